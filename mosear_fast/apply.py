"""``apply_mosear``: MoSE adapters and/or AR attention on a Hugging Face causal LM, in place.

Also the model-level readouts: ``aux_loss`` (MoSE regularizers of the last forward) and
``attention_shares`` (AR's per-modality attention mass of the last forward).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .ar_config import ARConfig
from .context import ensure_context, share_context
from .hf_attention import IMPLEMENTATION, REPLACEABLE_IMPLEMENTATIONS, register_attention
from .modality import DEFAULT_MODALITIES
from .mose_layer import MoSELinear


def apply_mosear(model, mose=None, ar: ARConfig | None = None, *, adapter_name: str = "default"):
    """Adds MoSE adapters (``mose``: a MoSEConfig) and/or AR attention (``ar``: an ARConfig) to
    ``model`` (a transformers causal LM or a PEFT model around one); returns the model.

    MoSE wraps the target linears (B = 0: outputs unchanged at first) and freezes every other
    parameter. AR switches the model to the "mosear_ar" attention implementation (sdpa on the layers
    AR leaves alone). Afterwards ``model(..., modality_ids=ids)`` and
    ``model.generate(..., modality_ids=ids)`` take ``(B, T)`` ids in [-1, M).
    """
    if mose is None and ar is None:
        raise ValueError("apply_mosear: got mose=None and ar=None; pass a MoSEConfig, an ARConfig or both")
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(hf_model, nn.Module):
        raise TypeError("model: expected a torch.nn.Module (a transformers model), got "
                        f"{type(model).__name__}")
    if ar is not None and not isinstance(ar, ARConfig):
        raise TypeError(f"ar: expected an ARConfig or None, got {type(ar).__name__}")
    if mose is not None:
        from .mose_config import MoSEConfig

        if not isinstance(mose, MoSEConfig):
            raise TypeError(f"mose: expected a MoSEConfig or None, got {type(mose).__name__}")
        modalities = tuple(mose.modalities)
    else:
        existing = getattr(hf_model, "_mosear_context", None)
        modalities = ar.modalities or (existing.modalities if existing else DEFAULT_MODALITIES)
    ar_settings = ar.resolve(modalities) if ar is not None else None  # checks before changing the model
    if ar is not None:
        ar_layers = _check_ar_model(hf_model, ar)
    if mose is not None:
        _check_targets(hf_model, mose)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(mose, hf_model, adapter_name=adapter_name)  # installs the context too
    context = ensure_context(hf_model, modalities)
    share_context(hf_model, context)
    if ar is not None:
        register_attention()
        for module in _attention_modules(hf_model):
            module._mosear_context = context
        hf_model.set_attn_implementation(IMPLEMENTATION)
        context.ar, context.ar_layers = ar_settings, ar_layers
    return model


def _check_targets(model, config) -> None:
    """A clear error when no ``nn.Linear`` matches ``target_modules`` (PEFT's own names its internals)."""
    targets = config.target_modules
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]

    def matches(name):
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith(f".{t}") for t in targets)

    if not any(matches(name) for name in linear_names):
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(f"MoSEConfig.target_modules: no nn.Linear of the model matches {targets!r}; its "
                         f"linear layers are named {leaves}")


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


def _check_ar_model(model, ar: ARConfig):
    """The AR layer set (None = all), after checking the model can run the "mosear_ar" attention."""
    config = getattr(model, "config", None)
    supports = getattr(model, "_supports_attention_backend", False) and callable(
        getattr(model, "set_attn_implementation", None))
    if config is None or not supports or not type(model)._can_set_attn_implementation():
        raise ValueError(f"model: {type(model).__name__} does not dispatch attention through transformers' "
                         "AttentionInterface, so AR cannot be installed; use a model that does (LLaMA, "
                         "Qwen2, Mistral families) or pass ar=None")
    current = getattr(config, "_attn_implementation", None)
    if current not in REPLACEABLE_IMPLEMENTATIONS:
        raise ValueError("model.config._attn_implementation: AR replaces 'sdpa' or 'eager' attention, got "
                         f"{current!r}; load the model with attn_implementation='sdpa' (or call "
                         "model.set_attn_implementation('sdpa')) before apply_mosear")
    layers = {m.layer_idx for m in _attention_modules(model)}
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no attention modules with a layer_idx; AR "
                         "needs a transformers decoder (LLaMA, Qwen2, Mistral families)")
    wanted = set(layers) if ar.layers is None else set(ar.layers)
    if not wanted <= layers:
        raise ValueError(f"ARConfig.layers: {sorted(wanted - layers)} are not attention layers of the model "
                         f"(it has layers {min(layers)}..{max(layers)})")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        sliding = sorted(i for i in wanted if i < len(layer_types) and layer_types[i] != "full_attention")
        if sliding:
            raise ValueError(f"ARConfig.layers: layers {sliding} use {layer_types[sliding[0]]!r}, which AR "
                             "does not implement; list only full-attention layers in ARConfig.layers")
    return None if ar.layers is None else frozenset(wanted)


def aux_loss(model) -> torch.Tensor:
    """MoSE regularizers of the last forward: ``lb_coef * L_lb + z_coef * L_z`` averaged over the
    adapted layers (0 when the last forward was not in training mode). Differentiable."""
    terms = []
    for module in model.modules():
        if isinstance(module, MoSELinear):
            adapter = module.active_mose_adapter()
            regs = adapter.last_regularizers if adapter is not None else None
            if regs is not None:
                terms.append(adapter.load_balance_coef * regs["load_balance"]
                             + adapter.z_loss_coef * regs["z_loss"])
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(terms).mean()


def attention_shares(model, *, reallocated: bool = False) -> dict[int, torch.Tensor]:
    """Per AR layer of the last forward: the mean attention mass per modality, (M,) float32, over
    heads and the queries AR acts on (``query_modalities``, not padding; all real queries if none).

    ``reallocated=False``: the pre-reallocation masses (what AR monitors); True: after reallocation.
    """
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    context = getattr(hf_model, "_mosear_context", None)
    if context is None or context.ar is None:
        raise ValueError("model: attention_shares needs a model prepared with apply_mosear(model, "
                         "ar=ARConfig(...))")
    if not context.ar["record_shares"]:
        raise ValueError("model: its ARConfig has record_shares=False; set it to True to read the shares")
    key = "after" if reallocated else "before"
    return {layer: shares[key] for layer, shares in sorted(context.shares.items())}
