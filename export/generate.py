"""Generation with an exported decoder: ``OnnxGenerator(DIR).generate(input_ids, modality_ids, ...)``.

``DIR`` is a ``mosear-export --with-past`` output folder (``model.onnx`` + ``export_config.json``).
Greedy decoding with the KV cache: one prefill call on the prompt (empty past), then one call per
new token, each feeding the previous call's ``present.*`` (and ``present_modality_ids``) back as
``past_key_values.*`` (and ``past_modality_ids``). Semantics follow ``transformers``' greedy
``generate``: the attention mask grows by one real token per step, generated tokens are text
(modality 0), a sequence that produced an EOS token continues with the pad token, and decoding stops
early once every sequence has finished.

Providers: onnxruntime's CUDA provider when it is installed and a GPU is visible (then the cache
stays on the GPU between steps through IO binding: only the new token ids go in and the logits come
out), else the CPU provider. The pure parts (which output feeds which input, the first empty cache,
the greedy step) are plain functions tested without a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIG_FILE, ONNX_FILE = "export_config.json", "model.onnx"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
PAST_IDS, PRESENT_IDS = "past_modality_ids", "present_modality_ids"
TEXT_ID = 0
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class GeneratorError(ValueError):
    """The folder is not a with-past export, or the inputs do not fit its graph."""


@dataclass(frozen=True)
class DecodePlan:
    """How the graph's outputs feed its next call, read from ``export_config.json``."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    feature_inputs: tuple[str, ...]  # float inputs other than the cache (the audio-visual model's features)
    takes_modality_ids: bool
    cache_shapes: dict  # past input name -> (kv_heads, head_dim)
    cache_dtype: str
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    num_modalities: int | None

    @classmethod
    def from_config(cls, config: dict) -> DecodePlan:
        interface = config.get("interface", {})
        cache = interface.get("kv_cache")
        if cache is None:
            raise GeneratorError("DIR: export_config.json describes a prefill-only graph (no KV cache); export "
                                 "with mosear-export ... --with-past to generate")
        inputs = {i["name"]: i for i in config["inputs"]}
        names = tuple(i["name"] for i in config["inputs"])
        features = tuple(n for n in names if not n.startswith(PAST_PREFIX) and inputs[n]["dtype"].startswith("float"))
        shapes = {n: (int(inputs[n]["shape"][1]), int(inputs[n]["shape"][3])) for n in names
                  if n.startswith(PAST_PREFIX)}
        generation = interface.get("generation", {})
        modality = inputs.get("modality_ids") or inputs.get(PAST_IDS)
        return cls(input_names=names, output_names=tuple(o["name"] for o in config["outputs"]),
                   feature_inputs=features, takes_modality_ids="modality_ids" in inputs, cache_shapes=shapes,
                   cache_dtype=cache["dtype"], eos_token_id=tuple(generation.get("eos_token_id") or ()),
                   pad_token_id=generation.get("pad_token_id"),
                   num_modalities=modality["range"][1] if modality and "range" in modality else None)

    def feedback(self) -> dict[str, str]:
        """Output name -> the input it becomes on the next call (``present.3.key`` -> ``past_key_values.3.key``)."""
        links = {PRESENT_IDS: PAST_IDS}
        for name in self.input_names:
            if name.startswith(PAST_PREFIX):
                links[PRESENT_PREFIX + name[len(PAST_PREFIX):]] = name
        missing = [o for o in links if o not in self.output_names]
        if missing:
            raise GeneratorError(f"DIR: the graph has no output {missing[0]!r} for its input {links[missing[0]]!r}")
        return links

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The prefill call's cache inputs: zero-length past (``past_seq = 0``)."""
        if self.cache_dtype not in NUMPY_DTYPES:
            raise GeneratorError(f"DIR: the cache is {self.cache_dtype}, which numpy (and onnxruntime's CPU "
                                 "provider) cannot hold; export fp32 or fp16 to generate here")
        dtype = NUMPY_DTYPES[self.cache_dtype]
        feeds = {PAST_IDS: np.zeros((batch, 0), dtype=np.int64)}
        for name, (heads, dim) in self.cache_shapes.items():
            feeds[name] = np.zeros((batch, heads, 0, dim), dtype=dtype)
        return feeds


