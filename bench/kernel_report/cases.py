"""What an op module of the report declares: its cases and the tile math of its kernels.

An op module (``ar.py``, ``mose.py``) provides

- ``cases() -> list[Case]``: each case calls the op's real launchers on CPU tensors (allocated, never
  touched: the kernels are recorded, not run) at one shape, dtype and flag combination;
- ``dots(kernel_name, constexprs) -> list[Dot] | None``: the ``tl.dot`` calls of one pass of that
  kernel (from its tile math, given the launch's constexpr values, e.g. BLOCK_M), which the report
  turns into ``expected_mma_instructions``; None for a kernel it does not describe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .measure import Dot  # noqa: F401  (re-exported for the op modules)


@dataclass(frozen=True)
class Case:
    """One call of an op's launchers."""

    op: str
    name: str  # unique within the op, stable: tests select cases by it
    params: dict  # shape, dtype, flags (JSON values)
    run: Callable[[], None]  # calls the launchers (inside the report's recorder)
    main: bool = False  # a headline shape: shown in the README table
    roofline: dict | None = field(default=None)  # {"bytes": ..., "flops": ...} of the whole call


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


DTYPE_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
