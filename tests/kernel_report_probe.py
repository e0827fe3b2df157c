"""Tiny kernels compiled for sm_90a and measured by the kernel report's code; prints the facts as JSON.

Run by tests/test_kernel_report.py as ``python -m tests.kernel_report_probe`` in a process without
TRITON_INTERPRET: Triton's own jit helpers are interpreter objects when it is set, and the compiler
cannot call them.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from bench.kernel_report.measure import measure
from bench.kernel_report.specialise import SM90, _backend, compile_specialisation, specialise


@triton.jit
def chained_dots_kernel(q_ptr, k_ptr, v_ptr, o_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """o = (q k^T) v for one [BLOCK_M, D] block: the attention pattern (one dot feeds the next)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + rows[:, None] * D + d[None, :])  # [BM, D]
    k = tl.load(k_ptr + cols[:, None] * D + d[None, :])  # [BN, D]
    v = tl.load(v_ptr + cols[:, None] * D + d[None, :])  # [BN, D]
    s = tl.dot(q, tl.trans(k))  # [BM, BN]
    o = tl.dot(s.to(v.dtype), v)  # [BM, D]
    tl.store(o_ptr + rows[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty))


@triton.jit
def accumulate_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """A [BLOCK, BLOCK] fp32 accumulator: with few registers allowed, ptxas must spill."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for i in range(0, n):
        acc += tl.load(x_ptr + i * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :])
    tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def pipelined_sum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = sum over blocks of x [n, BLOCK, BLOCK] @ x: unconditional loads in a loop get async copies."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for i in range(0, n):
        tile = tl.load(x_ptr + i * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :])  # [B, B]
        acc = tl.dot(tile, tile, acc)
    tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


def _facts(kernel, args, **kwargs) -> dict:
    spec = specialise(kernel, args, kwargs)
    compiled = compile_specialisation(spec)
    facts = measure(compiled, _backend(SM90), spec.options)
    facts["metadata_shared"] = int(compiled.metadata.shared)
    return facts


def probe() -> dict:
    q = torch.empty(64, 64, dtype=torch.bfloat16)
    x = torch.empty(4 * 64 * 64)
    t = torch.empty(4 * 64 * 64, dtype=torch.bfloat16)
    return {
        "chained_4_warps": _facts(chained_dots_kernel, (q, q, q, q), BLOCK_M=64, BLOCK_N=64, D=64, num_warps=4),
        "chained_8_warps": _facts(chained_dots_kernel, (q, q, q, q), BLOCK_M=64, BLOCK_N=64, D=64, num_warps=8),
        "spilling": _facts(accumulate_kernel, (x, x, 4), BLOCK=64, num_warps=4, maxnreg=32),
        "pipelined": _facts(pipelined_sum_kernel, (t, x, 4), BLOCK=64, num_warps=4, num_stages=3),
        "not_pipelined": _facts(pipelined_sum_kernel, (t, x, 4), BLOCK=64, num_warps=4, num_stages=1),
    }


if __name__ == "__main__":
    json.dump(probe(), sys.stdout)
