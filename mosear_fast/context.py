"""How modality ids reach every MoSE layer and AR attention layer of a Hugging Face model.

One ``ModalityContext`` per model, shared by reference by the model given to ``apply_mosear`` (the
"top" model), its decoder (the language model that runs the layers), its ``MoSELinear`` layers and
its attention modules (attribute ``_mosear_context``, so a deep copy of the model gets its own
context). The path:

1. ``model(..., modality_ids=ids)``: a forward pre-hook on the top model pops ``modality_ids`` (so
   neither the model code nor a vision or audio encoder sees them) and notes them with the call's
   2-D attention mask and its ``input_ids``. A pre-hook on the decoder reads the input length, the
   cache length and the padding, and stores the key modality ids of the whole sequence (cache + new
   tokens) in the context, padding as -1. The ids stay in the context after the forward: gradient
   checkpointing reruns the layers during backward, and a later cached call continues from them.
2. ``model.generate(..., modality_ids=ids)``: a per-instance ``generate`` pops ``ids`` (generate
   rejects unknown kwargs) and keeps them, with the prompt's 2-D attention mask, in the context while
   the original ``generate`` runs; each step's pre-hook extends them with text ids (0) for the
   generated tokens and slices them to the cache length (chunked prefill), repeating them for
   num_return_sequences / beams.
3. ``MoSELinear`` reads the ids of the current tokens (the last ``q_len`` key ids); the AR
   attention function reads the key ids and the query ids via ``module._mosear_context``.

Where the ids come from (the first that applies): the ``modality_ids`` of the call (the decoder's
own, else the top model's); those given to ``generate``; the placeholder tokens of ``input_ids`` for
models whose config names them (``context.placeholder_tokens``, filled by ``apply_mosear`` from
e.g. ``audio_token_index`` / ``image_token_id``); text (0) for every token. Ids may cover the whole
sequence (B, cache + new), or, with a cache, only the new tokens (B, new): the cached part then
comes from the previous forward.

Where the padding comes from (the first that applies): a 2-D attention mask reaching the decoder;
the 2-D mask of the top model's call (composite models hand their language model prepared masks);
generate's prompt mask extended with ones (static caches hand the model prepared 4-D masks); the
last row of a prepared 4-D full-attention mask (a user's 4-D mask, or the ``"full_attention"``
entry of a dict of masks). Keys hidden there get id -1 whatever id they were given.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from .modality import check_modality_ids, modality_ids_from_placeholders, placeholder_token_ids

TEXT_ID = 0  # generated tokens and tokens without ids are modality 0 (text by convention)


@dataclass
class _Call:
    """What the top model's forward was given, for the decoder's pre-hook."""

    modality_ids: torch.Tensor | None
    placeholder_ids: torch.Tensor | None  # ids implied by the placeholder tokens of input_ids
    padding_mask: torch.Tensor | None  # the call's 2-D attention mask


class ModalityContext:
    """Per-model modality state: the config-level names and AR settings, and the current forward's ids."""

    def __init__(self, modalities):
        self.modalities = tuple(modalities)
        self.num_modalities = len(self.modalities)
        self.ar: dict | None = None  # resolved ARConfig (see ARConfig.resolve) or None
        self.ar_layers: frozenset | None = None  # None = every layer
        self.model_attention: str = "sdpa"  # what the layers without AR run ("sdpa" or "eager")
        self.model_name: str = ""  # for messages
        self.placeholder_tokens: dict[int, tuple[int, ...]] = {}  # modality id -> placeholder token ids
        self.generation_ids: torch.Tensor | None = None  # prompt ids while generate runs
        self.generation_mask: torch.Tensor | None = None  # prompt's 2-D attention mask while generate runs
        self.call: _Call | None = None  # set by the top model's pre-hook, taken by the decoder's
        self.key_modality: torch.Tensor | None = None  # (B, cache + new) of the latest forward
        self.query_modality: torch.Tensor | None = None  # (B, new)
        # Counts forwards, so work done once per forward (dynamic-weight updates) is not repeated when
        # gradient checkpointing recomputes the layers during backward. Not counted under torch.compile:
        # a compiled graph would guard on the value and recompile every step; there the recompute is the
        # compiler's (AOTAutograd reruns the ops, not the Python side effects).
        self.forward_count = 0
        self.shares: dict[int, dict[str, torch.Tensor]] = {}
        self.checked_masks: list = []  # attention masks the AR layers have checked in this forward

    # ---------------------------------------------------------------------------------------------

    def begin_forward(self, modality_ids, *, batch: int, q_len: int, past: int, visible, device,
                      checked: bool = False) -> None:
        """Stores the key ids of this forward. ``visible``: (B, past + q_len) bool, False at padding
        keys, or None (no padding). ``checked``: the ids are known to be valid (derived here)."""
        total = past + q_len
        if modality_ids is None and self.generation_ids is not None:
            key = _fit_length(_repeat_batch(self.generation_ids, batch), total)
        elif modality_ids is not None:
            ids = modality_ids.long() if checked else check_modality_ids(
                modality_ids, batch=batch, num_modalities=self.num_modalities)
            if ids.shape[1] == total:
                key = ids
            elif past > 0 and ids.shape[1] == q_len:
                key = torch.cat([self._cached_ids(batch, past).to(ids.device), ids], dim=1)
            else:
                also = f", or (B, {q_len}) for the new tokens only" if past > 0 else ""
                raise ValueError(f"modality_ids: expected shape (B={batch}, {total}) covering the whole "
                                 f"sequence ({past} cached + {q_len} new tokens){also}; got "
                                 f"{tuple(ids.shape)}")
        else:
            new = torch.full((batch, q_len), TEXT_ID, dtype=torch.long, device=device)
            key = new if past == 0 else torch.cat([self._cached_ids(batch, past).to(device), new], dim=1)
        key = key.to(device)
        if visible is not None:
            key = key.masked_fill(~visible.to(key.device), -1)
        self.key_modality = key
        self.query_modality = key[:, key.shape[1] - q_len:]
        if not torch.compiler.is_compiling():  # a compiled graph would pin the count (a recompile per step)
            self.forward_count += 1
        self.shares = {}
        self.checked_masks = []

    def _cached_ids(self, batch, past):
        cached = self.key_modality  # the previous forward's (this one has not stored its own yet)
        if cached is None or tuple(cached.shape) != (batch, past):
            raise ValueError(f"modality_ids: the cache holds {past} tokens whose modality ids are not known "
                             f"from the previous forward; pass modality_ids of shape (B={batch}, {past} + "
                             "new tokens) covering the whole sequence")
        return cached

    # ---------------------------------------------------------------------------------------------

    def current_query_modality(self) -> torch.Tensor:
        if self.query_modality is None:
            raise ValueError("modality ids: a MoSE/AR layer ran before any forward of the prepared model; "
                             "call the model (or its decoder) itself, with modality_ids=...")
        return self.query_modality

    def query_modality_for(self, shape) -> torch.Tensor:
        ids = self.current_query_modality()
        if tuple(ids.shape) != tuple(shape):
            raise ValueError(f"modality ids: the layer's input has tokens of shape {tuple(shape)} but the "
                             f"model's forward was given {tuple(ids.shape)}; modality_ids must match the "
                             "model input (B, T)")
        return ids

    def placeholder_ids(self, input_ids) -> torch.Tensor | None:
        """Ids implied by the placeholder tokens of ``input_ids`` (None without placeholders or input_ids)."""
        if not self.placeholder_tokens or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return None
        return modality_ids_from_placeholders(input_ids, self.placeholder_tokens)


