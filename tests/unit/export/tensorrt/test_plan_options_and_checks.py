"""TensorRT plan building: CPU tests for the logic (with the recording TensorRT stand-in of
tests/fakes/tensorrt.py where TensorRT is called), GPU tests (marked) for real plans."""

from __future__ import annotations

import builtins
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from dart_triton.contract import specs
from dart_triton.contract.passes import (
    ProfileRange,
    bucket_for,
    pad_to_bucket,
    parse_buckets,
    plan_passes,
    profile_ranges,
    unpad,
)
from dart_triton.export.tensorrt import build as tensorrt_build
from dart_triton.export.tensorrt import sidecar as plan_sidecar
from dart_triton.export.tensorrt.profiles import (
    check_graph_matches_spec,
    graph_dims_from_onnx,
    model_profiles,
    profile_shapes,
    read_onnx_io,
    trtexec_command,
)
from dart_triton.export.tensorrt.verify import (
    Tolerances,
    VerificationError,
    backbone_cases,
    compare_outputs,
    cosine,
    enc_dec_cases,
    onnx_reference,
    photo_pixels,
    random_text,
    verify_classes,
    verify_plan,
)
from tests.fakes.tensorrt import FakeTensorRT, HostBuffers, read_plan
from tests.fakes.tiny_graphs import FAKE_GPU, tiny_backbone, tiny_enc_dec

# buckets ---------------------------------------------------------------------------

def test_parse_buckets():
    assert parse_buckets("16, 1,4,4") == (1, 4, 16)
    assert parse_buckets([8, 2]) == (2, 8)
    assert parse_buckets(None) == () and parse_buckets("") == ()
    with pytest.raises(ValueError, match="comma-separated"):
        parse_buckets("1,four")
    with pytest.raises(ValueError, match=">= 1"):
        parse_buckets("0,4")



def test_bucket_for_and_passes():
    b = (1, 4, 16)
    assert [bucket_for(n, b) for n in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]
    with pytest.raises(ValueError, match="exceed the largest bucket 16"):
        bucket_for(17, b)
    with pytest.raises(ValueError):
        bucket_for(0, b)
    assert plan_passes(3, 16, b) == [(0, 3, 4)]
    assert plan_passes(80, 16, b) == [(0, 16, 16)] * 1 + [(16, 32, 16), (32, 48, 16), (48, 64, 16),
                                                      (64, 80, 16)]
    assert plan_passes(18, 16, b) == [(0, 16, 16), (16, 18, 4)]


def test_pad_to_bucket_numpy_and_unpad():
    feats = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    mask = np.array([[1, 0], [1, 1], [1, 0]], np.int32)
    pf, pm = pad_to_bucket(feats, mask, 4)
    assert pf.shape == (4, 2, 2) and pm.shape == (4, 2)
    np.testing.assert_array_equal(pf[:3], feats)
    np.testing.assert_array_equal(pf[3], feats[2])  # copies the last real prompt
    np.testing.assert_array_equal(pm[3], mask[2])  # never an all-zero mask row
    assert pm.sum(axis=1).min() >= 1
    np.testing.assert_array_equal(unpad(pf, 3), feats)
    same_f, same_m = pad_to_bucket(feats, mask, 3)
    assert same_f is feats and same_m is mask
    with pytest.raises(ValueError, match="do not fit"):
        pad_to_bucket(feats, mask, 2)
    with pytest.raises(ValueError, match="rows"):
        pad_to_bucket(feats, mask[:2], 4)


def test_pad_to_bucket_torch():
    torch = pytest.importorskip("torch")
    feats, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.int32)
    pf, pm = pad_to_bucket(feats, mask, 4)
    assert tuple(pf.shape) == (4, 3, 4) and tuple(pm.shape) == (4, 3)
    assert torch.equal(pf[3], feats[1]) and torch.equal(pm[2], mask[1])


def test_profile_ranges():
    assert profile_ranges(16) == [ProfileRange(1, 4, 16)]
    assert profile_ranges(16, opt_classes=8) == [ProfileRange(1, 8, 16)]
    assert profile_ranges(2) == [ProfileRange(1, 2, 2)]
    assert profile_ranges(16, "1,4,16") == [ProfileRange(1, 1, 1), ProfileRange(2, 4, 4),
                                            ProfileRange(5, 16, 16)]
    with pytest.raises(ValueError, match="largest bucket"):
        profile_ranges(16, (1, 4, 8))
    with pytest.raises(ValueError, match="opt_classes"):
        profile_ranges(16, opt_classes=17)
    with pytest.raises(ValueError):
        ProfileRange(3, 2, 4)


