"""The one GPU run: ``bash bench/gpu_run.sh`` (or ``python3 -m bench.gpu_run``) on an H100 or H200.

Offline, inside a time budget (default 470 s, under 8 minutes), each step bounded by its own timeout,
going on past a failed step:

1. install the package without network (``pip install --no-index --no-deps --no-build-isolation -e .``);
2. ``python -m bench.kernel_check``: the compiled Triton kernels against the float64 references;
3. the kernel tests (``pytest tests/test_mose_lora.py tests/test_ar_attention.py
   tests/test_mose_triton.py tests/test_ar_triton.py tests/test_capture_rules.py -k triton``: with the
   CUDA-graph capture tests; in parallel with pytest-xdist when installed);
4. the CUDA-graph decode steps (``python -m bench.cuda_graph_decode``): a decode call of each op and a
   stack of decoder layers, eager against captured and replayed;
5. the end-to-end benchmarks (``python -m bench.e2e --preset gpu``), one step per model;
6. the op benchmarks (``python -m bench --op mose|ar --preset ...``, the issue-3/4 presets), most
   important first, as long as the budget lasts.

Everything goes under the output folder (``--out``, else ``$OUT``, else ``bench/results/gpu-run``),
at most 8 files: ``gpu_run.log`` (everything printed), ``gpu_run.json`` (the steps, their status and
times, the kernel check, the test summary and the CUDA-graph decode results), ``ops-cuda.json``
(every op result in one bundle), ``e2e-gpu-cuda.json`` (the e2e results with the targets and whether
each was met) and its plot ``e2e-gpu-cuda.png``. A short table is printed last. To show the numbers in
the README, copy the two result JSON files into ``bench/results/`` and run ``python -m bench.render --write README.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 470.0  # the whole run, under 8 minutes
RESERVE_S = 20.0  # kept back for merging, plotting and the summary
MIN_STEP_S = 15.0  # a step that would get less than this is skipped
MAX_FILES = 8
KERNEL_TESTS = ["tests/test_mose_lora.py", "tests/test_ar_attention.py", "tests/test_mose_triton.py",
                "tests/test_ar_triton.py", "tests/test_capture_rules.py"]
# Op benchmarks in the order they run (most important first): (op, preset, mode, providers or None
# for all). The FlexAttention baselines compile once per shape, so they run on one preset only.
AR_FAST = "sdpa,mosear_triton,eager_ar"
OP_RUNS = [
    ("mose", "llama2-7b-qv", "fwd", None),
    ("ar", "llama2-7b-prefill", "fwd", AR_FAST),
    ("ar", "qwen2.5-omni-7b-decode", "fwd", AR_FAST),
    ("mose", "qwen2.5-7b-mlp", "fwd", None),
    ("ar", "llama2-7b-prefill-4k", "fwd", "sdpa,mosear_triton,flex_static,lse_merge"),
    ("ar", "qwen2.5-omni-7b-prefill", "fwd", AR_FAST),
    ("ar", "llama2-7b-decode", "fwd", AR_FAST),
    ("mose", "llama2-7b-qv", "fwd_bwd", None),
]
E2E_MODELS_GPU = ("llama2-7b", "qwen2.5-omni-7b")
GRAPH_DRY_RUN = ["--dry-run", "--layers", "2"]  # the CPU dry run of the CUDA-graph decode step


@dataclass
class Step:
    name: str
    argv: list[str]
    budget_s: float
    kind: str  # install | check | tests | e2e | op
    result: str | None = None  # JSON file the step writes (in the scratch folder)
    env: dict = field(default_factory=dict)


def plan(scratch: str, *, python: str = sys.executable, cuda: bool = True, install: bool = True,
         tests: bool = True, graph: bool = True, e2e_preset: str = "gpu", e2e_models=E2E_MODELS_GPU,
         op_runs=OP_RUNS, min_seconds: float = 0.2) -> list[Step]:
    """The steps of the run, in order."""
    steps = []
    if install:
        steps.append(Step("install", [python, "-m", "pip", "install", "--no-index", "--no-deps",
                                      "--no-build-isolation", "-q", "-e", "."], 60, "install"))
    interpreter = {} if cuda else {"TRITON_INTERPRET": "1"}
    steps.append(Step("kernel check", [python, "-m", "bench.kernel_check", "--out",
                                       os.path.join(scratch, "kernel_check.json")], 60, "check",
                      os.path.join(scratch, "kernel_check.json"), interpreter))
    if tests:
        parallel = ["-n", "4"] if importlib.util.find_spec("xdist") is not None else []
        steps.append(Step("kernel tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel,
                                           *KERNEL_TESTS, "-k", "triton"], 120, "tests"))
    if graph:
        path = os.path.join(scratch, "cuda_graph_decode.json")
        steps.append(Step("cuda graph decode", [python, "-m", "bench.cuda_graph_decode", "--out", path,
                                                *([] if cuda else GRAPH_DRY_RUN)], 90, "graph", path, interpreter))
    for model in e2e_models:
        path = os.path.join(scratch, f"e2e-{model}.json")
        steps.append(Step(f"e2e {model}", [python, "-m", "bench.e2e", "--preset", e2e_preset, "--models", model,
                                           "--out", path], 150, "e2e", path))
    for op, preset, mode, names in op_runs:
        path = os.path.join(scratch, f"op-{op}-{preset}-{mode}.json")
        command = [python, "-m", "bench", "--op", op, "--preset", preset, "--mode", mode, "--min-seconds",
                   str(min_seconds), "--max-runs", "30", "--out", path]
        if names:
            command += ["--providers", names]
        steps.append(Step(f"bench {op} {preset} {mode}", command, 60, "op", path))
    return steps


class Log:
    """Prints and appends to the log file."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")

    def close(self):
        self.file.close()


