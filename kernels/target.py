"""What a launcher may ask about the device its kernels run on, in one place.

Launch planning (block sizes, split-k, grid fill, interpreter work-arounds) depends on two facts:
how many SMs the device has and whether the kernels run in the Triton interpreter. Launchers ask
here instead of calling ``torch.cuda`` directly, so that the static kernel report
(``python -m bench.kernel_report``) can plan launches on a machine without a GPU exactly as on its
target: inside ``pretend(H100)`` CPU tensors are planned as compiled kernels on a 132-SM device.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """The launch-planning facts of one device."""

    name: str
    multiprocessor_count: int


H100 = Target("NVIDIA H100 SXM (sm_90a)", 132)

_state = threading.local()


def _pretended() -> Target | None:
    return getattr(_state, "target", None)


def interpreted(device: torch.device) -> bool:
    """Whether kernels on ``device`` run in the Triton interpreter (CPU tensors, or TRITON_INTERPRET=1)."""
    if _pretended() is not None:
        return False
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def multiprocessor_count(device: torch.device) -> int | None:
    """The SM count of ``device``; None where kernels do not run on SMs (the CPU interpreter)."""
    target = _pretended()
    if target is not None:
        return target.multiprocessor_count
    if device.type != "cuda":
        return None
    return _cuda_sm_count(device)


@functools.cache
def _cuda_sm_count(device: torch.device) -> int:
    # cached: the properties query costs microseconds, paid on every launch otherwise
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_facts(device: torch.device) -> tuple[bool, int | None]:
    """``(interpreted(device), multiprocessor_count(device))`` in one call: the facts a launch plan
    depends on, cheap enough for every call and hashable, so launchers key their plan caches on it."""
    target = getattr(_state, "target", None)
    if target is not None:
        return False, target.multiprocessor_count
    if device.type != "cuda":
        return True, None
    return os.environ.get("TRITON_INTERPRET", "0") == "1", _cuda_sm_count(device)


@contextlib.contextmanager
def pretend(target: Target = H100):
    """Within this block (this thread), every device is planned as ``target``: compiled, its SM count."""
    previous = _pretended()
    _state.target = target
    try:
        yield target
    finally:
        _state.target = previous
