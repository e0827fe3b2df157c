#!/usr/bin/env bash
# The test suite: sets up .venv, runs pytest (Triton kernels through the interpreter on CPU), then the
# Triton tests again under Triton 3.6, the GPU image's version (scripts/test_triton36.sh).
# Arguments go to the first pytest run; MOSEAR_SKIP_TRITON36=1 skips the second (the first then runs
# every file). Both runs spread the test files over one pytest-xdist worker per core
# (MOSEAR_TEST_WORKERS=N to choose, 0 for one process); a file's tests stay on one worker, so module
# fixtures (compiled kernel reports, exports) are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
# The full static kernel reports (every launch compiled for sm_90a) are checked once, in the Triton 3.6
# pass when it runs: that is the compiler of the GPU image. The small sm_90a compiles of the kernel files
# and of test_kernel_report.py run under this Triton too.
full_reports=()
if [ "${MOSEAR_SKIP_TRITON36:-0}" != "1" ]; then
    full_reports=(--ignore=tests/test_kernel_report_ar.py --ignore=tests/test_kernel_report_mose.py)
fi
.venv/bin/python -m pytest -q -n "${MOSEAR_TEST_WORKERS:-auto}" --dist loadfile "${full_reports[@]}" "$@"
if [ "${MOSEAR_SKIP_TRITON36:-0}" != "1" ]; then
    bash scripts/test_triton36.sh
fi