def _repeat_batch(ids, batch):
    if ids.shape[0] == batch:
        return ids
    if batch % ids.shape[0] != 0:
        raise ValueError(f"modality_ids: {ids.shape[0]} rows cannot be expanded to the batch of {batch}")
    return ids.repeat_interleave(batch // ids.shape[0], dim=0)  # generate's expansion order


def _fit_length(ids, total, fill=TEXT_ID):
    """Prompt ids (or a prompt mask) cut or extended with ``fill`` to ``total`` positions."""
    if ids.shape[1] >= total:
        return ids[:, :total]
    extra = torch.full((ids.shape[0], total - ids.shape[1]), fill, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, extra], dim=1)


def _is_2d_mask(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


def visible_keys(attention_mask, call_mask, generation_mask, *, batch: int, total: int):
    """(B, total) bool, False at padding keys, or None when nothing is padding. Sources in the order
    of the module docstring."""
    if _is_2d_mask(attention_mask):
        return _check_2d(attention_mask, batch, total) != 0
    if _is_2d_mask(call_mask) and tuple(call_mask.shape) == (batch, total):
        return call_mask != 0
    if generation_mask is not None:
        return _fit_length(_repeat_batch(generation_mask, batch), total, fill=1) != 0
    if isinstance(attention_mask, dict):
        if "full_attention" not in attention_mask:
            raise ValueError(f"attention_mask: a dict of prepared masks without a 'full_attention' entry (keys "
                             f"{sorted(attention_mask)}) does not show which keys are padding; pass the 2-D "
                             f"padding mask (B={batch}, {total}) instead")
        attention_mask = attention_mask["full_attention"]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        if attention_mask.shape[-1] < total or attention_mask.shape[0] not in (1, batch):
            raise ValueError(f"attention_mask: a 4-D mask of shape {tuple(attention_mask.shape)} cannot mark the "
                             f"padding of (B={batch}, {total}) cached + new tokens; pass the 2-D padding mask "
                             "or a (B, 1, new, cached + new) full-attention mask")
        # A full causal mask: its last query sees every key that is not padding.
        last_row = attention_mask[:, 0, -1, :total]
        visible = last_row if last_row.dtype == torch.bool else last_row == 0
        return visible.expand(batch, total)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a tensor, a dict of tensors or None, got "
                        f"{type(attention_mask).__name__}")
    return None


