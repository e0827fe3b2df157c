"""AR as a transformers attention implementation ("mosear_ar", "mosear_ar_eager").

Registered with ``AttentionInterface`` (and, for the masks, ``AttentionMaskInterface``), so every
model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` runs ``ar_attention`` on the configured
layers and exactly the model's own attention on the others: "mosear_ar" falls back to sdpa (with
sdpa's boolean masks), "mosear_ar_eager" to the model's own ``eager_attention_forward`` (with eager's
additive masks), which models with logit softcapping (Gemma2) or an eager default need. The function
receives q/k/v after RoPE and the cache update, (B, H, L, D); modality ids and the AR settings come
from ``module._mosear_context`` (see ``context.py``).

What an AR layer does with each argument transformers passes:

- ``scaling`` -> ``scale``; ``sliding_window`` -> ``window``; ``softcap`` -> ``softcap``;
  ``is_causal`` (else ``module.is_causal``) -> ``causal``.
- ``dropout``: AR has none; ``apply_mosear`` refuses AR on layers whose ``attention_dropout`` is not
  0, and a non-zero value reaching an AR layer raises.
- ``attention_mask``: AR masks padding through the key modality ids (-1) and applies causality and
  the window itself. Once per mask and forward, the mask is checked to be exactly that (one host
  read; skipped while tracing), so a mask AR cannot reproduce (packed sequences, bidirectional
  image blocks, a custom 4-D mask) raises instead of being ignored.
- read-outs and hints that do not change attention (``INERT_ARGUMENTS``) are ignored; any other
  argument raises, naming it.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from .backend import is_exporting
from .ops import ar_attention

IMPLEMENTATION = "mosear_ar"  # layers without AR run sdpa
EAGER_IMPLEMENTATION = "mosear_ar_eager"  # layers without AR run the model's own eager attention
IMPLEMENTATIONS = (IMPLEMENTATION, EAGER_IMPLEMENTATION)
# Implementations a model may use before AR takes over (others rely on kernel-specific kwargs or masks).
REPLACEABLE_IMPLEMENTATIONS = (None, "sdpa", "eager", *IMPLEMENTATIONS)
# Arguments of transformers' attention calls that do not change what attention computes: read-outs, and
# flash-attention packing hints whose effect reaches AR through the mask (which is checked).
INERT_ARGUMENTS = frozenset({
    "position_ids", "use_cache", "output_attentions", "output_hidden_states", "output_router_logits",
    "return_dict", "num_items_in_batch", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "seq_idx",
})
# Hidden entries of additive (float) masks: eager uses the dtype's minimum, users often -inf.
_HIDDEN_BELOW = -1e4
_MASK_CHECK_ROWS = 256  # query rows per step of the mask check (bounds its temporaries)


def register_attention() -> None:
    """Registers "mosear_ar" and "mosear_ar_eager" with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, mosear_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(EAGER_IMPLEMENTATION, mosear_attention_forward)
    AttentionMaskInterface.register(EAGER_IMPLEMENTATION, eager_mask)


@functools.cache
def op_arguments() -> frozenset:
    """The optional ``ar_attention`` arguments this version of the op has (of "window", "softcap")."""
    return frozenset({"window", "softcap"} & set(inspect.signature(ar_attention).parameters))


def eager_attention_function(module_class):
    """The model's own eager attention (``eager_attention_forward`` of its modeling module) or None."""
    function = getattr(importlib.import_module(module_class.__module__), "eager_attention_forward", None)
    return function if callable(function) else None


