"""``apply_mosear``: MoSE adapters and/or AR attention on a Hugging Face causal LM, in place.

Also the model-level readouts: ``aux_loss`` (MoSE regularizers of the last forward) and
``attention_shares`` (AR's per-modality attention mass of the last forward).
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from .ar_config import ARConfig
from .context import check_same_modalities, ensure_context, find_decoder, language_model_modules, share_context
from .hf_attention import (
    EAGER_IMPLEMENTATION,
    IMPLEMENTATION,
    IMPLEMENTATIONS,
    REPLACEABLE_IMPLEMENTATIONS,
    eager_attention_function,
    op_arguments,
    register_attention,
)
from .modality import DEFAULT_MODALITIES
from .mose_layer import MoSELinear


def apply_mosear(model, mose=None, ar: ARConfig | None = None, *, adapter_name: str = "default"):
    """Adds MoSE adapters (``mose``: a MoSEConfig) and/or AR attention (``ar``: an ARConfig) to
    ``model`` (a transformers causal LM, a vision/audio-language model, or a PEFT model around one);
    returns the model.

    MoSE wraps the target linears of the language model (B = 0: outputs unchanged at first; linears
    of vision or audio encoders and projectors are left alone, since modality ids are per token of
    the language model) and freezes every other parameter. A model is adapted once: a second call
    with ``mose`` is refused. AR switches the language model to the "mosear_ar" attention
    implementation (the model's own sdpa or eager attention on the layers AR leaves alone); a later
    call with ``ar`` replaces the AR settings. Everything AR cannot honour is refused here, naming
    the argument and the model: attention dropout, attention sinks, bidirectional or chunked
    layers, and sliding windows or logit softcapping where the installed ``ar_attention`` lacks them.

    Afterwards ``model(..., modality_ids=ids)`` and ``model.generate(..., modality_ids=ids)`` take
    ``(B, T)`` ids in [-1, M). Models whose config names placeholder tokens (``image_token_id``,
    ``video_token_index``, ``audio_token_index``, ...: Qwen2.5-Omni, Qwen2-VL, LLaVA, Gemma3, ...)
    get their ids from ``input_ids`` when none are passed: image and video placeholders are the
    "visual" modality, audio placeholders "audio" (see ``modality.placeholder_token_ids``).
    """
    if mose is None and ar is None:
        raise ValueError("apply_mosear: got mose=None and ar=None; pass a MoSEConfig, an ARConfig or both")
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(hf_model, nn.Module):
        raise TypeError("model: expected a torch.nn.Module (a transformers model), got "
                        f"{type(model).__name__}")
    if ar is not None and not isinstance(ar, ARConfig):
        raise TypeError(f"ar: expected an ARConfig or None, got {type(ar).__name__}")
    decoder = find_decoder(hf_model)
    if mose is not None:
        from .mose_config import MoSEConfig

        if not isinstance(mose, MoSEConfig):
            raise TypeError(f"mose: expected a MoSEConfig or None, got {type(mose).__name__}")
        _check_not_adapted(hf_model)
        modalities = tuple(mose.modalities)
    else:
        existing = getattr(hf_model, "_mosear_context", None)
        modalities = ar.modalities or (existing.modalities if existing else DEFAULT_MODALITIES)
    # every check before the model changes
    ar_settings = ar.resolve(modalities) if ar is not None else None
    check_same_modalities(getattr(hf_model, "_mosear_context", None), modalities)
    if ar is not None:
        ar_layers, model_attention = _check_ar_model(hf_model, decoder, ar)
    if mose is not None:
        _check_targets(hf_model, mose)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(mose, hf_model, adapter_name=adapter_name)  # installs the context too
    context = ensure_context(hf_model, modalities)
    share_context(hf_model, context)
    if ar is not None:
        register_attention()
        for module in _attention_modules(decoder):
            module._mosear_context = context
        context.model_attention = model_attention
        decoder.set_attn_implementation(EAGER_IMPLEMENTATION if model_attention == "eager" else IMPLEMENTATION)
        context.ar, context.ar_layers = ar_settings, ar_layers
    return model


def _check_not_adapted(model) -> None:
    adapted = [m for m in model.modules() if isinstance(m, MoSELinear)]
    if adapted:
        names = sorted({name for m in adapted for name in m.mose_adapter})
        raise ValueError(f"mose: {type(model).__name__} already has MoSE adapters ({names} on {len(adapted)} "
                         "linear layers); apply_mosear adds MoSE once. Start again from the base model to "
                         "change the adapter configuration; pass only ar=ARConfig(...) to change AR")


def _linear_matches(model, targets) -> list[str]:
    """Names of the ``nn.Linear`` modules matching ``target_modules`` (PEFT's rule: a regex string must
    match the full name, a list entry the name or its last components)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(targets, str):
        return [name for name in names if re.fullmatch(targets, name) is not None]
    return [name for name in names if any(name == t or name.endswith(f".{t}") for t in targets)]


def _check_targets(model, config) -> None:
    """A clear error when no ``nn.Linear`` of the language model matches ``target_modules`` (PEFT's own error
    names its internals). Matches in vision or audio encoders and projectors are left alone (the PEFT
    method skips them: their inputs are not tokens of the language model's sequence)."""
    targets = config.target_modules
    matched = _linear_matches(model, targets)
    modules = dict(model.named_modules())
    language = language_model_modules(model)
    if not any(id(modules[name]) in language for name in matched):
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, nn.Linear) and id(m) in language})
        outside = f" (only linears outside the language model match: {matched[:3]})" if matched else ""
        raise ValueError(f"MoSEConfig.target_modules: no nn.Linear of the language model matches {targets!r}"
                         f"{outside}; its linear layers are named {leaves}")


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


