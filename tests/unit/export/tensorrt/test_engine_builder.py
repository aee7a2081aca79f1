"""Every TensorRT call of the build, the verification runner and the error path, against the
recording TensorRT 10 and 11 stand-ins of tests/fakes/tensorrt.py (CPU)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dart_triton.contract import specs
from dart_triton.export.tensorrt import build as tensorrt_build
from dart_triton.export.tensorrt import executor as plan_executor
from dart_triton.export.tensorrt import plan_record
from dart_triton.export.tensorrt import sidecar as plan_sidecar
from dart_triton.export.tensorrt.build import PlanBuildOptions, TensorRTPath
from dart_triton.export.tensorrt.executor import PlanExecutor
from tests.fakes.tensorrt import FakeTensorRT, HostBuffers, read_plan
from tests.fakes.tiny_graphs import FAKE_GPU

TRT10, TRT11 = "10.9.0.34", "11.4.0.106"


def install(monkeypatch, version: str) -> FakeTensorRT:
    fake = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    return fake


def build_one(fake: FakeTensorRT, onnx_dir: Path, tmp_path: Path, model: str, **options):
    """build_engine for one job, as build_plans calls it; returns the plan's header."""
    opts = PlanBuildOptions.coerce({"models": (model,), **options})
    _, (job,) = tensorrt_build.plan_jobs(onnx_dir, tmp_path / "repo", opts,
                                         TensorRTPath.detect(fake))
    graph = job.onnx
    if job.fp16_graph:
        graph = tmp_path / "graph.fp16.onnx"
        from dart_triton.export.tensorrt import fp16

        fp16.convert_file(job.onnx, graph)
    blob = tensorrt_build.build_engine(fake, job, opts, fake.Logger(), graph)
    return read_plan(blob)[0], job


# The version path --------------------------------------------------------------------------


def test_path_is_decided_by_the_api_once(monkeypatch, onnx_dir, tmp_path):
    assert TensorRTPath.detect(FakeTensorRT(TRT10)) == TensorRTPath(TRT10, False)
    assert TensorRTPath.detect(FakeTensorRT(TRT11)) == TensorRTPath(TRT11, True)
    assert TensorRTPath.for_version("11.4").typing == "strong"
    assert TensorRTPath.for_version("10").typing == "weak"
    with pytest.raises(ValueError, match="major number"):
        TensorRTPath.for_version("eleven")
    install(monkeypatch, TRT11)
    _, jobs = tensorrt_build.plan_jobs(onnx_dir, tmp_path, PlanBuildOptions())
    assert {j.path for j in jobs} == {TensorRTPath(TRT11, True)}  # the installed module's


@pytest.mark.parametrize(("version", "precision", "flags", "network_flags"), [
    (TRT10, "fp16", {"FP16", "TF32"}, 0),  # weak typing: FP16 kernels allowed
    (TRT10, "fp32", set(), 0),  # IEEE FP32: TF32 cleared
    (TRT11, "fp16", {"TF32"}, 1 << 1),  # strong: no precision flag, STRONGLY_TYPED network
    (TRT11, "fp32", set(), 1 << 1),
])
def test_flags_per_precision(monkeypatch, onnx_dir, tmp_path, version, precision, flags,
                             network_flags):
    fake = install(monkeypatch, version)
    header, job = build_one(fake, onnx_dir, tmp_path, "backbone", precision=precision)
    assert set(header["flags"]) == flags and header["network_flags"] == network_flags
    assert ("config.set_flag", "FP16") in fake.calls if "FP16" in flags else not fake.named(
        "config.set_flag")
    (parsed,) = fake.parsed_models
    fp16_weights = {t.data_type for t in parsed.graph.initializer} == {onnx.TensorProto.FLOAT16}
    # TensorRT 11 FP16 reads the FP16 graph; everything else the FP32 export
    assert fp16_weights == (version == TRT11 and precision == "fp16")
    assert {i.type.tensor_type.elem_type for i in parsed.graph.input} == {
        onnx.TensorProto.FLOAT}  # the Triton contract: FP32 in, whatever the plan computes


