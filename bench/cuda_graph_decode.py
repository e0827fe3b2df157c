"""``python -m bench.cuda_graph_decode``: decode steps of the two ops, eager against CUDA-graph replay.

At decode sizes an AR call runs 3-25 us on the GPU and a MoSE call a few microseconds, so an eager
step is bound by the host (validation, launch planning, Triton's launch path) unless it is replayed
from a CUDA graph. Each step below is run eagerly ``--iters`` times back to back, then captured once
with ``torch.cuda.graph`` and replayed ``--iters`` times; both are timed with CUDA events around the
whole loop (per-step microseconds = total / iters). After the replays the inputs are refreshed in
place, the graph replayed once more and its output compared with an eager call on the same inputs
(they run the same kernels, so they must agree exactly).

Steps (Qwen2.5-7B's decode shapes, bf16, the public ops with ``validate=False`` and
``backend="triton"``):

    ar            one ``ar_attention`` call: B=1, Hq=28, Hkv=4, D=128, Lq=1 over Lk=4096 cached keys
    mose          one ``mose_lora`` call: N=1 token, d=3584, r=16, M=3, E=4, top-1
    layers        ``--layers`` decoder layers of both: per layer a MoSE update of the query projection
                  and AR over that layer's own KV cache (the host cost of a model's step)

Without CUDA it exits with status 2, unless ``--dry-run``: the steps are built at tiny sizes and run
once eagerly (on the CPU under ``TRITON_INTERPRET=1``, or on CUDA when present), to check the script
itself on a machine without a GPU.

Examples:
    python -m bench.cuda_graph_decode --out graph.json
    TRITON_INTERPRET=1 python -m bench.cuda_graph_decode --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

AR_SHAPE = dict(batch=1, n_q_heads=28, n_kv_heads=4, head_dim=128, len_k=4096)
MOSE_SHAPE = dict(d=3584, rank=16, n_modalities=3, n_experts=4)
DRY_AR_SHAPE = dict(batch=1, n_q_heads=4, n_kv_heads=2, head_dim=16, len_k=40)
DRY_MOSE_SHAPE = dict(d=32, rank=4, n_modalities=3, n_experts=4)
AR_OPTIONS = dict(num_modalities=3, balance=(1, 2), strength=0.5)
STEPS = ("ar", "mose", "layers")


class UsageError(ValueError):
    """A bad command-line value or a missing GPU: one line on stderr, exit status 2."""


@dataclass
class DecodeStep:
    """One decode step: ``run()`` reads the static inputs and returns the output; ``refresh()`` writes
    new values into the inputs in place (a captured graph reads them at their addresses)."""

    name: str
    calls: int  # op calls per step
    run: Callable[[], torch.Tensor]
    refresh: Callable[[], None]


def _ar_inputs(shape: dict, dtype, device, g: torch.Generator) -> dict:
    from tests.cases import av_layout

    b, hq, hkv, d, lk = (shape[k] for k in ("batch", "n_q_heads", "n_kv_heads", "head_dim", "len_k"))
    return dict(q=torch.randn(b, hq, 1, d, generator=g).to(device, dtype),
                k=torch.randn(b, hkv, lk, d, generator=g).to(device, dtype),
                v=torch.randn(b, hkv, lk, d, generator=g).to(device, dtype),
                key_modality=av_layout(lk).expand(b, lk).clone().to(device))


def _mose_inputs(shape: dict, dtype, device, g: torch.Generator) -> dict:
    from tests.cases import make_mose_inputs

    t = make_mose_inputs(1, shape["d"], shape["d"], n_modalities=shape["n_modalities"],
                         n_experts=shape["n_experts"], rank=shape["rank"], dtype=dtype, pad_fraction=0.0,
                         seed=int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)))
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def build_steps(device, *, layers: int = 28, dtype=torch.bfloat16, dry_run: bool = False,
                names=STEPS) -> list[DecodeStep]:
    """The decode steps on ``device`` (tiny shapes with ``dry_run``)."""
    import mosear_fast

    ar_shape, mose_shape = (DRY_AR_SHAPE, DRY_MOSE_SHAPE) if dry_run else (AR_SHAPE, MOSE_SHAPE)
    g = torch.Generator().manual_seed(0)
    opts = dict(backend="triton", validate=False)

    def ar_call(t):
        return mosear_fast.ar_attention(t["q"], t["k"], t["v"], t["key_modality"], **AR_OPTIONS, **opts)

    def mose_call(t, x=None):
        return mosear_fast.mose_lora(t["x"] if x is None else x, t["modality"], t["expert"], t["gate"], t["A"],
                                     t["B"], t["scale"], t["out"], **opts)

    def refresher(*tensors):
        def refresh():
            for t in tensors:
                t.copy_(torch.randn(t.shape, generator=g).to(t.device, t.dtype))
        return refresh

    steps = []
    if "ar" in names:
        t = _ar_inputs(ar_shape, dtype, device, g)
        steps.append(DecodeStep("ar", 1, lambda t=t: ar_call(t), refresher(t["q"])))
    if "mose" in names:
        t = _mose_inputs(mose_shape, dtype, device, g)
        steps.append(DecodeStep("mose", 1, lambda t=t: mose_call(t), refresher(t["x"])))
    if "layers" in names:
        per_layer = [(_mose_inputs(mose_shape, dtype, device, g), _ar_inputs(ar_shape, dtype, device, g))
                     for _ in range(layers)]
        hidden = per_layer[0][0]["x"]  # the step's input token

        def run_layers():
            x = hidden
            for mose_t, ar_t in per_layer:
                y = mose_call(mose_t, x)  # the query projection's update, (1, d)
                o = ar_call(ar_t)  # attention over this layer's cache, (1, Hq, 1, D)
                x = y + o.flatten()[: y.shape[1]].view_as(y)  # the next layer's input depends on both
            return x

        steps.append(DecodeStep("layers", 2 * layers, run_layers, refresher(hidden)))
    return steps


def _time_loop(fn: Callable[[], object], iters: int) -> float:
    """Microseconds per call of ``iters`` calls back to back (CUDA events around the whole loop)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e3 / iters


