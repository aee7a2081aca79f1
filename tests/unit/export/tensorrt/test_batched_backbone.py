"""--max-batch B on the TensorRT path: the backbone plan's profile over 1..B frames, its
verification on a batch of different frames, the sidecar that makes a plan for another
B stale, and a config whose CUDA graphs the plan's profile takes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dart_triton.contract import specs
from dart_triton.export.tensorrt import build as tensorrt_build
from dart_triton.export.tensorrt import executor as plan_executor
from dart_triton.export.tensorrt import plan_record
from dart_triton.export.tensorrt import sidecar as plan_sidecar
from dart_triton.export.tensorrt.build import PlanBuildOptions, TensorRTPath
from dart_triton.export.tensorrt.verify import backbone_cases
from dart_triton.export.triton_config import RepoOptions, all_configs
from tests.fakes.tensorrt import FakeTensorRT, HostBuffers, read_plan
from tests.fakes.tiny_graphs import FAKE_GPU, TINY, tiny_backbone, tiny_enc_dec

TRT10 = "10.9.0.34"


@pytest.fixture
def batched_onnx(tmp_path, monkeypatch):
    """Tiny graphs with a backbone for any number of frames, and the fake TensorRT."""
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(TRT10))
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    d = tmp_path / "onnx"
    d.mkdir()
    tiny_backbone(d / "backbone.onnx", frames="frames")
    tiny_enc_dec(d / "enc_dec.onnx")
    return d


def test_plan_profile_verification_and_sidecar(batched_onnx, tmp_path):
    repo = tmp_path / "repo"
    results = tensorrt_build.build_plans(batched_onnx, repo, {"max_batch": 4,
                                                             "models": ("backbone",)})
    plan = read_plan((repo / "backbone" / "1" / "model.plan").read_bytes())[0]
    frame = (3, TINY.imgsz, TINY.imgsz)
    assert plan["profiles"] == [{specs.PIXEL_VALUES: [[1, *frame], [4, *frame], [4, *frame]]}]
    info = results["backbone"]
    assert info["frame_profile"] == {"min": 1, "opt": 4, "max": 4}
    # verified on one frame and on four different ones at once
    runs = info["verification"]["runs"]
    assert [r["label"].endswith("4 frames") for r in runs] == [False, True]
    assert "4 frames" in info["verification"]["inputs"]["pixels"]

    def stale(max_batch: int) -> list[str]:
        want = plan_record.wanted_plan_fields(PlanBuildOptions(max_batch=max_batch),
                                              TINY.imgsz, 16, "vit", None)
        want = {k: v for k, v in want.items() if k in ("frame_profile", "backbone_kind")}
        return plan_sidecar.stale_reasons(repo, models=["backbone"], want=want)

    assert stale(4) == []
    built = 'backbone: built for frame profile {"max": 4, "min": 1, "opt": 4}, want '
    assert stale(2) == [built + '{"min": 1, "opt": 2, "max": 2}']
    assert stale(1) == [built + "null"]


def test_one_frame_plans_stay_current_and_one_frame_graphs_are_refused(onnx_dir, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(TRT10))
    # a sidecar from before --max-batch has no frame_profile: current at --max-batch 1
    want = plan_record.wanted_plan_fields(PlanBuildOptions(), TINY.imgsz, 16, "vit", None)
    assert want["frame_profile"] is None
    _, jobs = tensorrt_build.plan_jobs(onnx_dir, tmp_path, PlanBuildOptions())
    assert jobs[0].model == specs.BACKBONE and jobs[0].frames is None
    with pytest.raises(ValueError, match=r"backbone.onnx takes 1 frame\(s\) per call; export "
                                         r"it with `--max-batch 4`"):
        tensorrt_build.plan_jobs(onnx_dir, tmp_path, PlanBuildOptions(max_batch=4))


def test_dynamic_graph_at_max_batch_1_is_pinned_to_one_frame(batched_onnx, tmp_path):
    _, jobs = tensorrt_build.plan_jobs(batched_onnx, tmp_path, PlanBuildOptions(),
                                       TensorRTPath(TRT10, False))
    one = (1, 3, TINY.imgsz, TINY.imgsz)
    assert jobs[0].profiles == [{specs.PIXEL_VALUES: (one, one, one)}]


@pytest.mark.parametrize("max_batch", [2, 4, 6])
def test_config_matches_the_batched_plan(batched_onnx, tmp_path, max_batch):
    """The config declares the plan's tensors (batch dimension -1) and every CUDA graph
    (and its lower bound) is a batch the plan's one profile takes."""
    repo = tmp_path / "repo"
    tensorrt_build.build_plans(batched_onnx, repo, {"max_batch": max_batch,
                                                   "skip_verify": True})
    plan = read_plan((repo / "backbone" / "1" / "model.plan").read_bytes())[0]
    cfg = text_format.Parse(all_configs(RepoOptions(backend="tensorrt", dims=TINY,
                                                    max_batch=max_batch))["backbone"],
                            mc.ModelConfig())
    assert cfg.max_batch_size == max_batch
    for declared, built in ((cfg.input, plan["inputs"]), (cfg.output, plan["outputs"])):
        assert {t.name: [-1, *t.dims] for t in declared} == {n: s for n, s, _ in built}
    ((lo, _opt, hi),) = [p[specs.PIXEL_VALUES] for p in plan["profiles"]]
    assert lo[0] == 1 and hi[0] == max_batch
    sizes = []
    for g in cfg.optimization.cuda.graph_spec:
        bounds = [g] + ([g.graph_lower_bound] if g.HasField("graph_lower_bound") else [])
        for b in bounds:
            shape = (b.batch_size, *b.input[specs.PIXEL_VALUES].dim)
            assert all(x <= s <= y for x, s, y in zip(lo, shape, hi, strict=True)), shape
        sizes.append((bounds[-1].batch_size, g.batch_size))
    # every batch size 1..B runs on a captured graph
    assert sorted(n for low, high in sizes for n in range(low, high + 1)) == list(
        range(1, max_batch + 1))


def test_batch_cases_are_different_frames():
    (one, batch) = backbone_cases(TINY, {}, frames=3)
    pixels = batch.inputs[specs.PIXEL_VALUES]
    assert pixels.shape == (3, 3, TINY.imgsz, TINY.imgsz) and batch.label.endswith("3 frames")
    np.testing.assert_array_equal(pixels[:1], one.inputs[specs.PIXEL_VALUES])
    assert not np.array_equal(pixels[1], pixels[0]) and not np.array_equal(pixels[2], pixels[1])
    assert len(backbone_cases(TINY, {})) == 1


def test_build_and_build_plans_carry_max_batch(batched_onnx, tmp_path, capsys):
    """`build --max-batch` reaches the plan options (so check-repository wants the frame
    profile); `build-plans --max-batch` prints the frame profile's trtexec line."""
    from dart_triton.export.options import BuildOptions

    assert BuildOptions(backend="tensorrt", max_batch=4).plan_options(16).max_batch == 4
    code = tensorrt_build.main(["--onnx-dir", str(batched_onnx), "--output", str(tmp_path),
                                "--dry-run", "--max-batch", "4", "--models", "backbone"])
    assert code == 0
    line = capsys.readouterr().out
    frame = f"3x{TINY.imgsz}x{TINY.imgsz}"
    assert (f"--minShapes=pixel_values:1x{frame} --optShapes=pixel_values:4x{frame} "
            f"--maxShapes=pixel_values:4x{frame}") in line
    with pytest.raises(ValueError, match="--max-batch must be >= 1"):
        PlanBuildOptions(max_batch=0).validate()
