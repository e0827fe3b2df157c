"""End-to-end benchmarks (bench/e2e.py), the eager variant's op routing and the GPU script's logic.

Everything runs on the CPU at tiny sizes; the GPU numbers come from ``bash bench/gpu_run.sh``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

import mosear_fast.ops as ops
from bench import e2e, gpu_run, presets
from bench.e2e_eager import eager_ops, mose_eager, use_implementations
from mosear_fast import ar_attention, mose_lora
from mosear_fast.tolerances import rel_error
from tests.baselines import ar_eager_materialised, mose_naive_group_loop
from tests.cases import make_ar_inputs, make_mose_inputs

CPU = torch.device("cpu")
TINY_MODEL = dict(arch="llama", hidden=32, heads=4, kv_heads=2, mlp=64, vocab=64, full_layers=8)
TINY_PRESET = dict(models=("tiny-llama",), layers=1, dtype=torch.float32, prefill_lengths=(16, 48),
                   decode_batches=(1, 2), decode_context=16, decode_tokens=2, train_batch=1, train_length=16,
                   rank=4, num_experts=4, top_k=1, timing=dict(warmup=0, min_runs=1, max_runs=1, min_seconds=0.0),
                   decode_reps=1, onnx_dtype="fp32")
FAST_VARIANTS = ["backbone", "mosear_fast", "mosear_eager"]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(presets.E2E_MODELS, "tiny-llama", TINY_MODEL)
    monkeypatch.setitem(presets.E2E_PRESETS, "tiny", TINY_PRESET)
    return "tiny"


# -------------------------------------------------------------------------------------------------
# The eager variant
# -------------------------------------------------------------------------------------------------


def test_use_implementations_routes_ops_and_restores():
    calls = []

    def fake_mose(*args, **kwargs):
        calls.append("mose")
        return mose_eager(*args, **kwargs)

    inputs = make_mose_inputs(24, 8, 12, rank=4)
    args = [inputs[n] for n in ("x", "modality", "expert", "gate", "A", "B", "scale", "out")]
    original = ops.implementation
    with use_implementations({"mose_lora": fake_mose}):
        y = mose_lora(*args)
    assert calls == ["mose"] and ops.implementation is original
    mose_lora(*args)
    assert calls == ["mose"]  # outside the block the backend runs again
    ref = mose_naive_group_loop(*args)
    assert rel_error(y, ref) == 0.0
    with pytest.raises(ValueError, match="unknown ops"):
        with use_implementations({"linear": fake_mose}):
            pass


def test_mose_eager_inplace_writes_out():
    inputs = make_mose_inputs(20, 8, 6, rank=4, top_k=2)
    args = [inputs[n] for n in ("x", "modality", "expert", "gate", "A", "B", "scale")]
    out = inputs["out"].clone()
    expected = mose_lora(*args, out.clone(), backend="torch")
    with eager_ops():
        got = mose_lora(*args, out, inplace=True)
    assert got is out and rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("len_q,len_k", [(24, 24), (1, 30), (5, 30)])
def test_ar_eager_baseline_with_model_options_matches_torch_backend(len_q, len_k):
    inputs = make_ar_inputs(2, 4, 2, len_q, len_k, 8, layout="av", left_pad=2)
    q, k, v, mod = (inputs[n] for n in ("q", "k", "v", "key_modality"))
    query_mask = torch.rand(2, len_q, generator=torch.Generator().manual_seed(0)) < 0.6
    options = dict(num_modalities=3, balance=(1, 2), strength=0.7, modality_bias=(0.0, 0.3, -0.2),
                   query_mask=query_mask, return_masses=True)
    o, masses = ar_eager_materialised(q, k, v, mod, target=(1.0, 2.0), threshold=0.0, causal=True, scale=None,
                                      **options)
    ref_o, ref_masses = ar_attention(q, k, v, mod, target=(1.0, 2.0), backend="torch", **options)
    assert rel_error(o, ref_o) < 1e-5 and rel_error(masses, ref_masses) < 1e-5
    assert masses.dtype == torch.float32


# -------------------------------------------------------------------------------------------------
# The e2e runner
# -------------------------------------------------------------------------------------------------


def test_e2e_cli_measures_every_variant(tiny, tmp_path):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--preset", tiny, "--device", "cpu", "--variants", ",".join(FAST_VARIANTS),
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "e2e" and result["complete"] and result["environment"]["device_type"] == "cpu"
    assert list(result["variants"]) == FAST_VARIANTS
    (model,) = result["models"]
    assert model["model"] == "tiny-llama" and model["layers"] == 1 and model["full_layers"] == 8
    assert [r["length"] for r in model["prefill"]] == [16, 48]
    assert [r["batch"] for r in model["decode"]] == [1, 2]
    for kind in ("prefill", "decode", "train"):
        for row in model[kind]:
            assert list(row["variants"]) == FAST_VARIANTS
            floor, fast, eager = (row["variants"][v] for v in FAST_VARIANTS)
            assert floor["ratio_to_floor"] == 1.0 and eager["speedup_over_eager"] == 1.0
            assert fast["median_ms"] > 0 and fast["tokens_per_s"] > 0 and fast["peak_memory_bytes"] is None
            assert "no allocator" in fast["peak_memory_note"]
            if kind == "decode":
                assert fast["ms_per_step"] == pytest.approx(fast["median_ms"] / 2)
                assert fast["scaled_tokens_per_s"] == pytest.approx(fast["tokens_per_s"] / 8)  # 1 of 8 layers
            else:
                assert fast["per_layer_ms"] == pytest.approx(fast["median_ms"])  # one layer
                assert fast["scaled_ms"] == pytest.approx(fast["median_ms"] * 8)
    # The eager variant computes the same function as the fused one.
    assert model["parity"]["eager_vs_fast_rel_err"] < 1e-4
    # Targets are stated, and not judged on a CPU run.
    assert model["targets"] and all(t["met"] is None for t in model["targets"])


def test_e2e_onnxruntime_skips_with_reason(tiny, monkeypatch):
    import bench.e2e_models as models

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nsecond line")

    import mosear_fast.export.pipeline as export_pipeline

    monkeypatch.setattr(models, "export_onnx_file", broken)
    monkeypatch.setattr(export_pipeline, "write_graph", broken)  # the decode variant's --with-past graph
    result = e2e.run(tiny, CPU, variants=["backbone", "mosear_fast", "onnxruntime"], log=lambda s: None)
    (model,) = result["models"]
    reason = "export or session failed: RuntimeError: exporter exploded"
    for row in model["prefill"] + model["decode"]:
        assert row["variants"]["onnxruntime"] == {"skipped": reason}
        assert "median_ms" in row["variants"]["mosear_fast"]
    assert model["onnx"]["skipped"].startswith("export or session failed")
    assert model["onnx"]["decode"]["skipped"] == reason


def test_e2e_onnxruntime_runs_the_exported_graph(tiny):
    result = e2e.run(tiny, CPU, variants=["backbone", "mosear_fast", "onnxruntime"], log=lambda s: None)
    (model,) = result["models"]
    onnx = model["onnx"]
    assert "skipped" not in onnx, onnx
    assert onnx["provider"] == "CPUExecutionProvider" and onnx["api"].startswith("mosear_fast.export")
    for row in model["prefill"]:
        assert row["variants"]["onnxruntime"]["median_ms"] > 0
    for row in model["decode"]:  # the --with-past graph through OnnxGenerator
        cell = row["variants"]["onnxruntime"]
        assert cell["median_ms"] > 0 and cell["per_token_ms"] == pytest.approx(cell["median_ms"] / row["new_tokens"])
    assert onnx["decode"]["provider"] == "CPUExecutionProvider"
    assert model["parity"]["onnxruntime_vs_fast_rel_err"] < 1e-3


def _fake_result(fast_8192, eager_8192, decode_ratio, train_fast, train_eager, peaks):
    def cell(ms, peak=None):
        return dict(median_ms=ms, peak_memory_bytes=peak)
    result = dict(layers=4, full_layers=32,
                  prefill=[dict(batch=1, length=8192, variants=dict(backbone=cell(10.0), mosear_fast=cell(fast_8192),
                                                                    mosear_eager=cell(eager_8192)))],
                  decode=[dict(batch=1, context=2048, new_tokens=32,
                               variants=dict(backbone=cell(100.0), mosear_fast=cell(100.0 * decode_ratio)))],
                  train=[dict(batch=1, length=2048,
                              variants=dict(backbone=cell(50.0), mosear_fast=cell(train_fast, peaks[0]),
                                            mosear_eager=cell(train_eager, peaks[1])))])
    e2e.derive(result)
    return result


def test_targets_are_judged_on_cuda_bf16_only():
    good = _fake_result(11.0, 40.0, 1.1, 10.0, 25.0, (100, 200))
    targets = e2e.evaluate_targets(good, device_type="cuda", dtype=torch.bfloat16)
    assert len(targets) == 5 and all(t["met"] is True for t in targets), targets
    bad = _fake_result(12.0, 30.0, 1.3, 10.0, 15.0, (300, 200))
    assert [t["met"] for t in e2e.evaluate_targets(bad, device_type="cuda", dtype=torch.bfloat16)] == [False] * 5
    cpu = e2e.evaluate_targets(good, device_type="cpu", dtype=torch.float32)
    assert all(t["met"] is None and "not checked" in t["note"] for t in cpu)
    assert cpu[0]["value"] == pytest.approx(1.1)  # the value is still reported


# -------------------------------------------------------------------------------------------------
# The GPU script
# -------------------------------------------------------------------------------------------------


def test_gpu_plan_is_the_issue_run(tmp_path):
    steps = gpu_run.plan(str(tmp_path), python="python3")
    names = [s.kind for s in steps]
    assert names[:3] == ["install", "check", "tests"]
    install = steps[0].argv
    assert "--no-deps" in install and "--no-build-isolation" in install and "--no-index" in install
    tests = steps[2].argv
    assert tests[-2:] == ["-k", "triton"] and all(f in tests for f in gpu_run.KERNEL_TESTS)
    e2e_steps = [s for s in steps if s.kind == "e2e"]
    assert [s.argv[s.argv.index("--models") + 1] for s in e2e_steps] == list(presets.E2E_PRESETS["gpu"]["models"])
    for step in (s for s in steps if s.kind == "op"):
        op, preset = step.argv[step.argv.index("--op") + 1], step.argv[step.argv.index("--preset") + 1]
        assert preset in presets.PRESETS[op]
    # Each step's cap fits the budget; the run's deadline (8 minutes in all) decides how many op runs fit.
    assert all(s.budget_s < gpu_run.DEFAULT_BUDGET_S / 2 for s in steps) and gpu_run.DEFAULT_BUDGET_S < 480


def _py(code):
    return [sys.executable, "-c", code]


def test_gpu_run_keeps_going_merges_and_summarises(tmp_path, monkeypatch, capsys):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    env = dict(device="CPU: test", device_type="cpu", torch=torch.__version__, triton=None, cuda=None,
               python="3", commit="abc1234", date="2026-11-28T00:00:00+00:00")
    op_result = dict(op="mose", preset="cpu-small", mode="fwd", floor="linear", environment=env,
                     providers={"linear": "", "mosear_torch": ""},
                     results=[dict(case=dict(n_tokens=8), dtype="float32",
                                   providers=dict(linear=dict(median_ms=1.0, ratio_to_floor=1.0),
                                                  mosear_torch=dict(median_ms=2.0, ratio_to_floor=2.0)))])
    e2e_doc = dict(kind="e2e", preset="cpu-small", environment=env, settings=dict(layers=1, dtype="float32"),
                   complete=True, models=[dict(model="m", layers=1, prefill=[], decode=[], train=[], targets=[])])
    op_path, e2e_path = scratch / "op.json", scratch / "e2e.json"
    steps = [
        gpu_run.Step("fails", _py("import sys; print('boom'); sys.exit(3)"), 30, "install"),
        gpu_run.Step("op", _py(f"import json; json.dump({op_result!r}, open({str(op_path)!r}, 'w'))"), 30, "op",
                     str(op_path)),
        gpu_run.Step("e2e", _py(f"import json; json.dump({e2e_doc!r}, open({str(e2e_path)!r}, 'w'))"), 30, "e2e",
                     str(e2e_path)),
        gpu_run.Step("hangs", _py("import time; print('waiting', flush=True); time.sleep(60)"), 2.5, "op"),
    ]
    started = time.monotonic()
    log = gpu_run.Log(str(out / "gpu_run.log"))
    rc = gpu_run.execute(steps, str(out), started + 120, log, cuda=False)
    log.close()
    assert rc == 1  # a step failed
    report = json.loads((out / "gpu_run.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status["fails"] == "failed" and status["op"] == "ok" and status["e2e"] == "ok"
    assert status["hangs"] == "timed out"
    files = sorted(os.listdir(out))
    assert len(files) <= gpu_run.MAX_FILES
    assert {"gpu_run.log", "gpu_run.json", "ops-cpu.json", "e2e-cpu-small-cpu.json"} <= set(files)
    bundle = json.loads((out / "ops-cpu.json").read_text())
    assert bundle["kind"] == "op-bundle" and bundle["results"][0]["op"] == "mose"
    log_text = (out / "gpu_run.log").read_text()
    assert "boom" in log_text and "waiting" in log_text
    printed = capsys.readouterr().out.rstrip().splitlines()
    summary_at = max(i for i, line in enumerate(printed) if line == "SUMMARY")
    assert any("mosear_torch 2 ms (2.00x)" in line for line in printed[summary_at:])
    assert time.monotonic() - started < 30


def test_gpu_run_skips_steps_past_the_budget(tmp_path, capsys):
    log = gpu_run.Log(str(tmp_path / "gpu_run.log"))
    steps = [gpu_run.Step("late", _py("print('never ran')"), 30, "op")]
    assert gpu_run.execute(steps, str(tmp_path), time.monotonic() + 1.0, log, cuda=False) == 0
    log.close()
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert report["steps"] == [dict(name="late", kind="op", status="skipped", rc=None, seconds=0.0,
                                    detail="out of time budget")]
    assert "never ran" not in capsys.readouterr().out


def test_e2e_compiled_variant_times_decode_and_train_against_mosear_fast(tiny, tmp_path):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--preset", tiny, "--device", "cpu", "--variants", "mosear_fast,mosear_compiled",
                     "--compile-backend", "aot_eager", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["compile_backend"] == "aot_eager"
    (model,) = result["models"]
    assert all(list(row["variants"]) == ["mosear_fast"] for row in model["prefill"])  # no compiled prefill
    for kind in ("decode", "train"):
        for row in model[kind]:
            fast, compiled = row["variants"]["mosear_fast"], row["variants"]["mosear_compiled"]
            assert compiled["median_ms"] > 0, compiled
            assert compiled["ratio_to_mosear_fast"] == pytest.approx(compiled["median_ms"] / fast["median_ms"])
