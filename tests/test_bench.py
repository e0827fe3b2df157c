"""The benchmark harness: the runner writes JSON with ratios; CPU providers timed by pytest-benchmark.

pytest-benchmark runs each benchmark once in the normal suite (--benchmark-disable in pytest's
addopts); `pytest tests/test_bench.py --benchmark-enable` times them.
"""

import json

import pytest
import torch

from bench import presets
from bench.__main__ import main as bench_main
from bench.registry import providers

CPU = torch.device("cpu")
TINY_MOSE = dict(n_tokens=64, d_in=32, d_out=48, rank=8, n_modalities=3, n_experts=4, top_k=1,
                 dtype=torch.float32, device=CPU)
TINY_AR = dict(batch=1, n_q_heads=4, n_kv_heads=2, len_q=64, len_k=64, head_dim=16, dtype=torch.float32,
               device=CPU)


def _runnable(op):
    return [n for n, p in providers(op).items() if p.unavailable(dict(TINY_MOSE if op == "mose" else TINY_AR,
                                                                     mode="fwd")) is None]


@pytest.mark.parametrize("mode", ["fwd", "update", "fwd_bwd"])
@pytest.mark.parametrize("name", _runnable("mose"))
def test_mose_provider(benchmark, name, mode):
    provider, case = providers("mose")[name], dict(TINY_MOSE, mode=mode)
    reason = provider.unavailable(case)
    if reason is not None:
        pytest.skip(f"{name} in mode {mode}: {reason}")
    benchmark(provider.setup(case))


@pytest.mark.parametrize("name", _runnable("ar"))
def test_ar_provider(benchmark, name):
    benchmark(providers("ar")[name].setup(dict(TINY_AR, mode="fwd")))


def test_runner_writes_json_with_ratios(tmp_path, monkeypatch):
    monkeypatch.setitem(presets.PRESETS["mose"], "tiny", lambda: [
        {k: v for k, v in TINY_MOSE.items() if k != "device"}])
    out = tmp_path / "r.json"
    assert bench_main(["--op", "mose", "--preset", "tiny", "--device", "cpu", "--min-seconds", "0",
                       "--max-runs", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["floor"] == "linear" and result["environment"]["device_type"] == "cpu"
    assert result["environment"]["torch"] == torch.__version__
    timings = result["results"][0]["providers"]
    assert timings["linear"]["ratio_to_floor"] == 1.0
    assert timings["mosear_torch"]["median_ms"] > 0 and timings["mosear_torch"]["tflops"] > 0


def test_runner_cpu_clock_and_interleaved_rounds(tmp_path, monkeypatch, capsys):
    """--clock cpu times the process's CPU time (refused with several threads) and --rounds N times
    every provider once per round; both are recorded in the JSON."""
    monkeypatch.setitem(presets.PRESETS["mose"], "tiny", lambda: [
        {k: v for k, v in TINY_MOSE.items() if k != "device"}])
    out = tmp_path / "r.json"
    args = ["--op", "mose", "--preset", "tiny", "--device", "cpu", "--min-seconds", "0", "--max-runs", "2",
            "--providers", "linear,mosear_linear_torch", "--clock", "cpu", "--rounds", "3", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert bench_main(args) == 2 and "OMP_NUM_THREADS=1" in capsys.readouterr().err and not out.exists()
        torch.set_num_threads(1)
        assert bench_main(args) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["environment"]["clock"] == "process CPU time" and result["environment"]["threads"] == 1
    assert result["environment"]["rounds"] == 3
    timings = result["results"][0]["providers"]
    assert list(timings) == ["linear", "mosear_linear_torch"] and timings["mosear_linear_torch"]["runs"] == 3
    assert timings["linear"]["ratio_to_floor"] == 1.0 and timings["mosear_linear_torch"]["median_ms"] > 0
    wall = args[:args.index("--clock")] + ["--rounds", "0", "--out", str(tmp_path / "no.json")]
    assert bench_main(wall) == 2
    assert "rounds" in capsys.readouterr().err


def test_runner_rejects_unknown_names(capsys):
    assert bench_main(["--op", "ar", "--preset", "nope", "--device", "cpu"]) == 2
    assert "preset" in capsys.readouterr().err
    assert bench_main(["--op", "ar", "--providers", "flash9", "--device", "cpu"]) == 2
    assert "providers" in capsys.readouterr().err


@pytest.mark.parametrize("op,name,mode", [("mose", "mosear_triton", "fwd"), ("mose", "mosear_triton", "fwd_bwd"),
                                          ("mose", "mosear_fused_linear", "fwd"),
                                          ("mose", "mosear_fused_linear", "fwd_bwd"), ("ar", "mosear_triton", "fwd"),
                                          ("ar", "flex_static", "fwd"), ("ar", "lse_merge", "fwd")])
def test_cuda_providers_run_on_tiny_cpu_shapes(op, name, mode):
    """The CUDA-only providers are timed on a GPU only; their wiring is checked here on tiny CPU
    shapes (Triton through its interpreter, FlexAttention eagerly)."""
    tiny = dict(TINY_MOSE, n_tokens=16, d_in=16, d_out=16) if op == "mose" else dict(TINY_AR, len_q=8, len_k=8)
    case = dict(tiny, mode=mode)
    assert providers(op)[name].unavailable(case) is not None  # not timed on the CPU
    result = providers(op)[name].setup(case)()
    if mode == "fwd":
        assert torch.isfinite(result).all()
