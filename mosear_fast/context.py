"""How modality ids reach every MoSE layer and AR attention layer of a Hugging Face model.

One ``ModalityContext`` per model, shared by reference by the top model, its decoder, its
``MoSELinear`` layers and its attention modules (attribute ``_mosear_context``, so a deep copy of
the model gets its own context). The path:

1. ``model(..., modality_ids=ids)``: the top model's forward passes unknown kwargs down to the
   decoder (e.g. ``LlamaModel``); a forward pre-hook on the decoder pops ``modality_ids`` (so the
   model code never sees it), reads the input length, the cache length and the attention mask, and
   stores the key modality ids of the whole sequence (cache + new tokens) in the context, padding
   (attention mask 0) as -1. The ids stay in the context after the forward: gradient
   checkpointing reruns the layers during backward, and a later cached call continues from them.
2. ``model.generate(..., modality_ids=ids)``: a per-instance ``generate`` pops ``ids`` (generate
   rejects unknown kwargs) and keeps them in the context while the original ``generate`` runs;
   each step's pre-hook extends them with text ids (0) for the generated tokens and slices them
   to the cache length (chunked prefill), repeating them for num_return_sequences / beams.
3. ``MoSELinear`` reads the ids of the current tokens (the last ``q_len`` key ids); the AR
   attention function reads the key ids and the query ids via ``module._mosear_context``.

Ids may cover the whole sequence (B, cache + new), or, with a cache, only the new tokens (B, new):
the cached part then comes from the previous forward. Without ids, new tokens are text (0).
"""

from __future__ import annotations

import types

import torch

from .modality import check_modality_ids

TEXT_ID = 0  # generated tokens and tokens without ids are modality 0 (text by convention)


class ModalityContext:
    """Per-model modality state: the config-level names and AR settings, and the current forward's ids."""

    def __init__(self, modalities):
        self.modalities = tuple(modalities)
        self.num_modalities = len(self.modalities)
        self.ar: dict | None = None  # resolved ARConfig (see ARConfig.resolve) or None
        self.ar_layers: frozenset | None = None  # None = every layer
        self.generation_ids: torch.Tensor | None = None  # prompt ids while generate runs
        self.key_modality: torch.Tensor | None = None  # (B, cache + new) of the latest forward
        self.query_modality: torch.Tensor | None = None  # (B, new)
        # Counts forwards, so work done once per forward (dynamic-weight updates) is not repeated when
        # gradient checkpointing recomputes the layers during backward.
        self.forward_count = 0
        self.shares: dict[int, dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------------------------

    def begin_forward(self, modality_ids, *, batch: int, q_len: int, past: int, attention_mask,
                      device) -> None:
        total = past + q_len
        if modality_ids is None and self.generation_ids is not None:
            key = _fit_length(_repeat_batch(self.generation_ids, batch), total)
        elif modality_ids is not None:
            ids = check_modality_ids(modality_ids, batch=batch, num_modalities=self.num_modalities)
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
        key = _mark_padding(key.to(device), attention_mask, total)
        self.key_modality = key
        self.query_modality = key[:, key.shape[1] - q_len:]
        self.forward_count += 1
        self.shares = {}

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


def _repeat_batch(ids, batch):
    if ids.shape[0] == batch:
        return ids
    if batch % ids.shape[0] != 0:
        raise ValueError(f"modality_ids: {ids.shape[0]} rows cannot be expanded to the batch of {batch}")
    return ids.repeat_interleave(batch // ids.shape[0], dim=0)  # generate's expansion order


def _fit_length(ids, total):
    """Prompt ids cut or extended with text ids to ``total`` positions."""
    if ids.shape[1] >= total:
        return ids[:, :total]
    extra = torch.full((ids.shape[0], total - ids.shape[1]), TEXT_ID, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, extra], dim=1)


def _mark_padding(key, attention_mask, total):
    """Key ids with -1 where the attention mask hides a key (2-D padding mask or a 4-D mask's last row)."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor):
        return key
    if attention_mask.dim() == 2:
        if attention_mask.shape != key.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(key.shape)} (B, cached + new tokens), "
                             f"got {tuple(attention_mask.shape)}")
        return key.masked_fill(attention_mask.to(key.device) == 0, -1)
    if attention_mask.dim() == 4 and attention_mask.shape[-1] >= total:
        # A prepared mask (compilable caches): the last query sees every non-padding key.
        last_row = attention_mask[:, 0, -1, :total]
        visible = last_row if last_row.dtype == torch.bool else last_row == 0
        return key.masked_fill(~visible.to(key.device), -1)
    return key


# -------------------------------------------------------------------------------------------------
# Installation on a model
# -------------------------------------------------------------------------------------------------


def find_decoder(model):
    """The module whose forward takes input_ids / inputs_embeds and runs the layers."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def _decoder_pre_hook(module, args, kwargs):
    context = module._mosear_context
    modality_ids = kwargs.pop("modality_ids", None)
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("input_ids / inputs_embeds: the model needs one of them to size modality_ids")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    if isinstance(past, torch.Tensor):  # a static cache counts its filled slots on the device
        past = int(past)  # (int() of a traced size would pin the cache length of an exported graph)
    context.begin_forward(modality_ids, batch=inputs.shape[0], q_len=inputs.shape[1], past=past,
                          attention_mask=kwargs.get("attention_mask"), device=inputs.device)
    return args, kwargs


def _generate_with_modality_ids(self, *args, modality_ids=None, **kwargs):
    """``generate`` that accepts ``modality_ids`` (B, prompt length) for the prompt."""
    generate = type(self).generate
    if modality_ids is None:
        return generate(self, *args, **kwargs)
    context = self._mosear_context
    prompt = kwargs.get("inputs_embeds")
    if prompt is None:
        prompt = kwargs.get("input_ids", args[0] if args else None)
    if prompt is None:
        raise ValueError("modality_ids: generate needs input_ids or inputs_embeds for the prompt they "
                         "describe")
    ids = check_modality_ids(modality_ids, batch=prompt.shape[0], num_modalities=context.num_modalities)
    if ids.shape[1] != prompt.shape[1]:
        raise ValueError(f"modality_ids: expected shape (B={prompt.shape[0]}, {prompt.shape[1]}) like the "
                         f"prompt, got {tuple(ids.shape)}")
    previous, context.generation_ids = context.generation_ids, ids
    try:
        return generate(self, *args, **kwargs)
    finally:
        context.generation_ids = previous


def ensure_context(model, modalities) -> ModalityContext:
    """The model's context (created with its hooks on first use); modalities must agree."""
    context = getattr(model, "_mosear_context", None)
    if context is not None:
        if context.modalities != tuple(modalities):
            raise ValueError(f"modalities: the model was prepared with {context.modalities}, got "
                             f"{tuple(modalities)}; use the same modalities in MoSEConfig and ARConfig")
        return context
    context = ModalityContext(modalities)
    model._mosear_context = context
    decoder = find_decoder(model)
    decoder._mosear_context = context
    decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True)
    if callable(getattr(type(model), "generate", None)):
        # Bound to this instance (a deep copy rebinds it to the copy).
        model.generate = types.MethodType(_generate_with_modality_ids, model)
    return context


def share_context(model, context) -> None:
    """Point every MoSE layer of the model at ``context``; new layers take the model's train/eval mode
    (they are created in training mode, which would update dynamic weights in an eval model)."""
    from .mose_linear import MoSELinear

    for module in model.modules():
        if isinstance(module, MoSELinear):
            module._mosear_context = context
            module.train(model.training)