def _check_2d(mask, batch, total):
    if tuple(mask.shape) != (batch, total):
        raise ValueError(f"attention_mask: expected shape {(batch, total)} (B, cached + new tokens), "
                         f"got {tuple(mask.shape)}")
    return mask


# -------------------------------------------------------------------------------------------------
# Installation on a model
# -------------------------------------------------------------------------------------------------


def find_decoder(model):
    """The module whose forward takes input_ids / inputs_embeds and runs the layers."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def language_model_modules(model) -> set[int]:
    """ids of the modules whose inputs are tokens of the language model's sequence: the decoder's and the
    output head (not a vision or audio encoder's, nor a projector's)."""
    decoder = find_decoder(model)
    ids = {id(m) for m in decoder.modules()}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if isinstance(head, torch.nn.Module):
        ids |= {id(m) for m in head.modules()}
    return ids


def _input_ids(args, kwargs):
    inputs = kwargs.get("input_ids", args[0] if args else None)
    return inputs if isinstance(inputs, torch.Tensor) else None


def _top_pre_hook(module, args, kwargs):
    context = module._mosear_context
    modality_ids = kwargs.pop("modality_ids", None)
    mask = kwargs.get("attention_mask")
    wanted = modality_ids is None and context.generation_ids is None  # ids given to generate come first
    placeholders = context.placeholder_ids(_input_ids(args, kwargs)) if wanted else None
    context.call = _Call(modality_ids, placeholders, mask if _is_2d_mask(mask) else None)
    return args, kwargs


def _top_post_hook(module, args, kwargs, output):
    module._mosear_context.call = None  # also after an error: no stale ids for a later direct decoder call


def _decoder_pre_hook(module, args, kwargs):
    context = module._mosear_context
    call, context.call = context.call or _Call(None, None, None), None
    modality_ids = kwargs.pop("modality_ids", None)
    if modality_ids is None:
        modality_ids = call.modality_ids
    inputs = _input_ids(args, kwargs)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("input_ids / inputs_embeds: the model needs one of them to size modality_ids")
    derived = False
    if modality_ids is None and context.generation_ids is None:
        modality_ids = call.placeholder_ids
        if modality_ids is None:
            modality_ids = context.placeholder_ids(_input_ids(args, kwargs))
        derived = modality_ids is not None
    if torch.compiler.is_compiling() and module.training:
        _refuse_compiled_checkpointing(module)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    batch, q_len = inputs.shape[0], inputs.shape[1]
    if isinstance(past, torch.Tensor):  # a static cache counts its filled slots on the device
        past = _static_cache_length(past, q_len, kwargs.get("attention_mask"), call.padding_mask)
    visible = visible_keys(kwargs.get("attention_mask"), call.padding_mask, context.generation_mask,
                           batch=batch, total=past + q_len)
    context.begin_forward(modality_ids, batch=batch, q_len=q_len, past=past, visible=visible,
                          device=inputs.device, checked=derived)
    return args, kwargs


def _refuse_compiled_checkpointing(decoder) -> None:
    """MoSE layers keep their regularizers and dynamic-weight state as Python side effects of the forward,
    which torch.compile cannot trace inside a checkpointed layer (a higher-order op without side effects)."""
    if any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules()):
        raise ValueError("gradient_checkpointing: a MoSE model trained under torch.compile runs without gradient "
                         "checkpointing (the adapters record their regularizers and dynamic weights as side effects, "
                         "which a compiled checkpointed layer cannot hold); call "
                         "model.gradient_checkpointing_disable() or train eagerly")


def _static_cache_length(counter: torch.Tensor, q_len: int, attention_mask, call_mask) -> int:
    """The filled length of a static cache, whose counter is a device tensor. Eager: read on the host
    (``int()``; of a traced size it would pin the cache length of an exported graph). Under
    torch.compile, from the 2-D padding mask (cached + new tokens) when the call has one: a size the
    graph knows, no data-dependent value; else the counter, which the compiler traces as a symbolic
    int (generate's compiled steps, which get prepared 4-D masks)."""
    if torch.compiler.is_compiling():
        for mask in (attention_mask, call_mask):
            if _is_2d_mask(mask):
                return mask.shape[1] - q_len
    return int(counter)


def _generate_with_modality_ids(self, *args, modality_ids=None, **kwargs):
    """``generate`` that accepts ``modality_ids`` (B, prompt length) for the prompt, and keeps the
    prompt's 2-D attention mask for the steps that get prepared 4-D masks."""
    generate = type(self).generate
    context = self._mosear_context
    prompt = kwargs.get("inputs_embeds")
    if prompt is None:
        prompt = kwargs.get("input_ids", args[0] if args else None)
    ids = None
    if modality_ids is not None:
        if prompt is None:
            raise ValueError("modality_ids: generate needs input_ids or inputs_embeds for the prompt they "
                             "describe")
        ids = check_modality_ids(modality_ids, batch=prompt.shape[0], num_modalities=context.num_modalities)
        if ids.shape[1] != prompt.shape[1]:
            raise ValueError(f"modality_ids: expected shape (B={prompt.shape[0]}, {prompt.shape[1]}) like the "
                             f"prompt, got {tuple(ids.shape)}")
    mask = kwargs.get("attention_mask")
    previous = context.generation_ids, context.generation_mask
    context.generation_ids = ids
    context.generation_mask = mask if _is_2d_mask(mask) else None
    try:
        return generate(self, *args, **kwargs)
    finally:
        context.generation_ids, context.generation_mask = previous


def check_same_modalities(context, modalities) -> None:
    if context is not None and context.modalities != tuple(modalities):
        raise ValueError(f"modalities: the model was prepared with {context.modalities}, got "
                         f"{tuple(modalities)}; use the same modalities in MoSEConfig and ARConfig")


def ensure_context(model, modalities) -> ModalityContext:
    """The model's context (created with its hooks on first use); modalities must agree."""
    context = getattr(model, "_mosear_context", None)
    if context is not None:
        check_same_modalities(context, modalities)
        return context
    context = ModalityContext(modalities)
    context.model_name = type(model).__name__
    context.placeholder_tokens = placeholder_token_ids(getattr(model, "config", None), context.modalities)
    model._mosear_context = context
    decoder = find_decoder(model)
    decoder._mosear_context = context
    decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True)
    if decoder is not model:
        model.register_forward_pre_hook(_top_pre_hook, with_kwargs=True)
        model.register_forward_hook(_top_post_hook, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        # Bound to this instance (a deep copy rebinds it to the copy).
        model.generate = types.MethodType(_generate_with_modality_ids, model)
    return context


def share_context(model, context) -> None:
    """Point every MoSE layer of the model at ``context``; new layers take the model's train/eval mode
    (they are created in training mode, which would update dynamic weights in an eval model)."""
    from .mose_layer import MoSELinear

    for module in model.modules():
        if isinstance(module, MoSELinear):
            module._mosear_context = context
            module.train(model.training)
