#!/usr/bin/env bash
# Make `import tensorrt` work in the tritonserver image with exactly the TensorRT that
# Triton's tensorrt backend links: a plan only loads on the TensorRT version that built it
# ("expecting library version X got Y, please rebuild"), so the Python builder must match
# the libnvinfer in the image, not whatever pip resolves. The -py3 image ships the TensorRT
# libraries for the backend but (depending on the release) not the Python bindings; when
# they are missing, install the PyPI wheel of the same version (NGC builds have internet).
#
# The version is read from the library file itself: the soname link libnvinfer.so.N
# points at the real libnvinfer.so.X.Y.Z (Debian/Ubuntu packages, NVIDIA's tar files and
# the NGC images all install it that way). The soname alone says only "10", and pip would
# then install the newest 10.x, which the image's libraries refuse. The package database
# (dpkg), when it owns that file, adds the build number (10.9.0.34) and the CUDA major.
#
#   --print                 print version, CUDA major and the pip requirement; install nothing
#   DART_TRT_LIB_DIRS=a:b   look only in these directories (default: the loader's cache,
#                           then the usual multiarch and TensorRT install directories)
set -euo pipefail
shopt -s nullglob

log() { printf '[install_tensorrt_python] %s\n' "$*"; }
die() { printf '[install_tensorrt_python] error: %s\n' "$*" >&2; exit 1; }

print_only=0
case "${1:-}" in
    --print) print_only=1 ;;
    "") ;;
    *) die "unknown argument $1 (use --print or nothing)" ;;
esac

# Every libnvinfer.so.N (soname links only, not libnvinfer.so.X.Y.Z) in the given dirs.
sonames_in() {
    local dir f
    for dir in "$@"; do
        for f in "$dir"/libnvinfer.so.[0-9]*; do
            if [[ "$(basename "$f")" =~ ^libnvinfer\.so\.[0-9]+$ ]]; then
                printf '%s\n' "$f"
            fi
        done
    done
}

find_sonames() {
    local dirs=()
    if [[ -n "${DART_TRT_LIB_DIRS:-}" ]]; then
        IFS=: read -r -a dirs <<<"$DART_TRT_LIB_DIRS"
        sonames_in "${dirs[@]}"
        return
    fi
    if command -v ldconfig >/dev/null; then
        ldconfig -p 2>/dev/null | sed -n 's/^[[:space:]]*libnvinfer\.so\.[0-9][0-9]* .*=> //p'
    fi
    sonames_in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib/sbsa-linux-gnu \
        /usr/local/tensorrt/lib /opt/tensorrt/lib /usr/lib64 /usr/lib
}

mapfile -t found < <(find_sonames | sort -u)
[[ ${#found[@]} -gt 0 ]] \
    || die "no libnvinfer.so.N found: is this an NGC tritonserver -py3 image? (set DART_TRT_LIB_DIRS)"
soname="" newest=-1  # the newest major when several are installed
for f in "${found[@]}"; do
    major="${f##*.so.}"
    if (( major > newest )); then
        soname="$f" newest="$major"
    fi
done
[[ ${#found[@]} -eq 1 ]] || log "several TensorRT libraries (${found[*]}): using $soname"

real="$(readlink -f "$soname")"
file_version=""
if [[ "$(basename "$real")" =~ ^libnvinfer\.so\.([0-9]+\.[0-9]+\.[0-9]+)$ ]]; then
    file_version="${BASH_REMATCH[1]}"
fi

# The package that owns the file, for the build number and CUDA major, e.g.
# "libnvinfer10: /usr/lib/x86_64-linux-gnu/libnvinfer.so.10.9.0" -> 10.9.0.34-1+cuda12.8.
deb_version=""
if command -v dpkg-query >/dev/null; then
    package="$(dpkg-query -S "$real" 2>/dev/null | head -n 1 | cut -d: -f1 || true)"
    if [[ -n "$package" ]]; then
        deb_version="$(dpkg-query -W -f='${Version}' "$package" 2>/dev/null || true)"
    fi
fi
deb_release="${deb_version%%-*}"  # 10.9.0.34

if [[ -n "$file_version" ]]; then
    trt_version="$file_version"
    if [[ -n "$deb_release" && "$deb_release" == "$file_version".* ]]; then
        trt_version="$deb_release"
    elif [[ -n "$deb_release" ]]; then
        log "warning: package says $deb_version but $real is $file_version: trusting the file"
        deb_version=""
    fi
elif [[ -n "$deb_release" ]]; then
    trt_version="$deb_release"
else
    die "cannot tell the TensorRT release of $soname: it resolves to $real (not" \
        "libnvinfer.so.X.Y.Z) and no package owns it; install the matching tensorrt wheel" \
        "by hand"
fi

cuda_major="$(sed -n 's/.*+cuda\([0-9]*\)\..*/\1/p' <<<"$deb_version")"
if [[ -z "$cuda_major" ]]; then
    cuda_major="${CUDA_VERSION:-12}"  # set in every NGC image, e.g. 12.8.1.012
    cuda_major="${cuda_major%%.*}"
fi
release="$(cut -d. -f1-3 <<<"$trt_version")"
if [[ "$trt_version" == "$release" ]]; then
    requirement="tensorrt-cu${cuda_major}==${release}.*"  # any build of that release
else
    requirement="tensorrt-cu${cuda_major}==${trt_version}"
fi
log "image TensorRT libraries: $trt_version ($real, CUDA $cuda_major)"

if [[ "$print_only" == 1 ]]; then
    printf 'version=%s\ncuda=%s\nrequirement=%s\n' "$trt_version" "$cuda_major" "$requirement"
    exit 0
fi

have="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
if [[ -n "$have" && ( "$have" == "$trt_version" || "$have" == "$trt_version".* ) ]]; then
    log "tensorrt python bindings $have already match"
    exit 0
fi
[[ -n "$have" ]] && log "tensorrt python $have does not match the libraries: replacing it"

# Exact build first; some releases exist on PyPI only as another build of X.Y.Z.
log "pip install $requirement"
python3 -m pip install --no-cache-dir "$requirement" \
    || python3 -m pip install --no-cache-dir "tensorrt-cu${cuda_major}==${release}.*"

have="$(python3 -c 'import tensorrt; print(tensorrt.__version__)')"
[[ "$(cut -d. -f1-3 <<<"$have")" == "$release" ]] \
    || die "installed tensorrt $have but the image's libraries are $trt_version"
[[ "$have" == "$trt_version" || "$have" == "$trt_version".* ]] \
    || log "warning: tensorrt python $have vs libraries $trt_version: if Triton refuses the" \
           "plans (\"expecting library version\"), build them with trtexec from the image"
log "tensorrt python $have installed"