# profiles and trtexec ----------------------------------------------------------------

def test_profile_shapes_follow_specs():
    d = specs.GraphDims()  # 1008 px, 256-d, L=32
    spec = specs.enc_dec_spec(d)
    prof = profile_shapes(spec, ProfileRange(2, 4, 4))
    assert prof[specs.FPN_FEATURES] == ((1, 256, 72, 72),) * 3
    assert prof[specs.TEXT_FEATURES] == ((2, 32, 256), (4, 32, 256), (4, 32, 256))
    assert prof[specs.TEXT_MASK] == ((2, 32), (4, 32), (4, 32))
    ranges = profile_ranges(16, (1, 4, 16))
    profs = model_profiles(spec, ranges)
    assert [p[specs.TEXT_MASK][1][0] for p in profs] == [1, 4, 16]
    assert [p[specs.TEXT_MASK][0][0] for p in profs] == [1, 2, 5]
    assert model_profiles(specs.backbone_spec(d), ranges) == []  # static: TensorRT's own
    with pytest.raises(ValueError, match="no N range"):
        profile_shapes(spec, None)


def test_trtexec_single_profile():
    spec = specs.enc_dec_spec(specs.GraphDims())
    profs = model_profiles(spec, profile_ranges(16))
    line = trtexec_command("/o/enc_dec.onnx", "/r/enc_dec/1/model.plan", profs, "fp16", 4, 5,
                           only_inputs=[specs.TEXT_FEATURES, specs.TEXT_MASK])
    args = shlex.split(line)
    assert args[:3] == ["trtexec", "--onnx=/o/enc_dec.onnx",
                        "--saveEngine=/r/enc_dec/1/model.plan"]
    assert "--fp16" in args and "--memPoolSize=workspace:4096" in args
    assert "--builderOptimizationLevel=5" in args
    assert "--minShapes=text_features:1x32x256,text_mask:1x32" in args
    assert "--optShapes=text_features:4x32x256,text_mask:4x32" in args
    assert "--maxShapes=text_features:16x32x256,text_mask:16x32" in args
    assert not any(a.startswith("--profile") for a in args)


def test_trtexec_buckets_and_fp32():
    spec = specs.enc_dec_spec(specs.GraphDims(imgsz=644))
    profs = model_profiles(spec, profile_ranges(16, (1, 4, 16)))
    args = shlex.split(trtexec_command("a b.onnx", "p.plan", profs, "fp32",
                                       only_inputs=[specs.TEXT_FEATURES, specs.TEXT_MASK]))
    assert "--onnx=a b.onnx" in args  # quoted path survives
    assert "--fp16" not in args and "--noTF32" in args
    assert not any(a.startswith(("--memPoolSize", "--builderOptimizationLevel")) for a in args)
    i0, i1, i2 = (args.index(f"--profile={i}") for i in range(3))
    assert i0 < i1 < i2
    assert args[i1 + 1] == "--minShapes=text_features:2x32x256,text_mask:2x32"
    assert args[i1 + 2] == "--optShapes=text_features:4x32x256,text_mask:4x32"
    assert args[i2 + 3] == "--maxShapes=text_features:16x32x256,text_mask:16x32"
    with pytest.raises(ValueError, match="precision"):
        trtexec_command("a", "b", profs, "int8")


def test_graph_dims_from_tiny_onnx(onnx_dir: Path):
    bb, ed = read_onnx_io(onnx_dir / "backbone.onnx"), read_onnx_io(onnx_dir / "enc_dec.onnx")
    assert ed.inputs[specs.TEXT_FEATURES] == (-1, 6, 8)
    dims = graph_dims_from_onnx(bb, ed, 16)
    assert (dims.imgsz, dims.fpn_dim, dims.text_len, dims.text_dim, dims.num_queries) == (
        56, 8, 6, 8, 5)
    assert not dims.masks
    assert graph_dims_from_onnx(None, ed, 4).imgsz == 56
    check_graph_matches_spec(ed, specs.enc_dec_spec(dims), "enc_dec.onnx")
    with pytest.raises(ValueError, match=r"pred_boxes is \[-1, 5, 4\], spec says \[-1, 7, 4\]"):
        check_graph_matches_spec(ed, specs.enc_dec_spec(
            specs.GraphDims(imgsz=56, fpn_dim=8, text_len=6, text_dim=8, num_queries=7)), "x")


