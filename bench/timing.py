"""Timing and memory measurement: CUDA events on GPU, a wall clock on CPU; medians of many runs."""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def _tick(clock: str):
    return time.process_time if clock == "cpu" else time.perf_counter


def _summary(times_ms: list[float]) -> dict:
    quantiles = statistics.quantiles(times_ms, n=5) if len(times_ms) > 1 else [times_ms[0]] * 4
    return dict(median_ms=statistics.median(times_ms), p20_ms=quantiles[0], p80_ms=quantiles[3],
                runs=len(times_ms), peak_memory_bytes=None)


def measure_rounds(fns: dict, *, rounds: int, warmup: int = 3, clock: str = "wall") -> dict:
    """CPU only: ``rounds`` rounds, each running every callable of ``fns`` once in turn, so that load
    which drifts during the run (a shared machine) falls on every provider alike. Returns
    ``measure``'s summary per name."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    tick = _tick(clock)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = tick()
            fn()
            times[name].append((tick() - t0) * 1e3)
    return {name: _summary(t) for name, t in times.items()}


def measure(fn, device: torch.device, *, warmup: int = 3, min_runs: int = 5, max_runs: int = 100,
            min_seconds: float = 0.5, clock: str = "wall") -> dict:
    """Runs ``fn`` after ``warmup`` calls until ``min_runs`` and ``min_seconds`` are both reached.

    On the CPU each run is timed by the wall clock, or with ``clock="cpu"`` by the process's CPU
    time (meaningful with one thread: it leaves out the time the process waits for a core on a
    shared machine, not the slowdown other processes cause in the caches).

    Returns the median and the 20th/80th percentiles in milliseconds, the number of timed runs and,
    on CUDA, the peak memory allocated during one run beyond what was allocated before it.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times_ms = []
    tick = _tick(clock)
    started = time.perf_counter()
    while len(times_ms) < max_runs and (len(times_ms) < min_runs or time.perf_counter() - started < min_seconds):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(begin.elapsed_time(end))
        else:
            t0 = tick()
            fn()
            times_ms.append((tick() - t0) * 1e3)
    result = _summary(times_ms)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return result
