"""Decoder graphs with a KV cache (``mosear-export --with-past``): one graph for prefill (empty past) and
decode (one or more new tokens after a cache), optimum's naming.

Inputs, in order (the audio-visual model has ``visual`` and ``audio`` after ``input_ids`` and no
``modality_ids``, as its prefill graph)::

    input_ids              (batch, seq)                   int64   the new tokens
    attention_mask         (batch, past_seq + seq)        int64   cached and new tokens, 1 = real, 0 = padding
    modality_ids           (batch, seq)                   int64   the new tokens' modality ids (causal LM only)
    past_modality_ids      (batch, past_seq)              int64   the cached tokens' modality ids
    past_key_values.{i}.key / .value  (batch, kv_heads, past_seq, head_dim)  model dtype

Outputs: ``logits (batch, seq, vocab)``, ``present_modality_ids (batch, past_seq + seq)`` and
``present.{i}.key`` / ``.value`` (batch, kv_heads, past_seq + seq, head_dim).

Why the modality ids travel with the cache: AR reallocates attention between the modalities of the
*keys*, cached ones included, and the graph cannot recover a cached token's modality from its key.
So the ids are cached like the keys: ``present_modality_ids`` (padding marked -1, as AR sees them)
is fed back as the next call's ``past_modality_ids``, exactly like ``present.{i}.key``. Prefill
passes an empty past (``past_seq = 0``). Positions are computed in the graph from the attention
mask (``cumsum - 1``, what ``generate`` does), so left-padded batches decode correctly.

The audio-visual model derives the prompt's modality ids from the placeholders as its prefill graph
does. The whole prompt goes in the first call (empty past): only there are placeholders replaced by
features; tokens of later calls are text, even a generated token whose id is a placeholder's (as in
``generate``). Decode calls pass the same ``visual``/``audio`` features again (unused there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sources import AudioVisualExport, CausalLMExport, ExportModule, InputSpec

PAST_AXIS = "past_seq"
TOTAL_AXIS = "past_seq + seq"  # the attention mask's length: cached + new tokens
PAST_IDS, PRESENT_IDS = "past_modality_ids", "present_modality_ids"
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class KVLayout:
    """The cache of a model: per layer (kv_heads, key head_dim, value head_dim), measured by running it."""

    layers: tuple[tuple[int, int, int], ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def as_dict(self, dtype: torch.dtype) -> dict:
        return {"num_layers": self.num_layers, "dtype": TORCH_DTYPE_NAMES.get(dtype, str(dtype)),
                "layers": [{"kv_heads": h, "key_dim": dk, "value_dim": dv} for h, dk, dv in self.layers],
                "shape": ["batch", "kv_heads", PAST_AXIS, "head_dim"]}


def measure_kv_layout(language_model) -> KVLayout:
    """Runs the language model on two text tokens with ``use_cache=True`` and reads the cache's shapes,
    so any Hugging Face model (GQA, per-layer head sizes) is described by what it really caches."""
    device = next(language_model.parameters()).device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    extra = {"modality_ids": torch.zeros_like(ids)} if getattr(language_model, "_mosear_context", None) else {}
    with torch.no_grad():
        out = language_model(input_ids=ids, use_cache=True, **extra)
    layers = [(int(layer.keys.shape[1]), int(layer.keys.shape[-1]), int(layer.values.shape[-1]))
              for layer in out.past_key_values.layers]
    if not layers:
        raise ValueError("model: its forward with use_cache=True returned an empty cache; --with-past needs a "
                         "decoder that caches keys and values")
    return KVLayout(tuple(layers))


def cache_from(past) -> object:
    """A transformers ``DynamicCache`` holding the flat (key, value, key, value, ...) tensors."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(len(past) // 2):
        cache.update(past[2 * i], past[2 * i + 1], i)
    return cache


