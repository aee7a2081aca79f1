"""The third plan of a `--masks` build: mask_decoder's profile (prompts P, kept queries J),
its verification on the photo's levels and the reference enc_dec's best queries, and the
backbone and enc_dec plans carrying their mask outputs; with the recording TensorRT
stand-ins of tests/fakes/tensorrt.py (CPU)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from dart_triton.contract import specs
from dart_triton.contract.passes import ProfileRange
from dart_triton.export.tensorrt import build as tensorrt_build
from dart_triton.export.tensorrt import executor as plan_executor
from dart_triton.export.tensorrt import plan_record
from dart_triton.export.tensorrt import sidecar as plan_sidecar
from dart_triton.export.tensorrt.build import PlanBuildOptions, TensorRTPath
from dart_triton.export.tensorrt.plan_check import mask_decoder_cases
from dart_triton.export.tensorrt.profiles import profile_shapes, query_range
from tests.fakes.tensorrt import FakeTensorRT, HostBuffers, read_plan
from tests.fakes.tiny_graphs import (
    FAKE_GPU,
    TINY,
    tiny_backbone,
    tiny_enc_dec,
    tiny_mask_decoder,
    tiny_mask_graphs,
)

TRT10, TRT11 = "10.9.0.34", "11.4.0.106"
MASKS = specs.GraphDims(**{**TINY.__dict__, "masks": True})  # Q = 5, mask side 16


@pytest.fixture
def mask_dir(tmp_path: Path) -> Path:
    return tiny_mask_graphs(tmp_path / "onnx_masks")


def install(monkeypatch, version: str = TRT10) -> FakeTensorRT:
    fake = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    return fake


def test_a_masks_export_gets_three_jobs_and_one_mask_profile(mask_dir, tmp_path):
    opts = PlanBuildOptions(buckets=(1, 4, 16))
    dims, jobs = tensorrt_build.plan_jobs(mask_dir, tmp_path / "repo", opts,
                                          TensorRTPath(TRT10, False))
    assert dims.masks and [j.model for j in jobs] == list(specs.MASK_GRAPH_MODELS)
    bb, ed, md = jobs
    assert set(bb.io.outputs) == {t.name for t in specs.backbone_spec(MASKS).outputs}
    assert {specs.ENCODER_MEMORY, specs.DECODER_QUERIES} <= set(ed.io.outputs)
    assert len(ed.profiles) == 3  # enc_dec: one per bucket, as without masks
    # mask_decoder: one profile whatever the buckets (dart sends kept prompts unpadded),
    # P over 1..max_classes, J over 1..num_queries tuned at 4, the levels static
    assert md.ranges == [ProfileRange(1, 4, 16)] and md.queries == ProfileRange(1, 4, 5)
    (prof,) = md.profiles
    assert prof[specs.KEPT_QUERIES] == ((1, 1, 8), (4, 4, 8), (16, 5, 8))
    assert prof[specs.ENCODER_MEMORY] == ((1, 16, 8), (4, 16, 8), (16, 16, 8))
    assert prof[specs.TEXT_MASK] == ((1, 6), (4, 6), (16, 6))
    assert md.dynamic == [specs.ENCODER_MEMORY, specs.TEXT_FEATURES, specs.TEXT_MASK,
                          specs.KEPT_QUERIES]
    args = shlex.split(md.trtexec)
    assert "--maxShapes=encoder_memory:16x16x8,text_features:16x6x8,text_mask:16x6," \
           "kept_queries:16x5x8" in args
    assert not any(a.startswith("--profile") for a in args)
    assert "fpn_features_4x:" not in md.trtexec  # static: no shapes to give
    # asked for by name, or left out
    _, jobs = tensorrt_build.plan_jobs(mask_dir, tmp_path, PlanBuildOptions(
        models=("mask_decoder",)))
    assert [j.model for j in jobs] == ["mask_decoder"]
    _, jobs = tensorrt_build.plan_jobs(mask_dir, tmp_path, PlanBuildOptions(
        models="backbone,enc_dec"))
    assert [j.model for j in jobs] == ["backbone", "enc_dec"]


def test_profile_shapes_take_a_second_dynamic_axis():
    spec = specs.mask_decoder_spec(MASKS)
    with pytest.raises(ValueError, match=r"kept_queries \[-1, -1, 8\] is dynamic but no J"):
        profile_shapes(spec, ProfileRange(1, 2, 4))
    assert query_range(200) == ProfileRange(1, 4, 200) and query_range(2) == ProfileRange(1, 2, 2)


def test_mask_jobs_refuse_what_cannot_be_built(mask_dir, onnx_dir, tmp_path):
    opts = PlanBuildOptions
    with pytest.raises(FileNotFoundError, match=r"mask_decoder\.onnx not found .*export --masks"):
        tensorrt_build.plan_jobs(onnx_dir, tmp_path, opts(models=("mask_decoder",)))
    tiny_mask_decoder(onnx_dir / "mask_decoder.onnx")  # beside graphs exported without masks
    with pytest.raises(ValueError, match="exported without --masks"):
        tensorrt_build.plan_jobs(onnx_dir, tmp_path, opts(models=("mask_decoder",)))
    _, jobs = tensorrt_build.plan_jobs(onnx_dir, tmp_path, opts())
    assert [j.model for j in jobs] == ["backbone", "enc_dec"]  # no masks: two plans
    (mask_dir / "mask_decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="export --masks"):
        tensorrt_build.plan_jobs(mask_dir, tmp_path, opts())
    tiny_mask_decoder(mask_dir / "mask_decoder.onnx", fixed_j=3)
    with pytest.raises(ValueError, match=r"fixed kept_queries \[-1, 3, 8\].*dynamic P and J"):
        tensorrt_build.plan_jobs(mask_dir, tmp_path, opts())
    # graphs of one export only: an enc_dec without the mask outputs
    tiny_mask_decoder(mask_dir / "mask_decoder.onnx")
    tiny_enc_dec(mask_dir / "enc_dec.onnx")
    with pytest.raises(ValueError, match="disagree on masks"):
        tensorrt_build.plan_jobs(mask_dir, tmp_path, opts())


def test_the_enc_dec_says_masks_when_the_backbone_has_no_finer_level(tmp_path):
    """Two FPN scales: detection on the finest, no mask levels; enc_dec's mask outputs
    still say the export was made with --masks."""
    d = specs.GraphDims(**{**TINY.__dict__, "scale_factors": (1.0, 0.5)})
    tiny_backbone(tmp_path / "backbone.onnx", d)
    tiny_enc_dec(tmp_path / "enc_dec.onnx", d, masks=True)
    (tmp_path / "dart_graphs.json").write_text('{"dims": {"scale_factors": [1.0, 0.5]}}')
    dims, _ = tensorrt_build.plan_jobs(tmp_path, tmp_path / "repo", PlanBuildOptions(
        models=("backbone", "enc_dec")))
    assert dims.masks and dims.mask_levels == ()


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_build_plans_installs_three_verified_plans(monkeypatch, mask_dir, tmp_path, capsys,
                                                   version):
    install(monkeypatch, version)
    repo = tmp_path / "repo"
    res = tensorrt_build.build_plans(mask_dir, repo, {"buckets": "1,4,16"})
    assert list(res) == list(specs.MASK_GRAPH_MODELS)
    header, _ = read_plan((repo / "mask_decoder" / "1" / "model.plan").read_bytes())
    (prof,) = header["profiles"]
    assert prof[specs.KEPT_QUERIES] == [[1, 1, 8], [4, 4, 8], [16, 5, 8]]
    assert [t[0] for t in header["outputs"]] == [specs.MASK_LOGITS]
    # the backbone and enc_dec plans carry their mask outputs, each verified
    assert {specs.FPN_FEATURES_4X, specs.FPN_FEATURES_2X} <= set(
        res["backbone"]["verification"]["worst"])
    assert {specs.ENCODER_MEMORY, specs.DECODER_QUERIES} <= set(
        res["enc_dec"]["verification"]["worst"])
    md = res["mask_decoder"]
    ver = md["verification"]
    assert [r["label"] for r in ver["runs"]] == [
        "random text, P=1, J=1", "random text, P=1, J=5", "random text, P=4, J=4",
        "random text, P=16, J=4"]
    assert ver["worst"][specs.MASK_LOGITS]["cosine"] > 0.999
    assert ver["inputs"]["fpn_levels"] == "reference features of the photo verify_astronaut.jpg"
    assert ver["inputs"]["queries"].startswith("the best-scoring decoder queries")
    assert md["n_range"] == [1, 16] and md["j_range"] == [1, 5]
    assert md["mask_profiles"] == [{"index": 0, "prompts": {"min": 1, "opt": 4, "max": 16},
                                    "queries": {"min": 1, "opt": 4, "max": 5}}]
    assert md["max_classes"] is None and md["profiles"] == [] and md["buckets"] is None
    assert res["enc_dec"]["mask_profiles"] is None
    assert "mask_decoder: verified against onnxruntime cpu fp32" in capsys.readouterr().out
    # check-repository's view: current, and another opt_classes makes the mask plan stale
    path = TensorRTPath.detect(sys.modules["tensorrt"])
    want = plan_record.wanted_plan_fields(PlanBuildOptions(buckets=(1, 4, 16)), 56, 16,
                                             "vit", path, num_queries=5)
    assert plan_sidecar.stale_reasons(repo, device=FAKE_GPU, want=want) == []
    assert plan_sidecar.repository_plan_models(repo) == list(specs.MASK_GRAPH_MODELS)
    other = plan_record.wanted_plan_fields(PlanBuildOptions(buckets=(1, 4, 16),
                                                               opt_classes=8), 56, 16, "vit",
                                              path, num_queries=5)
    (reason,) = plan_sidecar.stale_reasons(repo, device=FAKE_GPU, want=other)
    assert reason.startswith("mask_decoder: built for mask optimisation profile [")
    assert '"opt": 8, "max": 16}' in reason
    (repo / "mask_decoder" / "1" / "model.plan").unlink()
    assert plan_sidecar.stale_reasons(repo, want=want)[0].startswith("mask_decoder: no plan")


def test_a_wrong_mask_plan_is_refused_and_nothing_installed(monkeypatch, mask_dir, tmp_path,
                                                            capsys):
    fake = install(monkeypatch)
    fake.drift = {(specs.MASK_LOGITS, 0): 1e3}  # the mask plan's logits are off
    repo = tmp_path / "repo"
    rc = tensorrt_build.main(["--onnx-dir", str(mask_dir), "--output", str(repo)])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "mask_decoder plan failed verification" in err and "mask_logits cosine" in err
    assert "P=1, J=1" in err
    assert not list(repo.rglob("model.plan*")) and not list(repo.rglob(".plan-staging-*"))
    fake.drift = {}
    assert tensorrt_build.main(["--onnx-dir", str(mask_dir), "--output", str(repo)]) == 0
    assert sorted(p.parent.parent.name for p in repo.rglob("model.plan")) == sorted(
        specs.MASK_GRAPH_MODELS)


def test_mask_cases_keep_each_prompts_best_queries():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5)).astype(np.float32)
    queries = rng.normal(size=(3, 5, 8)).astype(np.float32)
    named = {specs.FPN_FEATURES: np.zeros((1, 8, 4, 4), np.float32),
             specs.FPN_FEATURES_4X: np.ones((1, 8, 16, 16), np.float32),
             specs.ENCODER_MEMORY: rng.normal(size=(3, 16, 8)),
             specs.TEXT_FEATURES: rng.normal(size=(3, 6, 8)).astype(np.float32),
             specs.TEXT_MASK: np.ones((3, 6), np.int32),
             specs.PRED_LOGITS: logits, specs.DECODER_QUERIES: queries}
    cases = mask_decoder_cases(ProfileRange(1, 2, 3), ProfileRange(1, 2, 5), named, "names")
    assert [c.label for c in cases] == ["names, P=1, J=1", "names, P=1, J=5", "names, P=2, J=2",
                                        "names, P=3, J=2"]
    last = cases[-1].inputs
    assert specs.FPN_FEATURES not in last and last[specs.FPN_FEATURES_4X].shape == (1, 8, 16, 16)
    assert last[specs.ENCODER_MEMORY].dtype == np.float32
    for p in range(3):
        best = np.argsort(-logits[p])[:2]
        np.testing.assert_array_equal(last[specs.KEPT_QUERIES][p], queries[p, best])


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_build_with_masks_and_tensorrt(monkeypatch, tiny_checkpoint, tmp_path, version):
    """`dart-triton build --backend tensorrt --masks`: the real export of the tiny
    checkpoint gives three plans, each verified (TensorRT 11: the FP16 graphs, the mask
    head's included), and a current repository."""
    from dart_triton.export import manifest
    from dart_triton.export.backends import check_build
    from dart_triton.export.options import BuildOptions, packaged_vocabulary
    from dart_triton.export.repository import build_repository

    install(monkeypatch, version)
    monkeypatch.setattr(plan_sidecar, "current_device", lambda: dict(FAKE_GPU))
    build = BuildOptions(backend="tensorrt", max_classes=4, masks=True)
    build.plan = PlanBuildOptions(tolerances={"max_abs_boxes": 0.5})  # tiny random model
    assert check_build(build).name == "tensorrt"
    repo = tmp_path / "repo"
    build_repository(tiny_checkpoint, repo, build, log=lambda *_: None)
    for model in specs.MASK_GRAPH_MODELS:
        info = plan_sidecar.read_sidecar(plan_sidecar.plan_path(repo, model))
        assert info["verification"]["worst"], model
        assert 'platform: "tensorrt_plan"' in (repo / model / "config.pbtxt").read_text()
    mask = plan_sidecar.read_sidecar(plan_sidecar.plan_path(repo, specs.MASK_DECODER))
    assert mask["mask_profiles"][0]["queries"] == {"min": 1, "opt": 4, "max": 10}
    assert mask["verification"]["worst"][specs.MASK_LOGITS]["cosine"] > 0.999
    assert (mask["fp16_graph"] is not None) == (version == TRT11)
    assert manifest.plan_models(repo) == list(specs.MASK_GRAPH_MODELS)
    assert manifest.stale_reasons(repo, tiny_checkpoint, build, packaged_vocabulary()) == []
