"""MoSE providers on the Triton kernels (CUDA only: the interpreter on the CPU is far too slow to time).

``mosear_triton``: the frozen base ``F.linear`` plus the ``mose_lora`` update (read from and written
with the base output in one pass); "fwd_bwd" adds the backward to x, gate, A and B with W frozen
(autograd then adds the base's dx and the adapter's).

``mosear_fused_linear``: ``kernels/mose/function.mose_linear_triton``, the fused base + adapter op:
the Triton expand writes ``bias + update``, cuBLAS adds ``x W^T`` into it (beta = 1), and the
backward accumulates the base dx GEMM into the adapter's dx in place (see function.py for the
roofline). Range validation is off in both (the timed call is the sync-free kernel path).
"""

from __future__ import annotations

from functools import partial

from mosear_fast import mose_lora

from ..registry import Provider, register
from ..setups import cuda_only, mose_setup


def _fused_linear(x, weight, modality, expert, gate, A, B, scale):
    import torch

    from mosear_fast.kernels.mose.function import mose_linear_triton  # imports triton: only when timed

    if not isinstance(scale, torch.Tensor):
        scale = torch.full((A.shape[0],), float(scale), device=x.device)
    return mose_linear_triton(x, weight, None, modality, expert, gate, A, B, scale.to(torch.float32))


def _fused_unavailable(case: dict) -> str | None:
    if case["mode"] == "update":
        return "fuses the adapter with the base GEMM: no update-only mode"
    return cuda_only(case)


register(Provider(
    op="mose",
    name="mosear_triton",
    setup=mose_setup(partial(mose_lora, backend="triton", validate=False)),
    unavailable=cuda_only,
    description="F.linear base + Triton MoSE update (counting-sort routing, split shrink/expand, sync-free)",
))
register(Provider(
    op="mose",
    name="mosear_fused_linear",
    setup=mose_setup(layer=_fused_linear),
    unavailable=_fused_unavailable,
    description="fused base + MoSE: Triton expand writes bias + update, cuBLAS adds x W^T into it (beta = 1)",
))
