#!/usr/bin/env bash
# Refresh constraints.txt, the versions `scripts/setup.sh` and the Docker image install.
# Done on purpose, never by setup: it installs today's newest versions of everything the
# project needs into a scratch venv and writes them down. Then run `bash scripts/test.sh`
# (which reinstalls from the new file) and commit constraints.txt only if it passes.
#
#   bash scripts/update_constraints.sh      # x86_64 (the torch pair for aarch64 is kept)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m venv "$scratch/venv"
PY="$scratch/venv/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# The torch pair and the vocabulary package are pinned in setup.sh, not taken newest.
torch_x86="$(grep -o '"torch==[^"]*" "torchvision==[^"]*"); fi' "$ROOT/scripts/setup.sh" | head -1)"
mapfile -t pair < <(echo "$torch_x86" | grep -o '[a-z]*==[0-9.]*')
"$PY" -m pip install --quiet "${pair[@]}"
"$PY" -m pip install --quiet "${ROOT}[serve,video,draw,eval,bench,dev,students]"
"$PY" -m pip install --quiet --no-deps "open_clip_torch==3.3.0"
{
    echo "# Tested versions of every package the project installs (pip constraints)."
    echo "# Written by scripts/update_constraints.sh on $(date -u +%Y-%m-%d); used by"
    echo "# scripts/setup.sh and docker/Dockerfile. Refresh on purpose, then run the tests."
    "$PY" -m pip freeze --exclude dart-triton \
        | grep -v -E '^(torch|torchvision)==' | LC_ALL=C sort -f
    echo "# The torch pair: PyPI's CUDA build on x86_64, CPU builds on aarch64."
    for p in "${pair[@]}"; do echo "$p; platform_machine != \"aarch64\""; done
    grep -h -E '^(torch|torchvision)==.*aarch64' "$ROOT/constraints.txt" 2>/dev/null || true
} > "$ROOT/constraints.txt.new"
mv "$ROOT/constraints.txt.new" "$ROOT/constraints.txt"
echo "wrote $ROOT/constraints.txt; now run: bash scripts/test.sh"
