"""``python -m bench.host_overhead``: the Python cost of one call of each op, kernels stubbed out.

At decode sizes an AR call runs 3-25 us on the GPU, so the host time spent before its kernels are
launched decides the step time unless the step is replayed from a CUDA graph. This bench times that
host time on the CPU: every Triton launch (``JITFunction.run``, the class-level entry that
``kernel[grid](...)`` calls; ``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``) is replaced by
a stub that evaluates the grid and returns, so everything the launcher does itself still runs (launch
planning, the integer arithmetic of grids and splits, allocation of outputs and split-k buffers, the
routing's buffer, argument lists) and only the kernel is skipped. With ``--bind`` (the default) the
stub also runs Triton's own argument binder for sm_90a (what ``JITFunction.run`` does before the driver launch:
specialisation of every argument, the cache key), to show Triton's share of a real launch.

Launches are planned as on an H100 (``kernels.target.pretend``), with CPU tensors at the full shapes,
so the plan (block sizes, splits, grids) is the GPU's. Columns, median microseconds per call over
``--calls`` calls after ``--warmup`` (timed in samples of 20 calls, the columns taking turns sample by
sample so that the load of a shared machine falls on all alike; ``--clock cpu`` counts CPU time only):

    launcher      the Triton backend's entry (``ar_attention_triton`` / ``mose_lora_triton``), stubbed
    +bind         the same, with Triton's binder run per launch (``--no-bind``: left out)
    op            the public op (``mosear_fast.ar_attention`` / ``mose_lora``) with ``validate=False``:
                  argument checks, backend dispatch, launcher; the value checks are skipped as on CUDA
    op+values     the public op with ``validate=True``: also the value range checks of the ids, here on
                  host tensors (on CUDA they cost a device-to-host copy and a sync on top)
    torch         the PyTorch backend on the CPU, running for real (at decode sizes mostly host time;
                  left out with a printed reason where the CPU would spend seconds computing)

Examples:
    python -m bench.host_overhead
    python -m bench.host_overhead --ops ar --shapes decode --calls 5000 --clock cpu --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Shapes of issue 13: Qwen2.5-7B's attention (28 query heads, 4 KV heads, head dim 128) at 4096 keys,
# and a MoSE adapter on a 3584-wide projection (r 16, 3 modalities, 4 experts).
AR_SHAPE = dict(batch=1, n_q_heads=28, n_kv_heads=4, head_dim=128, len_k=4096)
AR_LEN_Q = dict(prefill=4096, decode=1)
MOSE_SHAPE = dict(d=3584, rank=16, n_modalities=3, n_experts=4)
MOSE_TOKENS = dict(prefill=4096, decode=1)
AR_OPTIONS = dict(num_modalities=3, balance=(1, 2), strength=0.5)
# The PyTorch backend computes for real: left out where that would take seconds on a CPU.
TORCH_MAX_FLOP = 5e9
OPS = ("ar", "mose")
SHAPES = ("prefill", "decode")
COLUMNS = ("launcher", "+bind", "op", "op+values", "torch")


class UsageError(ValueError):
    """A bad command-line value: one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------
# Stubbed launches
# ------------------------------------------------------------------------------------------------


def _kernel_classes():
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        InterpretedFunction = None
    return [c for c in (JITFunction, InterpretedFunction) if c is not None]


def _binder_for(kernel):
    """Triton's binder of ``kernel`` for sm_90a and the options ``JITFunction.run`` adds (None when
    the kernel is an interpreted one, which has no binder)."""
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        return None
    from bench.kernel_report.specialise import SM90, _binder

    return _binder(kernel, SM90)


class StubMode:
    """What a stubbed launch does besides evaluating its grid: ``bind`` also runs Triton's binder."""

    def __init__(self, bind: bool = False):
        self.bind = bind


