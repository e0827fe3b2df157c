"""MoSE providers on the Triton kernels (CUDA only: the interpreter on the CPU is far too slow to time).

``mosear_triton``: the frozen base ``F.linear`` plus the ``mose_lora`` update (read from and written
with the base output in one pass); "fwd_bwd" adds the backward to x, gate, A and B with W frozen.
Range validation is off (``validate=False``) so the timed call is the sync-free kernel path.

``mosear_fused_linear``: ``kernels/mose/fused_linear.mose_linear``, base GEMM and adapter expand in
one kernel (and dx = dy W + A^T dh in one kernel). Written without a GPU and never benchmarked yet:
it stays only if it beats ``mosear_triton`` here.
"""

from __future__ import annotations

from functools import partial

from mosear_fast import mose_lora

from ..registry import Provider, register
from ..setups import cuda_only, mose_setup


def _fused_linear(x, weight, *routing_and_weights):
    from mosear_fast.kernels.mose.fused_linear import mose_linear  # imports triton: only when timed

    return mose_linear(x, weight, None, *routing_and_weights)


def _fused_unavailable(case: dict) -> str | None:
    if case["mode"] == "update":
        return "fuses the adapter with the base GEMM: no update-only mode"
    return cuda_only(case)


register(Provider(
    op="mose",
    name="mosear_triton",
    setup=mose_setup(partial(mose_lora, backend="triton", validate=False)),
    unavailable=cuda_only,
    description="F.linear base + Triton MoSE update (sorted-index shrink/expand kernels, sync-free)",
))
register(Provider(
    op="mose",
    name="mosear_fused_linear",
    setup=mose_setup(layer=_fused_linear),
    unavailable=_fused_unavailable,
    description="fused base GEMM + MoSE expand epilogue (UNBENCHMARKED: keep only if it beats mosear_triton)",
))
