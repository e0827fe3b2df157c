"""The static kernel report's framework (bench/kernel_report): binder, compile facts, occupancy math,
MMA counting, pipelining detection, capture of launches, record schema.

The test suite runs with TRITON_INTERPRET=1, under which Triton's own jit helpers are interpreter
objects that the compiler cannot call: compiling happens in clean subprocesses (the tiny kernels of
tests/kernel_report_probe.py, and the op kernels through ``report_records``). The binder test binds
in this process, with a kernel built as ``JITFunction`` directly. Tests named ``*triton*`` also run
under Triton 3.6 (scripts/test_triton36.sh).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

from bench.kernel_report import report_records
from bench.kernel_report.capture import record_launches
from bench.kernel_report.measure import H100, Dot, expected_mma, occupancy, parse_ptxas_log, waves
from bench.kernel_report.report import RECORD_FIELDS, ROOT
from bench.kernel_report.specialise import SM90, specialise


def _copy_scaled(x_ptr, y_ptr, n, stride, one, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs * stride * one, tl.load(x_ptr + offs * stride, mask=mask) * scale, mask=mask)


COPY_SCALED = JITFunction(_copy_scaled)


@functools.cache
def _probe() -> dict:
    """Facts of the tiny kernels of tests/kernel_report_probe.py, compiled in a clean process (once)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOSEAR_POISON_OUTPUTS")}
    proc = subprocess.run([sys.executable, "-m", "tests.kernel_report_probe"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


class _StandInDriver:
    """What ``JITFunction.run`` asks of the active driver before it compiles (no GPU needed)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return SM90


def _specialisation_by_triton_run(kernel, args, kwargs) -> dict:
    """What ``JITFunction.run`` itself hands to the compiler for this launch (through its cache hook)."""
    from triton.runtime import driver

    seen = {}

    def hook(*, compile, **_):
        seen.update(signature=compile["signature"], constants=compile["constants"], attrs=compile["configs"][0],
                    num_warps=compile["num_warps"], num_stages=compile["num_stages"])
        return True  # skip the compile: the specialisation is what we came for

    previous_driver, previous_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(_StandInDriver())
    knobs.runtime.jit_cache_hook = hook
    try:
        kernel.run(*args, grid=(1,), warmup=True, **kwargs)
    finally:
        driver._active, knobs.runtime.jit_cache_hook = previous_driver, previous_hook
        kernel.device_caches.clear()
    return seen


def test_triton_binder_matches_jit_run():
    x = torch.empty(1024)
    y = torch.empty(1025)[1:]  # a data pointer not 16-byte aligned
    # n = 1000 (divisible by 8 only), stride = 32 (by 16), one = 1 (specialised), scale a float
    args, kwargs = (x, y, 1000, 32, 1, 0.5), dict(BLOCK=128, num_warps=2, num_stages=3)
    spec = specialise(COPY_SCALED, args, kwargs)
    by_run = _specialisation_by_triton_run(COPY_SCALED, args, kwargs)
    assert spec.signature == by_run["signature"]
    assert spec.constexprs == by_run["constants"]
    assert spec.attrs == by_run["attrs"]
    assert (spec.options["num_warps"], spec.options["num_stages"]) == (by_run["num_warps"], by_run["num_stages"])
    # and it is the real specialisation, not hand-written i32s
    assert spec.signature["one"] == "constexpr" and spec.named_constexprs()["one"] == 1
    assert spec.signature["n"] == "i32" and spec.signature["scale"] == "fp32"
    assert set(spec.divisible_by_16()) == {"x_ptr", "stride"}


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert parse_ptxas_log(log) == dict(regs=255, spill_stores=44, spill_loads=40, spill_bytes=84, stack_bytes=8)
    with pytest.raises(ValueError, match="ptxas log"):
        parse_ptxas_log("ptxas fatal : Unsupported .version")


def test_triton_compiled_facts_of_tiny_kernels():
    facts = _probe()["chained_4_warps"]
    assert 0 < facts["regs"] <= 255 and facts["spill_bytes"] == 0
    assert facts["smem_bytes"] == facts["metadata_shared"] > 0  # the dot operands are staged in shared memory
    assert facts["num_warps"] == 4
    assert facts["ctas_per_sm"] == occupancy(facts["regs"], facts["smem_bytes"], 4)["ctas_per_sm"] >= 1
    # 32 registers for a 64 x 64 fp32 accumulator over 4 warps (32 values per thread): ptxas spills
    spilled = _probe()["spilling"]
    assert spilled["regs"] <= 32 and spilled["spill_stores"] > 0 and spilled["spill_loads"] > 0
    assert spilled["spill_bytes"] == spilled["spill_stores"] + spilled["spill_loads"]
    assert spilled["ttgir_dots"] == [] and spilled["mma_instructions"] == 0


def test_triton_pipelined_loop_detection():
    # the same loop: with 3 stages Triton turns the loads into async copies; with 1 it does not
    assert _probe()["pipelined"]["pipelined"] and _probe()["pipelined"]["async_copies_in_loop"] > 0
    assert not _probe()["not_pipelined"]["pipelined"] and _probe()["not_pipelined"]["loads_in_loop"] > 0


@pytest.mark.parametrize("regs, smem, warps, ctas, limiter", [
    (241, 48 * 1024, 8, 1, "registers"),  # today's AR prefill kernel: 241 regs -> 7936 per warp, 2 warps/scheduler
    (128, 0, 4, 4, "registers"),  # 4096 regs per warp: 4 warps per scheduler, 16 per SM
    (32, 100 * 1024, 4, 2, "shared_memory"),  # (100 KiB + 1 KiB reserved) twice in 228 KiB
    (32, 0, 4, 16, "registers"),  # 64 warps fit: registers and the warp limit both allow 16
    (16, 0, 1, 32, "blocks"),  # 32 blocks per SM at most
    (40, 228 * 1024, 4, 0, "shared_memory"),  # more than the 227 KiB one block may use
])
def test_occupancy_math(regs, smem, warps, ctas, limiter):
    got = occupancy(regs, smem, warps)
    assert got["ctas_per_sm"] == ctas
    assert got["occupancy"] == pytest.approx(ctas * warps / 64)
    if ctas < 16 or limiter != "registers":
        assert got["occupancy_limiter"] == limiter
    assert waves(264, 1) == 2.0 and waves(66, 2) == 0.25 and waves(1, 0) is None


def test_triton_mma_count_matches_tile_math():
    # 4 warps = one warpgroup: each dot [64, 64] x [64, 64] is computed once
    facts = _probe()["chained_4_warps"]
    assert [(d["m"], d["n"], d["k"]) for d in facts["ttgir_dots"]] == [(64, 64, 64), (64, 64, 64)]
    assert all(d["mma_version"] == 3 and d["instr"][0] == 64 for d in facts["ttgir_dots"])
    expected = expected_mma([Dot(64, 64, 64, count=2)], facts["ttgir_dots"], 4)
    assert facts["mma_instructions"] == expected > 0
    assert sum(facts["mma_by_shape"].values()) == facts["mma_instructions"]


def test_triton_mma_count_shows_duplicated_rows():
    # 8 warps on a 64-row chained dot: Triton puts all warps along M (warpsPerCTA [8, 1] = 128 rows),
    # so both warpgroups compute the whole 64-row tile: more instructions than the work needs
    facts = _probe()["chained_8_warps"]
    assert facts["ttgir_dots"][0]["warps_per_cta"] == [8, 1]
    expected = expected_mma([Dot(64, 64, 64, count=2)], facts["ttgir_dots"], 8)
    assert facts["mma_instructions"] > expected
    assert expected_mma([Dot(32, 64, 64)], facts["ttgir_dots"], 8) is None  # a dot the kernel does not have
    # the compiler may split a dot along k: a declared k it does not show is matched by [m, n]
    half = expected_mma([Dot(64, 64, 64)], facts["ttgir_dots"], 8)
    assert expected_mma([Dot(64, 64, 128)], facts["ttgir_dots"], 8) == 2 * half


def _launches_of(call) -> list[tuple]:
    """(kernel, grid) of every launch ``call`` makes, recorded (not run)."""
    from mosear_fast.kernels.target import pretend

    with pretend(), record_launches() as launches:
        call()
    return [(launch.name, launch.grid) for launch in launches]


def _launches_run(call) -> list[tuple]:
    """(kernel, grid) of every launch ``call`` makes, counted while the interpreter really runs them."""
    from unittest import mock

    from triton.runtime.interpreter import InterpretedFunction

    from mosear_fast.kernels.target import pretend

    seen, run = [], InterpretedFunction.run

    def counting(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__, tuple(grid) + (1,) * (3 - len(grid))))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    with pretend(), mock.patch.object(InterpretedFunction, "run", counting):
        call()
    return seen


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="compares with launches the interpreter runs")
def test_recorder_captures_every_launch():
    from mosear_fast.kernels.ar_attention.function import ar_attention_triton
    from mosear_fast.kernels.mose.function import mose_lora_triton

    def decode():  # 132 SMs pretended: split-k, so a forward and a merge launch
        q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 520, 16)  # 9 key blocks of 64
        ar_attention_triton(q, k, k, torch.randint(0, 3, (1, 520)), num_modalities=3, balance=(1, 2), target=None,
                            strength=0.5, threshold=0.0, modality_bias=None, causal=True, scale=0.25,
                            query_mask=None, return_masses=True)

    def mose_train_step():  # forward and every backward kernel
        x = torch.randn(20, 16, requires_grad=True)
        A, B = torch.randn(3, 4, 16, requires_grad=True), torch.randn(3, 2, 8, 4, requires_grad=True)
        gate = torch.rand(20, 1, requires_grad=True)
        y = mose_lora_triton(x, torch.randint(0, 3, (20,)), torch.randint(0, 2, (20, 1)), gate, A, B,
                             torch.ones(3), torch.randn(20, 8))
        y.backward(torch.randn_like(y))

    recorded_ar, recorded_mose = _launches_of(decode), _launches_of(mose_train_step)
    assert [name for name, _ in recorded_ar] == ["ar_attention_fwd_kernel", "ar_split_merge_kernel"]
    assert recorded_ar[0][1][2] > 1  # the split over keys planned for 132 SMs
    assert [name for name, _ in recorded_mose] == ["mose_route_kernel", "mose_shrink_kernel", "mose_expand_kernel",
                                                   "mose_dy_kernel", "mose_x_kernel"]
    assert recorded_ar == _launches_run(decode)
    assert recorded_mose == _launches_run(mose_train_step)


def _check_record(r: dict):
    missing = [f for f in RECORD_FIELDS if f not in r]
    assert not missing, missing
    assert r["op"] in ("ar", "mose") and isinstance(r["kernel"], str) and isinstance(r["case"]["name"], str)
    assert len(r["grid"]) == 3 and r["grid_size"] == r["grid"][0] * r["grid"][1] * r["grid"][2]
    for f in ("num_warps", "num_stages", "regs", "spill_bytes", "smem_bytes", "ctas_per_sm", "mma_instructions",
              "ex2"):
        assert isinstance(r[f], int) and r[f] >= 0, f
    assert 0 < r["regs"] <= 255
    assert 0 <= r["occupancy"] <= 1 and isinstance(r["pipelined"], bool)
    if r["ctas_per_sm"]:
        assert r["waves"] == pytest.approx(r["grid_size"] / (r["ctas_per_sm"] * H100.sm_count), abs=1e-4)
    assert r["expected_mma_instructions"] is None or r["expected_mma_instructions"] >= 0


def test_triton_report_records_of_a_decode_case():
    records = report_records("ar", cases=["decode-llama2-7b-b1-l4096-bf16"])
    assert [r["kernel"] for r in records] == ["ar_attention_fwd_kernel", "ar_split_merge_kernel"]
    for r in records:
        _check_record(r)
    fwd = records[0]
    assert fwd["case"]["len_q"] == 1 and fwd["case"]["len_k"] == 4096 and fwd["case"]["dtype"] == "bfloat16"
    assert fwd["grid"][2] > 1  # split-k planned for 132 SMs
    assert fwd["expected_mma_instructions"] > 0 and fwd["mma_instructions"] > 0
    assert records is not report_records("ar", cases=["decode-llama2-7b-b1-l4096-bf16"])  # copies of the cache


def test_committed_report_schema():
    with open(ROOT / "bench" / "results" / "kernel-report-sm90a.json") as f:
        report = json.load(f)
    assert report["kind"] == "kernel-report" and report["environment"]["triton"] and report["environment"]["commit"]
    assert not report["errors"]
    assert {r["op"] for r in report["records"]} == {"ar", "mose"}
    for r in report["records"]:
        _check_record(r)
    names = {r["case"]["name"] for r in report["records"]}
    assert {"prefill-llama2-7b-b1-l4096-bf16", "lora-4096x4096-n8192-r16-top1-bf16"} <= names
    assert all(x["bound"] in ("memory", "compute") for x in report["roofline"])


def test_cli_rejects_an_unknown_case(capsys):
    from bench.kernel_report.__main__ import main

    assert main(["--op", "ar", "--case", "no-such-case"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-case" in err[0]


def test_triton_compile_launches_of_a_launcher_script():
    from tests.triton_compile import compile_launches

    records = compile_launches("""
        import torch
        from mosear_fast.kernels.mose.function import mose_lora_triton

        x, A, B = torch.empty(40, 48, dtype=torch.bfloat16), torch.empty(3, 8, 48, dtype=torch.bfloat16), \\
            torch.empty(3, 2, 24, 8, dtype=torch.bfloat16)
        mose_lora_triton(x, torch.randint(0, 3, (40,)), torch.randint(0, 2, (40, 1)), torch.rand(40, 1), A, B,
                         torch.ones(3), None)
    """, expected=3)
    assert [r["kernel"] for r in records] == ["mose_route_kernel", "mose_shrink_kernel", "mose_expand_kernel"]
    shrink = records[1]
    # one block of 64 tokens; d_in = 48 in two tiles of 32, split in two to fill the 132 SMs planned
    assert shrink["grid"] == [1, 2, 1] and shrink["specialisation"]["constexprs"]["BLOCK_T"] == 64
    # the real specialisation: d_in = 48 is divisible by 16, N = 40 is not
    assert "D_IN" in shrink["specialisation"]["divisible_by_16"]
    assert "N" not in shrink["specialisation"]["divisible_by_16"]
    assert 0 < shrink["regs"] <= 255 and shrink["spill_bytes"] == 0


def test_render_shows_the_headline_rows_only():
    from bench.render import kernel_report_section

    with open(ROOT / "bench" / "results" / "kernel-report-sm90a.json") as f:
        report = json.load(f)
    text = kernel_report_section(report)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| kernel")]
    main = [r for r in report["records"] if r["case"]["main"]]
    assert 0 < len(main) < len(report["records"]) and len(rows) == len(main)
    assert all(f" {r['case']['name']} " in row for r, row in zip(main, rows))
    assert "Static kernel report (sm_90a, no GPU)" in text and report["environment"]["triton"] in text


def test_recorder_records_every_config_of_an_autotuned_kernel():
    import triton

    def scale(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    configs = [triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4)]
    tuned = triton.autotune(configs, key=["n"])(JITFunction(scale))
    with record_launches() as launches:
        tuned[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](torch.empty(1000), 1000)
    assert [(launch.kwargs["BLOCK"], launch.kwargs["num_warps"], launch.grid) for launch in launches] == [
        (64, 2, (16, 1, 1)), (128, 4, (8, 1, 1))]