def measure_step(step: DecodeStep, *, iters: int, warmup: int) -> dict:
    """Eager and graph-replay microseconds per step, and whether the replayed output matches eager."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles, builds tables) on a side stream, as capture wants
        for _ in range(warmup):
            step.run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    eager_us = _time_loop(step.run, iters)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step.run()
    for _ in range(warmup):
        graph.replay()
    graph_us = _time_loop(graph.replay, iters)
    step.refresh()
    graph.replay()
    expected = step.run()
    torch.cuda.synchronize()
    diff = (captured.float() - expected.float()).abs().max().item()
    return dict(step=step.name, calls_per_step=step.calls, eager_us=eager_us, graph_us=graph_us,
                eager_per_call_us=eager_us / step.calls, graph_per_call_us=graph_us / step.calls,
                speedup=eager_us / graph_us if graph_us > 0 else None, replay_matches_eager=diff == 0.0,
                max_abs_diff=diff)


def dry_run(steps: list[DecodeStep]) -> list[dict]:
    """Each step once, eagerly, and its inputs refreshed (no timing, no graph)."""
    rows = []
    for step in steps:
        out = step.run()
        step.refresh()
        rows.append(dict(step=step.name, calls_per_step=step.calls, output_shape=list(out.shape),
                         finite=bool(torch.isfinite(out.float()).all())))
    return rows


def format_row(row: dict) -> str:
    if "eager_us" not in row:
        return f"  {row['step']:8s} ran once (dry run): output {row['output_shape']}, finite {row['finite']}"
    return (f"  {row['step']:8s} {row['calls_per_step']:4d} calls  eager {row['eager_us']:9.1f} us  "
            f"graph {row['graph_us']:9.1f} us  ({row['speedup']:.2f}x; per call {row['eager_per_call_us']:.1f} -> "
            f"{row['graph_per_call_us']:.1f} us)  replay == eager: {row['replay_matches_eager']}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.cuda_graph_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {STEPS} (default all)")
    p.add_argument("--layers", type=int, default=28, help="decoder layers of the 'layers' step (default 28)")
    p.add_argument("--iters", type=int, default=200, help="timed steps, eager and replayed (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--dry-run", action="store_true",
                   help="no CUDA needed: build the steps at tiny sizes and run each once (TRITON_INTERPRET=1)")
    p.add_argument("--out", default=None, metavar="PATH", help="write the results as JSON (atomically)")
    return p.parse_args(argv)


def run(args) -> dict:
    from .environment import describe

    names = tuple(n.strip() for n in args.steps.split(",") if n.strip())
    if not names or any(n not in STEPS for n in names):
        raise UsageError(f"--steps: expected comma-separated names of {STEPS}, got {args.steps!r}")
    for flag, value in (("--layers", args.layers), ("--iters", args.iters)):
        if value < 1:
            raise UsageError(f"{flag}: expected an int >= 1, got {value}")
    if args.warmup < 1:
        raise UsageError(f"--warmup: expected an int >= 1 (capture needs a warmed-up step), got {args.warmup}")
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"--out: the folder of {args.out} does not exist")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
            raise UsageError("--dry-run: without CUDA the kernels run in the Triton interpreter; set "
                             "TRITON_INTERPRET=1 before the start")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif not torch.cuda.is_available():
        raise UsageError("CUDA graphs need a CUDA device, and none is available (use --dry-run to check the "
                         "script on a machine without one)")
    else:
        device = torch.device("cuda")
    steps = build_steps(device, layers=args.layers, dry_run=args.dry_run, names=names)
    print(f"decode steps on {device} ({'dry run' if args.dry_run else f'{args.iters} iterations'}):", flush=True)
    rows = []
    with torch.no_grad():
        for step in steps:
            row = dry_run([step])[0] if args.dry_run else measure_step(step, iters=args.iters, warmup=args.warmup)
            print(format_row(row), flush=True)
            rows.append(row)
    return dict(kind="cuda-graph-decode", environment=describe(device), dry_run=args.dry_run, iters=args.iters,
                layers=args.layers, results=rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        from mosear_fast.atomic import atomic_write_json

        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    failed = [r["step"] for r in result["results"] if r.get("replay_matches_eager") is False or
              r.get("finite") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
