"""``ARConfig.calibrate``: per-layer, per-head AR targets measured on a model.

The model runs its ordinary attention (transformers' sdpa) under a temporary attention
implementation that also hands each AR layer's post-RoPE q, k, v to a recorder. The recorder asks
the public ``ar_attention`` op (strength 0: nothing moves) for the masses ``P_m`` of the selected
queries and, when balancing by contribution, for ``vbar_m`` (the op with a logit bias of -1e4 on
every other modality returns exactly modality m's own softmax-weighted mean of v). Per head it
averages the shares the config balances (``P_m``, or ``P_m * ||vbar_m||``, over the balance set)
over the selected queries that see every balance modality. Afterwards the model's attention
implementation and its AR settings are as they were.
"""

from __future__ import annotations

import torch

from .context import ensure_context
from .modality import DEFAULT_MODALITIES
from .ops import ar_attention

IMPLEMENTATION = "mosear_ar_calibrate"
_HIDDEN = -1.0e4  # logit bias that removes a modality from the softmax (exp underflows to 0)


def _ar_model(model):
    """The transformers model AR applies to: ``model`` itself or its outermost submodule that is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.modules():
        if callable(getattr(module, "set_attn_implementation", None)) and \
                getattr(module, "_supports_attention_backend", False):
            return module
    raise ValueError(f"model: {type(model).__name__} holds no transformers model that dispatches attention "
                     "through AttentionInterface (LLaMA, Qwen2, Mistral families); AR cannot be calibrated on it")


class _ShareRecorder:
    """Sums per head of the balance shares of selected queries, per layer."""

    def __init__(self, settings: dict, layers):
        self.settings, self.layers = settings, layers
        self.sums: dict[int, torch.Tensor] = {}  # [Hq, |S|] float64
        self.counts: dict[int, torch.Tensor] = {}  # [Hq]

    def add(self, layer, query, key, value, context, scaling) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        s = self.settings
        key_ids, query_ids = context.key_modality, context.current_query_modality()
        selected = (query_ids[..., None] == query_ids.new_tensor(s["query_modalities"])).any(-1)  # [B, Lq]
        common = dict(num_modalities=s["num_modalities"], balance=s["balance"], strength=0.0, causal=True,
                      scale=scaling, backend=s["backend"])
        _, masses = ar_attention(query, key, value, key_ids, query_mask=selected, return_masses=True, **common)
        amount = masses[..., list(s["balance"])].double()  # [B, Hq, Lq, |S|]
        valid = selected[:, None, :] & (amount > 0).all(-1)  # the query sees every balance modality
        if s["balance_by"] == "contribution":
            norms = []
            for m in s["balance"]:
                bias = [_HIDDEN] * s["num_modalities"]
                bias[m] = 0.0
                vbar = ar_attention(query, key, value, key_ids, modality_bias=bias, **common)  # [B, Hq, Lq, D]
                norms.append(vbar.double().norm(dim=-1))
            amount = amount * torch.stack(norms, -1)
        shares = amount / amount.sum(-1, keepdim=True).clamp_min(1e-300)
        weight = valid.unsqueeze(-1).double()
        self.sums[layer] = self.sums.get(layer, 0) + (shares * weight).sum((0, 2)).cpu()
        self.counts[layer] = self.counts.get(layer, 0) + valid.sum((0, 2)).double().cpu()

    def targets(self) -> dict[int, tuple]:
        out = {}
        for layer in sorted(self.sums):
            counts = self.counts[layer].unsqueeze(-1)  # [Hq, 1]
            n_balance = self.sums[layer].shape[-1]
            mean = torch.where(counts > 0, self.sums[layer] / counts.clamp_min(1), 1.0 / n_balance)
            mean = mean.clamp_min(1e-6)  # targets are positive
            mean = mean / mean.sum(-1, keepdim=True)
            out[layer] = tuple(tuple(row) for row in mean.tolist())
        return out


def _calibrating_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """transformers attention function: plain sdpa, recording the layer's shares on the way."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = getattr(module, "_mosear_calibration", None)
    if recorder is not None:
        recorder.add(module.layer_idx, query, key, value, module._mosear_context, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _calibrating_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@torch.no_grad()
def calibrated_layer_targets(config, model, batches) -> dict[int, tuple]:
    """{layer: per-head target (Hq rows of |S| floats)} of ``config``'s AR layers (see ``ARConfig.calibrate``)."""
    from .apply import _attention_modules, _check_ar_model
    from .context import find_decoder

    hf = _ar_model(model)
    decoder = find_decoder(hf)  # the language model, whose attention AR replaces
    existing = getattr(hf, "_mosear_context", None)
    modalities = existing.modalities if existing is not None else (config.modalities or DEFAULT_MODALITIES)
    settings = config.resolve(modalities)
    layers, _ = _check_ar_model(hf, decoder, config)
    context = ensure_context(hf, modalities)
    recorder = _ShareRecorder(settings, layers)
    attention = _attention_modules(decoder)
    previous = decoder.config._attn_implementation
    was_training = model.training
    _register()
    for module in attention:
        module._mosear_context, module._mosear_calibration = context, recorder
    try:
        decoder.set_attn_implementation(IMPLEMENTATION)
        model.eval()
        n_batches = 0
        for batch in batches:
            model(**batch)
            n_batches += 1
    finally:
        decoder.set_attn_implementation(previous)
        model.train(was_training)
        for module in attention:
            del module._mosear_calibration
    if n_batches == 0:
        raise ValueError("batches: expected at least one batch of model inputs to calibrate on, got none")
    return recorder.targets()


__all__ = ["calibrated_layer_targets"]
