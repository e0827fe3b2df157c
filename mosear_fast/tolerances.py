"""The tolerance table: one relative error bound per dtype, used by tests, benchmarks and export checks.

Errors are relative in the Frobenius norm: ``||out - ref|| / ||ref||``. For ``mose_lora`` compare
the update (``y - out``), not ``out + update``, which would hide a wrong update. NaN never passes.
"""

from __future__ import annotations

import torch

REL_TOL = {
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 1e-2,
}
# float32 dots through tensor cores (tf32, the default of tl.dot on recent GPUs)
TF32_REL_TOL = 5e-4


def tolerance(dtype: torch.dtype, *, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return TF32_REL_TOL
    return REL_TOL[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when out has NaN/inf; abs error when ref is 0."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"rel_error: shapes differ, {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    diff = (out - ref).norm().item()
    norm = ref.norm().item()
    return diff / norm if norm > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, tf32: bool = False,
                 what: str = "output") -> None:
    """Raises AssertionError when ``rel_error(out, ref)`` exceeds the table's bound for ``dtype``."""
    err, tol = rel_error(out, ref), tolerance(dtype, tf32=tf32)
    if not err <= tol:  # also false for NaN
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})")