# Layer types AR implements (transformers' config.layer_types names).
AR_LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_ar_model(model, decoder, ar: ARConfig):
    """``(AR layer set or None for all, the attention of the other layers)`` after checking that the
    language model can run the "mosear_ar" attention and that AR honours everything its attention
    layers are given."""
    name = type(model).__name__
    config = getattr(decoder, "config", None)
    supports = getattr(decoder, "_supports_attention_backend", False) and callable(
        getattr(decoder, "set_attn_implementation", None))
    if config is None or not supports or not type(decoder)._can_set_attn_implementation():
        raise ValueError(f"model: {name} does not dispatch attention through transformers' "
                         "AttentionInterface, so AR cannot be installed; use a model that does (LLaMA, "
                         "Qwen2, Mistral, Gemma families) or pass ar=None")
    current = getattr(config, "_attn_implementation", None)
    if current not in REPLACEABLE_IMPLEMENTATIONS:
        raise ValueError("model.config._attn_implementation: AR replaces 'sdpa' or 'eager' attention, got "
                         f"{current!r}; load the model with attn_implementation='sdpa' (or call "
                         "model.set_attn_implementation('sdpa')) before apply_mosear")
    modules = {m.layer_idx: m for m in _attention_modules(decoder)}
    if not modules:
        raise ValueError(f"model: {name} has no attention modules with a layer_idx; AR needs a transformers "
                         "decoder (LLaMA, Qwen2, Mistral, Gemma families)")
    wanted = set(modules) if ar.layers is None else set(ar.layers)
    if not wanted <= set(modules):
        raise ValueError(f"ARConfig.layers: {sorted(wanted - set(modules))} are not attention layers of the model "
                         f"(it has layers {min(modules)}..{max(modules)})")
    if decoder is not model and "token_type_ids" in inspect.signature(type(model).forward).parameters:
        raise ValueError(f"token_type_ids: {name} gives the tokens of each image bidirectional attention when it is "
                         "called with token_type_ids (as its processor does), which AR's causal attention does not "
                         "reproduce; pass ar=None (MoSE alone works), or apply AR to a causal language model")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None)
    for problem in _ar_problems(name, {i: modules[i] for i in sorted(wanted)}, text_config, layer_types):
        raise ValueError(problem)
    needs_eager = current in ("eager", EAGER_IMPLEMENTATION) or any(
        getattr(m, "attn_logit_softcapping", None) is not None for i, m in modules.items() if i not in wanted)
    if current in IMPLEMENTATIONS:  # AR already installed: keep the attention the other layers had
        needs_eager = current == EAGER_IMPLEMENTATION
    if needs_eager:
        missing = sorted({type(m).__name__ for m in modules.values() if eager_attention_function(type(m)) is None})
        if missing:
            raise ValueError(f"model: the layers of {name} without AR need the model's own eager attention "
                             f"(logit softcapping or an eager default), but the modeling module of {missing} "
                             "has no eager_attention_forward; put AR on every layer (ARConfig(layers=None))")
    return (None if ar.layers is None else frozenset(wanted)), ("eager" if needs_eager else "sdpa")


