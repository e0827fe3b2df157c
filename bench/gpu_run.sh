#!/usr/bin/env bash
# The one GPU run (H100/H200, offline, under 8 minutes): installs the package without network, checks
# the compiled kernels, runs the kernel tests, the end-to-end and the op benchmarks, and writes a log and
# JSON under the output folder ($OUT when set, else bench/results/gpu-run). See bench/gpu_run.py.
#   bash bench/gpu_run.sh [--out DIR] [--budget SECONDS] [--skip-install] [--skip-tests]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_run "$@"