def test_tensorrt_11_never_touches_the_removed_flags(monkeypatch, onnx_dir, tmp_path):
    fake = install(monkeypatch, TRT11)
    assert not hasattr(fake.BuilderFlag, "FP16")
    with pytest.raises(AttributeError):
        fake.BuilderFlag.FP16  # noqa: B018 - what the weak-typing code did, and died of
    res = tensorrt_build.build_plans(onnx_dir, tmp_path / "repo", {"buckets": "1,4,16"})
    for model, info in res.items():
        assert info["typing"] == "strong", model
        assert info["fp16_graph"]["pass_version"] >= 1
        assert info["fp16_report"]["fp16_nodes"] > 0
        prepare, line = info["trtexec"]
        assert prepare.startswith("python -m dart_triton.export.tensorrt.fp16 ")
        args = shlex.split(line)
        assert "--stronglyTyped" in args and "--fp16" not in args
        assert args[1].endswith(f"{model}.fp16.onnx")
    assert not list((tmp_path / "repo").rglob("*.fp16.onnx*"))  # staged, then removed
    assert not list((tmp_path / "onnx").glob("*.fp16.onnx"))  # the export dir untouched


def test_workspace_opt_level_and_one_profile_per_bucket(monkeypatch, onnx_dir, tmp_path):
    fake = install(monkeypatch, TRT10)
    header, job = build_one(fake, onnx_dir, tmp_path, "enc_dec", buckets="1,4,16",
                            workspace_gb=1.5, opt_level=5)
    assert fake.named("config.set_memory_pool_limit") == [
        ("config.set_memory_pool_limit", "WORKSPACE", 1610612736)]  # 1.5 GiB in bytes
    assert fake.named("config.builder_optimization_level") == [
        ("config.builder_optimization_level", 5)]
    # one profile per bucket, min/opt/max on the dynamic inputs only (not fpn_features)
    shapes = fake.named("profile.set_shape")
    assert [c[1] for c in shapes] == ["text_features", "text_mask"] * 3
    assert [(c[2][0], c[3][0], c[4][0]) for c in shapes[::2]] == [(1, 1, 1), (2, 4, 4),
                                                                  (5, 16, 16)]
    assert shapes[0][2:] == ((1, 6, 8),) * 3
    assert fake.named("config.add_optimization_profile") == [
        ("config.add_optimization_profile", i) for i in range(3)]
    assert list(header["profiles"][2]) == ["text_features", "text_mask"]
    # TensorRT's defaults when not asked: no pool limit, no optimisation level
    fake.calls.clear()
    build_one(fake, onnx_dir, tmp_path, "backbone")
    assert not fake.named("config.set_memory_pool_limit")
    assert not fake.named("config.builder_optimization_level")
    assert not fake.named("profile.")  # static backbone: TensorRT's own profile


def test_parse_errors_and_a_none_engine_are_one_line(monkeypatch, onnx_dir, tmp_path, capsys):
    fake = install(monkeypatch, TRT10)
    args = ["--onnx-dir", str(onnx_dir), "--output", str(tmp_path / "repo")]
    fake.parse_errors = ["ModelImporter.cpp:949: While parsing node number 3 [Conv]:\n"
                         "  unsupported attribute", "second\nerror"]
    assert tensorrt_build.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "could not parse" in err and "[Conv]: unsupported attribute; second error" in err
    fake.parse_errors, fake.fail_build = [], True
    assert tensorrt_build.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed to build backbone" in err
    assert not list((tmp_path / "repo").rglob("model.plan*"))


def test_binding_exceptions_become_one_line(monkeypatch, onnx_dir, tmp_path, capsys):
    """A TensorRT API mismatch (TypeError / AttributeError from the bindings) is named with
    the step and the version, in one line, not a traceback."""
    install(monkeypatch, TRT10)

    def bad_pool_limit(self, pool, size):
        raise TypeError("set_memory_pool_limit(): incompatible function arguments.\n"
                        "Invoked with: <MemoryPoolType.WORKSPACE>, 1.5")

    import tests.fakes.tensorrt as fake_tensorrt

    monkeypatch.setattr(fake_tensorrt.BuilderConfig, "set_memory_pool_limit", bad_pool_limit)
    rc = tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(tmp_path / "r"),
                              "--workspace-gb", "1.5"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert ("TensorRT 10.9.0.34 (weakly typed): building the backbone plan: TypeError: "
            "set_memory_pool_limit(): incompatible function arguments. Invoked with:") in err