def test_graph_dims_mismatch(tmp_path: Path):
    tiny_backbone(tmp_path / "bb.onnx", specs.GraphDims(imgsz=70, fpn_dim=8))
    tiny_enc_dec(tmp_path / "ed.onnx")
    with pytest.raises(ValueError, match="disagree on imgsz: 70 vs 56"):
        graph_dims_from_onnx(read_onnx_io(tmp_path / "bb.onnx"),
                             read_onnx_io(tmp_path / "ed.onnx"))


def test_graph_dims_hint_fills_symbolic_dims(tmp_path: Path):
    tiny_backbone(tmp_path / "backbone.onnx")
    tiny_enc_dec(tmp_path / "enc_dec.onnx", symbolic_q=True)
    ed = read_onnx_io(tmp_path / "enc_dec.onnx")
    assert ed.outputs[specs.PRED_BOXES] == (-1, -1, 4)
    assert graph_dims_from_onnx(None, ed).num_queries == 200  # spec default, still valid
    hint = {"imgsz": 56, "fpn_dim": 8, "text_len": 6, "text_dim": 8, "num_queries": 5,
            "max_classes": 8, "masks": False}
    (tmp_path / "dart_graphs.json").write_text(json.dumps({"dims": hint}))
    opts = tensorrt_build.PlanBuildOptions()
    dims, _ = tensorrt_build.plan_jobs(tmp_path, tmp_path / "repo", opts)
    assert dims.num_queries == 5 and dims.max_classes == 8  # the export's max_classes
    dims, _ = tensorrt_build.plan_jobs(tmp_path, tmp_path / "repo", opts.coerce(
        {"max_classes": 4}))
    assert dims.max_classes == 4
    (tmp_path / "dart_graphs.json").write_text(json.dumps({"dims": {**hint, "imgsz": 112}}))
    with pytest.raises(ValueError, match=r"dart_graphs\.json says imgsz=112"):
        tensorrt_build.plan_jobs(tmp_path, tmp_path / "repo", opts)


def test_plan_jobs_and_dry_run(onnx_dir: Path, tmp_path: Path, capsys):
    opts = tensorrt_build.PlanBuildOptions.coerce({"buckets": "1,4,16", "opt_level": 4})
    dims, jobs = tensorrt_build.plan_jobs(onnx_dir, tmp_path / "repo", opts)
    assert dims.max_classes == 16 and [j.model for j in jobs] == ["backbone", "enc_dec"]
    bb, ed = jobs
    assert bb.profiles == [] and bb.dynamic == [] and "--minShapes" not in bb.trtexec
    assert bb.plan == tmp_path / "repo" / "backbone" / "1" / "model.plan"
    assert ed.dynamic == [specs.TEXT_FEATURES, specs.TEXT_MASK]
    assert [r.opt for r in ed.ranges] == [1, 4, 16] and len(ed.profiles) == 3
    assert "--profile=2" in ed.trtexec and "fpn_features:" not in ed.trtexec

    rc = tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(tmp_path / "r"),
                              "--dry-run", "--max-classes", "8", "--opt-classes", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) == 2 and out[0].startswith("trtexec --onnx=")
    assert "--fp16" in out[1] and "--optShapes=text_features:2x6x8,text_mask:2x6" in out[1]
    assert "--maxShapes=text_features:8x6x8" in out[1]


def test_plan_jobs_refuses_bad_inputs(onnx_dir: Path, tmp_path: Path, capsys):
    build = tensorrt_build.plan_jobs
    opts = tensorrt_build.PlanBuildOptions
    with pytest.raises(ValueError, match="--imgsz 1008 but the ONNX graphs"):
        build(onnx_dir, tmp_path, opts(imgsz=1008))
    with pytest.raises(FileNotFoundError, match="dart-triton export"):
        build(tmp_path, tmp_path, opts())
    with pytest.raises(ValueError, match="precision"):
        build(onnx_dir, tmp_path, opts(precision="int8"))
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    tiny_enc_dec(fixed / "enc_dec.onnx", fixed_n=4)
    with pytest.raises(ValueError, match="fixed class count N=4"):
        build(fixed, tmp_path, opts(models=("enc_dec",)))
    rc = tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(tmp_path),
                              "--dry-run", "--buckets", "1,4", "--max-classes", "16"])
    assert rc == 1 and "largest bucket (4) must equal max_classes (16)" in capsys.readouterr().err


# sidecars and repository compatibility -------------------------------------------------

