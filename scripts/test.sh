#!/usr/bin/env bash
# The test suite: sets up .venv, then runs pytest (Triton kernels through the interpreter on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest -q "$@"
