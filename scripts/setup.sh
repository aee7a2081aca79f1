#!/usr/bin/env bash
# Create .venv and install everything the demo and the tests need (idempotent).
#   * torch and torchvision as a matching pair (timm, for the student backbones, needs
#     torchvision; the CPU torch 2.13.0 on this machine's disk has no torchvision that
#     imports beside it): 2.14.1 / 0.29.1 on x86_64 (PyPI's default CUDA build, which runs
#     on a CPU; pip takes both from this machine's disk where they lie there), 2.9.1 /
#     0.24.1 (CPU builds) on aarch64,
#   * the project, editable, with its extras,
#   every package at the version constraints.txt pins (tested; refreshed on purpose with
#   scripts/update_constraints.sh), so a fresh install today is the install CI tested,
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
want="$(sha256sum "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" "$ROOT/constraints.txt" \
    | sha256sum | cut -c1-16)"
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    # A full disk otherwise shows up minutes later as a test's "No space left on device".
    free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
    (( free_gb >= 9 )) || log "warning: ${free_gb} GB free beside $VENV; a first install" \
        "and a test run take about 9 GB (the CUDA build of torch is most of it)"
    log "installing python packages into $VENV (first run: a few minutes)"
    "$PY" -m pip install --quiet --upgrade pip
    if [[ "$(uname -m)" == aarch64 ]]; then torch_pair=("torch==2.9.1" "torchvision==0.24.1")
    else torch_pair=("torch==2.14.1" "torchvision==0.29.1"); fi
    "$PY" - "${torch_pair[@]}" <<'PYCHECK' 2>/dev/null || "$PY" -m pip install --quiet --constraint "$ROOT/constraints.txt" "${torch_pair[@]}"
import sys, torch, torchvision  # the pinned pair, and torchvision's ops load beside torch
from torchvision.ops import nms  # noqa: F401
want = [a.split("==")[1] for a in sys.argv[1:]]
sys.exit([torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]] != want)
PYCHECK
    "$PY" -m pip install --quiet --constraint "$ROOT/constraints.txt" \
        -e "${ROOT}[video,draw,eval,bench,dev,students]"
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
