"""Static kernel report: every Triton kernel launch of the launchers, compiled for sm_90a and measured
without a GPU (``python -m bench.kernel_report --help``).

For tests that assert kernel properties (cached per process; compiles in a clean subprocess when the
Triton interpreter is on, as in the test suite)::

    from bench.kernel_report import report_records
    from bench.kernel_report import ar  # ar.MAIN: the headline case names; mose.MAIN likewise

    for r in report_records("ar", cases=ar.MAIN):  # one dict per kernel launch
        assert r["spill_bytes"] == 0, (r["kernel"], r["case"]["name"])
        if r["kernel"] == "ar_attention_fwd_kernel":
            assert r["mma_instructions"] == r["expected_mma_instructions"]
        assert r["waves"] >= 1

Record fields: ``op``, ``kernel``, ``case`` (name, main, shape, dtype, flags), ``grid``,
``grid_size``, ``num_warps``, ``num_stages``, ``regs``, ``spill_bytes`` (= ``spill_stores`` +
``spill_loads``), ``smem_bytes``, ``ctas_per_sm``, ``occupancy``, ``occupancy_limiter``, ``waves``,
``mma_instructions``, ``expected_mma_instructions`` (None for a kernel whose op module declares no
dots), ``mma_by_shape``, ``pipelined``, ``async_copies_in_loop``, ``loads_in_loop``, ``ex2``,
``ttgir_dots``, ``specialisation`` (constexprs, arguments marked divisible by 16). Case names:
``python -m bench.kernel_report --op ar --list``. A kernel whose tile math changes must update
``dots()`` in ``ar.py`` / ``mose.py``; launchers must ask ``mosear_fast.kernels.target`` (not
``torch.cuda``) for SM counts and interpreter mode, or the report cannot plan them as on an H100.
Launcher calls at shapes of a test's own choosing: ``tests/triton_compile.compile_launches``.
"""


def report_records(op: str, cases=None) -> list[dict]:
    """One record per kernel launch of ``op`` ("ar" or "mose") at the named cases (all when None)."""
    from .report import report_records as _report_records

    return _report_records(op, cases)