def _ar_problems(name, modules, text_config, layer_types):
    """Messages for what the AR layers ``modules`` ({layer: attention module}) would be given and AR
    cannot honour."""

    def layers_where(predicate):
        return [i for i, m in modules.items() if predicate(i, m)]

    other = layers_where(lambda i, m: layer_types is not None and i < len(layer_types)
                         and layer_types[i] not in AR_LAYER_TYPES)
    if other:
        yield (f"ARConfig.layers: {name} layers {other} use {layer_types[other[0]]!r} attention, which AR does not "
               f"implement (it implements {AR_LAYER_TYPES}); list other layers in ARConfig.layers")
    bidirectional = layers_where(lambda i, m: getattr(m, "is_causal", True) is False)
    if bidirectional:
        yield (f"is_causal: {name} layers {bidirectional} attend bidirectionally (use_bidirectional_attention / "
               "is_causal=False), which AR's causal attention does not reproduce; list other layers in "
               "ARConfig.layers")
    dropout = layers_where(lambda i, m: float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0)
    if dropout:
        value = modules[dropout[0]].attention_dropout
        yield (f"attention_dropout: {name} layers {dropout} apply attention dropout ({value}) in training, which AR "
               "attention does not; set model.config.attention_dropout = 0 before building the model (or the "
               "attention modules' attention_dropout = 0) before apply_mosear")
    sinks = layers_where(lambda i, m: getattr(m, "sinks", None) is not None)
    if sinks:
        yield (f"s_aux: {name} layers {sinks} use attention sinks, which AR attention does not implement; list "
               "other layers in ARConfig.layers")
    for argument, op_name, value_of in (("sliding_window", "window", _layer_window),
                                        ("softcap", "softcap", _layer_softcap)):
        if op_name in op_arguments():
            continue
        using = {i: value_of(i, m, text_config, layer_types) for i, m in modules.items()}
        using = {i: v for i, v in using.items() if v is not None}
        if using:
            yield (f"{argument}: {name} layers {sorted(using)} use {argument}={next(iter(using.values()))}, which "
                   f"this version of ar_attention does not implement ({op_name}=...); list other layers in "
                   "ARConfig.layers")


def _layer_window(layer, module, text_config, layer_types):
    """The sliding window transformers passes this layer's attention (None: full attention)."""
    if hasattr(module, "sliding_window"):  # Qwen2/3, Gemma2/3: set per layer
        return module.sliding_window
    if layer_types is not None:
        sliding = layer < len(layer_types) and layer_types[layer] == "sliding_attention"
        return getattr(text_config, "sliding_window", None) if sliding else None
    return getattr(text_config, "sliding_window", None)  # Mistral, Mixtral, Phi3, Starcoder2: every layer


def _layer_softcap(layer, module, text_config, layer_types):
    return getattr(module, "attn_logit_softcapping", None)


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
