"""The wheel as a user installs it: built from the sdist, installed into a fresh venv
(tests/deploy/wheel_env.py), and used from a working directory that holds a folder named
`dart_triton` (a decoy that fails loudly if anything imports it): --version,
tiny-checkpoint, build, serve (real tritonserver) and detect, checked against
transformers' Sam3Model."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dart_triton import __version__
from dart_triton.contract import specs
from dart_triton.export.backends import BACKENDS
from dart_triton.export.manifest import MANIFEST
from tests.deploy.wheel_env import WheelEnv, sdist_members
from tests.helpers import wait_http_ready
from tests.tolerances import BOX_ATOL_PER_PIXEL, SCORE_ATOL

pytestmark = [pytest.mark.slow, pytest.mark.server]

CLASSES = ["person", "rocket", "flag"]
DECOY = "raise ImportError('the decoy dart_triton in the working directory was imported')\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty working directory but for a folder named dart_triton (the decoy)."""
    work = tmp_path_factory.mktemp("user_workdir")
    (work / "dart_triton").mkdir()
    (work / "dart_triton" / "__init__.py").write_text(DECOY)
    return work


def test_distributions_build_without_warnings(wheel_env: WheelEnv):
    warnings = [line for line in wheel_env.build_log.splitlines()
                if re.search(r"warning", line, re.I)]
    assert not warnings, "\n".join(warnings)


def test_wheel_and_sdist_carry_every_module_and_asset(wheel_env: WheelEnv):
    in_wheel = set(zipfile.ZipFile(wheel_env.wheel).namelist())
    modules = {m for b in BACKENDS.values() for m in b.python_models().values()}
    wanted = {m.replace(".", "/") + ".py" for m in modules}
    wanted |= {"dart_triton/assets/coco80.txt", "dart_triton/assets/verify_astronaut.jpg",
               "dart_triton/export/tensorrt/fp16.py", "dart_triton/export/manifest.py",
               "dart_triton/client/cli.py", "dart_triton/benchmarks/coco_eval.py"}
    assert wanted <= in_wheel, sorted(wanted - in_wheel)
    # The sdist keeps the design's folders (export/, client/, ...), mapped by pyproject.
    in_sdist = set(sdist_members(wheel_env.sdist))
    source = {w.replace("dart_triton/export/", "export/").replace("dart_triton/client/", "client/")
              .replace("dart_triton/benchmarks/", "benchmarks/") for w in wanted}
    assert source <= in_sdist, sorted(source - in_sdist)


