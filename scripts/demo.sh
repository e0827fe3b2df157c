#!/usr/bin/env bash
# The main job on its built-in default: sets up .venv, then runs `mosear-demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/mosear-demo "$@"