def _info(model: str, imgsz: int = 1008, trt: str = "10.9.0.34", **kw) -> dict:
    return {"model": model, "imgsz": imgsz, "tensorrt_version": trt, "gpu_name": "NVIDIA H100",
            "compute_capability": "9.0", "max_classes": 16 if model == "enc_dec" else None,
            **kw}


def _put_plan(repo: Path, model: str, info: dict) -> Path:
    plan = plan_sidecar.plan_path(repo, model)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"plan-" + model.encode())
    info = {**info, "plan_sha256": plan_sidecar.sha256_files([plan])}
    plan_sidecar.write_sidecar(plan, info)
    return plan


def test_sidecar_roundtrip(tmp_path: Path):
    plan = tmp_path / "enc_dec" / "1" / "model.plan"
    path = plan_sidecar.write_sidecar(plan, _info("enc_dec", buckets=[1, 4, 16]))
    assert path == tmp_path / "enc_dec" / "1" / "model.plan.json"
    assert json.loads(path.read_text())["buckets"] == [1, 4, 16]
    assert plan_sidecar.read_sidecar(plan)["imgsz"] == 1008
    assert plan_sidecar.read_sidecar(tmp_path / "nope.plan") is None
    assert not list(path.parent.glob("*.tmp"))


def test_onnx_sha256_covers_external_data(tmp_path: Path):
    import onnx

    src = tiny_backbone(tmp_path / "a.onnx")
    model = onnx.load(str(src))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    first = plan_sidecar.onnx_sha256(tmp_path / "ext.onnx")
    data = tmp_path / "ext.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert plan_sidecar.onnx_sha256(tmp_path / "ext.onnx") != first


def test_repository_compatibility(tmp_path: Path):
    repo = tmp_path / "repo"
    check = plan_sidecar.check_repository_compatibility
    check(repo)  # empty repository: nothing to disagree with
    _put_plan(repo, "backbone", _info("backbone"))
    check(repo, _info("enc_dec"))
    with pytest.raises(plan_sidecar.PlanCompatibilityError,
                       match=r"image size 644 .*backbone.* image size 1008"):
        check(repo, _info("enc_dec", imgsz=644))
    with pytest.raises(plan_sidecar.PlanCompatibilityError, match=r"TensorRT version 10\.11"):
        check(repo, _info("enc_dec", trt="10.11.0.33"))
    check(repo, _info("enc_dec", imgsz=644), replacing=("backbone", "enc_dec"))
    _put_plan(repo, "enc_dec", _info("enc_dec", trt="10.8.0.43"))
    with pytest.raises(plan_sidecar.PlanCompatibilityError, match="TensorRT version"):
        check(repo)


def test_stale_reasons(tmp_path: Path, capsys):
    repo = tmp_path / "repo"
    dev = {"gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    assert len(plan_sidecar.stale_reasons(repo)) == 2  # no plans at all
    for m in ("backbone", "enc_dec"):
        _put_plan(repo, m, _info(m))
    kw = {"device": dev, "trt_version": "10.9.0.34", "imgsz": 1008, "max_classes": 16}
    assert plan_sidecar.stale_reasons(repo, **kw) == []
    reasons = plan_sidecar.stale_reasons(
        repo, **{**kw, "device": {"gpu_name": "NVIDIA L4", "compute_capability": "8.9"},
                 "trt_version": "10.11.0.33", "max_classes": 32})
    text = "\n".join(reasons)
    assert "built for TensorRT 10.9.0.34, want 10.11.0.33" in text and "NVIDIA L4" in text
    assert "built for max_classes 16, want 32" in text
    (repo / "enc_dec" / "1" / "model.plan").write_bytes(b"truncated")
    assert any("hash" in r for r in plan_sidecar.stale_reasons(repo, **kw))
    # the entrypoint's check command: exit 1 and the reasons on stdout
    assert plan_sidecar.main(["check", str(tmp_path / "empty")]) == 1
    assert "stale: backbone: no plan" in capsys.readouterr().out


# verification -------------------------------------------------------------------------

def test_cosine():
    a = np.array([1.0, 2.0, 3.0])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), a) == 0.0


