"""Export of MoSEAR models to ONNX and TensorRT (``mosear-export``).

- ``export(source, out_dir, **options) -> report``: the graph, its checks and files (``pipeline.py``);
- ``load_source(source) -> (module, example_inputs)``: the exact module that is exported (``sources.py``);
- ``tensorrt_lint(onnx_path, trt_version=None) -> problems``: TensorRT parser support, no TensorRT needed.
"""

from .lint import tensorrt_lint
from .pipeline import export
from .sources import build_demo_model, load_source

__all__ = ["build_demo_model", "export", "load_source", "tensorrt_lint"]
