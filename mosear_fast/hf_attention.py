"""AR as a transformers attention implementation ("mosear_ar").

Registered with ``AttentionInterface`` (and, for the mask, ``AttentionMaskInterface`` with sdpa's
mask builder), so every model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (LLaMA, Qwen2,
Mistral families) runs ``ar_attention`` on the configured layers and exactly transformers' sdpa
path on the others. The function receives q/k/v after RoPE and the cache update, (B, H, L, D);
modality ids and the AR settings come from ``module._mosear_context`` (see ``context.py``).
"""

from __future__ import annotations

import torch

from .backend import is_exporting
from .ops import ar_attention

IMPLEMENTATION = "mosear_ar"
# Implementations a model may use before AR takes over (others rely on kernel-specific kwargs or masks).
REPLACEABLE_IMPLEMENTATIONS = (None, "sdpa", "eager", IMPLEMENTATION)


def register_attention() -> None:
    """Registers "mosear_ar" with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, mosear_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def mosear_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: AR on the context's layers, sdpa elsewhere."""
    context = getattr(module, "_mosear_context", None)
    layer = getattr(module, "layer_idx", None)
    ar_here = context is not None and context.ar is not None and (
        context.ar_layers is None or layer in context.ar_layers)
    if not ar_here:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout > 0:
        raise ValueError(f"attention dropout: AR layers run without dropout, got dropout={dropout} in layer "
                         f"{layer}; set config.attention_dropout=0 or call model.eval()")
    settings = context.ar
    key_ids = context.key_modality
    query_ids = context.current_query_modality()
    total = key_ids.shape[1]
    if key.shape[2] > total:  # a static cache: keys past the current position are empty slots
        key, value = key[:, :, :total], value[:, :, :total]
    elif key.shape[2] < total:  # a sliding cache keeps the most recent keys
        key_ids = key_ids[:, total - key.shape[2]:]
    if query_ids.shape != (query.shape[0], query.shape[2]):
        raise ValueError(f"modality ids: layer {layer} got {query.shape[2]} queries but the forward was "
                         f"given ids for {tuple(query_ids.shape)}")
    # a broadcast compare rather than torch.isin, which the ONNX exporter cannot translate
    selected = (query_ids[..., None] == query_ids.new_tensor(settings["query_modalities"])).any(-1)
    record = settings["record_shares"] and not is_exporting()  # a monitoring read-out, not part of a graph
    result = ar_attention(
        query, key, value, key_ids, num_modalities=settings["num_modalities"], balance=settings["balance"],
        target=settings["target"], strength=settings["strength"], threshold=settings["threshold"],
        modality_bias=settings["modality_bias"], causal=True, scale=scaling, query_mask=selected,
        balance_by=settings["balance_by"], return_masses=record, backend=settings["backend"],
        validate=False)  # the key ids were checked once at model entry: no host sync per layer
    if not record:
        return result.transpose(1, 2).contiguous(), None
    out, masses = result
    context.shares[layer] = _mean_shares(masses, key_ids, query_ids, selected, settings)
    return out.transpose(1, 2).contiguous(), None


def _mean_shares(masses, key_ids, query_ids, selected, settings):
    """Mean masses (M,) over heads and the reallocated queries (all real queries when none is), before
    and after reallocation."""
    from .kernels.ar_attention.torch_backend import reallocate_masses

    n_mod = settings["num_modalities"]
    batch, _, len_q, _ = masses.shape
    len_k = key_ids.shape[1]
    # Which modalities each query can see (bottom-right causal): counts of each modality up to it.
    one_hot = torch.nn.functional.one_hot(key_ids.clamp_min(0), n_mod) * (key_ids >= 0).unsqueeze(-1)
    seen = one_hot.cumsum(1)[:, len_k - len_q:] > 0 if len_q <= len_k else None  # [B, Lq, M]
    if seen is None:  # more queries than keys: the first Lq - Lk see nothing
        pad = torch.zeros(batch, len_q - len_k, n_mod, dtype=torch.bool, device=masses.device)
        seen = torch.cat([pad, one_hot.cumsum(1) > 0], dim=1)
    in_balance = torch.zeros(n_mod, dtype=torch.bool, device=masses.device)
    tau = torch.zeros(n_mod, dtype=torch.float32, device=masses.device)
    targets = settings["target"] or (1.0,) * len(settings["balance"])
    for m, t in zip(settings["balance"], targets, strict=True):
        in_balance[m], tau[m] = True, t
    after = reallocate_masses(masses, seen.unsqueeze(1), in_balance=in_balance, tau=tau,
                              strength=settings["strength"], threshold=settings["threshold"],
                              selected=selected.unsqueeze(1))
    real = query_ids >= 0
    weight = selected & real
    weight = torch.where(weight.any(), weight, real)  # no reallocated query: all real ones (no host sync)
    weight = weight.to(masses.dtype)[:, None, :, None]  # [B, 1, Lq, 1]
    denom = (weight.sum() * masses.shape[1]).clamp_min(1)
    return {"before": (masses * weight).sum((0, 1, 2)) / denom,
            "after": (after * weight).sum((0, 1, 2)) / denom}
