"""Export of MoSEAR models to ONNX and TensorRT (``mosear-export``).

- ``export(source, out_dir, **options) -> report``: the graph, its checks and files (``pipeline.py``);
- ``load_source(source, adapter=None) -> (module, example_inputs)``: the exact module that is exported
  (``sources.py``);
- ``build_demo_model(seed=0) -> model``: the ``"demo"`` source's model;
- ``tensorrt_lint(onnx_path, trt_version=None) -> problems``: TensorRT parser support, no TensorRT needed;
- ``OnnxGenerator(DIR).generate(input_ids, modality_ids, attention_mask=None, max_new_tokens=16)``: greedy
  generation with a ``--with-past`` export (``generate.py``; ``mosear-generate`` on the command line).

``with_past=True`` exports a decoder with a KV cache (``with_past.py``); ``ops="fused"`` writes one
custom node per MoSE/AR use (``fused.py``: ``mosear.MoSELoRA``, ``mosear.ARAttention``), run by
onnxruntime through ``ort_custom_ops.py`` and by TensorRT through ``trt_plugins.py``.

Sources: ``"demo"`` (the built-in audio-visual LM the demo trains, with the demo's MoSE adapters and
AR; ``mosear_fast.demo_config``), a ``mosear-train`` output folder (read by ``mosear_fast.trained``,
the reader training uses too), a Hugging Face causal-LM folder with ``adapter=`` a PEFT MoSE adapter
folder, or a prepared ``nn.Module``. The audio-visual model's graph takes ``input_ids``, ``visual``,
``audio`` and ``attention_mask`` (modality ids derived from the placeholder tokens); a causal LM's
takes ``input_ids``, ``attention_mask`` and ``modality_ids``. See ``sources.py``.
"""

from .generate import OnnxGenerator
from .lint import tensorrt_lint
from .pipeline import export
from .sources import build_demo_model, load_source

__all__ = ["OnnxGenerator", "build_demo_model", "export", "load_source", "tensorrt_lint"]