def _enc_dec_outputs(n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {specs.PRED_BOXES: rng.uniform(0, 1, (n, 200, 4)).astype(np.float32),
            specs.PRED_LOGITS: rng.normal(0, 3, (n, 200)).astype(np.float32),
            specs.PRESENCE_LOGITS: rng.normal(0, 3, (n, 1)).astype(np.float32)}


def test_compare_outputs_passes_close_arrays():
    ref = _enc_dec_outputs()
    got = {k: v + np.float32(1e-3) for k, v in ref.items()}
    figs = compare_outputs("enc_dec", ref, got)
    assert figs[specs.PRED_BOXES]["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert figs[specs.PRED_LOGITS]["cosine"] > 0.9999


@pytest.mark.parametrize(("tensor", "change", "message"), [
    (specs.PRED_BOXES, lambda x: x + 0.05, r"pred_boxes max abs diff 0\.05 > 0\.02"),
    (specs.PRED_LOGITS, lambda x: x + np.random.default_rng(3).normal(0, 1, x.shape),
     r"pred_logits cosine 0\.9\d+ < 0\.999"),
    (specs.PRESENCE_LOGITS, lambda x: -x, "presence_logits max abs diff"),  # 4 values
    (specs.PRED_LOGITS, lambda x: x[:2], r"pred_logits shape \[2, 200\] != reference"),
    (specs.PRED_BOXES, lambda x: np.where(x > 0.5, np.nan, x), "pred_boxes has .* non-finite"),
])
def test_compare_outputs_fails_naming_the_tensor(tensor, change, message):
    ref = _enc_dec_outputs()
    got = dict(ref)
    got[tensor] = change(ref[tensor])
    with pytest.raises(VerificationError, match=message) as e:
        compare_outputs("enc_dec", ref, got, context="N=4")
    assert "enc_dec plan failed verification" in str(e.value) and "(N=4)" in str(e.value)


def test_compare_outputs_backbone_hint_and_missing():
    rng = np.random.default_rng(0)
    ref = {specs.FPN_FEATURES: rng.normal(size=(1, 8, 4, 4)),
           specs.FPN_FEATURES_2X: rng.normal(size=(1, 8, 8, 8))}
    bad = {specs.FPN_FEATURES: ref[specs.FPN_FEATURES],
           specs.FPN_FEATURES_2X: rng.normal(size=(1, 8, 8, 8))}  # uncorrelated: cos ~ 0
    with pytest.raises(VerificationError, match=r"fpn_features_2x cosine .*explicit attention"):
        compare_outputs("backbone", ref, bad)
    with pytest.raises(VerificationError, match="fpn_features_2x missing"):
        compare_outputs("backbone", ref, {specs.FPN_FEATURES: ref[specs.FPN_FEATURES]})
    assert compare_outputs("backbone", ref, ref, Tolerances(min_cosine=0.9999))


def test_verify_plan_with_onnxruntime_standing_in(onnx_dir: Path):
    """The whole verification path, with ORT as both the reference and the 'plan'."""
    dims = graph_dims_from_onnx(read_onnx_io(onnx_dir / "backbone.onnx"),
                                read_onnx_io(onnx_dir / "enc_dec.onnx"), 16)
    bb = onnx_reference(onnx_dir / "backbone.onnx")
    bb_cases = backbone_cases(dims, {})
    assert bb_cases[0].label == "photo verify_astronaut.jpg"
    px = bb_cases[0].inputs[specs.PIXEL_VALUES]
    assert px.shape == (1, 3, 56, 56) and px.min() >= -1 and px.max() <= 1
    summary = verify_plan("backbone", bb_cases, bb, bb)
    assert summary["worst"][specs.FPN_FEATURES]["cosine"] == pytest.approx(1.0)
    fpn = bb(bb_cases[0].inputs, 0)[specs.FPN_FEATURES]

    ranges = profile_ranges(16, (1, 4, 16))
    cases = enc_dec_cases(ranges, fpn, random_text(dims, 16))
    assert [(c.profile, c.inputs[specs.TEXT_MASK].shape[0]) for c in cases] == [
        (0, 1), (1, 2), (1, 4), (2, 5), (2, 16)]
    assert all(c.inputs[specs.TEXT_MASK].sum(axis=1).min() >= 2 for c in cases)
    ed = onnx_reference(onnx_dir / "enc_dec.onnx")
    summary = verify_plan("enc_dec", cases, ed, ed)
    assert set(summary["worst"]) == {specs.PRED_BOXES, specs.PRED_LOGITS, specs.PRESENCE_LOGITS}
    assert len(summary["runs"]) == 5 and summary["tolerances"]["max_abs_boxes"] == 0.02

    def fp16ish(inputs, profile):  # a 'plan' whose boxes drift too far on one bucket
        out = ed(inputs, profile)
        if profile == 2:
            out[specs.PRED_BOXES] = out[specs.PRED_BOXES] + 0.03
        return out

    with pytest.raises(VerificationError, match=r"random text, N=5, profile 2.*pred_boxes"):
        verify_plan("enc_dec", cases, ed, fp16ish)
    with pytest.raises(ValueError, match="16 rows, need 17"):
        enc_dec_cases(profile_ranges(17), fpn, random_text(dims, 16))


def test_padding_leaves_real_rows_unchanged(onnx_dir: Path):
    """Rows are independent: padded-to-bucket outputs match unpadded ones on the real rows."""
    ed = onnx_reference(onnx_dir / "enc_dec.onnx")
    feats = np.random.default_rng(0).normal(size=(3, 6, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], np.int32)
    fpn = np.random.default_rng(1).normal(size=(1, 8, 4, 4)).astype(np.float32)
    plain = ed({specs.FPN_FEATURES: fpn, specs.TEXT_FEATURES: feats, specs.TEXT_MASK: mask}, 0)
    pf, pm = pad_to_bucket(feats, mask, bucket_for(3, (1, 4, 16)))
    padded = ed({specs.FPN_FEATURES: fpn, specs.TEXT_FEATURES: pf, specs.TEXT_MASK: pm}, 0)
    for name, value in plain.items():
        np.testing.assert_allclose(unpad(padded[name], 3), value, rtol=1e-6, atol=1e-6)


def test_real_inputs_are_the_packaged_photo_and_class_names():
    """Verification's default inputs: the shipped photograph, preprocessed as served, and
    real class names (never random pixels)."""
    a, b = photo_pixels(112), photo_pixels(112)
    assert a.dtype == np.float32 and a.shape == (1, 3, 112, 112)
    np.testing.assert_array_equal(a, b)
    assert -1 <= a.min() < -0.5 and 0.5 < a.max() <= 1  # a real photo spans the range
    assert a.std() > 0.2
    # neighbouring pixels are correlated, unlike noise
    assert np.corrcoef(a[0, 0, :, :-1].ravel(), a[0, 0, :, 1:].ravel())[0, 1] > 0.8
    names = verify_classes(82)
    assert names[:3] == ["person", "bicycle", "car"] and names[80:] == names[:2]


# missing TensorRT ----------------------------------------------------------------------

def test_missing_tensorrt_message(monkeypatch, onnx_dir: Path, tmp_path: Path, capsys):
    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(tensorrt_build.TensorRTMissingError) as e:
        tensorrt_build.import_tensorrt()
    assert str(e.value) == (
        "TensorRT not installed: run inside the NGC tritonserver container "
        "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3) or pip install tensorrt on a GPU machine")
    with pytest.raises(tensorrt_build.TensorRTMissingError):
        tensorrt_build.build_plans(onnx_dir, tmp_path / "repo", None)
    assert not (tmp_path / "repo").exists()  # failed before touching the repository
    rc = tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(tmp_path / "r")])
    assert rc == 1 and "TensorRT not installed" in capsys.readouterr().err
    assert plan_sidecar.tensorrt_version() is None


