"""bench.render: README tables and PNG plots from the JSON results (op, op bundle and e2e results)."""

from __future__ import annotations

import glob
import json
import os
import stat

import pytest
import torch

from bench import e2e, render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ENV = dict(device="CPU: x86_64, 2 cores", device_type="cpu", torch="2.13.0+cpu", triton="3.9.0", cuda=None,
               python="3.11", commit="abc1234", date="2026-11-28T00:00:00+00:00", transformers="5.24.0")
GPU_ENV = dict(CPU_ENV, device="NVIDIA H100 80GB HBM3", device_type="cuda", torch="2.11.0+cu130", triton="3.6.0",
               cuda="13.0", commit="def5678", transformers="5.17.0")


def _op_result(env, op="mose"):
    case = (dict(n_tokens=8, d_in=4, d_out=4, rank=2) if op == "mose" else
            dict(batch=1, n_q_heads=4, n_kv_heads=2, len_q=8, len_k=8, head_dim=16))
    return dict(op=op, preset="p", mode="fwd", floor="linear", environment=env,
                providers={"linear": "floor", "mosear_triton": "fused"},
                results=[dict(case=case, dtype="bfloat16",
                              providers=dict(linear=dict(median_ms=1.0, ratio_to_floor=1.0),
                                             mosear_triton=dict(median_ms=1.2, ratio_to_floor=1.2)))])


def _e2e_result(env, dtype):
    def cell(ms, peak=None):
        return dict(median_ms=ms, peak_memory_bytes=peak)

    model = dict(model="llama2-7b", dims=dict(arch="llama", hidden=4096, heads=32, kv_heads=32, mlp=11008, vocab=32000),
                 layers=4, full_layers=32,
                 prefill=[dict(batch=1, length=n, variants=dict(backbone=cell(n / 100), mosear_fast=cell(n / 90),
                                                               mosear_eager=cell(n / 20),
                                                               onnxruntime=dict(skipped="no CUDA provider")))
                          for n in (512, 2048, 8192)],
                 decode=[dict(batch=b, context=2048, new_tokens=32,
                              variants=dict(backbone=cell(100.0), mosear_fast=cell(130.0), mosear_eager=cell(300.0)))
                         for b in (1, 8)],
                 train=[dict(batch=1, length=2048, variants=dict(backbone=cell(50.0, 2**30),
                                                                 mosear_fast=cell(60.0, 2**31),
                                                                 mosear_eager=cell(200.0, 2**32)))])
    e2e.derive(model)
    model["targets"] = e2e.evaluate_targets(model, device_type=env["device_type"], dtype=dtype)
    settings = dict(layers=4, dtype=str(dtype).replace("torch.", ""), mose=dict(r=64, num_experts=4))
    return dict(kind="e2e", preset="gpu" if env["device_type"] == "cuda" else "cpu-small", environment=env,
                settings=settings, floor="backbone", eager="mosear_eager", variants=dict.fromkeys(e2e.VARIANTS, ""),
                complete=True, models=[model])


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "mose-p-fwd-cpu.json").write_text(json.dumps(_op_result(CPU_ENV)))
    bundle = dict(kind="op-bundle", environment=GPU_ENV, results=[_op_result(GPU_ENV), _op_result(GPU_ENV, "ar")])
    (folder / "ops-cuda.json").write_text(json.dumps(bundle))
    (folder / "e2e-gpu-cuda.json").write_text(json.dumps(_e2e_result(GPU_ENV, torch.bfloat16)))
    (folder / "e2e-cpu-small-cpu.json").write_text(json.dumps(_e2e_result(CPU_ENV, torch.float32)))
    (folder / "gpu_run.json").write_text(json.dumps(dict(kind="gpu-run", steps=[])))  # not a result: ignored
    return folder


