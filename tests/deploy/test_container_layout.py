"""The container's layout without Docker: the real docker/entrypoint.sh, run with the
wheel installed in a fresh venv (tests/deploy/wheel_env.py: not editable, the python3 and
dart-triton of that venv first on PATH), from a working directory with no source tree,
with a "volume" for the repository and a mounted checkpoint.

Replaced, because only NVIDIA's image has them: TensorRT (the build is switched to
`--backend python` through the entrypoint's own DART_BUILD_ARGS) and the image's
tritonserver (`dart-triton serve` runs the one bundled in nvidia-pytriton instead).

A first start builds and serves (answering `dart-triton health`), a second finds the
repository current and skips the build, and a changed DART_IMGSZ rebuilds.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from dart_triton.export.manifest import MANIFEST
from dart_triton.serving.processes import free_port
from tests.deploy.wheel_env import ROOT, WheelEnv
from tests.helpers import wait_http_ready

pytestmark = [pytest.mark.slow, pytest.mark.server]

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
# One instance of each model: the server starts faster on a loaded 2-core machine.
BUILD_ARGS = "--backend python --instances dart=1,preprocess=1,postprocess=1"


@pytest.fixture(scope="module")
def container(tmp_path_factory, wheel_env: WheelEnv, tiny_checkpoint: Path):
    workdir = tmp_path_factory.mktemp("workspace")  # WORKDIR /workspace: empty
    models = tmp_path_factory.mktemp("volume") / "models"

    def env(**extra: str) -> dict[str, str]:
        return wheel_env.env(**{
            "DART_MODEL_REPOSITORY": str(models), "DART_CHECKPOINT": str(tiny_checkpoint),
            "DART_IMGSZ": "112", "DART_MAX_CLASSES": "4", "DART_BUILD_ARGS": BUILD_ARGS,
            "DART_HOST": "127.0.0.1", **extra})

    return workdir, models, env


def _start_only(container, **extra: str) -> subprocess.CompletedProcess[str]:
    """A start with DART_BUILD_ONLY=1: check (and build), then exit."""
    workdir, _, env = container
    return subprocess.run(["bash", str(ENTRYPOINT)], cwd=workdir,
                          env=env(DART_BUILD_ONLY="1", **extra), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def _manifest(models: Path) -> dict:
    return json.loads((models / MANIFEST).read_text())


def test_first_start_builds_then_serves(container, wheel_env: WheelEnv, tmp_path: Path):
    workdir, models, env = container
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    log = tmp_path / "entrypoint.log"
    with log.open("w") as out:
        # Extra `docker run` arguments reach `dart-triton serve` (and tritonserver).
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), *(f"--{n}-port={p}" for n, p in ports.items())],
            cwd=workdir, env=env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http_ready(proc, ports["http"], 300, log.read_text)
        health = subprocess.run(
            ["dart-triton", "health", "--url", f"127.0.0.1:{ports['grpc']}", "--timeout", "60"],
            cwd=workdir, env=env(), capture_output=True, text=True, timeout=120)
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.startswith("dart-triton health: ok")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the entrypoint exec'd into `dart-triton serve`
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "stale: no dart_repository.json" in text
    assert "[dart-entrypoint] building" in text
    manifest = _manifest(models)
    assert manifest["options"]["backend"] == "python"  # DART_BUILD_ARGS overrode tensorrt
    assert manifest["dims"]["imgsz"] == 112 and manifest["dims"]["max_classes"] == 4


def test_second_start_finds_the_repository_current(container):
    _, models, _ = container
    before = _manifest(models)
    res = _start_only(container)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{models} is current: skipping the build" in res.stderr
    assert "building" not in res.stderr
    assert _manifest(models) == before


def test_changed_imgsz_rebuilds(container):
    _, models, _ = container
    res = _start_only(container, DART_IMGSZ="56")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stale: imgsz: built with 112, now 56" in res.stdout
    assert "[dart-entrypoint] building" in res.stderr
    assert _manifest(models)["dims"]["imgsz"] == 56
    res = _start_only(container, DART_IMGSZ="56")
    assert res.returncode == 0 and "is current: skipping the build" in res.stderr