def test_dart_triton_comes_from_the_wheel(wheel_env: WheelEnv, tmp_path: Path):
    # The python models import triton_python_backend_utils (only inside Triton): located.
    code = ("import importlib.util, dart_triton, dart_triton.export.repository as r; "
            "print(dart_triton.__file__); print(r.__file__); print(r.packaged_vocabulary()); "
            "print(importlib.util.find_spec('dart_triton.triton_models.dart_model').origin)")
    res = wheel_env.run([str(wheel_env.python), "-c", code], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for line in res.stdout.splitlines():
        assert Path(line).resolve().is_relative_to(wheel_env.venv.resolve()), line
    # The python backend's stubs run as the overlay's python3: the same package.
    stub_python = wheel_env.venv / "dart-triton-tools" / "triton-python" / "bin" / "python3"
    res = wheel_env.run([str(stub_python), "-c", "import numpy, dart_triton; "
                         "print(dart_triton.__file__); print(numpy.__version__)"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    package, numpy_version = res.stdout.split()
    assert Path(package).resolve().is_relative_to(wheel_env.venv.resolve())
    assert numpy_version.startswith("1.")


def test_version(wheel_env: WheelEnv, workdir: Path):
    res = wheel_env.run(["dart-triton", "--version"], cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"dart-triton {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)


@pytest.fixture(scope="module")
def built(wheel_env: WheelEnv, workdir: Path) -> tuple[Path, Path]:
    """`tiny-checkpoint` then `build --backend python`, both from the decoy directory."""
    res = wheel_env.run(["dart-triton", "tiny-checkpoint", "ckpt"], cwd=workdir)
    assert res.returncode == 0, res.stderr
    res = wheel_env.run(["dart-triton", "build", "--checkpoint", "ckpt", "--output", "repo",
                         "--backend", "python", "--max-classes", "4",
                         "--instances", "dart=1,preprocess=1,postprocess=1"], cwd=workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    return workdir / "ckpt", workdir / "repo"


def test_build_writes_a_self_contained_repository(built: tuple[Path, Path]):
    _, repo = built
    for name in (specs.PREPROCESS, specs.TEXT_ENCODER, specs.BACKBONE, specs.ENC_DEC,
                 specs.POSTPROCESS, specs.DART):
        entry = (repo / name / "1" / "model.py").read_text()
        assert "from dart_triton.triton_models." in entry  # generated, importing the package
    assert (repo / specs.TEXT_ENCODER / "1" / "coco80.txt").is_file()
    manifest = json.loads((repo / MANIFEST).read_text())
    assert manifest["dart_triton_version"] == __version__
    assert manifest["options"]["backend"] == "python"
    assert manifest["dims"]["max_classes"] == 4
    assert manifest["checkpoint"]["path"] == str(built[0].resolve())


def _free_port() -> int:
    from dart_triton.serving.processes import free_port

    return free_port()


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_serve_and_detect_from_the_decoy_directory(wheel_env: WheelEnv, workdir: Path,
                                                   built: tuple[Path, Path], photo):
    from PIL import Image

    from dart_triton.model.parts import load_parts
    from dart_triton.pipeline.detectors import NaivePipeline

    checkpoint, repo = built
    Image.fromarray(photo).save(workdir / "photo.png")
    ports = {name: _free_port() for name in ("http", "grpc", "metrics")}
    proc = subprocess.Popen(
        ["dart-triton", "serve", "--model-repository", "repo",
         *(f"--{name}-port={port}" for name, port in ports.items())],
        cwd=workdir, env=wheel_env.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # Its output is a pipe: read only once it has exited (reading it live would block).
        wait_http_ready(proc, ports["http"], 240,
                        lambda: proc.communicate()[0] if proc.poll() is not None else "")
        res = wheel_env.run(["dart-triton", "detect", "photo.png", "--classes", *CLASSES,
                             "--url", f"127.0.0.1:{ports['grpc']}", "--json", "dets.json"],
                            cwd=workdir, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        log = _stop(proc)
    assert "decoy" not in log, log[-3000:]
    served = json.loads((workdir / "dets.json").read_text())  # one image: its detections
    assert served, "the tiny checkpoint's presence bias makes some queries clear 0.3"

    # The reference: transformers' Sam3Model, once per prompt, on the same checkpoint.
    parts = load_parts(checkpoint, max_classes=4)
    ref = NaivePipeline(parts.model, parts.tokenizer).detect(photo, CLASSES).to_coco(0)
    assert [d["category_id"] for d in served] == [d["category_id"] for d in ref]
    np.testing.assert_allclose([d["score"] for d in served], [d["score"] for d in ref],
                               atol=SCORE_ATOL)
    np.testing.assert_allclose([d["bbox"] for d in served], [d["bbox"] for d in ref],
                               atol=BOX_ATOL_PER_PIXEL * 512)


def test_serve_refuses_a_repository_of_another_version(wheel_env: WheelEnv, workdir: Path,
                                                       built: tuple[Path, Path]):
    _, repo = built
    manifest = json.loads((repo / MANIFEST).read_text())
    old = workdir / "old_repo"
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps({**manifest, "dart_triton_version": "0.0.1"}))
    res = wheel_env.run(["dart-triton", "serve", "--model-repository", "old_repo"], cwd=workdir,
                        timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"dart-triton serve: old_repo was built by dart-triton 0.0.1 and this is {__version__}: "
        "rebuild it with `dart-triton build`")
