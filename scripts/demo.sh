#!/usr/bin/env bash
# The main job, from a fresh clone: set up, build a Triton model repository, serve it,
# detect objects in a sample photograph through tritonclient, write JSON + an annotated image.
#
# By default the checkpoint is a TINY RANDOMLY INITIALISED SAM3 (real weights cannot be
# downloaded here): the pipeline is real, the boxes are meaningless.
# Real weights: SAM3_CHECKPOINT=/path/to/facebook-sam3 bash scripts/demo.sh
# Env: DART_IMGSZ (default: the checkpoint's), DART_BACKEND (python), OUT (out/demo),
#      DART_CLASSES ("person,rocket,flag"), DART_IMAGE (default: a sample photo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BACKEND="${DART_BACKEND:-python}"
# The tritonserver bundled in nvidia-pytriton has only the python backend: refuse a backend
# the server that `dart-triton serve` runs cannot load now, not after a build and a crash.
# Checked before setup when a venv is already there (exit 2 is the check's refusal; other
# failures wait for setup to fix the venv), and again after it.
check_backend() {
    local problem rc=0
    problem="$("$1" -m dart_triton.export.server_check "$BACKEND" 2>&1)" || rc=$?
    if [[ $rc -eq 2 || ( $rc -ne 0 && "$2" == after ) ]]; then
        echo "demo.sh: DART_BACKEND=$BACKEND: $problem" >&2
        exit 2
    fi
}
[[ -x .venv/bin/python ]] && check_backend .venv/bin/python before
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
check_backend python after

OUT="${OUT:-out/demo}"
mkdir -p "$OUT"
CHECKPOINT="${SAM3_CHECKPOINT:-$OUT/sam3-tiny-random}"
if [[ -z "${SAM3_CHECKPOINT:-}" && ! -f "$CHECKPOINT/config.json" ]]; then
    dart-triton tiny-checkpoint "$CHECKPOINT" --seed 0
fi
IMAGE="${DART_IMAGE:-$OUT/astronaut.png}"
if [[ -z "${DART_IMAGE:-}" ]]; then
    python -c "import sys; from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save(sys.argv[1])" "$IMAGE"
fi
IFS=',' read -r -a CLASSES <<< "${DART_CLASSES:-person,rocket,flag}"

build_args=(--checkpoint "$CHECKPOINT" --output "$OUT/model_repository" --backend "$BACKEND")
[[ -n "${DART_IMGSZ:-}" ]] && build_args+=(--imgsz "$DART_IMGSZ")
dart-triton build "${build_args[@]}"

dart-triton serve --model-repository "$OUT/model_repository" --http-port 0 --grpc-port 0 \
    --metrics-port 0 --exit-timeout-secs=5 > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
# The launcher prints the ports it picked; wait for readiness.
for _ in $(seq 1 180); do
    grpc=$(grep -oE 'GRPCInferenceService at 127\.0\.0\.1:[0-9]+' "$OUT/server.log" | grep -oE '[0-9]+$' | head -1 || true)
    http=$(grep -oE 'HTTPService at 127\.0\.0\.1:[0-9]+' "$OUT/server.log" | grep -oE '[0-9]+$' | head -1 || true)
    if [[ -n "$http" ]] && curl -sf "http://127.0.0.1:$http/v2/health/ready" >/dev/null; then break; fi
    kill -0 $server 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
    sleep 1
done
[[ -n "${grpc:-}" ]] || { echo "server did not become ready; see $OUT/server.log" >&2; exit 1; }

dart-triton detect "$IMAGE" --classes "${CLASSES[@]}" --url "127.0.0.1:$grpc" \
    --json "$OUT/detections.json" --annotate "$OUT/annotated.png"
echo
echo "detections: $OUT/detections.json   annotated image: $OUT/annotated.png"
[[ -z "${SAM3_CHECKPOINT:-}" ]] && echo "(tiny random checkpoint: boxes are meaningless; set SAM3_CHECKPOINT for real weights)"
