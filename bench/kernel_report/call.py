"""``python -m bench.kernel_report.call < script.py``: the kernel report's records of any launcher call.

The script (Python read from stdin) calls launchers on CPU tensors, at shapes of its choosing; every
Triton launch it makes is recorded instead of run, planned as on an H100, specialised by Triton's
own binder and compiled for sm_90a. Prints one JSON record per launch (the fields of the report's
records, without op and case). Run it without TRITON_INTERPRET. Exit status 1 if a kernel does not
compile.
"""

from __future__ import annotations

import json
import sys

from .report import call_records


def main() -> int:
    script = sys.stdin.read()
    code = compile(script, "<stdin>", "exec")
    try:
        records = call_records(lambda: exec(code, {"__name__": "__kernel_report_call__"}))
    except RuntimeError as err:
        print(f"python -m bench.kernel_report.call: {err}", file=sys.stderr)
        return 1
    json.dump(records, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