def test_gpu_first_cpu_apart_every_row_names_its_run(results):
    text = render.render(glob.glob(str(results / "*.json")))
    gpu, cpu = text.split("#### CPU results (development machine; not representative of GPU speed)")
    assert gpu.startswith("#### GPU results")
    assert "NVIDIA H100" in gpu and "CPU: x86_64" not in gpu
    assert "NVIDIA H100" not in cpu
    for section, env in ((gpu, GPU_ENV), (cpu, CPU_ENV)):
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| shape |")
                and not line.startswith("| prompt |") and not line.startswith("| batch")]
        assert rows
        for row in rows:
            assert row.rstrip(" |").endswith(f"commit {env['commit']}") and f"torch {env['torch']}" in row, row
    # The bundle is expanded: both op results show on the GPU side.
    assert "**mose / p / fwd**" in gpu and "**ar / p / fwd**" in gpu


def test_e2e_tables_and_targets(results):
    text = render.render(glob.glob(str(results / "*.json")))
    gpu, cpu = text.split("#### CPU results")
    assert "**e2e / gpu / llama2-7b**" in gpu and "4 of 32 layers" in gpu
    assert "| 8192 | 20.5 (1.00x) | 22.8 (1.11x) | 102 (5.00x) | n/a | 728.2 ms | 4.50x |" in gpu
    assert "Decode (32 greedy steps" in gpu and "| 1 (2048) |" in gpu
    assert "2048 MiB" in gpu and "Training step" in gpu
    # Targets on the GPU: decode 1.3x is missed, the others met.
    assert "- decode B=1: mosear_fast within 1.2x of the backbone (time per token): 1.3 (**missed**)" in gpu
    assert "- prefill 8192: mosear_fast >= 3.0x faster than eager: 4.5 (met)" in gpu
    assert "Targets not checked on this run" in cpu


def test_write_replaces_the_block_and_writes_plots(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\ntail\n")
    os.chmod(readme, 0o644)
    assert render.main(["--results", str(results), "--write", str(readme)]) == 0
    doc = readme.read_text()
    assert doc.startswith("# title\n\nintro\n\n<!-- bench:begin -->\n#### GPU results") and doc.endswith(
        "<!-- bench:end -->\n\ntail\n")
    assert "old" not in doc
    assert stat.S_IMODE(os.stat(readme).st_mode) == 0o644
    for name in ("e2e-gpu-cuda.png", "e2e-cpu-small-cpu.png"):
        png = results / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](results/{name})" in doc  # linked relative to the README
    # Rendering again gives the same block (nothing depends on the previous one).
    assert render.main(["--results", str(results), "--write", str(readme)]) == 0
    assert readme.read_text() == doc


def test_write_refuses_a_file_without_the_block(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no block\n")
    assert render.main(["--results", str(results), "--write", str(readme)]) == 2
    assert "bench:begin" in capsys.readouterr().err


def test_no_gpu_results_says_so(tmp_path):
    (tmp_path / "e2e.json").write_text(json.dumps(_e2e_result(CPU_ENV, torch.float32)))
    text = render.render([str(tmp_path / "e2e.json")])
    assert "No GPU results yet: the GPU numbers are still to be taken" in text


def test_readme_block_matches_the_results():
    """The README's bench block is what bench.render makes of bench/results/ (run
    ``python -m bench.render --write README.md`` after adding results)."""
    folder = os.path.join(REPO, "bench", "results")
    expected = render.render(glob.glob(os.path.join(folder, "*.json")), plots_dir=folder, link_from=REPO,
                             write_plots=False)
    doc = open(os.path.join(REPO, "README.md")).read()
    block = doc.split(render.BEGIN, 1)[1].split(render.END, 1)[0]
    assert block == "\n" + expected
    for link in (line.split("](", 1)[1].rstrip(")\n") for line in expected.splitlines() if line.startswith("![")):
        assert os.path.isfile(os.path.join(REPO, link)), f"plot {link} is missing: rerun bench.render --write"
