"""Compiled facts of the AR Triton kernels (issue 11), from the static kernel report: every launch the
AR launcher makes at the GPU presets' shapes and at the flag / dtype variants of the headline shapes,
specialised by Triton's own binder and compiled for sm_90a without a GPU (``bench.kernel_report``).

These guard speed until a GPU run is possible; they do not replace one. Named ``*triton*`` so that
they also run under Triton 3.6 (scripts/test_triton36.sh), the GPU image's version.
"""

import pytest

from bench.kernel_report import report_records

PASS_KERNELS = ("ar_prefill_kernel", "ar_decode_kernel")  # the kernels with the attention dots


@pytest.fixture(scope="module")
def records():
    found = report_records("ar")
    assert found, "no AR launches recorded"
    return found


def _where(r: dict) -> str:
    return f"{r['kernel']} at {r['case']['name']}"


def test_triton_ar_launches_do_not_spill(records):
    spilled = [(_where(r), r["regs"], r["spill_bytes"]) for r in records if r["spill_bytes"]]
    assert not spilled


def test_triton_ar_mma_work_is_one_pass(records):
    """One S = Q K^T and one P V per key block (no warpgroup computing rows another one computes,
    no dot per class state): the MMA instructions in the PTX equal the tile math's."""
    passes = [r for r in records if r["kernel"] in PASS_KERNELS]
    assert {r["kernel"] for r in passes} == set(PASS_KERNELS)
    for r in passes:
        assert r["expected_mma_instructions"] is not None, _where(r)
        assert r["mma_instructions"] == r["expected_mma_instructions"], _where(r)
        if r["case"]["dtype"] != "float32":  # float32 runs exact dots on CUDA cores: no MMA
            assert r["mma_instructions"] > 0, _where(r)


def test_triton_ar_key_loops_are_pipelined(records):
    """K/V of the prefill and decode loops come through async copies (loads not under a branch)."""
    for r in records:
        if r["kernel"] in PASS_KERNELS:
            assert r["pipelined"], _where(r)


def test_triton_ar_prefill_fills_the_gpu_once(records):
    """The persistent prefill grid: one 8-warp program per SM (it fits once), no second wave."""
    for r in records:
        if r["kernel"] == "ar_prefill_kernel" and r["num_warps"] == 8:
            assert r["ctas_per_sm"] >= 1 and r["grid_size"] <= 132 * r["ctas_per_sm"], _where(r)
