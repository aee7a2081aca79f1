#!/usr/bin/env bash
# One command for a lent GPU machine: the torch backend measured end to end through Triton.
#
#   scripts/gpu_check.sh wheels        # HERE (PyPI reachable): fetch what the GPU machine
#                                      # lacks into artifacts/gpu-wheels/{big,main,tools}
#   scripts/gpu_check.sh [options]     # THERE: every step below, in order
#
# The GPU machine has no internet but has PyTorch + CUDA, timm, transformers, onnxruntime;
# what it lacks travels as wheels, at most 64 MiB per call, in an ignored folder that stays
# while the machine is warm (30 s idle). nvidia-pytriton is stripped to the Python 3.12 stub
# (37 MiB), so two calls carry everything:
#   1. carry artifacts/gpu-wheels/big and .../main (59 MiB): --steps setup,build
#   2. carry artifacts/gpu-wheels/tools (34 MiB):          --steps tools,serve,test,bundle
#   3. while still warm, nothing carried:                 --steps profile,hierarchy,bundle
# The streams study alone (H200, 2026-12-04: 76 s, then 236 s with two server starts):
#   1. carry big and main: --steps setup,streams_build --compile none
#   2. carry tools:        --steps tools,streams,bundle --compile none --repeats 1
# (--compile none: eager under CUDA graphs; compiling at load costs minutes per start.)
# Steps run in the order --steps gives; files under artifacts/ stay while the machine is warm.
#
# Steps (--steps, comma-separated, run in that order; default all of them, in this order):
#   setup      install the carried wheels and this project (offline)
#   tools      scripts/install_triton_tools.sh (numpy<2 stub env, perf_analyzer); report
#              what the bundled tritonserver links (CUDA runtime, libpython for the stub)
#   test       pytest -m gpu (the CUDA and torch-backend GPU tests; TensorRT ones skip)
#   build      a random-weight checkpoint (full size; --tiny: the test-size one), then one
#              --backend torch repository per --sizes entry
#   serve      per size: serve the repository, class scaling with perf_analyzer
#              (concurrency 1 and 2), served vs in-process timing, goals
#              (python -m dart_triton.benchmarks.gpu_check)
#   profile    per size: where backbone and enc_dec spend their time, per kernel, and the
#              rate they reach (python -m dart_triton.benchmarks.kernel_profile)
#   hierarchy  the optimisation hierarchy on this device (python -m ...benchmarks.hierarchy)
#   paths      where a served request's time goes, served vs in process at N = 1 and 4
#              (python -m dart_triton.benchmarks.request_path; torch backend)
#   streams    S cameras into one server, --max-batch (frames share backbone calls,
#              prompts of several frames share enc_dec passes) vs one frame per call:
#              aggregate frames/s, p50/p99 (python -m dart_triton.benchmarks.streams)
#   streams_build  only build the streams step's two repositories (before `streams`; alone,
#              a device call that carries no tritonserver can do it)
#   masks      what masks on demand cost at 1008 px: the mask head per kept class and
#              per kept detection, RLE at 1080p (python -m dart_triton.benchmarks.masks)
#   coldstart  start to ready, compiled at load vs from the build's AOTInductor packages
#              (python -m dart_triton.benchmarks.cold_start); not in the default list:
#              it compiles twice (name it in --steps)
#   bundle     results, CSVs, plots and logs as one tarball (--bundle; $OUT when set)
#
# Options:
#   --device cuda|cpu   cuda (default): GPU repositories (--gpu, FP16, --compile, CUDA graphs)
#                       and results into benchmarks/; cpu: CPU FP32 repositories, results
#                       into --out only (what CI runs: `--device cpu --tiny`)
#   --tiny              the tiny random SAM3 (seconds per step, numbers meaningless)
#   --sizes "1008 644"  image sizes (default: 1008 644; --tiny: the checkpoint's)
#   --compile MODE      none|default|max-autotune for the GPU repositories (default: default)
#   --buckets LIST      prompt buckets of the full-size repositories (default: 1,4,16)
#   --scaling "N ..."   class counts of the served class-scaling study (default: 1 2 4 8 16 80)
#   --repeats R         rounds per repository of the streams study (default: 3)
#   --steps LIST        e.g. setup or build,serve (default: all)
#   --out DIR           logs, repositories and (cpu) results (default: artifacts/gpu_check)
#   --bundle FILE       tarball the bundle step writes (default: $OUT/gpu_check.tgz when $OUT
#                       is set, else DIR/gpu_check.tgz)
#
# Each step fits one 10-minute device command. Back here, merge the GPU
# sections into RESULTS.md with:
#   tar xzf gpu_check.tgz -C /tmp && cp /tmp/gpu_check/results/* benchmarks/results/ &&
#   python -m dart_triton.benchmarks.common merge /tmp/gpu_check/RESULTS.md benchmarks/RESULTS.md
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1

