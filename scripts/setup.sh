#!/usr/bin/env bash
# Create .venv and install everything the demo and the tests need (idempotent).
#   * torch 2.13.0 (the CPU build where this machine has it on disk),
#   * the project, editable, with its extras,
#   * the CLIP BPE vocabulary (open_clip_torch, --no-deps: only its vocab file is used),
#   * tritonserver + python backend, perf_analyzer, libb64 (scripts/install_triton_tools.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.dart-triton-setup"
log() { printf '[setup] %s\n' "$*"; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "[setup] error: Python 3.11+ needed ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
[[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"

# Reinstall only when the dependency list changed.
want="$(sha256sum "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    log "installing python packages into $VENV (first run: a few minutes)"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -c 'import torch' 2>/dev/null || "$PY" -m pip install --quiet "torch==2.13.0"
    "$PY" -m pip install --quiet -e "${ROOT}[video,draw,eval,bench,dev]"
    "$PY" -m pip install --quiet --no-deps "open_clip_torch==3.3.0"
    echo "$want" > "$STAMP"
fi
VENV="$VENV" bash "$ROOT/scripts/install_triton_tools.sh"
# checkov (the Kubernetes policy scan) in a venv of its own: its pins would downgrade
# packaging, networkx and python-dateutil in the project venv.
CHECKOV_VENV="$ROOT/.tools/checkov"
CHECKOV_VERSION="3.3.30"
if [[ "$("$CHECKOV_VENV/bin/checkov" --version 2>/dev/null)" != "$CHECKOV_VERSION" ]]; then
    log "installing checkov $CHECKOV_VERSION into $CHECKOV_VENV"
    rm -rf "$CHECKOV_VENV"
    "$PYTHON" -m venv "$CHECKOV_VENV"
    "$CHECKOV_VENV/bin/python" -m pip install --quiet "checkov==$CHECKOV_VERSION"
fi
log "ready: . $VENV/bin/activate"