@contextlib.contextmanager
def stub_launches(*, bind: bool | StubMode = False, counter: list | None = None):
    """Within the block every Triton launch evaluates its grid (and with ``bind`` runs Triton's binder
    on its arguments) and returns without running the kernel. ``bind`` may be a ``StubMode``, read at
    each launch, so that one block can time both. ``counter`` (a one-element list) counts launches."""
    from bench.kernel_report.specialise import launch_options

    mode = bind if isinstance(bind, StubMode) else StubMode(bind)

    def stub(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            names = list(self.arg_names)
            grid = grid(dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names})
        if mode.bind:
            binder = _binder_for(self)
            if binder is None:
                raise UsageError("--bind: the kernels are interpreted ones (TRITON_INTERPRET=1 was set when they "
                                 "were imported); run without TRITON_INTERPRET")
            binder(*args, **launch_options(self, kwargs))
        if counter is not None:
            counter[0] += 1
        return None

    classes = _kernel_classes()
    saved = [(c, c.__dict__["run"]) for c in classes]
    try:
        for c in classes:
            c.run = stub
        yield
    finally:
        for c, run in saved:
            c.run = run


@contextlib.contextmanager
def public_op_on_cpu():
    """The public ops accept ``backend="triton"`` for CPU tensors only under ``TRITON_INTERPRET=1``;
    the kernels are already imported (stubbed), so the variable only opens the dispatch. Value
    checks follow the CUDA rule (done only with ``validate=True``) instead of the CPU one (always)."""
    from mosear_fast import _validation

    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_check = _validation._needs_value_checks
    os.environ["TRITON_INTERPRET"] = "1"
    _validation._needs_value_checks = lambda t, validate: validate
    try:
        yield
    finally:
        _validation._needs_value_checks = saved_check
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str  # "ar" or "mose"
    shape: str  # "prefill" or "decode"
    description: str
    launcher: Callable[[], object]
    public: Callable[[bool], object]  # validate -> result
    torch_backend: Callable[[], object]
    torch_flop: float  # the PyTorch backend's work, to leave it out where it would take seconds


def ar_case(shape: str, dtype=torch.bfloat16, scale: float = 1.0) -> Case:
    """AR attention at Qwen2.5-7B's heads: prefill (Lq = Lk) or one decode query over the cache."""
    import mosear_fast
    from mosear_fast.kernels.ar_attention.function import ar_attention_triton
    from mosear_fast.kernels.ar_attention.torch_backend import ar_attention_torch
    from tests.cases import make_ar_inputs

    s = {k: max(1, int(v * scale)) if k in ("len_k",) else v for k, v in AR_SHAPE.items()}
    len_q = min(s["len_k"], max(1, int(AR_LEN_Q[shape] * scale)) if shape == "prefill" else 1)
    t = make_ar_inputs(s["batch"], s["n_q_heads"], s["n_kv_heads"], len_q, s["len_k"], s["head_dim"], dtype=dtype,
                       layout="av")
    args = (t["q"], t["k"], t["v"], t["key_modality"])
    backend_args = dict(AR_OPTIONS, target=(0.5, 0.5), threshold=0.0, modality_bias=None, causal=True,
                        scale=s["head_dim"] ** -0.5, query_mask=None, return_masses=False)
    flop = 4.0 * s["batch"] * s["n_q_heads"] * len_q * s["len_k"] * s["head_dim"]
    return Case(
        "ar", shape, f"B={s['batch']} Hq={s['n_q_heads']} Hkv={s['n_kv_heads']} D={s['head_dim']} Lq={len_q} "
        f"Lk={s['len_k']} {str(dtype).replace('torch.', '')}",
        launcher=lambda: ar_attention_triton(*args, **backend_args),
        public=lambda validate: mosear_fast.ar_attention(*args, **AR_OPTIONS, backend="triton", validate=validate),
        torch_backend=lambda: ar_attention_torch(*args, **backend_args),
        torch_flop=flop,
    )


