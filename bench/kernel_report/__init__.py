"""Static kernel report: every Triton kernel launch of the launchers, compiled for sm_90a and measured
without a GPU (``python -m bench.kernel_report --help``).

For tests: ``report_records(op, cases=None)`` returns one dict per kernel launch (fields in
``report.RECORD_FIELDS`` and more), cached per process.
"""


def report_records(op: str, cases=None) -> list[dict]:
    from .report import report_records as _report_records

    return _report_records(op, cases)