def test_fp16_graph_errors_are_one_line(monkeypatch, onnx_dir, tmp_path, capsys):
    install(monkeypatch, TRT11)
    from dart_triton.export.tensorrt import fp16

    fp16.convert_file(onnx_dir / "backbone.onnx", onnx_dir / "half.onnx")
    (onnx_dir / "half.onnx").replace(onnx_dir / "backbone.onnx")  # an FP16 graph as input
    rc = tensorrt_build.main(["--onnx-dir", str(onnx_dir), "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "already holds FP16 weights" in err


# PlanExecutor against the recording context -------------------------------------------------


def _enc_dec_plan(fake: FakeTensorRT, onnx_dir: Path, tmp_path: Path) -> bytes:
    opts = PlanBuildOptions(buckets=(1, 4, 16), models=("enc_dec",))
    _, (job,) = tensorrt_build.plan_jobs(onnx_dir, tmp_path, opts, TensorRTPath.detect(fake))
    return tensorrt_build.build_engine(fake, job, opts, fake.Logger())


def _inputs(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {specs.FPN_FEATURES: rng.normal(size=(1, 8, 4, 4)).astype(np.float32),
            specs.TEXT_FEATURES: rng.normal(size=(n, 6, 8)).astype(np.float32),
            specs.TEXT_MASK: np.ones((n, 6), np.int32)}


def test_plan_runner_call_order(monkeypatch, onnx_dir, tmp_path):
    from dart_triton.export.tensorrt.verify import onnx_reference

    fake = install(monkeypatch, TRT10)
    buffers = HostBuffers()
    runner = PlanExecutor(_enc_dec_plan(fake, onnx_dir, tmp_path), fake, buffers=buffers)
    assert runner.inputs == [specs.FPN_FEATURES, specs.TEXT_FEATURES, specs.TEXT_MASK]
    assert runner.num_profiles == 3
    fake.calls.clear()
    got = runner(_inputs(4), profile=1)
    calls = [c for c in fake.calls if c[0].startswith("context.")]
    names = [c[0].removeprefix("context.") for c in calls]
    # 1. the profile, on the runner's stream, before any shape
    assert calls[0] == ("context.set_optimization_profile_async", 1, buffers.stream_handle)
    # 2. every input shape and address before any output shape is asked for
    first_out = names.index("get_tensor_shape")
    assert names[1:first_out] == ["set_input_shape", "set_tensor_address"] * 3
    assert [c[1] for c in calls[1:first_out:2]] == runner.inputs
    # 3. output shapes and addresses, 4. one launch on the same stream, then a sync
    assert names[first_out:-1] == ["get_tensor_shape", "set_tensor_address"] * 3
    assert calls[-1] == ("context.execute_async_v3", buffers.stream_handle)
    assert buffers.synchronized == 1
    want = onnx_reference(onnx_dir / "enc_dec.onnx")(_inputs(4))
    for name, value in want.items():  # what the context wrote at the output addresses
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)
    # the same profile again: no re-selection; another profile: selected first
    fake.calls.clear()
    runner(_inputs(3), profile=1)
    assert not fake.named("context.set_optimization_profile_async")
    fake.calls.clear()
    runner(_inputs(1), profile=0)
    assert fake.calls[0] == ("context.set_optimization_profile_async", 0,
                             buffers.stream_handle)


def test_plan_runner_refuses_shapes_outside_the_profile(monkeypatch, onnx_dir, tmp_path):
    fake = install(monkeypatch, TRT10)
    runner = PlanExecutor(_enc_dec_plan(fake, onnx_dir, tmp_path), fake, buffers=HostBuffers())
    with pytest.raises(ValueError, match=r"text_features shape \[4, 6, 8\] outside profile 0 "
                                         r"\(min \[1, 6, 8\], max \[1, 6, 8\]\)"):
        runner(_inputs(4), profile=0)
    assert not fake.named("context.execute_async_v3")
    with pytest.raises(ValueError, match="profile 3 out of range"):
        runner(_inputs(4), profile=3)
    with pytest.raises(KeyError, match="text_mask"):
        runner({k: v for k, v in _inputs(4).items() if k != specs.TEXT_MASK}, profile=1)
    runner.close()
    assert runner.engine is None and runner.context is None


# Sidecars: everything that shapes a plan, and a change in any of it rebuilds ---------------


def test_every_plan_shaping_field_is_recorded_and_compared(monkeypatch, onnx_dir, tmp_path):
    install(monkeypatch, TRT10)
    repo = tmp_path / "repo"
    opts = PlanBuildOptions(buckets=(1, 4, 16), opt_level=4, workspace_gb=2.0)
    tensorrt_build.build_plans(onnx_dir, repo, opts)
    for model in specs.GRAPH_MODELS:
        info = plan_sidecar.read_sidecar(plan_sidecar.plan_path(repo, model))
        assert set(plan_sidecar.PLAN_FIELDS) <= set(info), model
        assert info["workspace_bytes"] == 2 << 30
    path = TensorRTPath(TRT10, False)
    want = plan_record.wanted_plan_fields(opts, 56, 16, "vit", path)
    check = lambda **w: plan_sidecar.stale_reasons(  # noqa: E731
        repo, device=FAKE_GPU, want={**want, **w})
    assert check() == []
    changed = {
        "precision": ("fp32", "enc_dec: built for precision fp16, want fp32"),
        "opt_level": (3, "built for builder optimisation level 4, want 3"),
        "workspace_gb": (None, "built for workspace (GiB) 2.0, want null"),
        "tensorrt_version": ("10.11.0.33", "built for TensorRT 10.9.0.34, want 10.11.0.33"),
        "typing": ("strong", "built for network typing weak, want strong"),
        "imgsz": (112, "built for imgsz 56, want 112"),
        "backbone_kind": ("pruned", "backbone: built for backbone kind vit, want pruned"),
        "buckets": ([1, 16], "enc_dec: built for buckets [1, 4, 16], want [1, 16]"),
        "max_classes": (32, "enc_dec: built for max_classes 16, want 32"),
    }
    for field, (value, reason) in changed.items():
        reasons = check(**{field: value})
        assert any(reason in r for r in reasons), (field, reasons)
    # the whole of a changed build, as check-repository computes it
    fp32 = plan_record.wanted_plan_fields(PlanBuildOptions(buckets=(1, 16)), 56, 16, "vit",
                                             path)
    reasons = plan_sidecar.stale_reasons(repo, device=FAKE_GPU, want=fp32)
    assert any("optimisation profiles" in r for r in reasons)
    other_gpu = {"gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    assert any("this GPU has NVIDIA L4" in r
               for r in plan_sidecar.stale_reasons(repo, device=other_gpu, want=want))
    # the command-line check takes the same options
    monkeypatch.setattr(plan_sidecar, "current_device", lambda: dict(FAKE_GPU))
    assert plan_sidecar.main(["check", str(repo), "--precision", "fp16", "--opt-level", "4",
                              "--buckets", "1,4,16", "--workspace-gb", "2"]) == 0
    assert plan_sidecar.main(["check", str(repo), "--precision", "fp32"]) == 1


def test_old_sidecars_without_the_new_fields_are_stale(tmp_path):
    repo = tmp_path / "repo"
    for model in specs.GRAPH_MODELS:
        plan = plan_sidecar.plan_path(repo, model)
        plan.parent.mkdir(parents=True)
        plan.write_bytes(b"plan")
        plan_sidecar.write_sidecar(plan, {"model": model, "imgsz": 56, "precision": "fp16",
                                          "tensorrt_version": TRT10})
    want = plan_record.wanted_plan_fields(PlanBuildOptions(), 56, 16, "vit",
                                             TensorRTPath(TRT10, False))
    reasons = plan_sidecar.stale_reasons(repo, want=want)
    assert "backbone: built for network typing null, want weak" in reasons
    assert "enc_dec: built for max_classes null, want 16" in reasons
    with pytest.raises(ValueError, match="unknown plan fields"):
        plan_sidecar.stale_reasons(repo, want={"colour": "red"})


def test_check_repository_rebuilds_plans_when_a_build_option_changes(monkeypatch, tmp_path,
                                                                    tiny_checkpoint):
    """The container's decision: `dart-triton check-repository` on a tensorrt repository
    compares the plans' sidecars with the build options (DART_BUILD_ARGS)."""
    from dart_triton.export import manifest
    from dart_triton.export.options import BuildOptions, packaged_vocabulary
    from dart_triton.export.repository import build_repository

    install(monkeypatch, TRT10)
    monkeypatch.setattr(plan_sidecar, "current_device", lambda: dict(FAKE_GPU))
    repo = tmp_path / "repo"
    build = BuildOptions(backend="tensorrt", max_classes=4, buckets=(1, 4))
    build.plan = PlanBuildOptions(tolerances={"max_abs_boxes": 0.5})  # tiny random model
    build_repository(tiny_checkpoint, repo, build, log=lambda *_: None)
    vocab = packaged_vocabulary()
    assert manifest.stale_reasons(repo, tiny_checkpoint, build, vocab) == []
    for option, reason in (("opt_level", "enc_dec: built for builder optimisation level null"),
                           ("precision", "enc_dec: built for precision fp16, want fp32")):
        changed = BuildOptions(backend="tensorrt", max_classes=4, buckets=(1, 4))
        changed.plan = PlanBuildOptions(tolerances={"max_abs_boxes": 0.5},
                                        **{option: 2 if option == "opt_level" else "fp32"})
        reasons = manifest.stale_reasons(repo, tiny_checkpoint, changed, vocab)
        assert any(r.startswith(reason) for r in reasons), reasons
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(TRT11))
    reasons = manifest.stale_reasons(repo, tiny_checkpoint, build, vocab)
    assert "backbone: built for TensorRT 10.9.0.34, want 11.4.0.106" in reasons
    assert "backbone: built for network typing weak, want strong" in reasons


def test_dry_run_prints_the_lines_of_the_version(onnx_dir, tmp_path, capsys):
    """Without TensorRT here, --dry-run prints TensorRT 10's lines, or another version's."""
    base = ["--onnx-dir", str(onnx_dir), "--output", str(tmp_path / "r"), "--dry-run"]
    assert tensorrt_build.main([*base, "--tensorrt-version", "11.4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["python", "trtexec", "python", "trtexec"]
    assert lines[0] == (f"python -m dart_triton.export.tensorrt.fp16 {onnx_dir / 'backbone.onnx'} "
                        f"{onnx_dir / 'backbone.fp16.onnx'}")
    for line in lines[1::2]:
        args = shlex.split(line)
        assert "--stronglyTyped" in args and "--fp16" not in args
        assert args[1].endswith(".fp16.onnx")
    assert tensorrt_build.main([*base, "--tensorrt-version", "11.4", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()  # FP32: the export itself, IEEE FP32
    assert len(lines) == 2 and all("--noTF32" in x and "--stronglyTyped" in x for x in lines)
    assert tensorrt_build.main([*base, "--tensorrt-version", "10.9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--fp16" in x and "--stronglyTyped" not in x for x in lines)
    assert tensorrt_build.main([*base, "--tensorrt-version", "ten"]) == 1
    assert "must start with its major number" in capsys.readouterr().err


def test_the_backbone_kind_comes_from_the_export(monkeypatch, onnx_dir, tmp_path):
    """The exporter records which module the backbone graph is (dart_graphs.json); the
    backbone plan's sidecar keeps it, and another kind makes it stale."""
    import json

    install(monkeypatch, TRT10)
    described = f"pruned:{tmp_path / 'plan.json'}:2 (sub-block)"
    (onnx_dir / "dart_graphs.json").write_text(json.dumps({"backbone": described}))
    res = tensorrt_build.build_plans(onnx_dir, tmp_path / "repo", {"skip_verify": True})
    assert res["backbone"]["backbone_kind"] == "pruned"
    assert res["backbone"]["backbone"] == described
    assert res["enc_dec"]["backbone_kind"] is None  # enc_dec does not depend on it
    want = plan_record.wanted_plan_fields(PlanBuildOptions(), 56, 16, "vit",
                                             TensorRTPath(TRT10, False))
    assert plan_sidecar.stale_reasons(tmp_path / "repo", want=want) == [
        "backbone: built for backbone kind pruned, want vit"]