def cache_argument(language_model) -> str:
    """The forward's name for the cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def flatten_cache(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def positions(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position ids of the new tokens: the count of real tokens before each one (left padding skipped)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, attention_mask.shape[1] - new_tokens:]


class _WithPast:
    """What both decoders share: the cache inputs/outputs, random valid states, output masks."""

    layout: KVLayout
    model: torch.nn.Module

    def _cache_specs(self) -> list[InputSpec]:
        dtype = TORCH_DTYPE_NAMES[self._cache_dtype()]
        specs = [InputSpec(PAST_IDS, "int64", ("batch", PAST_AXIS), -1, self._num_modalities(),
                           f"the cached tokens' modality ids: the previous call's {PRESENT_IDS} (empty for "
                           "prefill)")]
        for name in past_names(self.layout.num_layers):
            heads, dk, dv = self.layout.layers[int(name.split(".")[1])]
            specs.append(InputSpec(name, dtype, ("batch", heads, PAST_AXIS, dk if name.endswith("key") else dv),
                                   note="the previous call's present tensor of the same layer (empty for prefill)"))
        return specs

    def _cache_dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def _num_modalities(self) -> int:
        from .sources import _num_modalities

        return _num_modalities(self._language_model())

    def output_names(self) -> list[str]:
        return ["logits", PRESENT_IDS, *present_names(self.layout.num_layers)]

    def _random_past(self, batch: int, past: int, g: torch.Generator):
        """Past mask (left padding, at least one real token when past > 0), ids and cache tensors."""
        pad = torch.randint(0, max(1, past // 3), (batch,), generator=g)  # [B] padded slots, < past
        mask = (torch.arange(past) >= pad[:, None]).long()
        ids = torch.randint(0, self._num_modalities(), (batch, past), generator=g).masked_fill(mask == 0, -1)
        dtype = self._cache_dtype()
        cache = []
        for heads, dk, dv in self.layout.layers:
            cache += [torch.randn(batch, heads, past, dk, generator=g).to(dtype),
                      torch.randn(batch, heads, past, dv, generator=g).to(dtype)]
        return mask, ids, cache

    def output_masks(self, inputs) -> dict:
        """Which output elements carry meaning: logits of real new tokens, cache rows of real tokens."""
        mask = self._named(inputs)["attention_mask"].bool()
        new = self._named(inputs)["input_ids"].shape[1]
        masks = {"logits": mask[:, mask.shape[1] - new:, None]}
        masks.update({name: mask[:, None, :, None] for name in present_names(self.layout.num_layers)})
        return masks

    def _named(self, inputs) -> dict:
        return dict(zip((s.name for s in self.input_specs()), inputs))

    def _decode(self, tokens: dict, attention_mask, ids, past, new_tokens: int):
        """The language model on the new tokens (``tokens``: input_ids or inputs_embeds) after ``past``."""
        lm = self._language_model()
        out = lm(**tokens, attention_mask=attention_mask, modality_ids=ids,
                 position_ids=positions(attention_mask, new_tokens), use_cache=True,
                 **{cache_argument(lm): cache_from(past)})
        present_ids = ids.masked_fill(attention_mask == 0, -1)
        cache = getattr(out, "cache", None) or out.past_key_values
        return (out.logits, present_ids, *flatten_cache(cache))

    def interface(self) -> dict:
        facts = super().interface()
        facts["kv_cache"] = {
            **self.layout.as_dict(self._cache_dtype()),
            "inputs": past_names(self.layout.num_layers), "outputs": present_names(self.layout.num_layers),
            "modality_ids": (f"{PAST_IDS} (batch, {PAST_AXIS}) in, {PRESENT_IDS} (batch, {TOTAL_AXIS}) out: the "
                             "key modality ids AR needs for cached tokens, fed back like the cache"),
            "prefill": f"{PAST_AXIS} = 0 (empty past tensors)",
            "attention_mask": f"(batch, {TOTAL_AXIS}): cached and new tokens",
            "positions": "computed in the graph from attention_mask (cumsum - 1)",
        }
        facts["generation"] = generation_facts(self._language_model())
        return facts


def generation_facts(language_model) -> dict:
    """EOS/pad ids for the generator (from the generation config, else the model config)."""
    config = getattr(language_model, "generation_config", None) or language_model.config
    text = language_model.config.get_text_config() if hasattr(language_model.config, "get_text_config") \
        else language_model.config

    def first(*values):
        return next((v for v in values if v is not None), None)

    eos = first(getattr(config, "eos_token_id", None), getattr(text, "eos_token_id", None))
    pad = first(getattr(config, "pad_token_id", None), getattr(text, "pad_token_id", None))
    eos = [int(e) for e in eos] if isinstance(eos, (list, tuple)) else (None if eos is None else [int(eos)])
    return {"eos_token_id": eos, "pad_token_id": None if pad is None else int(pad), "decoding": "greedy"}


class CausalLMWithPast(_WithPast, CausalLMExport):
    """A prepared causal LM as a decoder with a KV cache (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, layout: KVLayout | None = None):
        super().__init__(model)
        self.layout = layout or measure_kv_layout(model)

    def _language_model(self):
        return self.model

    def forward(self, *inputs):
        input_ids, attention_mask, modality_ids, past_ids, *past = inputs
        ids = torch.cat([past_ids, modality_ids], dim=1)
        return self._decode({"input_ids": input_ids}, attention_mask, ids, past, input_ids.shape[1])

    def input_specs(self) -> list[InputSpec]:
        ids, mask, modality = super().input_specs()
        mask = InputSpec(mask.name, mask.dtype, ("batch", TOTAL_AXIS), mask.low, mask.high,
                         "cached and new tokens: 1 = token, 0 = padding")
        modality = InputSpec(modality.name, modality.dtype, modality.shape, modality.low, modality.high,
                             "the new tokens' modality (0 text, 1 visual, 2 audio); -1 = padding / no adapter")
        return [ids, mask, modality, *self._cache_specs()]

    def example_inputs(self, batch: int, length: int, *, seed: int = 0, past: int = 0):
        """Random valid inputs: ``past`` cached tokens (left padded) then ``length`` new ones; with an
        empty past the new tokens are a left-padded prompt (as ``CausalLMExport.example_inputs``)."""
        g = torch.Generator().manual_seed(seed)
        ids, new_mask, modality = super().example_inputs(batch, length, seed=seed)
        if past:
            new_mask = torch.ones_like(new_mask)
            modality = torch.randint(0, self._num_modalities(), (batch, length), generator=g)
        past_mask, past_ids, cache = self._random_past(batch, past, g)
        return (ids, torch.cat([past_mask, new_mask], 1), modality, past_ids, *cache)


