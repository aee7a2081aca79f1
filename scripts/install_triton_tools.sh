#!/usr/bin/env bash
# Install what the server tests and benchmarks need on a CPU-only machine:
#   * nvidia-pytriton (the pyproject `serve` extra) into the venv: it bundles a
#     tritonserver 2.51 binary with the python backend;
#   * .tools/triton-python: a venv over the project venv whose only own package is
#     numpy<2. The bundled python-backend stub is built against numpy 1.x (pybind11)
#     and corrupts BYTES tensors when numpy 2 is imported; dart_triton.serving.binaries runs
#     the stub with this env's python3, which sees every other package of the venv;
#   * perf_analyzer, taken from the tritonclient 2.49.0 wheel (the last one that
#     ships it) and kept in .tools/, outside the venv, because the project needs
#     tritonclient>=2.50 there; plus the libs it links (libb64, libcudart.so.12).
# Idempotent: a second run only checks and exits.
#
# Usage: scripts/install_triton_tools.sh   (env: VENV=.venv, DART_TRITON_TOOLS=.tools;
# dart_triton.serving.binaries and dart_triton.benchmarks.perf_analyzer read the same DART_TRITON_TOOLS)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TOOLS="${DART_TRITON_TOOLS:-$ROOT/.tools}"
PY="$VENV/bin/python"

PA_CLIENT_VERSION="2.49.0"       # last tritonclient wheel with perf_analyzer inside
CUDART_VERSION="12.9.79"         # nvidia-cuda-runtime-cu12: only libcudart.so.12 is used
PA_DIR="$TOOLS/perf_analyzer"
PA_STAMP="$PA_DIR/INSTALLED"
PA_PKGS=("tritonclient==$PA_CLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDART_VERSION")
PA_WANT="${PA_PKGS[*]}"

log() { printf '[install_triton_tools] %s\n' "$*"; }
die() { printf '[install_triton_tools] error: %s\n' "$*" >&2; exit 1; }

[[ -x "$PY" ]] || die "no venv python at $PY (create the venv and pip install -e . first, or set VENV)"

# 1. nvidia-pytriton, with the version spec taken from pyproject's `serve` extra.
if "$PY" - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("pytriton")
ok = spec is not None and spec.origin is not None and (
    pathlib.Path(spec.origin).parent / "tritonserver" / "bin" / "tritonserver").is_file()
sys.exit(0 if ok else 1)
EOF
then
    log "nvidia-pytriton: present"
else
    serve_spec="$("$PY" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print(next(r for r in extras["serve"] if r.startswith("nvidia-pytriton")))
EOF
)"
    # --no-deps: only the bundled binaries are used, never the pytriton package, and
    # its numpy<2 pin would downgrade the venv's numpy (the stub gets numpy<2 in step 2).
    log "installing $serve_spec (binaries only, --no-deps) into $VENV"
    "$PY" -m pip install --quiet --no-deps --constraint "$ROOT/constraints.txt" "$serve_spec"
fi

# 2. The stub's Python: numpy<2 first, then everything in the project venv (a .pth
# line runs site.addsitedir, so the venv's own .pth files, e.g. the editable
# dart_triton, are honoured too). FOR_PREFIX ties it to the venv it overlays.
STUB_ENV="$TOOLS/triton-python"
STUB_NUMPY="numpy==1.26.4"
venv_prefix="$("$PY" -c 'import sys; print(sys.prefix)')"
venv_site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
venv_py="py$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
stub_want="$venv_prefix $STUB_NUMPY $venv_py"
if [[ -x "$STUB_ENV/bin/python3" && "$(cat "$STUB_ENV/FOR_PREFIX" 2>/dev/null)" == "$stub_want" ]]; then
    log "stub python env: present ($STUB_ENV)"
else
    log "creating stub python env $STUB_ENV ($STUB_NUMPY over $venv_prefix)"
    rm -rf "$STUB_ENV"
    "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv --without-pip "$STUB_ENV"
    "$PY" -m pip install --quiet --no-deps --target "$("$STUB_ENV/bin/python3" -c \
        'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "$STUB_NUMPY"
    stub_site="$("$STUB_ENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "import site; site.addsitedir('$venv_site')" > "$stub_site/zz_dart_triton_venv.pth"
    echo "$stub_want" > "$STUB_ENV/FOR_PREFIX"
fi
"$STUB_ENV/bin/python3" -c 'import numpy, dart_triton; assert numpy.__version__ < "2"' \
    || die "stub python env $STUB_ENV is broken: remove it and rerun"
# Packages of the venv built for numpy>=2 only (scipy 1.18 on Python 3.12, say) cannot
# import under numpy<2: hide them from the stub python (dart_triton/serving/stub_env.py).
"$STUB_ENV/bin/python3" -m dart_triton.serving.stub_env \
    "$("$STUB_ENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    | sed 's/^/[install_triton_tools] /' \
    || die "stub python env $STUB_ENV cannot import what the python models need (see above)"

# 3. libb64 (perf_analyzer links libb64.so.0d). Debian's package when we can
# install it; otherwise the copy bundled in nvidia_pytriton.libs (see step 4).
have_b64() { ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; }
if have_b64; then
    log "libb64-0d: present"
