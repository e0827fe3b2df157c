"""mosear-fast: fused kernels, drop-in modules and export for MoSEAR.

Functional ops: :func:`mose_lora` (MoSE dispatch) and :func:`ar_attention` (attention
reallocation), each with ``backend="auto" | "torch" | "triton"``.
"""

from .ops import ar_attention, mose_lora

__version__ = "0.1.0"
__all__ = ["ar_attention", "mose_lora", "__version__"]