def greedy_step(last_logits: np.ndarray, finished: np.ndarray, eos_token_id, pad_token_id):
    """(next tokens (B,), finished (B,)) from the last position's logits (B, V): argmax; a finished row
    gets the pad token; a row that emits an EOS token is finished from then on."""
    tokens = last_logits.argmax(-1).astype(np.int64)
    if len(eos_token_id):
        if pad_token_id is None:
            raise GeneratorError("eos_token_id: set, but the model has no pad_token_id for finished rows")
        tokens = np.where(finished, np.int64(pad_token_id), tokens)
        finished = finished | np.isin(tokens, np.asarray(eos_token_id, dtype=np.int64))
    return tokens, finished


def step_inputs(tokens: np.ndarray, attention_mask: np.ndarray, plan: DecodePlan, features: dict) -> dict:
    """The non-cache inputs of a decode step: the new tokens (text), the mask grown by one real token."""
    batch = tokens.shape[0]
    feeds = {"input_ids": tokens.reshape(batch, 1).astype(np.int64),
             "attention_mask": np.concatenate([attention_mask, np.ones((batch, 1), np.int64)], axis=1)}
    if plan.takes_modality_ids:
        feeds["modality_ids"] = np.full((batch, 1), TEXT_ID, dtype=np.int64)
    feeds.update(features)
    return feeds


def _as_int64(name, value, batch=None) -> np.ndarray:
    array = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
    if array.dtype.kind not in "iu" or array.ndim != 2 or (batch is not None and array.shape[0] != batch):
        want = "(B, T)" if batch is None else f"(B={batch}, T)"
        raise GeneratorError(f"{name}: expected a {want} integer array, got dtype {array.dtype} shape "
                             f"{tuple(array.shape)}")
    return array.astype(np.int64)


