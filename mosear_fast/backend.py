"""Backend dispatch: the one place that maps (op, backend, device) to an implementation.

``auto`` picks Triton for CUDA tensors and the PyTorch backend on the CPU. ``triton`` on CPU
tensors runs only under the Triton interpreter (``TRITON_INTERPRET=1``, which the tests set; the
package never sets it) and raises otherwise. Implementations are imported lazily, so a CPU-only
user never imports triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "torch", "triton")

# op -> backend -> "module:function" (None: not implemented yet)
_IMPLEMENTATIONS: dict[str, dict[str, str | None]] = {
    "mose_lora": {
        "torch": "mosear_fast.kernels.mose.torch_backend:mose_lora_torch",
        "triton": "mosear_fast.kernels.mose.function:mose_lora_triton",
    },
    "mose_linear": {
        "torch": "mosear_fast.kernels.mose.torch_linear:mose_linear_torch",
        "triton": "mosear_fast.kernels.mose.function:mose_linear_triton",
    },
    "ar_attention": {
        "torch": "mosear_fast.kernels.ar_attention.torch_backend:ar_attention_torch",
        "triton": "mosear_fast.kernels.ar_attention.function:ar_attention_triton",
    },
}
# While a model is exported (torch.export / torch.onnx.export), every backend gives way to a
# static-shape form of the op (no NonZero, no host-side sizes): internal, not a user-selectable backend.
_EXPORT_IMPLEMENTATIONS = {
    "mose_lora": "mosear_fast.kernels.mose.static:mose_lora_static",
    "mose_linear": "mosear_fast.kernels.mose.static:mose_linear_static",
    "ar_attention": "mosear_fast.kernels.ar_attention.static:ar_attention_static",
}


# Replacements of the export forms installed by ``export_forms`` (mosear-export --ops fused: one
# custom node per op); empty outside that context.
_EXPORT_OVERRIDES: dict[str, Callable] = {}


@contextlib.contextmanager
def export_forms(**forms: Callable):
    """While the context is open, an export traces ``op`` through ``forms[op]`` instead of its static
    form (same arguments as the static form). Used by the exporter, not a user-selectable backend."""
    unknown = set(forms) - set(_EXPORT_IMPLEMENTATIONS)
    if unknown:
        raise ValueError(f"forms: unknown ops {sorted(unknown)}; expected some of {sorted(_EXPORT_IMPLEMENTATIONS)}")
    previous = dict(_EXPORT_OVERRIDES)
    _EXPORT_OVERRIDES.update(forms)
    try:
        yield
    finally:
        _EXPORT_OVERRIDES.clear()
        _EXPORT_OVERRIDES.update(previous)


def _onnx_export_reader() -> Callable[[], bool]:
    """``torch.onnx.is_in_onnx_export`` imports two modules on every call (~1.1 us, paid on each op call):
    read the same two flags directly, found once at import; the public function where they are not."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    if not (hasattr(_flags, "_is_onnx_exporting") and hasattr(GLOBALS, "in_onnx_export")):
        return torch.onnx.is_in_onnx_export
    return lambda: bool(GLOBALS.in_onnx_export or _flags._is_onnx_exporting)


_in_onnx_export = _onnx_export_reader()


def is_exporting() -> bool:
    """True while torch.export or torch.onnx.export traces the model."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    if exporting is not None and exporting():
        return True
    if torch.compiler.is_compiling():  # dynamo traces the public function, not torch.onnx's internal modules
        return torch.onnx.is_in_onnx_export()
    return _in_onnx_export()


def is_capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def host_reads_allowed(device: torch.device | None = None) -> bool:
    """Whether validation may read tensor values on the host (``.min()``, ``.tolist()``, boolean
    indexing): not while a graph is compiled or exported (the values are symbolic; a read would break
    the graph) nor while a CUDA graph is captured (a read synchronises, which capture forbids; checked
    for CUDA tensors, or any when ``device`` is None). Cheapest checks first: this runs on every call."""
    if torch.compiler.is_compiling() or is_exporting():
        return False
    return not ((device is None or device.type == "cuda") and is_capturing())


def through_library() -> bool:
    """Whether the public ops call the registered ``mosear::`` ops (``mosear_fast.library``): while
    ``torch.compile`` traces, so the compiler sees one node per call with its fake implementation and
    autograd formula. Eager calls go straight to the backends (no dispatcher round trip, ~tens of us per
    call); an export takes the export forms (``implementation``)."""
    return torch.compiler.is_compiling() and not is_exporting()


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once at import (find_spec searches sys.path without importing triton: tens of microseconds,
# paid on every op call otherwise); a module constant, so torch.compile reads it without tracing a cache.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_FOUND


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend ("torch" or "triton") that runs ``op`` for tensors on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        has_triton = _IMPLEMENTATIONS[op]["triton"] is not None and triton_available()
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if backend == "triton":
        if _IMPLEMENTATIONS[op]["triton"] is None:
            raise NotImplementedError(f"backend: the Triton kernel of {op} is not implemented yet; "
                                      "use backend='torch' or 'auto'")
        if not triton_available():
            raise ValueError("backend: 'triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(f"backend: 'triton' needs CUDA tensors (got tensors on {device}); on the CPU it "
                             "runs only under the Triton interpreter (TRITON_INTERPRET=1)")
    return backend


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    """The callable that runs ``op`` on ``backend`` ("auto" resolved for ``device``)."""
    if is_exporting():
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if op in _EXPORT_OVERRIDES:
            return _EXPORT_OVERRIDES[op]
        target = _EXPORT_IMPLEMENTATIONS[op]
    else:
        target = _IMPLEMENTATIONS[op][resolve_backend(op, backend, device)]
    return _load(target)


@functools.cache
def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
