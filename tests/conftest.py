"""Shared fixtures: tiny random SAM3 checkpoints, a built repository, one real server.

Everything is session-scoped: checkpoints are written once, the repository is built
once, and one `tritonserver` (the binary bundled in nvidia-pytriton, CPU, python
backend) serves every server test on free loopback ports.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pytest

# Small enough that 3 x max classes is cheap, large enough to exercise chunking.
TEST_MAX_CLASSES = 4


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from dart_triton.model.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sam3_tiny_a"), seed=0, variant="a")


@pytest.fixture(scope="session")
def tiny_checkpoint_b(tmp_path_factory):
    from dart_triton.model.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sam3_tiny_b"), seed=1, variant="b")


@pytest.fixture(scope="session")
def tiny_checkpoint_c(tmp_path_factory):
    """FPN scales [4, 2, 1]: Sam3Model detects on the 2x level (stride 7), not imgsz / 14."""
    from dart_triton.model.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sam3_tiny_c"), seed=2, variant="c")


@pytest.fixture(scope="session")
def tiny_checkpoint_d(tmp_path_factory):
    """6 ViT blocks, 2 of them global (2 and 5): deep enough for backbone pruning."""
    from dart_triton.model.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sam3_tiny_d"), seed=3, variant="d")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """A handful of real photographs shipped by scikit-image, as PNG files."""
    from tests.photos import write_photos

    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session", params=["a", "b", "c"])
def any_tiny_checkpoint(request):
    suffix = "" if request.param == "a" else f"_{request.param}"
    return request.getfixturevalue(f"tiny_checkpoint{suffix}")


@pytest.fixture(scope="session")
def parts(tiny_checkpoint):
    from dart_triton.model.parts import load_parts

    return load_parts(tiny_checkpoint, max_classes=TEST_MAX_CLASSES)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph shipped by scikit-image (512x512 RGB)."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def naive(parts):
    from dart_triton.pipeline.detectors import NaivePipeline

    return NaivePipeline(parts.model, parts.tokenizer)


@pytest.fixture(scope="session")
def python_repository(tiny_checkpoint, tmp_path_factory):
    from dart_triton.export.repository import build_repository

    repo = tmp_path_factory.mktemp("repo_python")
    # With masks: every server test of the session also checks that a request without
    # RETURN_MASKS is answered as by a repository without them.
    build_repository(tiny_checkpoint, repo, backend="python", max_classes=TEST_MAX_CLASSES,
                     masks=True, log=lambda *_: None)
    return repo


@pytest.fixture(scope="module")
def torch_repository(tiny_checkpoint, tmp_path_factory):
    """A --backend torch repository (CPU, FP32) of the tiny checkpoint, with masks."""
    from dart_triton.export.repository import build_repository

    repo = tmp_path_factory.mktemp("repo_torch")
    build_repository(tiny_checkpoint, repo, backend="torch", max_classes=TEST_MAX_CLASSES,
                     masks=True, log=lambda *_: None)
    return repo


@pytest.fixture(scope="session")
def triton_server(python_repository):
    from dart_triton.serving.server import TritonServer

    with TritonServer(python_repository, startup_timeout=180,
                      extra_args=["--exit-timeout-secs=5"]) as server:
        yield server


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory):
    """The project's wheel (built from its sdist) in a fresh venv: tests/deploy/wheel_env.py."""
    from tests.deploy.wheel_env import make_wheel_env

    return make_wheel_env(tmp_path_factory.mktemp("wheel_env"))


# `--backbone` repositories (tests/server/test_backbones.py, test_students_server.py): each
# module defines `spec`, its --backbone value; these two resolve it per module.
@pytest.fixture(scope="module")
def backbone_reference(tiny_checkpoint_d, spec):
    """(in-process DartPipeline, Sam3Parts) with the module's backbone."""
    from tests.server.backbone_serving import reference_pipeline

    return reference_pipeline(tiny_checkpoint_d, spec)


@pytest.fixture(scope="module")
def backbone_server(tiny_checkpoint_d, spec, tmp_path_factory):
    """A tritonserver on a python-backend repository built with the module's backbone."""
    from dart_triton.serving.server import TritonServer
    from tests.server.backbone_serving import build

    repo = tmp_path_factory.mktemp("repo_backbone")
    build(tiny_checkpoint_d, repo, spec)
    with TritonServer(repo, startup_timeout=180, extra_args=["--exit-timeout-secs=5"]) as s:
        yield s


@pytest.fixture
def onnx_dir(tmp_path):
    """Tiny hand-built backbone.onnx and enc_dec.onnx: what the TensorRT tests build from."""
    from tests.fakes.tiny_graphs import tiny_backbone, tiny_enc_dec

    d = tmp_path / "onnx"
    d.mkdir()
    tiny_backbone(d / "backbone.onnx")
    tiny_enc_dec(d / "enc_dec.onnx")
    return d