class OnnxGenerator:
    """Greedy generation with a ``mosear-export --with-past`` folder (see the module docstring)."""

    def __init__(self, folder, *, providers=None, session=None):
        folder = Path(folder)
        config_path, onnx_path = folder / CONFIG_FILE, folder / ONNX_FILE
        if not config_path.is_file() or not onnx_path.is_file():
            raise GeneratorError(f"DIR: {folder} has no {CONFIG_FILE} and {ONNX_FILE}; expected a mosear-export "
                                 "output folder")
        try:
            self.config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise GeneratorError(f"DIR: {config_path} is unreadable ({err})") from None
        self.plan = DecodePlan.from_config(self.config)
        self.links = self.plan.feedback()
        self.session = session if session is not None else _session(onnx_path, providers,
                                                                    fused=self.config.get("ops") == "fused")
        self.provider = self.session.get_providers()[0]
        self.io_binding = self.provider == "CUDAExecutionProvider"

    def generate(self, input_ids, modality_ids=None, attention_mask=None, max_new_tokens: int = 16, *,
                 eos_token_id="model", return_logits: bool = False, progress=None, **features):
        """New token ids (B, n) int64, ``n <= max_new_tokens`` (fewer when every row ended with EOS).

        ``input_ids`` (B, T) prompt tokens, left padded; ``attention_mask`` (B, T), 1 = token (default all
        ones); ``modality_ids`` (B, T) in [-1, M) for a causal-LM export (default: text, -1 at padding);
        an audio-visual export derives them from its placeholders (pass None) and takes its features
        as keywords (``visual=``, ``audio=``). ``eos_token_id``: "model" (the model's), None (never
        stop) or ids. ``return_logits``: also the per-step logits (n, B, V) float32. ``progress``: a
        callable called with each step's index."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise GeneratorError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        ids = _as_int64("input_ids", input_ids)
        batch = ids.shape[0]
        mask = np.ones_like(ids) if attention_mask is None else _as_int64("attention_mask", attention_mask, batch)
        if mask.shape != ids.shape:
            raise GeneratorError(f"attention_mask: expected shape {ids.shape} like input_ids, got {mask.shape}")
        eos = self.plan.eos_token_id if eos_token_id == "model" else tuple(
            () if eos_token_id is None else np.atleast_1d(eos_token_id).tolist())
        feature_feeds = self._features(features, batch)
        feeds = {"input_ids": ids, "attention_mask": mask, **feature_feeds, **self.plan.empty_past(batch)}
        if self.plan.takes_modality_ids:
            feeds["modality_ids"] = self._modality_ids(modality_ids, ids, mask)
        elif modality_ids is not None:
            raise GeneratorError("modality_ids: this export derives them in the graph from the placeholder tokens; "
                                 "pass None")
        finished = np.zeros(batch, dtype=bool)
        tokens_out, logits_out = [], []
        state = None
        for step in range(max_new_tokens):
            logits, state = self._run(feeds, state)
            last = logits[:, -1, :].astype(np.float32)
            tokens, finished = greedy_step(last, finished, eos, self.plan.pad_token_id)
            tokens_out.append(tokens)
            if return_logits:
                logits_out.append(last)
            if progress is not None:
                progress(step)
            if finished.all() or step == max_new_tokens - 1:
                break
            feeds = step_inputs(tokens, feeds["attention_mask"], self.plan, feature_feeds)
        result = np.stack(tokens_out, axis=1)
        return (result, np.stack(logits_out)) if return_logits else result

    # ---------------------------------------------------------------------------------------------

    def _features(self, features: dict, batch: int) -> dict:
        unknown = sorted(set(features) - set(self.plan.feature_inputs))
        missing = [n for n in self.plan.feature_inputs if n not in features]
        if unknown or missing:
            raise GeneratorError(f"features: this export takes {list(self.plan.feature_inputs) or 'none'}; "
                                 f"missing {missing}, unknown {unknown}")
        inputs = {i["name"]: i for i in self.config["inputs"]}
        out = {}
        for name, value in features.items():
            array = np.asarray(value.cpu() if hasattr(value, "cpu") else value, dtype=np.float32)
            shape = inputs[name]["shape"]
            want = [batch, *shape[1:]]
            if list(array.shape) != want:
                raise GeneratorError(f"{name}: expected shape {tuple(want)}, got {tuple(array.shape)}")
            out[name] = array
        return out

    def _modality_ids(self, modality_ids, ids, mask) -> np.ndarray:
        if modality_ids is None:
            return np.where(mask == 0, -1, TEXT_ID).astype(np.int64)
        modality = _as_int64("modality_ids", modality_ids, ids.shape[0])
        if modality.shape != ids.shape:
            raise GeneratorError(f"modality_ids: expected shape {ids.shape} like input_ids, got {modality.shape}")
        high = self.plan.num_modalities
        if modality.size and (modality.min() < -1 or (high is not None and modality.max() >= high)):
            raise GeneratorError(f"modality_ids: expected ids in [-1, {high}), got values in "
                                 f"[{modality.min()}, {modality.max()}]")
        return np.where(mask == 0, -1, modality)

    def _run(self, feeds: dict, state):
        """One graph call: (logits as numpy, the cache state for the next call)."""
        if self.io_binding:
            return self._run_bound(feeds, state)
        all_feeds = {**feeds, **(state or {})}
        outputs = dict(zip(self.plan.output_names, self.session.run(None, all_feeds)))
        return outputs["logits"], {self.links[o]: outputs[o] for o in self.links}

    def _run_bound(self, feeds: dict, state):
        """CUDA provider: host inputs copied in, the cache bound as device OrtValues (the previous call's
        outputs, never copied to the host), outputs allocated on the device; only logits come back."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        device = ort_device_of(self.provider)
        for name, value in feeds.items():
            if state is not None and name in state:
                continue
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), *device))
        for name, value in (state or {}).items():
            binding.bind_ortvalue_input(name, value)
        for name in self.plan.output_names:
            binding.bind_output(name, device[0], device[1])
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.plan.output_names, binding.get_outputs()))
        next_state = {self.links[o]: outputs[o] for o in self.links}
        return outputs["logits"].numpy(), next_state


def ort_device_of(provider: str) -> tuple[str, int]:
    """(device type, device id) that IO binding uses for a provider's tensors."""
    return ("cuda", 0) if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else ("cpu", 0)


def preferred_providers(available) -> list[str]:
    """CUDA (IO binding) when onnxruntime has it, then the CPU. TensorRT's provider is left out: it
    rebuilds an engine for every new cache length."""
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or ["CPUExecutionProvider"]


def _session(onnx_path: Path, providers, *, fused: bool = False):
    import onnxruntime as ort

    chosen = list(providers) if providers else preferred_providers(ort.get_available_providers())
    if fused:  # the custom ops run in Python on the CPU (ort_custom_ops.py)
        from .ort_custom_ops import session_options

        options, chosen = session_options(), ["CPUExecutionProvider"]
    else:
        options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=chosen)
    except Exception as err:  # noqa: BLE001  (onnxruntime's own error types)
        raise GeneratorError(f"DIR: onnxruntime cannot load {onnx_path} with {chosen}: "
                             f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__}"
                             ) from None