def test_plan_runner_needs_cuda_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    from dart_triton.export.tensorrt.executor import PlanExecutor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"torch with CUDA .* or pass --skip-verify"):
        PlanExecutor(b"", trt=None)


def test_options_coerce():
    import argparse

    o = tensorrt_build.PlanBuildOptions.coerce(
        argparse.Namespace(precision="fp32", buckets="4,1", max_classes=None, unknown=1))
    assert o.precision == "fp32" and o.buckets == (1, 4) and o.resolved_max_classes() == 4
    assert tensorrt_build.PlanBuildOptions.coerce(None).resolved_max_classes() == 16
    o = tensorrt_build.PlanBuildOptions(buckets="1,8", models="enc_dec",
                                        tolerances={"min_cosine": 0.99}, sample="s.npz")
    assert o.buckets == (1, 8) and o.resolved_max_classes() == 8 and o.models == ("enc_dec",)
    assert o.tolerances == Tolerances(min_cosine=0.99) and o.sample == Path("s.npz")
    with pytest.raises(ValueError, match="opt level"):
        tensorrt_build.PlanBuildOptions(opt_level=9).validate()


def test_cli_dispatches_build_plans():
    from dart_triton.cli import COMMANDS

    module, func, _ = COMMANDS["build-plans"]
    assert (module, func) == ("dart_triton.export.tensorrt.build", "main")


# build_plans orchestration with the recording TensorRT stand-in (CPU) --------------------




