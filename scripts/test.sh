#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, parity, ONNX, real tritonserver.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
if ! command -v shellcheck >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    (apt-get install -y -qq shellcheck >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1; }) \
        || echo "[test] shellcheck not installed: its lint tests will skip"
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
exec python -m pytest -q "$@"
