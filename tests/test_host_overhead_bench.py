"""The host-overhead bench (``python -m bench.host_overhead``), the CUDA-graph decode bench
(``python -m bench.cuda_graph_decode``) and its step in the GPU script, on the CPU at tiny sizes."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from triton.runtime.jit import JITFunction

from bench import cuda_graph_decode, gpu_run, host_overhead
from mosear_fast.kernels.ar_attention.function import ar_attention_triton
from mosear_fast.kernels.mose.triton_routing import mose_route_kernel
from mosear_fast.kernels.target import pretend
from tests.cases import make_ar_inputs


def test_host_overhead_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        host_overhead.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "stub" in text and "--bind" in text and "--json" in text


@pytest.mark.parametrize("argv,flag", [(["--ops", "ar,conv"], "--ops"), (["--shapes", ""], "--shapes"),
                                       (["--calls", "0"], "--calls"), (["--scale", "2"], "--scale"),
                                       (["--json", "/no/such/folder/x.json"], "--json")])
def test_host_overhead_rejects_bad_arguments(capsys, argv, flag):
    assert host_overhead.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:")


def test_stubs_skip_the_kernels_and_keep_the_launcher_work(device):
    """Under the stubs the launcher still plans, allocates and launches (counted), but no kernel runs:
    the output keeps the NaN poison that the tests' allocation puts in every fresh output."""
    t = make_ar_inputs(1, 4, 2, 1, 40, 16, device=device)
    args = dict(num_modalities=3, balance=(1, 2), target=None, strength=0.5, threshold=0.0, modality_bias=None,
                causal=True, scale=0.25, query_mask=None, return_masses=False)
    launches = [0]
    with pretend(), host_overhead.stub_launches(counter=launches):
        o = ar_attention_triton(t["q"], t["k"], t["v"], t["key_modality"], **args)
    assert launches[0] == 2  # decode pass and split merge
    assert o.shape == t["q"].shape and torch.isnan(o).all()
    o = ar_attention_triton(t["q"], t["k"], t["v"], t["key_modality"], **args)  # stubs removed: the kernels run
    assert torch.isfinite(o).all()


def test_host_overhead_tiny_run_writes_json(tmp_path, capsys):
    path = tmp_path / "host.json"
    interpreted_kernels = not isinstance(mose_route_kernel, JITFunction)
    rc = host_overhead.main(["--calls", "5", "--warmup", "1", "--torch-calls", "2", "--scale", "0.01",
                             "--json", str(path)])
    assert rc == 0
    result = json.loads(path.read_text())
    assert result["kind"] == "host-overhead" and result["columns"] == list(host_overhead.COLUMNS)
    rows = {(r["op"], r["shape"]): r for r in result["results"]}
    assert set(rows) == {(op, shape) for op in host_overhead.OPS for shape in host_overhead.SHAPES}
    for row in rows.values():
        assert row["launches_per_call"] >= 2
        for column in ("launcher", "op", "op+values", "torch"):
            assert row["columns"][column]["median_us"] > 0 and row["columns"][column]["calls"] >= 2
        if interpreted_kernels:  # the binder needs compiled-mode kernels
            assert "TRITON_INTERPRET" in row["skipped"]["+bind"]
        else:
            assert row["columns"]["+bind"]["median_us"] > row["columns"]["launcher"]["median_us"]
    out = capsys.readouterr().out
    assert "launcher" in out and "mose" in out and "+bind:" in out


def test_torch_column_left_out_with_a_reason_above_the_flop_limit(monkeypatch):
    monkeypatch.setattr(host_overhead, "TORCH_MAX_FLOP", 1.0)
    rows = host_overhead.run(("mose",), ("decode",), calls=2, warmup=0, torch_calls=1, scale=0.01, log=lambda s: None)
    assert "torch" not in rows["results"][0]["columns"]
    assert "not host overhead" in rows["results"][0]["skipped"]["torch"]