class AudioVisualWithPast(_WithPast, AudioVisualExport):
    """The audio-visual LM as a decoder with a KV cache (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, layout: KVLayout | None = None):
        super().__init__(model)
        self.layout = layout or measure_kv_layout(model.llm)

    def _language_model(self):
        return self.model.llm

    def forward(self, *inputs):
        from mosear_fast.av_model import placeholder_modality_ids

        input_ids, visual, audio, attention_mask, past_ids, *past = inputs
        new_mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:]
        # Placeholders are read in the prompt (the call with an empty past) only: a generated token whose
        # id happens to be a placeholder's is text, as in generate. A count, not a shape test, so the
        # graph keeps one path for prefill and decode.
        prompt_call = torch.ones_like(past_ids).sum(-1, keepdim=True) == 0  # [B, 1]
        new_ids = torch.where(prompt_call, placeholder_modality_ids(input_ids, new_mask),
                              torch.zeros_like(input_ids).masked_fill(new_mask == 0, -1))
        embeds = torch.where(prompt_call[..., None], self.model.embed_inputs(input_ids, visual, audio),
                             self.model.llm.get_input_embeddings()(input_ids))
        ids = torch.cat([past_ids, new_ids], dim=1)
        return self._decode({"inputs_embeds": embeds}, attention_mask, ids, past, input_ids.shape[1])

    def input_specs(self) -> list[InputSpec]:
        ids, visual, audio, mask = super().input_specs()
        mask = InputSpec(mask.name, mask.dtype, ("batch", TOTAL_AXIS), mask.low, mask.high,
                         "cached and new tokens: 1 = real token, 0 = left padding")
        return [ids, visual, audio, mask, *self._cache_specs()]

    def seq_limits(self) -> tuple[int, int | None, str]:
        _, high, _ = super().seq_limits()
        return 1, high, f"new tokens per call, at most max_positions {high}"

    def default_seq(self) -> str:
        """From one new token (decode) to the prefill graph's longest prompt."""
        _, opt, high = AudioVisualExport.default_seq(self).split(":")
        return f"1:{opt}:{high}"

    def example_inputs(self, batch: int, length: int, *, seed: int = 0, past: int = 0):
        """Random valid inputs: with an empty past a left-padded prompt with the placeholders (as the
        prefill graph's), else ``length`` text tokens after ``past`` cached ones."""
        from mosear_fast import av_model as av

        g = torch.Generator().manual_seed(seed)
        if past:
            s = self.model.sizes
            ids = torch.randint(av.FIRST_EMOTION_ID, self.model.config.vocab_size, (batch, length), generator=g)
            visual = torch.randn(batch, s.n_visual, s.visual_dim, generator=g)
            audio = torch.randn(batch, s.n_audio, s.audio_dim, generator=g)
            new_mask = torch.ones(batch, length, dtype=torch.long)
        else:
            ids, visual, audio, new_mask = super().example_inputs(batch, length, seed=seed)
        past_mask, past_ids, cache = self._random_past(batch, past, g)
        return (ids, visual, audio, torch.cat([past_mask, new_mask], 1), past_ids, *cache)


def with_past(module: ExportModule) -> ExportModule:
    """The KV-cache decoder of a prefill ``ExportModule`` (same prepared model)."""
    cls = AudioVisualWithPast if isinstance(module, AudioVisualExport) else CausalLMWithPast
    return cls(module.model).eval()
