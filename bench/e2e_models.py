"""Models and inputs of the end-to-end benchmarks (bench/e2e.py).

- ``build_decoder``: a LlamaForCausalLM / Qwen2ForCausalLM with the real widths of a preset model
  (``bench.presets.E2E_MODELS``), a few layers and random weights (seeded), sdpa attention.
- ``av_prompt``: token ids and modality ids of a prompt laid out like an audio-visual one (text, a
  long visual span, a short audio span, text; ``tests.cases.av_layout``).
- ``add_mosear``: MoSE on q_proj/v_proj and AR on every layer, in place (``apply_mosear``).
- ``OrtPrefill``: the exported model (``mosear_fast.export``) in an onnxruntime session.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import time

import torch

from tests.cases import av_layout

from .presets import E2E_MODELS


def build_decoder(name: str, layers: int, *, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The preset model ``name`` with ``layers`` decoder layers, random weights, eval mode, sdpa."""
    if name not in E2E_MODELS:
        raise ValueError(f"model: expected one of {tuple(E2E_MODELS)}, got {name!r}")
    spec = E2E_MODELS[name]
    if spec["arch"] == "llama":
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as Model
    else:
        from transformers import Qwen2Config as Config
        from transformers import Qwen2ForCausalLM as Model
    config = Config(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["mlp"],
                    num_hidden_layers=layers, num_attention_heads=spec["heads"],
                    num_key_value_heads=spec["kv_heads"], max_position_embeddings=16384, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)  # seeds every device: the same weights for every run of the preset
    with torch.device(device):
        model = Model(config)
    return model.to(dtype=dtype).eval()


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def av_prompt(batch: int, length: int, vocab: int, *, device: torch.device, seed: int = 0):
    """(input_ids, modality_ids), each (batch, length) int64: random tokens, the audio-visual layout."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    modality = av_layout(length).expand(batch, length).clone()
    return ids.to(device), modality.to(device)


def mose_config(preset: dict):
    from mosear_fast import MoSEConfig

    # init_weights=False: B drawn at random, so the adapters change the output (the work is the same).
    return MoSEConfig(target_modules=["q_proj", "v_proj"], r=preset["rank"], alpha=16.0,
                      num_experts=preset["num_experts"], top_k=preset["top_k"], init_weights=False)


def add_mosear(model, preset: dict):
    """MoSE (r, E from the preset; M = 3 modalities) on q/v and AR (strength 0.5) on all layers."""
    from mosear_fast import ARConfig, apply_mosear

    # record_shares=False: the monitoring read-out is off, as in a latency-sensitive deployment
    apply_mosear(model, mose=mose_config(preset), ar=ARConfig(strength=0.5, record_shares=False))
    return model.eval()


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Runs the block with ``model``'s attention switched to ``name`` (e.g. "sdpa": AR off)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def cache_kwargs(model, cache) -> dict:
    """The KV-cache argument under the name this transformers version takes (``cache`` replaced
    ``past_key_values`` in 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def new_static_cache(model, max_cache_len: int):
    """A static KV cache (fixed shapes: what a compiled decode step uses)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


# -------------------------------------------------------------------------------------------------
# onnxruntime
# -------------------------------------------------------------------------------------------------


def ort_providers(device: torch.device) -> tuple[list[str] | None, str | None]:
    """(providers, None) for the session, or (None, reason) when onnxruntime cannot serve ``device``."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        return None, f"onnxruntime is not installed ({err})"
    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            return None, ("onnxruntime has no CUDA provider here (a CPU-only build: "
                          f"{', '.join(available)}); install onnxruntime-gpu for this variant")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
    return ["CPUExecutionProvider"], None


def export_onnx_file(model, out_dir: str, *, dtype_name: str, seq: tuple[int, int, int],
                     batch: int = 1) -> tuple[str, str]:
    """Exports ``model`` (prepared with ``apply_mosear``) to ONNX under ``out_dir``; returns (the .onnx
    path, the API used). Uses ``mosear_fast.export.export(source, out_dir, ...)`` where it exists and
    takes these options, else the graph exporter ``mosear_fast.export.graph.export_onnx``. Raises on
    failure."""
    import mosear_fast.export as export_pkg

    source = copy.deepcopy(model).to("cpu", torch.float32).eval()  # traced on the CPU, cast below
    seq_text, batch_text = ":".join(str(s) for s in seq), f"{batch}:{batch}:{batch}"
    api = getattr(export_pkg, "export", None)
    if callable(api):
        out_dir = os.path.join(out_dir, "export")  # the API wants a folder that does not exist yet
        options = dict(dtype=dtype_name, batch=batch_text, seq=seq_text)
        params = inspect.signature(api).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if takes_any or all(name in params for name in options):
            result = api(source, out_dir, **options)
            return _onnx_path(result, out_dir), "mosear_fast.export.export"
    from pathlib import Path

    from mosear_fast.export.graph import cast_module, export_onnx
    from mosear_fast.export.shapes import AxisRange
    from mosear_fast.export.sources import load_source

    module, _ = load_source(source)
    module = cast_module(module, dtype_name)
    path = Path(out_dir) / "model.onnx"
    export_onnx(module, path, batch=AxisRange("batch", batch, batch, batch), seq=AxisRange("seq", *seq),
                opset=20)
    return str(path), "mosear_fast.export.graph.export_onnx"


def _onnx_path(result, out_dir) -> str:
    for key in ("onnx_path", "onnx", "path"):
        value = result.get(key) if isinstance(result, dict) else getattr(result, key, None)
        if isinstance(value, (str, os.PathLike)) and str(value).endswith(".onnx"):
            return str(value)
    found = sorted(os.path.join(root, f) for root, _, files in os.walk(out_dir) for f in files
                   if f.endswith(".onnx"))
    if not found:
        raise RuntimeError(f"mosear_fast.export.export wrote no .onnx file under {out_dir}")
    return found[0]


class OrtPrefill:
    """An onnxruntime session of the exported graph ``(input_ids, attention_mask, modality_ids) ->
    logits``, run through I/O binding (inputs and logits stay on the session's device)."""

    def __init__(self, path: str, providers: list[str]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        started = time.perf_counter()
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.session_seconds = time.perf_counter() - started
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.provider = self.session.get_providers()[0]

    def bind(self, input_ids: torch.Tensor, modality_ids: torch.Tensor):
        """A zero-argument callable that runs the graph once on these inputs; returns the binding."""
        import onnxruntime as ort

        arrays = dict(input_ids=input_ids.cpu().numpy(), attention_mask=torch.ones_like(input_ids).cpu().numpy(),
                      modality_ids=modality_ids.cpu().numpy())
        binding = self.session.io_binding()
        self._values = []  # keep the device copies alive
        for name, array in arrays.items():
            if self.device == "cuda":
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                self._values.append(value)
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, array)
        binding.bind_output("logits", self.device)

        def run():
            self.session.run_with_iobinding(binding)
            return binding

        return run

    def last_logits(self, input_ids, modality_ids) -> torch.Tensor:
        """float32 logits of the last position, (B, V), on the CPU."""
        binding = self.bind(input_ids, modality_ids)()
        logits = binding.copy_outputs_to_cpu()[0]
        return torch.from_numpy(logits[:, -1]).float()