def _model_attention(module, context):
    if context is not None and context.model_attention == "eager":
        return eager_attention_function(type(module))
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def mosear_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: AR on the context's layers, the model's attention elsewhere."""
    context = getattr(module, "_mosear_context", None)
    layer = getattr(module, "layer_idx", None)
    ar_here = context is not None and context.ar is not None and (
        context.ar_layers is None or layer in context.ar_layers)
    if not ar_here:
        return _model_attention(module, context)(module, query, key, value, attention_mask, **kwargs)
    where = f"layer {layer} of {context.model_name}"
    dropout = kwargs.pop("dropout", 0.0)
    scaling = kwargs.pop("scaling", None)
    window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    is_causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    unknown = sorted(name for name, v in kwargs.items() if name not in INERT_ARGUMENTS and v is not None)
    if unknown:
        raise ValueError(f"attention arguments: {where} passed {unknown}, which AR attention does not implement; "
                         "leave this layer without AR (ARConfig(layers=...))")
    if dropout:
        raise ValueError(f"dropout: AR layers run without attention dropout, got dropout={dropout} in {where}; "
                         "set the model's attention_dropout to 0 before apply_mosear")
    extra = {}
    for name, given in (("window", window), ("softcap", softcap)):
        if given is not None:
            if name not in op_arguments():
                raise ValueError(f"{'sliding_window' if name == 'window' else name}: {where} needs {name}={given}, "
                                 "which this version of ar_attention does not implement")
            extra[name] = given
    if window is not None and not causal:
        raise ValueError(f"sliding_window: {where} asks for a window without causal masking, which AR does not "
                         "implement")
    settings = context.ar
    key_ids = context.key_modality
    query_ids = context.current_query_modality()
    total = key_ids.shape[1]
    given_mask = attention_mask  # layers of one type share it: checked once per forward
    if attention_mask is not None and attention_mask.shape[-1] >= key.shape[2]:
        attention_mask = attention_mask[..., :key.shape[2]]  # the columns of the keys given
    if key.shape[2] > total:  # a static cache: keys past the current position are empty slots
        key, value = key[:, :, :total], value[:, :, :total]
        attention_mask = attention_mask[..., :total] if attention_mask is not None else None
    elif key.shape[2] < total:  # a sliding cache keeps the most recent keys
        key_ids = key_ids[:, total - key.shape[2]:]
    if query_ids.shape != (query.shape[0], query.shape[2]):
        raise ValueError(f"modality ids: {where} got {query.shape[2]} queries but the forward was "
                         f"given ids for {tuple(query_ids.shape)}")
    _check_mask_once(context, where, given_mask, attention_mask, key_ids, query_ids, window=window, causal=causal)
    # a broadcast compare rather than torch.isin, which the ONNX exporter cannot translate
    selected = (query_ids[..., None] == query_ids.new_tensor(settings["query_modalities"])).any(-1)
    record = settings["record_shares"] and not is_exporting()  # a monitoring read-out, not part of a graph
    result = ar_attention(
        query, key, value, key_ids, num_modalities=settings["num_modalities"], balance=settings["balance"],
        target=settings["target"], strength=settings["strength"], threshold=settings["threshold"],
        modality_bias=settings["modality_bias"], causal=causal, scale=scaling, query_mask=selected,
        balance_by=settings["balance_by"], return_masses=record, backend=settings["backend"],
        validate=False, **extra)  # the key ids were checked once at model entry: no host sync per layer
    if not record:
        return result.transpose(1, 2).contiguous(), None
    out, masses = result
    visible = _visible_modalities(key_ids, query.shape[2], settings["num_modalities"], window=window, causal=causal)
    context.shares[layer] = _mean_shares(masses, visible, query_ids, selected, settings)
    return out.transpose(1, 2).contiguous(), None


# -------------------------------------------------------------------------------------------------
# The mask check
# -------------------------------------------------------------------------------------------------


def _tracing() -> bool:
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return is_exporting() or torch.compiler.is_compiling() or capturing


def _check_mask_once(context, where, given_mask, attention_mask, key_ids, query_ids, *, window, causal) -> None:
    """Raises unless ``attention_mask`` (``given_mask`` cut to the keys) shows exactly the keys AR attends:
    causal (bottom-right), within ``window``, not padding (key id -1); rows of padding queries are not
    compared. Done once per given mask object, window and causality in a forward."""
    if _tracing():
        return
    for seen in context.checked_masks:
        if seen[0] is given_mask and seen[1:] == (window, causal):
            return
    mismatch = _mask_mismatch(attention_mask, key_ids, query_ids >= 0, window=window, causal=causal)
    if mismatch:
        window_text = f" within a sliding window of {window}" if window is not None else ""
        raise ValueError(
            f"attention_mask: {where} was given a mask that AR attention cannot reproduce: {mismatch} query-key "
            f"pairs differ from {'causal' if causal else 'full'} attention{window_text} over the keys not marked "
            "as padding. AR applies causal masking, the model's sliding window and key padding (attention_mask "
            "0, or modality id -1) and nothing else; this mask has more, e.g. packed sequences (position_ids "
            "that restart, without attention_mask), bidirectional attention among image tokens "
            "(token_type_ids), a custom 4-D mask, or modality id -1 on tokens the mask does not pad. Pass a "
            "2-D padding mask, or leave these layers without AR (ARConfig(layers=...))")
    context.checked_masks.append((given_mask, window, causal))


def _mask_mismatch(attention_mask, key_ids, real_query, *, window, causal) -> int:
    """Number of (head, real query, key) entries where the mask and AR's visibility differ."""
    batch, len_k = key_ids.shape
    len_q = real_query.shape[1]
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-2] != len_q or attention_mask.shape[-1] != len_k \
                or attention_mask.shape[0] not in (1, batch):
            raise ValueError(f"attention_mask: expected a (B, 1 or H, {len_q}, {len_k}) mask for {len_q} queries "
                             f"over {len_k} keys, got {tuple(attention_mask.shape)}")
    key_pos = torch.arange(len_k, device=key_ids.device)
    real_key = (key_ids >= 0)[:, None, None, :]  # [B, 1, 1, Lk]
    count = torch.zeros((), dtype=torch.long, device=key_ids.device)
    for start in range(0, len_q, _MASK_CHECK_ROWS):
        rows = slice(start, min(start + _MASK_CHECK_ROWS, len_q))
        query_pos = torch.arange(rows.start, rows.stop, device=key_ids.device)[:, None] + len_k - len_q  # [r, 1]
        in_range = key_pos <= query_pos if causal else torch.ones(  # [r, Lk]
            rows.stop - rows.start, len_k, dtype=torch.bool, device=key_ids.device)
        ar_sees = in_range & ((query_pos - key_pos) < window) if window is not None else in_range
        ar_sees = ar_sees & real_key  # [B, 1, r, Lk]
        if attention_mask is None:  # the model attends every in-range key (no padding, no window)
            model_sees, odd = in_range, None
        else:
            block = attention_mask[:, :, rows]
            if block.dtype == torch.bool:
                model_sees, odd = block, None
            else:
                model_sees = block == 0
                odd = ~model_sees & ~(block <= _HIDDEN_BELOW)  # an additive bias AR cannot apply
        differ = ar_sees != model_sees if odd is None else (ar_sees != model_sees) | odd
        count += (differ & real_query[:, None, rows, None]).sum()
    return int(count)


