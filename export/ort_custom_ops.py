"""onnxruntime implementations of ``mosear.ARAttention`` and ``mosear.MoSELoRA`` (``--ops fused``):
Python custom ops of ``onnxruntime-extensions`` bound to the project's PyTorch backend.

They make a fused graph runnable (and so validated) on the CPU with the same report and tolerances
as a static graph. They are a correctness path, not a fast one: onnxruntime-extensions hands the
arrays to Python and copies the results back through Python lists. float32 graphs only (a Python
custom op is registered for one set of input types; the low-precision fused graphs are meant for
TensorRT, whose plugins take every float dtype).

``fused_session(path)`` registers the ops (once per process) and opens a CPU session with them.
"""

from __future__ import annotations

import numpy as np
import torch

from .fused import AR_ATTRS, AR_OP, DOMAIN, MOSE_OP, decode_ar_attrs

_REGISTERED = False


class CustomOpsUnavailable(RuntimeError):
    """onnxruntime-extensions is not installed."""


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise CustomOpsUnavailable("--ops fused: validating a fused graph with onnxruntime needs the "
                                   "onnxruntime-extensions package (pip install onnxruntime-extensions)") from None
    return onnxruntime_extensions


def run_ar(q, k, v, key_modality, query_mask, **attrs) -> np.ndarray:
    """``mosear.ARAttention`` on numpy arrays through ``mosear_fast.ar_attention`` (PyTorch backend)."""
    from mosear_fast import ar_attention

    kwargs = decode_ar_attrs(attrs)
    with torch.no_grad():
        o = ar_attention(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(k)),
                         torch.from_numpy(np.ascontiguousarray(v)), torch.from_numpy(key_modality).long(),
                         query_mask=torch.from_numpy(query_mask).bool(), backend="torch", **kwargs)
    return o.numpy()


def run_mose(x, modality, expert, gate, A, B, scale, out) -> np.ndarray:
    """``mosear.MoSELoRA`` on numpy arrays through ``mosear_fast.mose_lora`` (PyTorch backend)."""
    from mosear_fast import mose_lora

    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, modality, expert, gate, A, B, scale, out)]
    with torch.no_grad():
        y = mose_lora(t[0], t[1].long(), t[2].long(), t[3], t[4], t[5], t[6], t[7], backend="torch")
    return y.numpy()


def register() -> str:
    """Registers both ops with onnxruntime-extensions (idempotent); returns its library path."""
    global _REGISTERED
    ext = _extensions()
    op = ext.PyCustomOpDef
    if not _REGISTERED:
        types = {int: op.dt_int64, float: op.dt_float, str: op.dt_string}
        ext.onnx_op(op_type=f"{DOMAIN}::{AR_OP}",
                    inputs=[op.dt_float, op.dt_float, op.dt_float, op.dt_int64, op.dt_bool],
                    outputs=[op.dt_float], attrs={name: types[kind] for name, kind in AR_ATTRS.items()})(run_ar)
        ext.onnx_op(op_type=f"{DOMAIN}::{MOSE_OP}",
                    inputs=[op.dt_float, op.dt_int64, op.dt_int64, op.dt_float, op.dt_float, op.dt_float,
                            op.dt_float, op.dt_float],
                    outputs=[op.dt_float])(run_mose)
        _REGISTERED = True
    return ext.get_library_path()


def session_options():
    """onnxruntime SessionOptions with the custom ops library loaded."""
    import onnxruntime as ort

    library = register()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(library)
    return options


def fused_session(path):
    """A CPU onnxruntime session for a fused graph."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
