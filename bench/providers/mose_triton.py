"""MoSE providers on the Triton kernels (CUDA only: the interpreter on the CPU is far too slow to time).

``mosear_triton``: the frozen base ``F.linear`` plus the ``mose_lora`` update. "fwd": y =
mose_lora(..., out=F.linear(x, W), inplace=True): the update is added into the base output in place
(no extra allocation). "fwd_bwd": forward (out-of-place, since the base output carries x's
gradient) and backward to x, gate, A and B with W frozen. Range validation is off
(``validate=False``) so the timed call is the sync-free kernel path.

``mosear_fused_linear``: ``kernels/mose/fused_linear.mose_linear``, base GEMM and adapter expand in
one kernel (and dx = dy W + A^T dh in one kernel). Written without a GPU and never benchmarked yet:
it stays only if it beats ``mosear_triton`` here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.registry import Provider, register
from tests.cases import make_mose_inputs


def _unavailable(case: dict) -> str | None:
    if torch.device(case["device"]).type != "cuda":
        return "needs CUDA (the Triton interpreter on the CPU is too slow to benchmark)"
    return None


def _inputs(case: dict):
    device, dtype = torch.device(case["device"]), case["dtype"]
    n_tokens, d_in, d_out = case["n_tokens"], case["d_in"], case["d_out"]
    inputs = make_mose_inputs(n_tokens, d_in, d_out, n_modalities=case["n_modalities"],
                              n_experts=case["n_experts"], rank=case["rank"], top_k=case["top_k"],
                              dtype=dtype, device=device, with_out=False)
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(d_out, d_in, generator=g) * d_in ** -0.5).to(device=device, dtype=dtype)  # frozen base
    dy = torch.randn(n_tokens, d_out, device=device, dtype=dtype)
    if case["mode"] not in ("fwd", "fwd_bwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwd_bwd', got {case['mode']!r}")
    return inputs, W, dy


def _setup(case: dict):
    from mosear_fast import mose_lora

    inputs, W, dy = _inputs(case)
    x, modality, expert, gate = inputs["x"], inputs["modality"], inputs["expert"], inputs["gate"]
    A, B, scale = inputs["A"], inputs["B"], inputs["scale"]

    if case["mode"] == "fwd":
        def run():
            with torch.no_grad():
                base = F.linear(x, W)
                return mose_lora(x, modality, expert, gate, A, B, scale, base, inplace=True,
                                 backend="triton", validate=False)
        return run

    x, gate, A, B = (t.detach().requires_grad_(True) for t in (x, gate, A, B))

    def run():
        for t in (x, gate, A, B):
            t.grad = None
        base = F.linear(x, W)
        y = mose_lora(x, modality, expert, gate, A, B, scale, base, backend="triton", validate=False)
        y.backward(dy)
        return y

    return run


def _setup_fused(case: dict):
    from mosear_fast.kernels.mose.fused_linear import mose_linear

    inputs, W, dy = _inputs(case)
    x, modality, expert, gate = inputs["x"], inputs["modality"], inputs["expert"], inputs["gate"]
    A, B, scale = inputs["A"], inputs["B"], inputs["scale"]

    if case["mode"] == "fwd":
        def run():
            with torch.no_grad():
                return mose_linear(x, W, None, modality, expert, gate, A, B, scale)
        return run

    x, gate, A, B = (t.detach().requires_grad_(True) for t in (x, gate, A, B))

    def run():
        for t in (x, gate, A, B):
            t.grad = None
        y = mose_linear(x, W, None, modality, expert, gate, A, B, scale)
        y.backward(dy)
        return y

    return run


register(Provider(
    op="mose",
    name="mosear_triton",
    setup=_setup,
    unavailable=_unavailable,
    description="F.linear base + Triton MoSE update (sorted-index shrink/expand kernels, sync-free)",
))
register(Provider(
    op="mose",
    name="mosear_fused_linear",
    setup=_setup_fused,
    unavailable=_unavailable,
    description="fused base GEMM + MoSE expand epilogue (UNBENCHMARKED: keep only if it beats mosear_triton)",
))
