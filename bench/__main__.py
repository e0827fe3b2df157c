"""``python -m bench``: time the providers of one op on a preset, print ratios, write JSON.

Examples:
    python -m bench --op mose --preset cpu-small --mode fwd
    OMP_NUM_THREADS=1 python -m bench --op mose --preset cpu-small --mode fwd --clock cpu --rounds 60  # shared CPU
    python -m bench --op ar --preset llama2-7b-prefill --providers sdpa,mosear_triton,eager_ar
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from mosear_fast.atomic import atomic_write_json

from . import presets
from .environment import describe
from .registry import FLOORS, providers
from .timing import CLOCKS, measure, measure_rounds


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", required=True, choices=tuple(presets.PRESETS), help="which op to benchmark")
    p.add_argument("--preset", default="cpu-small", help="size preset (see bench/presets.py); default cpu-small")
    p.add_argument("--mode", default="fwd", choices=("fwd", "update", "fwd_bwd"),
                   help="fwd: base + update (MoSE) or attention (AR); update: the adapter alone; "
                        "fwd_bwd: forward + backward with the base frozen")
    p.add_argument("--providers", default=None, help="comma-separated provider names (default: all that can run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="timed seconds per measurement (default 0.5)")
    p.add_argument("--max-runs", type=int, default=100, help="at most this many timed runs (default 100)")
    p.add_argument("--clock", default="wall", choices=CLOCKS,
                   help="CPU timings: wall (default) or cpu, the process's CPU time, for a shared machine; "
                        "cpu needs one thread (OMP_NUM_THREADS=1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="CPU: time in this many interleaved rounds (every provider once per round) instead of "
                        "provider after provider, so drifting machine load falls on all alike")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<op>-<preset>-<mode>-<device>.json)")
    return p.parse_args(argv)


def run(op, preset, mode, device, names=None, *, min_seconds=0.5, max_runs=100, log=print,
        on_progress=None, clock="wall", rounds=None) -> dict:
    """Measures every (case, provider) pair; returns the JSON-ready result dict. ``on_progress`` gets
    the partial result after every case (so a run stopped by a time limit keeps what it measured)."""
    registry = providers(op)
    if names is not None:
        unknown = sorted(set(names) - set(registry))
        if unknown:
            raise ValueError(f"providers: unknown for {op}: {unknown}; known: {sorted(registry)}")
    floor = FLOORS[op]
    selected = [n for n in (names or registry) if n in registry]
    if floor not in selected:
        selected.insert(0, floor)
    rows = []
    environment = describe(device)
    if clock == "cpu":
        if device.type != "cpu" or torch.get_num_threads() != 1:
            raise ValueError("clock: 'cpu' times one CPU thread; run with --device cpu and OMP_NUM_THREADS=1 "
                             f"(got device {device.type}, {torch.get_num_threads()} threads)")
        environment["clock"] = "process CPU time"
    if rounds is not None:
        if device.type != "cpu" or rounds < 1:
            raise ValueError(f"rounds: interleaved rounds time CPU providers; expected >= 1 with --device cpu, got "
                             f"{rounds} on {device.type}")
        environment["rounds"] = rounds
    result = dict(op=op, preset=preset, mode=mode, floor=floor, environment=environment,
                  providers={n: registry[n].description for n in selected}, results=rows)
    for case in presets.cases(op, preset, mode=mode, device=device):
        shape = {k: v for k, v in case.items() if k not in ("device", "dtype", "mode")}
        timings, timed = {}, {}
        for name in selected:
            provider = registry[name]
            reason = provider.unavailable(case)
            if reason is None and mode == "fwd_bwd" and name == "sdpa":
                reason = "floor of the inference benchmark only"
            if reason is not None:
                timings[name] = dict(skipped=reason)
            elif rounds is not None:
                timed[name] = provider.setup(case)
            else:
                try:
                    timings[name] = measure(provider.setup(case), device, min_seconds=min_seconds,
                                            max_runs=max_runs, clock=clock)
                except torch.OutOfMemoryError:
                    timings[name] = dict(skipped="out of memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if timed:
            timings.update(measure_rounds(timed, rounds=rounds, clock=clock))
            timings = {name: timings[name] for name in selected}
        floor_ms = timings.get(floor, {}).get("median_ms")
        work = presets.flops(op, case)
        for t in timings.values():
            if "median_ms" in t:
                t["ratio_to_floor"] = t["median_ms"] / floor_ms if floor_ms else None
                t["tflops"] = work / (t["median_ms"] * 1e-3) / 1e12
        row = dict(case=shape, dtype=str(case["dtype"]).replace("torch.", ""), providers=timings)
        rows.append(row)
        log(format_row(row, selected))
        if on_progress is not None:
            on_progress(result)
    return result


def format_row(row, names) -> str:
    case = row["case"]
    shape = ", ".join(f"{k}={v}" for k, v in case.items() if k != "model")
    cells = []
    for name in names:
        t = row["providers"].get(name, {})
        if "median_ms" in t:
            ratio = t.get("ratio_to_floor")
            cells.append(f"{name} {t['median_ms']:.3f} ms" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        else:
            cells.append(f"{name} -")
    return f"[{shape}] " + " | ".join(cells)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    names = args.providers.split(",") if args.providers else None
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"{args.op}-{args.preset}-{args.mode}-{device.type}.json")

    def save(result):
        atomic_write_json(out, result)

    try:
        result = run(args.op, args.preset, args.mode, device, names, min_seconds=args.min_seconds,
                     max_runs=args.max_runs, on_progress=save, clock=args.clock, rounds=args.rounds)
    except ValueError as err:
        print(f"python -m bench: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({result['environment']['device']}, torch {result['environment']['torch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
