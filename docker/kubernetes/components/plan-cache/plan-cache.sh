#!/usr/bin/env bash
# Init container of every DART pod: make sure the shared plan cache holds a model
# repository built for THIS GPU model, TensorRT version, dart-triton version and build
# settings, building it if not, then point /run/dart/models at it for the server.
#
# TensorRT plans only run on the TensorRT version that built them and are tuned for one
# GPU model, so the cache (a ReadWriteMany volume) keeps one repository per key:
#   <cache>/<GPU name>/trt-<TensorRT version>/dart-<version>-<hash of the settings>
# A lock file beside each repository (flock: released by the kernel when the holder dies,
# also on NFSv4, whose client maps it to a byte-range lock) makes sure two pods never
# build the same key at once: the first builds (tens of minutes for ViT-H at 1008 px),
# the others wait on the lock and then find the repository current (the check takes
# seconds). Pods with other settings or on another GPU model use other keys, so a rolling
# update to new settings never rebuilds under a pod that still serves the old ones.
#
# The build itself is the image's entrypoint in DART_BUILD_ONLY mode (`dart-triton
# check-repository`, then `dart-triton build` when stale). Environment: DART_IMGSZ,
# DART_MAX_CLASSES, DART_BUILD_ARGS, DART_CHECKPOINT (from the pod spec), DART_PLAN_CACHE
# (/plan-cache), DART_REPOSITORY_LINK (/run/dart/models), DART_LOCK_TIMEOUT (seconds to
# wait for another pod's build, 7200), DART_ENTRYPOINT (the image's entrypoint).
set -euo pipefail

CACHE="${DART_PLAN_CACHE:-/plan-cache}"
LINK="${DART_REPOSITORY_LINK:-/run/dart/models}"
LOCK_TIMEOUT="${DART_LOCK_TIMEOUT:-7200}"
ENTRYPOINT="${DART_ENTRYPOINT:-/usr/local/bin/dart-entrypoint}"

log() { printf '[plan-cache] %s\n' "$*" >&2; }

# The key is computed by the same code that writes and checks the plans' sidecars, so
# "which GPU" means the same thing here as in `dart-triton check-repository`.
KEY="$(python3 - <<'PY'
import hashlib, os, re

from dart_triton import __version__
from dart_triton.export.tensorrt.sidecar import current_device, tensorrt_version

# No GPU: only a CPU backend can be built (DART_BUILD_ARGS="--backend python"); a
# TensorRT build fails there with its own message.
device = current_device() or {"gpu_name": "cpu"}
trt = tensorrt_version() or "none"
settings = "|".join(os.environ.get(k, "") for k in ("DART_IMGSZ", "DART_MAX_CLASSES",
                                                     "DART_BUILD_ARGS"))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
print(f"{slug(device['gpu_name'])}/trt-{slug(trt)}/dart-{slug(__version__)}-{digest}")
PY
)"
REPO="$CACHE/$KEY"
mkdir -p "$REPO"

exec 9>"$REPO.lock"
log "key $KEY: waiting for the build lock (up to ${LOCK_TIMEOUT}s)"
if ! flock --wait "$LOCK_TIMEOUT" 9; then
    log "error: $REPO.lock still held after ${LOCK_TIMEOUT}s: is another pod stuck building?"
    exit 1
fi
log "lock held: checking $REPO (a build runs only when it is stale)"
DART_MODEL_REPOSITORY="$REPO" DART_BUILD_ONLY=1 "$ENTRYPOINT"
flock --unlock 9

ln -sfn "$REPO" "$LINK"
log "$LINK -> $REPO"