@pytest.fixture
def fake_trt(monkeypatch) -> FakeTensorRT:
    """A TensorRT 10 stand-in; plans are run by the real PlanExecutor in host memory."""
    from dart_triton.export.tensorrt import executor as plan_executor

    fake = FakeTensorRT("10.9.0.34")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    return fake


def test_build_plans_installs_verified_plans(fake_trt, onnx_dir: Path, tmp_path: Path, capsys):
    repo = tmp_path / "repo"
    res = tensorrt_build.build_plans(onnx_dir, repo, {"buckets": "1,4,16", "opt_level": 2})
    for model in ("backbone", "enc_dec"):
        plan = repo / model / "1" / "model.plan"
        header, graph = read_plan(plan.read_bytes())
        assert graph == (onnx_dir / f"{model}.onnx").read_bytes()  # weak typing: the export
        assert "FP16" in header["flags"] and header["network_flags"] == 0
        info = plan_sidecar.read_sidecar(plan)
        assert info["tensorrt_version"] == "10.9.0.34" and info["gpu_name"] == "Fake GPU"
        assert info["typing"] == "weak" and info["fp16_graph"] is None
        assert info["imgsz"] == 56 and info["precision"] == "fp16" and info["opt_level"] == 2
        assert info["onnx_sha256"] == plan_sidecar.onnx_sha256(onnx_dir / f"{model}.onnx")
        assert info["plan_sha256"] == plan_sidecar.sha256_files([plan])
        assert info["trtexec"][0].startswith("trtexec --onnx=")
        assert info["verification"]["reference"] == "onnxruntime cpu fp32"
        assert res[model]["plan_path"] == str(plan)
    ed = res["enc_dec"]
    assert ed["buckets"] == [1, 4, 16] and ed["n_range"] == [1, 16] and ed["max_classes"] == 16
    assert [p["opt"] for p in ed["profiles"]] == [1, 4, 16]
    assert ed["verification"]["worst"][specs.PRED_BOXES]["max_abs"] == 0.0
    assert len(ed["verification"]["runs"]) == 5
    # no text encoder reachable from these bare graphs: said in the sidecar and printed
    assert ed["verification"]["inputs"]["text"].startswith("random text (no text encoder")
    bb = res["backbone"]
    assert bb["verification"]["inputs"] == {"pixels": "photo verify_astronaut.jpg"}
    assert bb["verification"]["worst"][specs.FPN_FEATURES]["cosine"] > 0.99999
    assert bb["profiles"] == [] and bb["max_classes"] is None and bb["backbone_kind"] == "vit"
    assert not list(repo.rglob(".plan-staging-*"))
    out = capsys.readouterr().out
    assert "--profile=2" in out and "enc_dec: verified against onnxruntime cpu fp32" in out
    assert "warning: random text" in out
    kw = {"imgsz": 56, "max_classes": 16, "trt_version": "10.9.0.34", "device": FAKE_GPU}
    assert plan_sidecar.stale_reasons(repo, **kw) == []

    # a later enc_dec-only build for another image size is refused, the repo untouched
    other = tmp_path / "onnx644"
    other.mkdir()
    tiny_enc_dec(other / "enc_dec.onnx", specs.GraphDims(imgsz=70, fpn_dim=8, text_len=6,
                                                            text_dim=8, num_queries=5))
    with pytest.raises(plan_sidecar.PlanCompatibilityError, match="image size 70"):
        tensorrt_build.build_plans(other, repo, {"models": ("enc_dec",)})
    assert plan_sidecar.read_sidecar(repo / "enc_dec" / "1" / "model.plan")["imgsz"] == 56


def test_build_plans_failed_verification_installs_nothing(fake_trt, onnx_dir: Path,
                                                          tmp_path: Path, capsys):
    fake_trt.drift = {(specs.PRED_BOXES, 0): 0.05}  # the plan's boxes drift by 0.05
    repo = tmp_path / "repo"
    rc = tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(repo)])
    err = capsys.readouterr().err
    assert rc == 1 and "enc_dec plan failed verification" in err and "pred_boxes" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(repo.rglob("model.plan*")) and not list(repo.rglob(".plan-staging-*"))
    # a looser bar from the command line lets the same plans through
    rc = tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(repo),
                              "--max-box-diff", "0.1"])
    assert rc == 0 and "backbone: " in capsys.readouterr().out
    ver = plan_sidecar.read_sidecar(repo / "enc_dec" / "1" / "model.plan")["verification"]
    assert ver["tolerances"]["max_abs_boxes"] == 0.1
    assert ver["worst"][specs.PRED_BOXES]["max_abs"] == pytest.approx(0.05)
    assert tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(repo),
                                "--skip-verify"]) == 0
    assert plan_sidecar.read_sidecar(repo / "enc_dec" / "1" / "model.plan")[
        "verification"] == {"skipped": True}


