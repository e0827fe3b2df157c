#!/usr/bin/env bash
# The test suite: sets up .venv, runs pytest (Triton kernels through the interpreter on CPU), then the
# Triton tests again under Triton 3.6, the GPU image's version (scripts/test_triton36.sh).
# Arguments go to the first pytest run; MOSEAR_SKIP_TRITON36=1 skips the second.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
.venv/bin/python -m pytest -q "$@"
if [ "${MOSEAR_SKIP_TRITON36:-0}" != "1" ]; then
    bash scripts/test_triton36.sh
fi
