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
# -k triton: the Triton parametrisations of the op tests, the Triton kernel files and the sm_90 compiles.
PYTHONPATH=.triton36 exec .venv/bin/python -m pytest -q -k triton -p no:cacheprovider "$@"
