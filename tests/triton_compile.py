"""Compiles Triton kernels through the real pipeline (TTIR to cubin) without a GPU.

The interpreter accepts code the compiler rejects (types, layouts, register limits), so each
kernel family also has a test that compiles it for sm_90 in a subprocess without
TRITON_INTERPRET: it needs the ptxas bundled with the triton package, not a GPU.

Two ways:

- ``compile_launches(script)`` (preferred): the script calls the *launchers* on CPU tensors; every
  launch is compiled with the specialisation a real launch gets (Triton's own argument binder on
  the real arguments: ints equal to 1 as constexprs, 16-divisible ints and pointers marked), planned
  as on an H100, and measured like the static kernel report (``bench/kernel_report``): the records
  give registers, spills, shared memory, MMA counts, pipelining. Nothing to keep in sync by hand.
- ``compile_kernels(script)``: the script calls ``compile_sm90(fn, types, consts, num_warps)`` with
  hand-written signatures (every unlisted argument ``i32``, no divisibility attributes): kernel
  code that compiles, but not necessarily the specialisation a launch compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PREAMBLE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_sm90(fn, types, consts, num_warps):
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
        print("compiled", fn.__name__)
""")


def _clean_env() -> dict:
    """This process's environment without the interpreter (and without NaN-filled outputs)."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOSEAR_POISON_OUTPUTS")}


def _skip_without_ptxas(proc) -> None:
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this triton installation: cannot compile without a GPU")


def compile_kernels(script: str, expected: int) -> None:
    """Runs PREAMBLE + ``script`` (which calls ``compile_sm90``) and checks ``expected`` compilations."""
    proc = subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(script)], env=_clean_env(),
                          capture_output=True, text=True, timeout=600)
    _skip_without_ptxas(proc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == expected, proc.stdout


def compile_launches(script: str, expected: int | None = None) -> list[dict]:
    """Runs ``script`` (launcher calls on CPU tensors) with every launch compiled for sm_90a as a real
    launch specialises it; returns one kernel-report record per launch (``kernel``, ``grid``,
    ``regs``, ``spill_bytes``, ``smem_bytes``, ``mma_instructions``, ``pipelined``, ...) and checks
    that there were ``expected`` launches when given."""
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_report.call"], input=textwrap.dedent(script),
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=900)
    _skip_without_ptxas(proc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(proc.stdout)
    if expected is not None:
        assert len(records) == expected, [r["kernel"] for r in records]
    return records