# -------------------------------------------------------------------------------------------------
# Attention shares
# -------------------------------------------------------------------------------------------------


def _visible_modalities(key_ids, len_q, n_mod, *, window, causal):
    """(B, Lq, M) bool: which modalities each query has a visible key of (bottom-right causal, window)."""
    batch, len_k = key_ids.shape
    one_hot = torch.nn.functional.one_hot(key_ids.clamp_min(0), n_mod) * (key_ids >= 0).unsqueeze(-1)
    before = torch.cat([one_hot.new_zeros(batch, 1, n_mod), one_hot.cumsum(1)], dim=1)  # [B, Lk+1, M] keys < t
    query_pos = torch.arange(len_q, device=key_ids.device) + len_k - len_q  # [Lq]
    if causal:
        high = (query_pos + 1).clamp(0, len_k)
        low = (query_pos - window + 1).clamp(0, len_k) if window is not None else torch.zeros_like(query_pos)
    else:
        high, low = torch.full_like(query_pos, len_k), torch.zeros_like(query_pos)
    low = torch.minimum(low, high)
    return (before[:, high] - before[:, low]) > 0


def _mean_shares(masses, visible, query_ids, selected, settings):
    """Mean masses (M,) over heads and the reallocated queries (all real queries when none is), before
    and after reallocation."""
    from .kernels.ar_attention.torch_backend import reallocate_masses

    n_mod = settings["num_modalities"]
    in_balance = torch.zeros(n_mod, dtype=torch.bool, device=masses.device)
    tau = torch.zeros(n_mod, dtype=torch.float32, device=masses.device)
    targets = settings["target"] or (1.0,) * len(settings["balance"])
    for m, t in zip(settings["balance"], targets, strict=True):
        in_balance[m], tau[m] = True, t
    after = reallocate_masses(masses, visible.unsqueeze(1), in_balance=in_balance, tau=tau,
                              strength=settings["strength"], threshold=settings["threshold"],
                              selected=selected.unsqueeze(1))
    real = query_ids >= 0
    weight = selected & real
    weight = torch.where(weight.any(), weight, real)  # no reallocated query: all real ones (no host sync)
    weight = weight.to(masses.dtype)[:, None, :, None]  # [B, 1, Lq, 1]
    denom = (weight.sum() * masses.shape[1]).clamp_min(1)
    return {"before": (masses * weight).sum((0, 1, 2)) / denom,
            "after": (after * weight).sum((0, 1, 2)) / denom}
