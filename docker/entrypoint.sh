#!/usr/bin/env bash
# Container start: make sure the model repository in /models is what `dart-triton build`
# would write now, build it if not, then hand over to the supervised server
# `dart-triton serve` (extra arguments go to it, and the ones it does not know on to
# tritonserver).
#
# "What build would write now" is decided by `dart-triton check-repository`: the
# repository's manifest (dart_repository.json) must record this dart-triton version, the
# same build options (DART_IMGSZ, DART_MAX_CLASSES, DART_BUILD_ARGS, the backend) and the
# same checkpoint, and TensorRT plans, if the repository has any, must have been built for
# this GPU and TensorRT version (their model.plan.json sidecars). Plans are specific to
# both, so they are built here, on the serving GPU, on first start, and cached in the
# /models volume; a later start on the same GPU reuses them.
#
# Environment: DART_IMGSZ (1008), DART_MAX_CLASSES (16), DART_CHECKPOINT
# (/checkpoints/sam3), DART_MODEL_REPOSITORY (/models), DART_BUILD_ARGS (extra flags for
# `dart-triton build`, e.g. "--buckets 1,4,16", or "--backend python" instead of the
# default tensorrt), DART_HOST (0.0.0.0: the address the server binds),
# DART_SKIP_BUILD=1 (serve /models as it is), DART_BUILD_ONLY=1 (check or build, then
# exit without serving: e.g. a Kubernetes init container that fills the volume).
set -euo pipefail

MODELS="${DART_MODEL_REPOSITORY:-/models}"
CHECKPOINT="${DART_CHECKPOINT:-/checkpoints/sam3}"
IMGSZ="${DART_IMGSZ:-1008}"
MAX_CLASSES="${DART_MAX_CLASSES:-16}"
HOST="${DART_HOST:-0.0.0.0}"
read -r -a EXTRA_BUILD_ARGS <<<"${DART_BUILD_ARGS:-}"
# TensorRT unless DART_BUILD_ARGS names another backend (the last --backend wins).
BUILD_ARGS=(--backend tensorrt --imgsz "$IMGSZ" --max-classes "$MAX_CLASSES"
            "${EXTRA_BUILD_ARGS[@]}")

log() { printf '[dart-entrypoint] %s\n' "$*" >&2; }

# `docker run IMAGE bash` and the like: run that command instead of the server.
if [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
fi

if [[ "${DART_SKIP_BUILD:-0}" == 1 ]]; then
    log "DART_SKIP_BUILD=1: serving $MODELS as it is"
else
    status=0
    dart-triton check-repository "$MODELS" --checkpoint "$CHECKPOINT" -- "${BUILD_ARGS[@]}" \
        || status=$?
    case "$status" in
        0) log "$MODELS is current: skipping the build" ;;
        1)
            if [[ ! -d "$CHECKPOINT" ]]; then
                log "error: no SAM3 checkpoint at $CHECKPOINT: mount it (see docker/README.md)"
                exit 1
            fi
            log "building $MODELS from $CHECKPOINT (dart-triton build ${BUILD_ARGS[*]});" \
                "TensorRT plans take minutes, the result is kept in the volume"
            dart-triton build --checkpoint "$CHECKPOINT" --output "$MODELS" "${BUILD_ARGS[@]}"
            ;;
        *)
            log "error: cannot check $MODELS with these settings (DART_BUILD_ARGS?), see above"
            exit "$status"
            ;;
    esac
fi

if [[ "${DART_BUILD_ONLY:-0}" == 1 ]]; then
    log "DART_BUILD_ONLY=1: $MODELS is ready; not serving"
    exit 0
fi

exec dart-triton serve --model-repository "$MODELS" --host "$HOST" "$@"