WHEELS="$ROOT/artifacts/gpu-wheels"
log() { printf '[gpu_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[gpu_check] error: %s\n' "$*" >&2; exit 2; }

# Wheels, fetched here ----------------------------------------------------------------------
# GPU image: Python 3.12. Versions: the ones this project is tested with here.
PY_TAG=3.12
BIG=("nvidia-pytriton==0.7.0")
MAIN=("transformers==5.24.0" "tritonclient==2.73.0" "python-rapidjson" "geventhttpclient"
      "gevent" "greenlet" "zope.event" "zope.interface" "brotli" "open_clip_torch==3.3.0"
      "setuptools>=77" "pycocotools==2.0.11")
TOOLS=("numpy==1.26.4" "tritonclient==2.49.0" "nvidia-cuda-runtime-cu12==12.9.79")

fetch_wheels() {
    local py="${PYTHON:-python3}" group dest
    [[ -x .venv/bin/python ]] && py=.venv/bin/python
    for group in big main tools; do
        dest="$WHEELS/$group"
        mkdir -p "$dest"
        local pkgs=()
        case "$group" in
            big) pkgs=("${BIG[@]}") ;;
            main) pkgs=("${MAIN[@]}") ;;
            tools) pkgs=("${TOOLS[@]}") ;;
        esac
        log "downloading ${pkgs[*]} -> $dest"
        # --no-deps: the machine has the rest; binary wheels for its Python and glibc.
        "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
            --python-version "$PY_TAG" --implementation cp \
            --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
            --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 --platform any "${pkgs[@]}"
    done
    strip_pytriton "$py" "$WHEELS"/big/nvidia_pytriton-*.whl
    du -sh "$WHEELS"/* | sed 's/^/[gpu_check] /'
    log "carry artifacts/gpu-wheels/big and .../main with '--steps setup,build', then"
    log "artifacts/gpu-wheels/tools with '--steps tools,serve,test,bundle' (each under 64 MiB);"
    log "then, carrying nothing, '--steps profile,hierarchy,bundle'"
}

# The GPU machine runs Python $PY_TAG: the other stubs, and the libpython 3.13 that only the
# 3.13 stub links, are 16 MiB it never loads. Rewritten in place; a second run finds
# nothing to drop.
strip_pytriton() {
    local py="$1" whl="$2"
    "$py" - "$whl" "$PY_TAG" <<'EOF'
import os, sys, zipfile
whl, keep = sys.argv[1], f"/python_backend_stubs/{sys.argv[2]}/"
def unused(name):
    return ("/python_backend_stubs/" in name and keep not in name) or "/libpython3-" in name
with zipfile.ZipFile(whl) as src:
    entries = [i for i in src.infolist() if not unused(i.filename)]
    if len(entries) < len(src.infolist()):
        with zipfile.ZipFile(whl + ".tmp", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            for info in entries:
                dst.writestr(info, src.read(info.filename), zipfile.ZIP_DEFLATED, 9)
        os.replace(whl + ".tmp", whl)
EOF
}

if [[ "${1:-}" == wheels ]]; then
    fetch_wheels
    exit 0
fi

# Options -----------------------------------------------------------------------------------
DEVICE=cuda TINY=0 SIZES="" COMPILE=default BUCKETS="1,4,16" SCALING="" REPEATS=3
STEPS="setup,tools,test,build,serve,profile,hierarchy,paths,streams_build,streams,masks,bundle"
OUT_DIR="$ROOT/artifacts/gpu_check" BUNDLE=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --sizes) SIZES="${2:?--sizes needs a list}"; shift 2 ;;
        --compile) COMPILE="${2:?--compile needs a mode}"; shift 2 ;;
        --buckets) BUCKETS="${2:?--buckets needs a list}"; shift 2 ;;
        --scaling) SCALING="${2:?--scaling needs class counts}"; shift 2 ;;
        --repeats) REPEATS="${2:?--repeats needs a count}"; shift 2 ;;
        --steps) STEPS="${2:?--steps needs a list}"; shift 2 ;;
        --out) OUT_DIR="${2:?--out needs a directory}"; shift 2 ;;
        --bundle) BUNDLE="${2:?--bundle needs a file}"; shift 2 ;;
        -h|--help) sed -n "2,/^set -euo/p" "${BASH_SOURCE[0]}" | sed "\$d" | cut -c3-; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || die "--device must be cuda or cpu, got $DEVICE"
[[ "$COMPILE" =~ ^(none|default|max-autotune)$ ]] || die "--compile must be none, default or max-autotune"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
CONFIG=full
[[ $TINY == 1 ]] && CONFIG=tiny
if [[ "$DEVICE" == cuda ]]; then
    RESULTS="$ROOT/benchmarks/RESULTS.md" FIGURES="$ROOT/benchmarks/results"
else  # CPU/CI runs never touch the committed results
    RESULTS="$OUT_DIR/RESULTS.md" FIGURES="$OUT_DIR/results"
fi
BUNDLE="${BUNDLE:-${OUT:-$OUT_DIR}/gpu_check.tgz}"
export DART_BENCH_CACHE="${DART_BENCH_CACHE:-$ROOT/artifacts/bench}"

# The Python that has PyTorch: this checkout's venv when there is one (here), else python3.
PY=python3
[[ -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"
BIN="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
export PATH="$BIN:$PATH"

STATUS=()
run_step() {  # run_step NAME FUNCTION: a failed step is reported, the next ones still run
    local name="$1" rc=0
    log "=== $name"
    "$2" > >(tee -a "$OUT_DIR/$name.log") 2>&1 || rc=$?
    STATUS+=("$name=$([[ $rc == 0 ]] && echo ok || echo "FAILED($rc)")")
    log "=== $name: $([[ $rc == 0 ]] && echo ok || echo "failed ($rc), see $OUT_DIR/$name.log")"
}

# Offline: every requirement comes from the carried wheels (PIP_* reach the pip that
# install_triton_tools.sh runs too). False when nothing was carried.
offline_pip() {
    local links=() d
    for d in "$WHEELS"/*/; do [[ -d "$d" ]] && links+=("$d"); done
    [[ ${#links[@]} -gt 0 ]] || return 1
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="${links[*]}"
}

# Steps -------------------------------------------------------------------------------------
step_setup() {
    if [[ "$DEVICE" == cuda ]]; then
        "$PY" -c 'import torch; assert torch.cuda.is_available(), "PyTorch sees no GPU"; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
    local d
    if offline_pip; then
        local main=()
        for d in "$WHEELS"/big/*.whl "$WHEELS"/main/*.whl; do [[ -f "$d" ]] && main+=("$d"); done
        if [[ ${#main[@]} -gt 0 ]]; then
            log "installing ${#main[@]} carried wheel(s)"
            "$PY" -m pip install --quiet --no-deps --no-compile "${main[@]}"
        fi
    fi
    if ! "$PY" -c 'import dart_triton.export' 2>/dev/null; then
        log "installing this project (editable, no dependencies)"
        "$PY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
    fi
}

step_tools() {
    if [[ "$DEVICE" == cuda ]]; then  # on the CPU, scripts/setup.sh has done this already
        offline_pip || true
        VENV="$("$PY" -c 'import sys; print(sys.prefix)')" bash scripts/install_triton_tools.sh
    fi
    "$PY" - <<'EOF'
# What the bundled tritonserver needs on this machine (README notes for GPU serving).
import subprocess, sys, sysconfig
from dart_triton.serving import binaries as server
root = server.bundled_tritonserver_dir()
if root is None:
    sys.exit("nvidia-pytriton is not installed (carry artifacts/gpu-wheels/big)")
ver = f"{sys.version_info.major}.{sys.version_info.minor}"
env = server.server_env(root / "bin" / "tritonserver")
for path in (root / "bin" / "tritonserver", root / "backends" / "python" / "libtriton_python.so",
             root / "python_backend_stubs" / ver / "triton_python_backend_stub"):
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env).stdout
    missing = [l.split()[0] for l in out.splitlines() if "not found" in l]
    cuda = [l.split("=>")[0].strip() for l in out.splitlines() if "cudart" in l or "libcuda" in l]
    print(f"{path.name}: links {', '.join(cuda) or 'no CUDA runtime'}; "
          f"{'missing ' + ', '.join(missing) if missing else 'all libraries found'}")
print("stub python:", server.stub_python_bin(root / "bin" / "tritonserver"),
      "| libpython dir:", sysconfig.get_config_var("LIBDIR"))
EOF
}

step_test() {
    if [[ "$DEVICE" != cuda ]]; then
        log "pytest -m gpu needs a GPU: skipped on --device cpu"
        return 0
    fi
    # Every test module is imported to find the gpu ones: one that needs a package this
    # machine lacks must not stop the others.
    "$PY" -m pytest -q -m gpu -rs --continue-on-collection-errors tests/ \
        --junitxml="$OUT_DIR/pytest-gpu.xml"
}

checkpoint() {
    "$PY" -c 'import sys; from dart_triton.benchmarks.common import random_checkpoint; print(random_checkpoint(sys.argv[1]))' "$CONFIG" | tail -n1
}

default_sizes() {
    if [[ -n "$SIZES" ]]; then echo "$SIZES"
    elif [[ $TINY == 1 ]]; then echo "ckpt"
    else echo "1008 644"; fi
}

repo_dir() { echo "$OUT_DIR/repo-torch-$DEVICE-$CONFIG-$1"; }

step_build() {
    local ckpt size args
    ckpt="$(checkpoint)"
    log "checkpoint: $ckpt"
    for size in $(default_sizes); do
        args=(--checkpoint "$ckpt" --output "$(repo_dir "$size")" --backend torch)
        [[ "$size" != ckpt ]] && args+=(--imgsz "$size")
        if [[ $TINY == 1 ]]; then  # a smoke run: fewer python stubs to start
            args+=(--max-classes 4 --instances "dart=1,preprocess=1,postprocess=1")
        else
            args+=(--max-classes 16 --buckets "$BUCKETS")
        fi
        if [[ "$DEVICE" == cuda ]]; then
            args+=(--gpu --compile "$COMPILE" --cuda-graphs)
            [[ $TINY == 1 ]] && args+=(--buckets "1,4")
        fi
        log "dart-triton build ${args[*]}"
        "$PY" -m dart_triton.cli build "${args[@]}"
    done
}

step_serve() {
    local size scaling iters=20 extra=()
    read -ra scaling <<<"${SCALING:-1 2 4 8 16 80}"
    # tiny: one pass and two passes (max 4); any perf_analyzer window is accepted
    if [[ $TINY == 1 ]]; then scaling=(1 8); iters=3; extra=(--stability 100000); fi
    for size in $(default_sizes); do
        [[ -f "$(repo_dir "$size")/dart_repository.json" ]] \
            || die "no repository for $size: run the build step first"
        "$PY" -m dart_triton.benchmarks.gpu_check --repo "$(repo_dir "$size")" \
            --stem "gpu_check_${DEVICE}_${CONFIG}_${size}" --iters "$iters" \
            --scaling "${scaling[@]}" --out "$FIGURES" --results "$RESULTS" \
            --config "$CONFIG" --log-dir "$OUT_DIR" "${extra[@]}"
    done
}

step_profile() {
    local size iters=5
    [[ $TINY == 1 ]] && iters=2
    for size in $(default_sizes); do
        [[ -f "$(repo_dir "$size")/dart_repository.json" ]] \
            || die "no repository for $size: run the build step first"
        "$PY" -m dart_triton.benchmarks.kernel_profile --repo "$(repo_dir "$size")" \
            --classes 4 --iters "$iters" --stem "kernel_profile_${DEVICE}_${CONFIG}_${size}" \
            --out "$FIGURES" --results "$RESULTS"
    done
}

step_hierarchy() {
    local args=(--config "$CONFIG" --device "$DEVICE" --out "$FIGURES" --results "$RESULTS"
                --stem "hierarchy_${DEVICE}_${CONFIG}_torch_backend" --attn sdpa)
    if [[ $TINY == 1 ]]; then
        args+=(--classes 3 --iters 1 --warmup 0 --max-classes 4 --no-engine)
    elif [[ "$DEVICE" == cuda ]]; then
        args+=(--sizes 1008 644 --dtypes fp16 --classes 4 80 --iters 5 --naive-max 4)
    else
        args+=(--classes 3 --iters 1)
    fi
    "$PY" -m dart_triton.benchmarks.hierarchy "${args[@]}"
}

# The studies that build their own repositories (cached under $DART_BENCH_CACHE).
study_args() {  # study_args: --config, --imgsz and --gpu as this run asks
    local args=(--config "$CONFIG" --out "$FIGURES" --results "$RESULTS")
    [[ $TINY == 0 ]] && args+=(--imgsz 1008)
    [[ "$DEVICE" == cuda ]] && args+=(--gpu)
    printf '%s\n' "${args[@]}"
}

step_paths() {
    local args
    mapfile -t args < <(study_args)
    if [[ $TINY == 1 ]]; then args+=(--classes 1 --iters 2 --warmup 0); else args+=(--classes 1 4); fi
    "$PY" -m dart_triton.benchmarks.request_path "${args[@]}" --backends torch
}

streams_args() {
    local args
    mapfile -t args < <(study_args)
    if [[ $TINY == 1 ]]; then
        args+=(--streams 2 --classes 1 --frames 2 --repeats 1)
    else
        # 16 prompts per pass, buckets at every power of two: a lone 1-class frame runs a
        # 1-row pass in both repositories, and a pass shared by 2 or 8 frames pads to 2 or
        # 8 rows, not 4 or 16 (on the H200 a 16-row pass costs 1.8x an 8-row one)
        args+=(--streams 1 2 4 8 --classes 1 4 --max-classes 16 --buckets "1,2,4,8,16"
               --frames 30 --repeats "$REPEATS")
    fi
    printf '%s\n' "${args[@]}" --backend torch --compile "$COMPILE"
}

step_streams() {
    local args
    mapfile -t args < <(streams_args)
    "$PY" -m dart_triton.benchmarks.streams "${args[@]}"
}

step_streams_build() {  # both streams repositories only (needs no tritonserver)
    local args
    mapfile -t args < <(streams_args)
    "$PY" -m dart_triton.benchmarks.streams "${args[@]}" --build-only
}

step_masks() {
    local args=(--config "$CONFIG" --device "$DEVICE" --out "$FIGURES" --results "$RESULTS")
    [[ $TINY == 1 ]] && args+=(--prompts 1 2 --queries 1 2 --iters 1 --warmup 0)
    "$PY" -m dart_triton.benchmarks.masks "${args[@]}"
}

step_coldstart() {
    local args
    mapfile -t args < <(study_args)
    "$PY" -m dart_triton.benchmarks.cold_start "${args[@]}" --compile "$COMPILE"
}

step_bundle() {
    # gpu_check/{RESULTS.md,results/,logs/}: results, figures and every step's log (not
    # the repositories: gigabytes).
    local stage
    stage="$(mktemp -d)"
    mkdir -p "$stage/gpu_check/logs"
    [[ -f "$RESULTS" ]] && cp "$RESULTS" "$stage/gpu_check/RESULTS.md"
    [[ -d "$FIGURES" ]] && cp -r "$FIGURES" "$stage/gpu_check/results"
    find "$OUT_DIR" -maxdepth 1 -type f \( -name '*.log' -o -name '*.xml' \) \
        -exec cp {} "$stage/gpu_check/logs/" \;
    mkdir -p "$(dirname "$BUNDLE")"
    tar czf "$BUNDLE" -C "$stage" gpu_check
    rm -rf "$stage"
    log "bundle: $BUNDLE ($(du -h "$BUNDLE" | cut -f1))"
}

log "device $DEVICE, $CONFIG model, steps $STEPS, out $OUT_DIR"
IFS=, read -ra ORDER <<<"$STEPS"
for name in "${ORDER[@]}"; do
    declare -F "step_$name" >/dev/null || die "unknown step $name (see --help)"
done
for name in "${ORDER[@]}"; do run_step "$name" "step_$name"; done
log "summary: ${STATUS[*]:-no steps run}"
[[ "${STATUS[*]:-}" != *FAILED* ]]
