"""Builds the report: capture each case's launches, compile each distinct specialisation once, one
record per launch. ``report_records`` is the entry point for tests (cached per process; it runs the
report in a subprocess when this process has the Triton interpreter on, as the test suite does).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import H100, expected_mma, measure, waves

OPS = ("ar", "mose")
ROOT = Path(__file__).resolve().parents[2]
RECORD_FIELDS = ("op", "kernel", "case", "grid", "num_warps", "num_stages", "regs", "spill_bytes", "smem_bytes",
                 "ctas_per_sm", "occupancy", "waves", "mma_instructions", "expected_mma_instructions", "pipelined",
                 "ex2")


def op_module(op: str):
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return importlib.import_module(f"{__package__}.{op}")


def select_cases(op_names, names=None) -> list:
    """The cases of the ops, or only those named (in the ops' order); an unknown name is a ValueError."""
    cases = [case for op in op_names for case in op_module(op).cases()]
    if names is None:
        return cases
    known = {c.name for c in cases}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"case: unknown case(s) {unknown} of {'/'.join(op_names)}; see --list")
    return [c for c in cases if c.name in set(names)]


def capture_call(call, label: str = "the call") -> list[tuple]:
    """``(launch, specialisation)`` for each launch ``call()`` makes, planned as on an H100."""
    from mosear_fast.kernels.target import pretend

    from .capture import record_launches
    from .specialise import specialise

    with pretend(), record_launches() as launches:
        call()
    if not launches:
        raise RuntimeError(f"{label}: the launchers made no kernel launch")
    # specialise now (it needs only pointers' alignment and the ints), so the tensors can go
    return [(launch, specialise(launch.kernel, launch.args, launch.kwargs)) for launch in launches]


def compile_all(specs, log=print) -> tuple[dict, list]:
    """Compiles and measures each distinct specialisation once: ``({key: facts or None}, errors)``."""
    from .specialise import _backend, compile_specialisation

    unique = {}
    for spec in specs:
        unique.setdefault(spec.key, spec)
    facts, errors = {}, []
    for i, (key, spec) in enumerate(unique.items(), 1):
        t0 = time.perf_counter()
        try:
            compiled = compile_specialisation(spec)
            facts[key] = measure(compiled, _backend(spec.target), spec.options)
        except Exception as err:  # noqa: BLE001  (one broken kernel must not hide the others)
            facts[key] = None
            errors.append(dict(kernel=spec.kernel.fn.__name__, error=f"{type(err).__name__}: {str(err)[:500]}"))
        log(f"  [{i}/{len(unique)}] {spec.kernel.fn.__name__} ({time.perf_counter() - t0:.1f} s)")
    return facts, errors


def declared_dots(kernel: str, constexprs: dict):
    """The tile math of ``kernel`` from the op module that describes it (None if none does)."""
    for op in OPS:
        dots = op_module(op).dots(kernel, constexprs)
        if dots is not None:
            return dots
    return None


def launch_record(launch, spec, fact: dict) -> dict:
    """The measured facts of one launch (everything but the op and the case)."""
    declared = declared_dots(launch.name, spec.named_constexprs())
    expected = expected_mma(declared, fact["ttgir_dots"], fact["num_warps"]) if declared is not None else None
    return dict(
        kernel=launch.name, grid=list(launch.grid), grid_size=launch.grid_size,
        **{k: fact[k] for k in ("num_warps", "num_stages", "regs", "spill_bytes", "spill_stores", "spill_loads",
                                "smem_bytes", "ctas_per_sm", "occupancy", "occupancy_limiter")},
        waves=waves(launch.grid_size, fact["ctas_per_sm"]),
        mma_instructions=fact["mma_instructions"], expected_mma_instructions=expected,
        mma_by_shape=fact["mma_by_shape"],
        **{k: fact[k] for k in ("pipelined", "async_copies_in_loop", "loads_in_loop", "ex2", "ttgir_dots")},
        specialisation=dict(constexprs={k: _json_value(v) for k, v in spec.named_constexprs().items()},
                            divisible_by_16=spec.divisible_by_16()),
    )