# PIP_NO_INDEX: an offline machine (scripts/gpu_check.sh), where apt-get would only wait.
elif [[ $EUID -eq 0 && -z "${PIP_NO_INDEX:-}" ]] && command -v apt-get >/dev/null; then
    log "installing Debian libb64-0d"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null; } \
        || log "apt-get failed; will use nvidia_pytriton's copy of libb64"
else
    log "libb64-0d: not installed and cannot apt-get; will use nvidia_pytriton's copy"
fi

# 4. perf_analyzer binary + libs into .tools/perf_analyzer, wrapper in .tools/bin.
if [[ -f "$PA_STAMP" && "$(cat "$PA_STAMP")" == "$PA_WANT" && -x "$PA_DIR/bin/perf_analyzer" ]]; then
    log "perf_analyzer: present ($PA_WANT)"
else
    log "fetching perf_analyzer from $PA_WANT"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # --no-deps + explicit platform: download only, never install 2.49 into the venv.
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --python-version 3.11 --dest "$tmp/wheels" "${PA_PKGS[@]}"
    "$PY" - "$tmp" <<'EOF'
import pathlib, sys, zipfile
tmp = pathlib.Path(sys.argv[1])
for whl in (tmp / "wheels").glob("*.whl"):
    zipfile.ZipFile(whl).extractall(tmp / "x")
EOF
    rm -rf "$PA_DIR"
    mkdir -p "$PA_DIR/bin" "$PA_DIR/lib"
    pa_bin="$(find "$tmp/x" -path '*/data/bin/perf_analyzer' -type f | head -n1)"
    cudart="$(find "$tmp/x" -name 'libcudart.so.12' | head -n1)"
    [[ -n "$pa_bin" ]] || die "perf_analyzer not found in the tritonclient $PA_CLIENT_VERSION wheel"
    [[ -n "$cudart" ]] || die "libcudart.so.12 not found in nvidia-cuda-runtime-cu12"
    install -m 0755 "$pa_bin" "$PA_DIR/bin/perf_analyzer"
    install -m 0644 "$cudart" "$PA_DIR/lib/libcudart.so.12"
    echo "$PA_WANT" > "$PA_STAMP"
fi

# Fallback libb64 from the pytriton wheel (auditwheel renamed it; the loader
# finds it by file name, so a link named after the real soname is enough).
if ! have_b64 && [[ ! -e "$PA_DIR/lib/libb64.so.0d" ]]; then
    # find_spec, not import: pytriton's own import needs packages we never install (zmq).
    libs="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("pytriton").origin).parent.parent / "nvidia_pytriton.libs")')"
    b64="$(find "$libs" -name 'libb64-*.so.0d' | head -n1)"
    [[ -n "$b64" ]] || die "libb64.so.0d missing: apt-get install libb64-0d"
    cp "$b64" "$PA_DIR/lib/libb64.so.0d"
fi

mkdir -p "$TOOLS/bin"
wrapper="$(cat <<'EOF'
#!/usr/bin/env bash
# Written by scripts/install_triton_tools.sh: runs the tritonclient 2.49.0 perf_analyzer
# with the libs it needs (libcudart.so.12; no GPU is required for HTTP/gRPC load).
pa="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../perf_analyzer" && pwd)"
export LD_LIBRARY_PATH="$pa/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$pa/bin/perf_analyzer" "$@"
EOF
)"
# Replaced only when it changed, and atomically: someone may be running it right now.
if [[ "$(cat "$TOOLS/bin/perf_analyzer" 2>/dev/null)" != "$wrapper" ]]; then
    printf '%s\n' "$wrapper" > "$TOOLS/bin/perf_analyzer.new"
    chmod 0755 "$TOOLS/bin/perf_analyzer.new"
    mv -f "$TOOLS/bin/perf_analyzer.new" "$TOOLS/bin/perf_analyzer"
fi
# On PATH once the venv is activated (the wrapper finds its libs through readlink -f).
# Not tritonserver: `dart-triton serve` runs the bundled one with the set-up it needs,
# and a tritonserver on PATH would be taken for the one in NVIDIA's container.
pa_link="$(cd "$TOOLS/bin" && pwd)/perf_analyzer"
if [[ "$(readlink "$VENV/bin/perf_analyzer" 2>/dev/null)" != "$pa_link" ]]; then
    ln -sfn "$pa_link" "$VENV/bin/perf_analyzer"
    log "linked $VENV/bin/perf_analyzer -> $pa_link"
fi

# 5. Verify. perf_analyzer 2.49 exits 99 on --help (it is not a known option there)
# but prints its usage; a missing lib would print a loader error instead.
missing="$(LD_LIBRARY_PATH="$PA_DIR/lib" ldd "$PA_DIR/bin/perf_analyzer" | grep 'not found' || true)"
[[ -z "$missing" ]] || die "perf_analyzer is missing shared libraries:
$missing"
help_out="$("$VENV/bin/perf_analyzer" --help 2>&1 || true)"
grep -q 'perf_analyzer \[options\]' <<<"$help_out" || die "perf_analyzer --help failed:
$help_out"
log "perf_analyzer: ok -> $TOOLS/bin/perf_analyzer (on PATH as $VENV/bin/perf_analyzer)"
