"""Captures the Triton launches a launcher makes, without running them.

``record_launches()`` swaps the launch entry of every Triton kernel (``JITFunction.run``, and
``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``) for a recorder that stores
``(kernel, grid, args, kwargs)`` and returns. It works at the class level, so every kernel object is
covered, whichever module imported it; the launcher's own code (block sizes, split-k, allocation)
runs unchanged. An autotuned kernel (``triton.autotune``) is recorded once per config, since
which config wins is decided by timing on the GPU. Combine it with
``mosear_fast.kernels.target.pretend()`` so that the launch planning on CPU tensors is the one of the
GPU target.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

try:  # the interpreter's kernel class (kernels decorated under TRITON_INTERPRET=1)
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - every supported Triton has it
    InterpretedFunction = None


@dataclass
class Launch:
    """One kernel launch as the launcher issued it."""

    kernel: object  # JITFunction (or InterpretedFunction under the interpreter)
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def grid_size(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _bound_args(kernel, args, kwargs) -> dict:
    names = list(kernel.arg_names)
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return bound


def _canonical_grid(grid, kernel, args, kwargs) -> tuple[int, int, int]:
    if callable(grid):  # a grid function gets the bound arguments, as in a real launch
        grid = grid(_bound_args(kernel, args, kwargs))
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


@contextlib.contextmanager
def record_launches():
    """Within the block, kernel launches are recorded (in order) into the yielded list, not run."""
    launches: list[Launch] = []

    def recorder(self, *args, grid, warmup, **kwargs):
        if warmup:  # a warm-up compiles only: nothing to record
            return None
        launches.append(Launch(self, _canonical_grid(grid, self, args, kwargs), args, dict(kwargs)))
        return None

    def every_config(self, *args, **kwargs):
        for config in self.configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    swaps = [(c, recorder) for c in (JITFunction, InterpretedFunction) if c is not None]
    swaps.append((Autotuner, every_config))
    saved = [(c, c.__dict__["run"]) for c, _ in swaps]
    try:
        for c, run in swaps:
            c.run = run
        yield launches
    finally:
        for c, run in saved:
            c.run = run