def mose_case(shape: str, dtype=torch.bfloat16, scale: float = 1.0, top_k: int = 1) -> Case:
    """``mose_lora`` (out given) on a d x d projection: prefill (N tokens) or one decode token."""
    import mosear_fast
    from mosear_fast.kernels.mose.function import mose_lora_triton
    from mosear_fast.kernels.mose.torch_backend import mose_lora_torch
    from tests.cases import make_mose_inputs

    s = MOSE_SHAPE
    d = max(16, int(s["d"] * scale))
    n = max(1, int(MOSE_TOKENS[shape] * scale)) if shape == "prefill" else 1
    t = make_mose_inputs(n, d, d, n_modalities=s["n_modalities"], n_experts=s["n_experts"], rank=s["rank"],
                         top_k=top_k, dtype=dtype, pad_fraction=0.0)
    scale_vec = t["scale"].to(torch.float32)
    args = (t["x"], t["modality"], t["expert"], t["gate"], t["A"], t["B"])
    return Case(
        "mose", shape, f"N={n} d={d} r={s['rank']} M={s['n_modalities']} E={s['n_experts']} top-{top_k} "
        f"{str(dtype).replace('torch.', '')}",
        launcher=lambda: mose_lora_triton(*args, scale_vec, t["out"]),
        public=lambda validate: mosear_fast.mose_lora(*args, t["scale"], t["out"], backend="triton",
                                                      validate=validate),
        torch_backend=lambda: mose_lora_torch(*args, scale_vec, t["out"]),
        torch_flop=2.0 * n * d * s["rank"] * (1 + top_k),
    )


def build_cases(ops, shapes, *, scale: float = 1.0) -> list[Case]:
    makers = dict(ar=ar_case, mose=mose_case)
    return [makers[op](shape, scale=scale) for op in ops for shape in shapes]


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


CLOCKS = dict(wall=time.perf_counter_ns, cpu=time.thread_time_ns)
BATCH = 20  # calls per timed sample


