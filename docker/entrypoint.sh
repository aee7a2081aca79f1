#!/usr/bin/env bash
# Container start: make sure /models holds TensorRT plans built for this GPU and TensorRT,
# then hand over to tritonserver (extra arguments go to tritonserver).
#
# Plans are specific to the GPU and TensorRT version that built them, so they are built
# here, on the serving GPU, on first start, and cached in the /models volume; a later
# start on the same GPU reuses them (checked against each plan's model.plan.json sidecar).
#
# Environment: DART_IMGSZ (1008), DART_MAX_CLASSES (16), DART_CHECKPOINT
# (/checkpoints/sam3), DART_MODEL_REPOSITORY (/models), DART_BUILD_ARGS (extra flags for
# `dart-triton build`, e.g. "--buckets 1,4,16"), DART_SKIP_BUILD=1 (serve /models as is).
set -euo pipefail

MODELS="${DART_MODEL_REPOSITORY:-/models}"
CHECKPOINT="${DART_CHECKPOINT:-/checkpoints/sam3}"
IMGSZ="${DART_IMGSZ:-1008}"
MAX_CLASSES="${DART_MAX_CLASSES:-16}"
read -r -a EXTRA_BUILD_ARGS <<<"${DART_BUILD_ARGS:-}"

log() { printf '[dart-entrypoint] %s\n' "$*" >&2; }

# `docker run IMAGE bash` and the like: run that command instead of the server.
if [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
fi

if [[ "${DART_SKIP_BUILD:-0}" == 1 ]]; then
    log "DART_SKIP_BUILD=1: serving $MODELS as it is"
elif python3 -m dart_triton.export.plan_sidecar check "$MODELS" \
        --imgsz "$IMGSZ" --max-classes "$MAX_CLASSES"; then
    log "TensorRT plans in $MODELS are current: skipping the build"
else
    if [[ ! -d "$CHECKPOINT" ]]; then
        log "error: no SAM3 checkpoint at $CHECKPOINT: mount it (see docker/README.md)"
        exit 1
    fi
    log "building $MODELS from $CHECKPOINT (imgsz $IMGSZ, up to $MAX_CLASSES classes);" \
        "TensorRT takes minutes, the result is cached in the volume"
    dart-triton build --checkpoint "$CHECKPOINT" --output "$MODELS" --backend tensorrt \
        --imgsz "$IMGSZ" --max-classes "$MAX_CLASSES" "${EXTRA_BUILD_ARGS[@]}"
fi

exec tritonserver --model-repository "$MODELS" "$@"
