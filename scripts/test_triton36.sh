#!/usr/bin/env bash
# The Triton tests again under Triton 3.6, the version of the GPU image (the dev venv has the newest).
# Triton 3.6 goes into .triton36/ (a pip --target folder put first on PYTHONPATH), so the venv's
# torch and the package are shared and only the Triton tests run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON36=${MOSEAR_TRITON36_VERSION:-3.6.0}
if ! PYTHONPATH=.triton36 .venv/bin/python -c "import triton, sys; sys.exit(triton.__version__ != '$TRITON36')" 2>/dev/null; then
    rm -rf .triton36
    .venv/bin/python -m pip install -q --no-deps --target .triton36 "triton==$TRITON36"
fi
# Without arguments: the Triton kernel test files (every kernel against its reference: forward,
# backward, tails, options, dtypes), the Triton cases of the fused mose_linear op and of the backend
# dispatch, and the sm_90a compiles and static kernel report checks (3.6's PTX and ptxas). The op-level
# Triton parametrisations of test_ar_attention.py / test_mose_lora.py run under the dev Triton only:
# they reach the same kernels through the same launchers, and running them twice would put the suite
# over its time budget. Arguments replace this selection (e.g. `-k triton` for every Triton test).
if [ "$#" -eq 0 ]; then
    set -- tests/test_ar_triton.py tests/test_mose_triton.py tests/test_kernel_report.py tests/test_kernel_report_ar.py \
        tests/test_kernel_report_mose.py tests/test_mose_linear_op.py tests/test_backend.py -k "triton or kernel_report"
fi
PYTHONPATH=.triton36 exec .venv/bin/python -m pytest -q -n "${MOSEAR_TEST_WORKERS:-auto}" --dist loadfile -p no:cacheprovider "$@"