def call_records(call) -> list[dict]:
    """Records of every launch ``call()`` makes (for tests that compile launcher calls of their own
    shapes); raises if a kernel does not compile. Run it where the Triton interpreter is off."""
    launches = capture_call(call)
    facts, errors = compile_all([spec for _, spec in launches], log=lambda s: None)
    if errors:
        raise RuntimeError(f"kernels that did not compile: {errors}")
    return [launch_record(launch, spec, facts[spec.key]) for launch, spec in launches]


def _environment() -> dict:
    import torch
    import triton

    from bench.environment import _commit

    return dict(triton=triton.__version__, torch=torch.__version__, commit=_commit(), target="sm_90a",
                limits=H100.__dict__.copy())


def build(op_names, case_names=None, log=print) -> dict:
    """The report of the given ops (and cases): ``{"environment", "records", "roofline", "errors"}``."""
    started = time.perf_counter()
    captured = [(case, capture_call(case.run, f"case {case.name}")) for case in select_cases(op_names, case_names)]
    log(f"kernel report: {sum(len(x) for _, x in captured)} launches in {len(captured)} cases, "
        f"{len({spec.key for _, x in captured for _, spec in x})} distinct specialisations to compile for sm_90a")
    facts, errors = compile_all([spec for _, launches in captured for _, spec in launches], log)

    records, roofline = [], []
    for case, launches in captured:
        case_info = dict(name=case.name, main=case.main, **case.params)
        for launch, spec in launches:
            if facts[spec.key] is not None:
                record = launch_record(launch, spec, facts[spec.key])
                records.append(dict(op=case.op, kernel=record.pop("kernel"), case=case_info, **record))
        if case.roofline:
            roofline.append(dict(op=case.op, case=case.name, **roofline_times(**case.roofline)))
    log(f"kernel report: done in {time.perf_counter() - started:.0f} s")
    return dict(kind="kernel-report", environment=_environment(), records=records, roofline=roofline, errors=errors)


def dumps(report: dict) -> str:
    """The report as JSON text with one line per record (diff-friendly, a third of the indented size)."""
    parts = []
    for key, value in report.items():
        if isinstance(value, list) and value:
            parts.append(f" {json.dumps(key)}: [\n" + ",\n".join("  " + json.dumps(x) for x in value) + "\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _json_value(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else repr(v)


def roofline_times(bytes: int, flops: float, limits=H100) -> dict:
    """Lower bounds at peak HBM bandwidth and peak dense bf16 tensor throughput."""
    memory_us = bytes / limits.hbm_bytes_per_s * 1e6
    compute_us = flops / limits.dense_bf16_flops * 1e6
    return dict(bytes=int(bytes), flops=float(flops), memory_us=round(memory_us, 2), compute_us=round(compute_us, 2),
                bound="memory" if memory_us >= compute_us else "compute")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _records(op: str, cases: tuple | None) -> tuple:
    if not _interpreter_on():
        report = build([op], list(cases) if cases is not None else None, log=lambda s: None)
    else:  # kernels decorated for the interpreter cannot be compiled: a clean process does it
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOSEAR_POISON_OUTPUTS")}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "report.json")
            cmd = [sys.executable, "-m", "bench.kernel_report", "--op", op, "--json", path, "--quiet"]
            for name in cases or ():
                cmd += ["--case", name]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"kernel report failed ({proc.returncode}): {proc.stderr[-3000:]}")
            with open(path) as f:
                report = json.load(f)
    if report["errors"]:
        raise RuntimeError(f"kernel report: kernels that did not compile: {report['errors']}")
    return tuple(report["records"])


def report_records(op: str, cases=None) -> list[dict]:
    """The report's records (one per kernel launch) of ``op`` ("ar" or "mose"), for the named cases
    (all when None; names as ``python -m bench.kernel_report --op OP --list`` prints them).

    Cached per process and argument set; safe to call from tests (a subprocess compiles when the
    Triton interpreter is on). Raises if a kernel does not compile.
    """
    op_module(op)
    key = tuple(cases) if cases is not None else None
    return [dict(r) for r in _records(op, key)]