def time_rounds(fns: dict[str, Callable[[], object]], *, calls: int, warmup: int, clock: str = "wall",
                batch: int = BATCH) -> dict:
    """Microseconds per call of each function: samples of ``batch`` calls in a row, the functions
    taking turns sample by sample (so a load spike on a shared machine falls on all of them alike),
    ``calls // batch`` samples each; the median, 20th and 80th percentile of the samples' per-call
    times. The garbage collector is paused while timing. ``clock`` "cpu" counts this thread's CPU
    time only (leaves out the time the thread waits for a core)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    tick = CLOCKS[clock]
    batch = max(1, min(batch, calls))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(1, calls // batch)):
            for name, fn in fns.items():
                t0 = tick()
                for _ in range(batch):
                    fn()
                samples[name].append((tick() - t0) / 1e3 / batch)
    finally:
        if enabled:
            gc.enable()
    result = {}
    for name, times in samples.items():
        q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
        result[name] = dict(median_us=statistics.median(times), p20_us=q[0], p80_us=q[3],
                            calls=len(times) * batch)
    return result


def measure_case(case: Case, *, calls: int, warmup: int, bind: bool, torch_calls: int, clock: str = "wall",
                 log=print) -> dict:
    from mosear_fast.kernels.target import pretend

    result = dict(op=case.op, shape=case.shape, description=case.description, columns={}, skipped={})
    counter = [0]
    mode = StubMode()

    def bound():
        mode.bind = True
        try:
            case.launcher()
        finally:
            mode.bind = False

    fns = {"launcher": case.launcher, "+bind": bound, "op": lambda: case.public(False),
           "op+values": lambda: case.public(True)}
    with pretend(), torch.no_grad(), stub_launches(bind=mode, counter=counter), public_op_on_cpu():
        case.launcher()
        result["launches_per_call"] = counter[0]
        if not bind:
            result["skipped"]["+bind"] = "left out (--no-bind)"
        else:
            try:
                bound()
            except UsageError as err:
                result["skipped"]["+bind"] = str(err)
        if "+bind" in result["skipped"]:
            del fns["+bind"]
        result["columns"].update(time_rounds(fns, calls=calls, warmup=warmup, clock=clock))
    if torch_calls <= 0:
        result["skipped"]["torch"] = "not asked for (--torch-calls 0)"
    elif case.torch_flop > TORCH_MAX_FLOP:
        result["skipped"]["torch"] = (f"{case.torch_flop / 1e9:.0f} GFLOP of real compute on the CPU per call "
                                      f"(over {TORCH_MAX_FLOP / 1e9:.0f}): not host overhead")
    else:
        with torch.no_grad():
            result["columns"]["torch"] = time_rounds({"torch": case.torch_backend}, calls=torch_calls,
                                                     warmup=max(1, torch_calls // 10), clock=clock, batch=1)["torch"]
    log(format_row(result))
    return result


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def header() -> str:
    return f"{'op':5s} {'shape':8s} {'launches':>8s} " + " ".join(f"{c:>10s}" for c in COLUMNS) + "  case"


def format_row(row: dict) -> str:
    cells = []
    for c in COLUMNS:
        t = row["columns"].get(c)
        cells.append(f"{t['median_us']:10.1f}" if t else f"{'-':>10s}")
    return f"{row['op']:5s} {row['shape']:8s} {row.get('launches_per_call', 0):8d} " + " ".join(cells) + \
        f"  {row['description']}"


def run(ops=OPS, shapes=SHAPES, *, calls=2000, warmup=200, bind=True, torch_calls=50, scale=1.0, clock="wall",
        log=print) -> dict:
    """Measures every (op, shape); returns the JSON-ready result."""
    from .environment import describe

    log(f"median microseconds per call ({clock} clock; kernels stubbed; planned as on an H100); '-': see notes")
    log(header())
    rows = [measure_case(case, calls=calls, warmup=warmup, bind=bind, torch_calls=torch_calls, clock=clock, log=log)
            for case in build_cases(ops, shapes, scale=scale)]
    notes = sorted({f"{c}: {why}" for r in rows for c, why in r["skipped"].items()})
    for note in notes:
        log(f"  - {note}")
    return dict(kind="host-overhead", environment=describe(torch.device("cpu")), calls=calls, warmup=warmup,
                clock=clock, columns=list(COLUMNS), results=rows)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {OPS} (default all)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {SHAPES} (default all)")
    p.add_argument("--calls", type=int, default=2000,
                   help=f"timed calls per column (default 2000), in samples of {BATCH} calls, the columns "
                        "taking turns sample by sample")
    p.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                   help="wall (default) or cpu: this thread's CPU time, steadier on a shared machine")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls first (default 200)")
    p.add_argument("--bind", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the launcher with Triton's sm_90a binder run per launch (default on; needs "
                        "kernels imported without TRITON_INTERPRET, else the column is left out with the reason)")
    p.add_argument("--torch-calls", type=int, default=50,
                   help="timed calls of the PyTorch backend, which computes for real (default 50; 0: leave out)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the sequence and feature sizes (smoke tests; default 1: the issue's shapes)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (atomically)")
    return p.parse_args(argv)


def _names(value: str, allowed: tuple, flag: str) -> tuple:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise UsageError(f"{flag}: expected comma-separated names of {allowed}, got {value!r}")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ops = _names(args.ops, OPS, "--ops")
        shapes = _names(args.shapes, SHAPES, "--shapes")
        for flag, value, low in (("--calls", args.calls, 1), ("--warmup", args.warmup, 0),
                                 ("--torch-calls", args.torch_calls, 0)):
            if value < low:
                raise UsageError(f"{flag}: expected an int >= {low}, got {value}")
        if not 0 < args.scale <= 1:
            raise UsageError(f"--scale: expected a float in (0, 1], got {args.scale}")
        if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise UsageError(f"--json: the folder of {args.json} does not exist")
        result = run(ops, shapes, calls=args.calls, warmup=args.warmup, bind=args.bind,
                     torch_calls=args.torch_calls, scale=args.scale, clock=args.clock)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        from mosear_fast.atomic import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