# ------------------------------------------------------------------------------------------------
# CUDA-graph decode
# ------------------------------------------------------------------------------------------------


def test_cuda_graph_decode_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cuda_graph_decode.main(["--help"])
    assert exit_info.value.code == 0
    assert "torch.cuda.graph" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graph_decode_needs_cuda_or_dry_run(capsys):
    assert cuda_graph_decode.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0] and "--dry-run" in err[0]


@pytest.mark.parametrize("argv,flag", [(["--steps", "ar,prefill"], "--steps"), (["--layers", "0"], "--layers"),
                                       (["--warmup", "0"], "--warmup"), (["--out", "/no/such/dir/g.json"], "--out")])
def test_cuda_graph_decode_rejects_bad_arguments(capsys, argv, flag):
    assert cuda_graph_decode.main(["--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:")


def test_cuda_graph_decode_dry_run(tmp_path):
    """The steps build and run at tiny shapes (on the CPU in the Triton interpreter, or on CUDA); the
    layer stack chains each layer's output into the next one's input."""
    path = tmp_path / "graph.json"
    assert cuda_graph_decode.main(["--dry-run", "--layers", "2", "--out", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["kind"] == "cuda-graph-decode" and result["dry_run"]
    rows = {r["step"]: r for r in result["results"]}
    assert set(rows) == set(cuda_graph_decode.STEPS)
    assert rows["layers"]["calls_per_step"] == 4 and all(r["finite"] for r in rows.values())
    shape = cuda_graph_decode.DRY_AR_SHAPE
    assert rows["ar"]["output_shape"] == [shape["batch"], shape["n_q_heads"], 1, shape["head_dim"]]


def test_dry_run_steps_refresh_their_inputs(device):
    steps = cuda_graph_decode.build_steps(device, layers=1, dry_run=True, names=("mose",))
    before = steps[0].run()
    steps[0].refresh()
    assert not torch.equal(before, steps[0].run())


def test_gpu_plan_runs_the_graph_step_after_the_kernel_tests(tmp_path):
    steps = gpu_run.plan(str(tmp_path), python="python3")
    kinds = [s.kind for s in steps]
    assert kinds.index("graph") == kinds.index("tests") + 1
    graph = steps[kinds.index("graph")]
    assert graph.argv[1:3] == ["-m", "bench.cuda_graph_decode"] and "--dry-run" not in graph.argv
    assert graph.result and graph.argv[graph.argv.index("--out") + 1] == graph.result
    cpu = gpu_run.plan(str(tmp_path), cuda=False, install=False, tests=False)
    dry = next(s for s in cpu if s.kind == "graph")
    assert "--dry-run" in dry.argv and dry.env.get("TRITON_INTERPRET") == "1"
    assert not [s for s in gpu_run.plan(str(tmp_path), graph=False) if s.kind == "graph"]


def test_gpu_run_puts_the_graph_results_in_its_report(tmp_path, capsys):
    doc = dict(kind="cuda-graph-decode", results=[dict(step="ar", calls_per_step=1, eager_us=80.0, graph_us=20.0,
                                                       eager_per_call_us=80.0, graph_per_call_us=20.0, speedup=4.0,
                                                       replay_matches_eager=True, max_abs_diff=0.0)])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = scratch / "graph.json"
    code = f"import json; json.dump({doc!r}, open({str(result)!r}, 'w'))"
    steps = [gpu_run.Step("cuda graph decode", [sys.executable, "-c", code], 30, "graph", str(result))]
    log = gpu_run.Log(str(tmp_path / "gpu_run.log"))
    assert gpu_run.execute(steps, str(tmp_path), time.monotonic() + 60, log, cuda=False) == 0
    log.close()
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert report["cuda_graph_decode"] == doc
    printed = capsys.readouterr().out
    assert "CUDA-graph decode" in printed and "(4.00x" in printed