def run_step(step: Step, timeout_s: float, log: Log) -> dict:
    """Runs one step in its own process group, its output teed to the log; kills it at the timeout."""
    log(f"\n===== {step.name} (timeout {timeout_s:.0f} s): {' '.join(step.argv)}")
    started = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **step.env)
    try:
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except OSError as err:
        log(f"----- {step.name}: could not start: {err}")
        return dict(name=step.name, kind=step.kind, status="failed", rc=None, seconds=0.0, error=str(err))
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            log(line)
            tail.append(line)
            del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    reader.join(timeout=10)
    seconds = time.perf_counter() - started
    rc = proc.returncode
    status = "timed out" if timed_out else ("ok" if rc == 0 else "failed")
    log(f"----- {step.name}: {status} (rc {rc}, {seconds:.1f} s)")
    return dict(name=step.name, kind=step.kind, status=status, rc=rc, seconds=round(seconds, 1),
                timeout_s=round(timeout_s, 1), tail=tail[-5:])


def _kill_group(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_json(path):
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def merge_e2e(paths) -> dict | None:
    """One e2e document from the per-model files (models in order; complete only if all are)."""
    docs = [d for d in (_read_json(p) for p in paths) if d and d.get("kind") == "e2e"]
    if not docs:
        return None
    merged = dict(docs[0])
    merged["models"] = [m for d in docs for m in d["models"]]
    merged["complete"] = all(d.get("complete") for d in docs) and len(docs) == len(paths)
    return merged


def merge_ops(paths) -> dict | None:
    results = [d for d in (_read_json(p) for p in paths) if d and "op" in d]
    if not results:
        return None
    return dict(kind="op-bundle", environment=results[0]["environment"], results=results)


def _pytest_summary(step_result: dict) -> str | None:
    for line in reversed(step_result.get("tail", [])):
        if " passed" in line or " failed" in line or " error" in line or "no tests ran" in line:
            return line.strip("= ").strip()
    return None


def op_summary_lines(bundle: dict) -> list[str]:
    """Per op result: the case with the fused provider's ratio to the floor."""
    lines = []
    for result in bundle["results"]:
        for row in result["results"]:
            shape = ", ".join(f"{k}={v}" for k, v in row["case"].items() if k != "model")
            measured = [n for n in result["providers"] if "median_ms" in row["providers"].get(n, {})]
            fused = [n for n in measured if n.startswith("mosear_triton")] or \
                [n for n in measured if n.startswith("mosear")]
            cells = []
            for name in [result["floor"], *fused]:
                t = row["providers"].get(name, {})
                if "median_ms" in t:
                    cells.append(f"{name} {t['median_ms']:.3g} ms ({t['ratio_to_floor']:.2f}x)")
            lines.append(f"  {result['op']}/{result['preset']}/{result['mode']} [{shape}] " + " | ".join(cells))
    return lines


def graph_summary_lines(graph: dict) -> list[str]:
    from .cuda_graph_decode import format_row

    return [format_row(row) for row in graph.get("results", [])]


def summary(steps: list[dict], kernel: dict | None, e2e: dict | None, ops: dict | None,
            graph: dict | None = None) -> str:
    from .e2e import format_model

    lines = ["", "=" * 100, "SUMMARY", "steps:"]
    for s in steps:
        lines.append(f"  {s['status']:10s} {s['seconds']:7.1f} s  {s['name']}" +
                     (f"  ({s['detail']})" if s.get("detail") else ""))
    if kernel:
        lines.append(f"kernel check: {kernel['passed']} passed, {kernel['failed']} failed "
                     f"({'compiled' if kernel.get('compiled') else 'interpreter'})")
    if graph:
        lines.append("CUDA-graph decode (per step, eager against replayed):")
        lines += graph_summary_lines(graph)
    if e2e:
        env = e2e["environment"]
        lines.append(f"e2e ({e2e['preset']}, {env['device']}, torch {env['torch']}, commit {env['commit']}):")
        for model in e2e["models"]:
            lines.append(format_model(model))
    if ops:
        lines.append("op benchmarks (floor and fused provider, median ms, ratio to the floor):")
        lines += op_summary_lines(ops)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results/gpu-run)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("MOSEAR_GPU_BUDGET", DEFAULT_BUDGET_S)),
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}, or $MOSEAR_GPU_BUDGET)")
    p.add_argument("--skip-install", action="store_true", help="the package is installed already")
    p.add_argument("--skip-tests", action="store_true", help="leave out the kernel tests")
    p.add_argument("--cpu", action="store_true",
                   help="a dry run of the script on a machine without CUDA: the cpu-small e2e preset, the "
                        "kernel check in the Triton interpreter, the CPU op presets, no install, no tests")
    args = p.parse_args(argv)
    out = args.out or os.environ.get("OUT") or os.path.join(REPO, "bench", "results", "gpu-run")
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + args.budget
    log = Log(os.path.join(out, "gpu_run.log"))
    scratch = tempfile.mkdtemp(prefix="mosear-gpu-run-")
    try:
        return _main(args, out, deadline, log, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        log.close()


def _main(args, out, deadline, log, scratch) -> int:
    cuda = not args.cpu
    if args.cpu:
        steps = plan(scratch, cuda=False, install=False, tests=False, e2e_preset="cpu-small",
                     e2e_models=("cpu-llama",),
                     op_runs=[("mose", "cpu-small", "fwd", None), ("ar", "cpu-small", "fwd", None)], min_seconds=0.05)
    else:
        steps = plan(scratch, install=not args.skip_install, tests=not args.skip_tests)
    return execute(steps, out, deadline, log, cuda=cuda)


def execute(steps: list[Step], out: str, deadline: float, log, *, cuda: bool) -> int:
    """Runs the steps within the deadline, then merges the results into at most 8 files under ``out``."""
    log(f"mosear-fast GPU run: {len(steps)} steps, {deadline - time.monotonic():.0f} s budget, output {out}")
    done = []
    for step in steps:
        left = deadline - time.monotonic() - RESERVE_S
        if left < MIN_STEP_S:
            done.append(dict(name=step.name, kind=step.kind, status="skipped", rc=None, seconds=0.0,
                             detail="out of time budget"))
            log(f"----- {step.name}: skipped (out of time budget)")
            continue
        record = run_step(step, min(step.budget_s, left), log)
        if step.kind == "tests":
            record["detail"] = _pytest_summary(record)
        done.append(record)
    kernel = next((_read_json(s.result) for s in steps if s.kind == "check" and s.result), None)
    graph = next((_read_json(s.result) for s in steps if s.kind == "graph" and s.result), None)
    e2e = merge_e2e([s.result for s in steps if s.kind == "e2e"])
    ops = merge_ops([s.result for s in steps if s.kind == "op"])
    device = "cuda" if cuda else "cpu"
    files = {}
    if e2e is not None:
        files["e2e"] = os.path.join(out, f"e2e-{e2e['preset']}-{device}.json")
        _write_json(files["e2e"], e2e)
        try:
            from .plots import plot_e2e

            png = plot_e2e(e2e, os.path.join(out, f"e2e-{e2e['preset']}-{device}.png"))
            if png:
                files["plot"] = png
        except Exception as err:  # noqa: BLE001  (a plot must not lose the numbers)
            log(f"plot failed: {type(err).__name__}: {err}")
    if ops is not None:
        files["ops"] = os.path.join(out, f"ops-{device}.json")
        _write_json(files["ops"], ops)
    report = dict(kind="gpu-run", steps=[{k: v for k, v in s.items() if k != "tail"} for s in done],
                  kernel_check=kernel, cuda_graph_decode=graph,
                  files=sorted(os.path.basename(f) for f in files.values()))
    files["report"] = os.path.join(out, "gpu_run.json")
    _write_json(files["report"], report)
    written = sorted(os.listdir(out))
    if len(written) > MAX_FILES:
        log(f"warning: {len(written)} files under {out} (more than {MAX_FILES}): {written}")
    log(summary(done, kernel, e2e, ops, graph))
    failed = [s for s in done if s["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


def _write_json(path, data):
    from mosear_fast.atomic import atomic_write_json

    atomic_write_json(path, data)


if __name__ == "__main__":
    sys.exit(main())
