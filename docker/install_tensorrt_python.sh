#!/usr/bin/env bash
# Make `import tensorrt` work in the tritonserver image with exactly the TensorRT that
# Triton's tensorrt backend links: a plan only loads on the TensorRT version that built it
# ("expecting library version X got Y, please rebuild"), so the Python builder must match
# the libnvinfer in the image, not whatever pip resolves. The -py3 image ships the TensorRT
# libraries for the backend but (depending on the release) not the Python bindings; when
# they are missing, install the PyPI wheel of the same version (NGC builds have internet).
set -euo pipefail

log() { printf '[install_tensorrt_python] %s\n' "$*"; }
die() { printf '[install_tensorrt_python] error: %s\n' "$*" >&2; exit 1; }

# The image's TensorRT, e.g. "10.9.0.34-1+cuda12.8" from the deb, else from the .so name.
deb_version="$(dpkg-query -W -f='${Version}' libnvinfer10 2>/dev/null || true)"
if [[ -n "$deb_version" ]]; then
    trt_version="${deb_version%%-*}"
    cuda_major="$(sed -n 's/.*+cuda\([0-9]*\)\..*/\1/p' <<<"$deb_version")"
else
    so="$(ldconfig -p | grep -o '/[^ ]*/libnvinfer\.so\.[0-9][0-9.]*' | sort -V | tail -n 1 || true)"
    [[ -n "$so" ]] || die "no libnvinfer in this image: is it an NGC tritonserver -py3 image?"
    trt_version="${so##*libnvinfer.so.}"
    cuda_major=""
fi
if [[ -z "$cuda_major" ]]; then
    cuda_major="${CUDA_VERSION:-12}"
    cuda_major="${cuda_major%%.*}"
fi
log "image TensorRT libraries: $trt_version (CUDA $cuda_major)"

have="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
if [[ -n "$have" && ( "$have" == "$trt_version" || "$have" == "$trt_version".* ) ]]; then
    log "tensorrt python bindings $have already match"
    exit 0
fi
[[ -n "$have" ]] && log "tensorrt python $have does not match the libraries: replacing it"

# Exact version first; some releases exist on PyPI only as X.Y.Z(.postN), hence the fallback.
release="$(cut -d. -f1-3 <<<"$trt_version")"
log "pip install tensorrt-cu${cuda_major}==${trt_version}"
python3 -m pip install --no-cache-dir "tensorrt-cu${cuda_major}==${trt_version}" \
    || python3 -m pip install --no-cache-dir "tensorrt-cu${cuda_major}==${release}.*"

have="$(python3 -c 'import tensorrt; print(tensorrt.__version__)')"
[[ "$(cut -d. -f1-3 <<<"$have")" == "$release" ]] \
    || die "installed tensorrt $have but the image's libraries are $trt_version"
[[ "$have" == "$trt_version" || "$have" == "$trt_version".* ]] \
    || log "warning: tensorrt python $have vs libraries $trt_version: if Triton refuses the" \
           "plans (\"expecting library version\"), build them with trtexec from the image"
log "tensorrt python $have installed"
