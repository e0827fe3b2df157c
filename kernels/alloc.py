"""Output allocation shared by every backend.

Tests set ``MOSEAR_POISON_OUTPUTS=1`` so that freshly allocated float outputs start as NaN:
an element a kernel forgets to write then fails the comparison instead of passing by luck.
"""

from __future__ import annotations

import os

import torch


def poison_enabled() -> bool:
    return os.environ.get("MOSEAR_POISON_OUTPUTS", "0") == "1"


def empty_output(shape, *, dtype: torch.dtype, device, poison: bool | None = None) -> torch.Tensor:
    """``torch.empty``, filled with NaN when output poisoning is on (float dtypes only). ``poison``:
    whether it is, when the caller has looked already (one environment read per call, not per buffer)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if (poison_enabled() if poison is None else poison) and out.is_floating_point():
        out.fill_(float("nan"))
    return out
