"""The build manifest (export/manifest.py): what `check-repository` calls stale, and why,
and `serve`'s refusal of another version's repository. Repositories are laid out by hand
here (no export): what is checked is the manifest logic itself; a real build, serve and
rebuild through the container entrypoint are in test_container_layout.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dart_triton import __version__
from dart_triton.contract import specs
from dart_triton.contract.manifest import version_refusal
from dart_triton.export import check, manifest
from dart_triton.export.options import BuildOptions, packaged_vocabulary
from dart_triton.export.tensorrt import build as tensorrt_build
from dart_triton.export.tensorrt import sidecar as plan_sidecar
from dart_triton.export.tensorrt.build import TensorRTPath
from dart_triton.export.tensorrt.plan_record import plan_fields

DIMS = specs.GraphDims(imgsz=112, max_classes=4)


@pytest.fixture()
def checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def _repo(tmp_path: Path, checkpoint: Path, build: BuildOptions, plans: str | None = None,
          dims: specs.GraphDims = DIMS) -> Path:
    """A repository as a build leaves it: model files, then the manifest."""
    repo = tmp_path / "repo"
    for name in specs.graph_models(dims):
        (repo / name / "1").mkdir(parents=True)
        platform = 'platform: "tensorrt_plan"' if plans else 'backend: "python"'
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n{platform}\n')
        if plans:
            plan = plan_sidecar.plan_path(repo, name)
            plan.write_bytes(b"plan " + name.encode())
            shaped = plan_fields(name, build.plan_options(dims.max_classes), dims.imgsz,
                                 dims.max_classes, build.backbone, TensorRTPath(plans, False),
                                 num_queries=dims.num_queries)
            plan_sidecar.write_sidecar(plan, {
                "model": name, **shaped, "plan_sha256": plan_sidecar.sha256_files([plan])})
        else:
            (repo / name / "1" / "model.onnx").write_bytes(b"graph")
    manifest.write_manifest(repo, build, checkpoint, packaged_vocabulary(), dims)
    return repo


def _stale(repo: Path, checkpoint: Path, build: BuildOptions) -> list[str]:
    return manifest.stale_reasons(repo, checkpoint, build, packaged_vocabulary())


def test_same_request_is_current_and_imgsz_defaults_to_the_checkpoints(tmp_path, checkpoint):
    build = BuildOptions(backend="python", max_classes=4)
    repo = _repo(tmp_path, checkpoint, build)
    assert _stale(repo, checkpoint, build) == []
    # imgsz None means the checkpoint's (112 for the tiny one); an explicit 112 is the same.
    assert _stale(repo, checkpoint, BuildOptions(backend="python", max_classes=4, imgsz=112)) == []
    assert _stale(repo, checkpoint, BuildOptions(backend="python", max_classes=4, imgsz=56)) == [
        "imgsz: built with 112, now 56"]


def test_every_shaping_option_is_compared(tmp_path, checkpoint):
    repo = _repo(tmp_path, checkpoint, BuildOptions(backend="python", max_classes=4))
    reasons = _stale(repo, checkpoint, BuildOptions(
        backend="onnxruntime", max_classes=4, instances={**BuildOptions().instances, "dart": 3},
        buckets=(1, 4)))
    assert "backend: built with 'python', now 'onnxruntime'" in reasons
    assert "instances.dart: built with 2, now 3" in reasons
    assert "buckets: built with [], now [1, 4]" in reasons
    vocab = tmp_path / "names.txt"
    vocab.write_text("cat\ndog\n")
    reasons = manifest.stale_reasons(repo, checkpoint, BuildOptions(
        backend="python", max_classes=4, vocabulary=vocab), vocab)
    assert any(r.startswith("vocabulary.name: built with 'coco80.txt'") for r in reasons)


def test_checkpoint_and_files_are_fingerprinted(tmp_path, checkpoint):
    build = BuildOptions(backend="python", max_classes=4)
    repo = _repo(tmp_path, checkpoint, build)
    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (reason,) = _stale(repo, checkpoint, build)
    assert reason.startswith("checkpoint.files.model.safetensors: built with [")
    # Without the checkpoint mounted, a built repository is served as it is.
    assert _stale(repo, tmp_path / "absent", build) == []
    (repo / "backbone" / "1" / "model.onnx").unlink()
    assert "1 file(s) of the build are missing, e.g. backbone/1/model.onnx" in _stale(
        repo, tmp_path / "absent", build)


def test_a_student_retrained_in_place_is_stale(tmp_path, checkpoint):
    """`--backbone student:DIR` reads the same text before and after a retraining: the
    directory's files are fingerprinted, and compared while it is there."""
    student = tmp_path / "student"
    (student / "ckpt").mkdir(parents=True)
    (student / "student.json").write_text("{}")
    (student / "ckpt" / "weights.safetensors").write_bytes(b"before")
    build = BuildOptions(backend="python", max_classes=4, backbone=f"student:{student}")
    repo = _repo(tmp_path, checkpoint, build)
    assert _stale(repo, checkpoint, build) == []
    (student / "ckpt" / "weights.safetensors").write_bytes(b"retrained")
    (reason,) = _stale(repo, checkpoint, build)
    assert reason.startswith("backbone_source.files.ckpt/weights.safetensors: built with [")
    shutil.rmtree(student)  # not mounted where the repository is served: not compared
    assert _stale(repo, checkpoint, build) == []