# GPU: real plans from the tiny graphs ----------------------------------------------------

def _need_gpu_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT python package not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: TensorRT plans need an NVIDIA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_gpu_build_single_profile(onnx_dir: Path, tmp_path: Path, precision: str):
    _need_gpu_tensorrt()
    repo = tmp_path / "repo"
    res = tensorrt_build.build_plans(onnx_dir, repo, {"precision": precision,
                                                      "max_classes": 8, "workspace_gb": 1})
    for model in ("backbone", "enc_dec"):
        plan = repo / model / "1" / "model.plan"
        info = json.loads((repo / model / "1" / "model.plan.json").read_text())
        assert plan.stat().st_size > 0 and info["precision"] == precision
        assert info["imgsz"] == 56 and info["plan_sha256"] == plan_sidecar.sha256_files([plan])
        assert info["tensorrt_version"] and info["compute_capability"]
        assert info["verification"]["worst"]
        assert res[model]["plan_path"] == str(plan)
    assert res["enc_dec"]["profiles"] == [{"index": 0, "min": 1, "opt": 4, "max": 8}]
    assert not list(repo.rglob(".plan-staging-*"))
    assert plan_sidecar.stale_reasons(repo, imgsz=56, max_classes=8,
                                      device=plan_sidecar.current_device(),
                                      trt_version=plan_sidecar.tensorrt_version()) == []


@pytest.mark.gpu
def test_gpu_build_buckets_and_run_padded(onnx_dir: Path, tmp_path: Path):
    _need_gpu_tensorrt()
    import tensorrt as trt

    from dart_triton.export.tensorrt.executor import PlanExecutor

    repo = tmp_path / "repo"
    res = tensorrt_build.build_plans(onnx_dir, repo, {"buckets": (1, 4, 16),
                                                      "models": ("enc_dec",)})
    assert [p["opt"] for p in res["enc_dec"]["profiles"]] == [1, 4, 16]
    runner = PlanExecutor((repo / "enc_dec" / "1" / "model.plan").read_bytes(), trt)
    assert runner.num_profiles == 3
    ref = onnx_reference(onnx_dir / "enc_dec.onnx")
    fpn = np.random.default_rng(0).normal(size=(1, 8, 4, 4)).astype(np.float32)
    feats = np.random.default_rng(1).normal(size=(3, 6, 8)).astype(np.float32)
    mask = np.ones((3, 6), np.int32)
    pf, pm = pad_to_bucket(feats, mask, 4)
    inputs = {specs.FPN_FEATURES: fpn, specs.TEXT_FEATURES: pf, specs.TEXT_MASK: pm}
    got = runner(inputs, profile=1)
    want = ref({**inputs, specs.TEXT_FEATURES: feats, specs.TEXT_MASK: mask}, 0)
    compare_outputs("enc_dec", want, {k: unpad(v, 3) for k, v in got.items()})
    with pytest.raises(ValueError, match="outside profile 0"):
        runner(inputs, profile=0)  # N=4 is not in bucket 1's range
    runner.close()


@pytest.mark.gpu
def test_gpu_verification_failure_installs_nothing(onnx_dir: Path, tmp_path: Path):
    _need_gpu_tensorrt()
    repo = tmp_path / "repo"
    strict = Tolerances(min_cosine=1.0 + 1e-9, max_abs_boxes=-1.0)  # impossible bars
    with pytest.raises(VerificationError, match="backbone plan failed verification"):
        tensorrt_build.build_plans(onnx_dir, repo, {"tolerances": strict})
    assert not list(repo.rglob("model.plan"))


@pytest.mark.gpu
def test_gpu_refuses_mixed_repository(onnx_dir: Path, tmp_path: Path):
    _need_gpu_tensorrt()
    repo = tmp_path / "repo"
    _put_plan(repo, "backbone", _info("backbone", imgsz=1008))
    with pytest.raises(plan_sidecar.PlanCompatibilityError, match="image size"):
        tensorrt_build.build_plans(onnx_dir, repo, {"models": ("enc_dec",),
                                                    "skip_verify": True})
    res = tensorrt_build.build_plans(onnx_dir, repo, {"skip_verify": True})  # both: fine
    assert res["backbone"]["verification"] == {"skipped": True}