def test_tensorrt_plans_of_another_tensorrt_are_stale(tmp_path, checkpoint, monkeypatch):
    build = BuildOptions(backend="tensorrt", max_classes=4)
    repo = _repo(tmp_path, checkpoint, build, plans="10.9.0.34")
    monkeypatch.setattr(plan_sidecar, "current_device", lambda: None)
    monkeypatch.setattr(tensorrt_build, "installed_path",
                        lambda: TensorRTPath("10.9.0.34", False))
    assert manifest.plan_models(repo) == list(specs.GRAPH_MODELS)
    assert _stale(repo, checkpoint, build) == []
    monkeypatch.setattr(tensorrt_build, "installed_path",
                        lambda: TensorRTPath("10.11.0.33", False))
    assert _stale(repo, checkpoint, build) == [
        f"{m}: built for TensorRT 10.9.0.34, want 10.11.0.33" for m in specs.GRAPH_MODELS]


def test_a_mask_decoder_plan_is_checked_with_the_others(tmp_path, checkpoint, monkeypatch):
    """--masks: the third plan is found by its config and held to its own profile (prompts
    and kept queries), which the manifest's dims decide."""
    build = BuildOptions(backend="tensorrt", max_classes=4, masks=True)
    dims = specs.GraphDims(imgsz=112, max_classes=4, masks=True)
    repo = _repo(tmp_path, checkpoint, build, plans="10.9.0.34", dims=dims)
    monkeypatch.setattr(plan_sidecar, "current_device", lambda: None)
    monkeypatch.setattr(tensorrt_build, "installed_path",
                        lambda: TensorRTPath("10.9.0.34", False))
    assert manifest.plan_models(repo) == list(specs.MASK_GRAPH_MODELS)
    assert _stale(repo, checkpoint, build) == []
    sidecar = plan_sidecar.read_sidecar(plan_sidecar.plan_path(repo, specs.MASK_DECODER))
    assert sidecar["mask_profiles"][0]["queries"] == {"min": 1, "opt": 4, "max": 200}
    plan_sidecar.write_sidecar(plan_sidecar.plan_path(repo, specs.MASK_DECODER), {
        **sidecar, "mask_profiles": [{**sidecar["mask_profiles"][0],
                                      "queries": {"min": 1, "opt": 4, "max": 100}}]})
    (reason,) = _stale(repo, checkpoint, build)
    assert reason.startswith("mask_decoder: built for mask optimisation profile")


def test_unfinished_and_foreign_repositories(tmp_path, checkpoint):
    build = BuildOptions(backend="python", max_classes=4)
    repo = _repo(tmp_path, checkpoint, build)
    assert version_refusal([repo], __version__) is None
    data = json.loads((repo / manifest.MANIFEST).read_text())
    (repo / manifest.MANIFEST).write_text(json.dumps({**data, "dart_triton_version": "0.0.1"}))
    assert version_refusal([repo], __version__) == (
        f"{repo} was built by dart-triton 0.0.1 and this is {__version__}: rebuild it with "
        "`dart-triton build`")
    assert f"built by dart-triton 0.0.1, this is {__version__}" in _stale(repo, checkpoint, build)
    (repo / manifest.MANIFEST).write_text("{not json")
    assert "is unreadable" in version_refusal([repo], __version__)
    manifest.invalidate(repo)  # what a build does first
    assert _stale(repo, checkpoint, build) == [
        f"no {manifest.MANIFEST} in {repo} (never built, or the build was interrupted)"]
    assert version_refusal([repo], __version__) is None  # not a dart-triton build: served as is


def test_check_repository_command(tmp_path, checkpoint, capsys):
    repo = _repo(tmp_path, checkpoint, BuildOptions(backend="python", max_classes=4))
    args = [str(repo), "--checkpoint", str(checkpoint), "--", "--backend", "python",
            "--max-classes", "4"]
    assert check.check_main(args) == 0
    assert capsys.readouterr().out == f"{repo} is current\n"
    assert check.check_main([*args, "--imgsz", "56"]) == 1
    assert capsys.readouterr().out == "stale: imgsz: built with 112, now 56\n"
    assert check.check_main([*args, "--buckets", "1,3"]) == 2
    assert "largest bucket (3) must equal --max-classes (4)" in capsys.readouterr().err
