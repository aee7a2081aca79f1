"""The FP16 graph the strongly typed (TensorRT 11) path builds from: its structure, and its
outputs against the FP32 graph in ONNX Runtime on the CPU (cosine), on the exporter's real
graphs (tiny random SAM3), the packaged photograph and real class names."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dart_triton.contract import specs
from dart_triton.export.tensorrt import build as tensorrt_build
from dart_triton.export.tensorrt import executor as plan_executor
from dart_triton.export.tensorrt import fp16, onnx_graph
from dart_triton.export.tensorrt import verify as plan_verify
from tests.fakes.tensorrt import FakeTensorRT, HostBuffers
from tests.fakes.tiny_graphs import FAKE_GPU

MIN_COSINE = 0.999  # the plans' own verification bar
HALF, FLOAT = TensorProto.FLOAT16, TensorProto.FLOAT


@pytest.fixture(scope="module")
def export(tiny_checkpoint, tmp_path_factory) -> Path:
    from dart_triton.export.onnx_export import export_graphs

    out = tmp_path_factory.mktemp("onnx")
    export_graphs(tiny_checkpoint, out, max_classes=4, check=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def converted(export, tmp_path_factory) -> dict[str, tuple[Path, fp16.Fp16Report]]:
    out = tmp_path_factory.mktemp("fp16")
    return {m: (out / f"{m}.fp16.onnx",
                fp16.convert_file(export / f"{m}.onnx", out / f"{m}.fp16.onnx"))
            for m in specs.GRAPH_MODELS}


def _dims(export: Path) -> specs.GraphDims:
    dims, _ = tensorrt_build.plan_jobs(export, export / "unused", tensorrt_build.PlanBuildOptions(
        max_classes=4), tensorrt_build.TensorRTPath("10", False))
    return dims


@pytest.fixture(scope="module")
def real_inputs(export, tiny_checkpoint) -> dict[str, dict[str, np.ndarray]]:
    """The photo through the FP32 backbone, and the text features of real class names."""
    from dart_triton.model.text_encoder import TextEncoder

    dims = _dims(export)
    pixels = plan_verify.photo_pixels(dims.imgsz)
    fpn = plan_verify.onnx_reference(export / "backbone.onnx")(
        {specs.PIXEL_VALUES: pixels})[specs.FPN_FEATURES]
    text = plan_verify.real_text(dims, 4, encoder=TextEncoder.from_checkpoint(tiny_checkpoint))
    return {specs.BACKBONE: {specs.PIXEL_VALUES: pixels},
            specs.ENC_DEC: {specs.FPN_FEATURES: fpn, specs.TEXT_FEATURES: text.features,
                            specs.TEXT_MASK: text.mask}}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def test_attention_is_left_in_the_form_tensorrt_fuses(converted):
    """Every softmax sits between two FP16 matmuls with no cast in the chain, and the scale
    comes before Q·Kᵀ: TensorRT's fused attention (FP32 accumulation inside)."""
    for model, (path, report) in converted.items():
        graph = onnx.load(str(path))
        types = _types(graph)
        producers = {o: n for n in graph.graph.node for o in n.output}
        softmaxes = [n for n in graph.graph.node if n.op_type == "Softmax"]
        assert softmaxes and report.attention_blocks == len(softmaxes), model
        assert report.folded_scales == len(softmaxes), model  # every scale moved onto Q
        for sm in softmaxes:
            assert types[sm.output[0]] == HALF
            scores = producers[sm.input[0]]
            if scores.op_type == "Add":  # enc_dec's attention masks
                scores = next(producers[i] for i in scores.input
                              if i in producers and producers[i].op_type == "MatMul")
            assert scores.op_type == "MatMul", (model, scores.op_type)
            assert all(types[i] == HALF for i in scores.input)
            assert producers[scores.input[0]].op_type == "Mul"  # Q·scale, then Q·Kᵀ
        assert not any(n.op_type in onnx_graph.SCALE_OPS and n.input[0] in {
            o for m in graph.graph.node if m.op_type == "MatMul" for o in m.output}
            and any(c.op_type == "Softmax" for c in graph.graph.node if n.output[0] in c.input)
            for n in graph.graph.node), model


def test_islands_weights_and_contract(converted, export):
    for model, (path, report) in converted.items():
        graph = onnx.load(str(path))
        types = _types(graph)
        ops = Counter(n.op_type for n in graph.graph.node)
        norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"]
        assert norms and all(types[i] == FLOAT for n in norms for i in n.input if i), model
        assert report.fp32_op_types["LayerNormalization"] == len(norms)
        for n in graph.graph.node:  # the box position encodings of the decoder
            if n.op_type in ("Sin", "Cos", "Log"):
                assert types[n.input[0]] == FLOAT, (model, n.name)
        # What depends on a graph input is FP16; what is computed from weights alone (the
        # decoder's prompt-independent start, folded by TensorRT at build) stays FP32.
        constant = onnx_graph.constant_outputs(graph.graph)
        varying = [n for n in graph.graph.node if not set(n.output) & constant]
        matmuls = [n for n in varying if n.op_type in ("MatMul", "Gemm", "Conv")]
        assert matmuls and all(types[n.output[0]] == HALF for n in matmuls), model
        fed = {i for n in varying for i in n.input}
        weights = [t for t in graph.graph.initializer if t.data_type in (HALF, FLOAT)
                   and t.name in fed]
        big = [t for t in weights if np.prod(t.dims) > 1024]
        assert big and all(t.data_type == HALF for t in big), model  # weights halved
        # the Triton contract is unchanged: FP32 (and INT32) in and out, same names/shapes
        src = onnx.load(str(export / f"{model}.onnx"), load_external_data=False).graph
        assert [(v.name, v.type.tensor_type.elem_type) for v in graph.graph.input] == [
            (v.name, v.type.tensor_type.elem_type) for v in src.input]
        assert [(v.name, v.type.tensor_type.elem_type) for v in graph.graph.output] == [
            (v.name, v.type.tensor_type.elem_type) for v in src.output]
        assert ops["Cast"] >= report.casts
        weight_bytes = lambda g: sum(  # noqa: E731
            numpy_helper.to_array(t).nbytes for t in g.initializer)
        assert weight_bytes(graph.graph) < 0.6 * weight_bytes(onnx.load(
            str(export / f"{model}.onnx")).graph)


@pytest.mark.parametrize("runtime", fp16.RUNTIMES)
@pytest.mark.parametrize("fp32_attention", [False, True])
def test_fp16_graph_matches_fp32_on_the_cpu(export, real_inputs, tmp_path, fp32_attention,
                                            runtime):
    """What CI can check without a GPU: the FP16 graph on the CPU (ONNX Runtime, and FP16
    arithmetic as written) against the FP32 graph in ONNX Runtime, on the photo and real
    class names, cosine >= 0.999 per output."""
    policy = fp16.Fp16Policy(fp32_attention=fp32_attention)
    for model in specs.GRAPH_MODELS:
        half = tmp_path / f"{model}.fp16.onnx"
        report = fp16.convert_file(export / f"{model}.onnx", half, policy)
        if fp32_attention:
            assert report.folded_scales == 0 and report.fp32_op_types["Softmax"] >= 1
        figures = fp16.compare_with_fp32(export / f"{model}.onnx", half, real_inputs[model],
                                         runtime)
        for name, fig in figures.items():
            assert fig["cosine"] >= MIN_COSINE, (model, name, fig)
            assert fig["max_abs"] > 0, (model, name)  # it really ran in FP16


def _attention_graph(path: Path, head_dim: int) -> Path:
    """softmax(Q·Kᵀ·s)·V as the restructured backbone exports it (scale after Q·Kᵀ)."""
    mk, vi = helper.make_node, helper.make_tensor_value_info
    scale = numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale")
    graph = helper.make_graph(
        [mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), mk("MatMul", ["q", "kt"], ["s"]),
         mk("Mul", ["s", "scale"], ["ss"]), mk("Softmax", ["ss"], ["p"], axis=-1),
         mk("MatMul", ["p", "v"], ["out"])], "attention",
        [vi(n, FLOAT, [2, 16, head_dim]) for n in ("q", "k", "v")],
        [vi("out", FLOAT, [2, 16, head_dim])], [scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_the_cpu_check_catches_fp16_that_breaks(tmp_path):
    """The comparison is not vacuous: large activations make an FP16 Q·Kᵀ overflow (inf,
    then NaN after the softmax) when the scale comes after it; the pass scales Q first and
    passes. ONNX Runtime's x86 kernels compute that matmul in FP32 and miss it; FP16
    arithmetic as written catches it."""
    src = _attention_graph(tmp_path / "attn.onnx", head_dim=128)
    rng = np.random.default_rng(0)
    x = {n: rng.normal(25, 5, (2, 16, 128)).astype(np.float32) for n in ("q", "k", "v")}
    report = fp16.convert_file(src, tmp_path / "ok.onnx")
    assert report.attention_blocks == report.folded_scales == 1
    fp16.convert_file(src, tmp_path / "bad.onnx", fp16.Fp16Policy(fold_attention_scales=False))
    for runtime in fp16.RUNTIMES:
        good = fp16.compare_with_fp32(src, tmp_path / "ok.onnx", x, runtime)
        assert good["out"]["cosine"] > MIN_COSINE, runtime
    bad = fp16.compare_with_fp32(src, tmp_path / "bad.onnx", x, "onnx-reference")
    assert not bad["out"]["cosine"] >= MIN_COSINE  # NaN: 25·25·128 = 80,000 > 65504
    from onnx.reference import ReferenceEvaluator

    with np.errstate(all="ignore"):
        got = ReferenceEvaluator(str(tmp_path / "bad.onnx")).run(["out"], x)[0]
    with pytest.raises(plan_verify.VerificationError, match=r"out has \d+ non-finite values"):
        plan_verify.compare_outputs("backbone", plan_verify.onnx_reference(src)(x),
                                    {"out": got})
    with pytest.raises(ValueError, match="runtime must be one of"):
        fp16.compare_with_fp32(src, tmp_path / "ok.onnx", x, "tensorrt")


def test_conversion_refusals_and_command_line(export, tmp_path, capsys):
    half = tmp_path / "backbone.fp16.onnx"
    assert fp16.main([str(export / "backbone.onnx"), str(half)]) == 0
    assert "attention blocks" in capsys.readouterr().out
    assert fp16.main([str(half), str(tmp_path / "again.onnx")]) == 1
    err = capsys.readouterr().err
    assert "already holds FP16 weights" in err and err.count("\n") == 1
    assert fp16.fp16_path(Path("/x/enc_dec.onnx")) == Path("/x/enc_dec.fp16.onnx")
    assert fp16.Fp16Policy().record()["pass_version"] == fp16.PASS_VERSION


def test_large_graphs_keep_external_weights(tmp_path, monkeypatch):
    """Weights over the threshold go to one external file beside the FP16 graph (a ViT-H
    is over protobuf's 2 GiB in FP32 and over 1 GiB in FP16)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 64])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")])
    src = tmp_path / "src" / "mm.onnx"
    src.parent.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                    str(src), save_as_external_data=True, location="mm.onnx.data",
                    size_threshold=0)
    monkeypatch.setattr(fp16, "EXTERNAL_DATA_BYTES", 1024)
    dst = tmp_path / "out" / "mm.fp16.onnx"
    fp16.convert_file(src, dst)
    assert (dst.parent / "mm.fp16.onnx.data").stat().st_size == 64 * 64 * 2
    x = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    assert fp16.compare_with_fp32(src, dst, x)["y"]["cosine"] > 0.9999


# The whole build on the real export, with the recording TensorRT stand-ins -----------------


@pytest.mark.parametrize("version", ["10.9.0.34", "11.4.0.106"])
def test_build_plans_on_the_real_export(export, tmp_path, monkeypatch, capsys, version):
    """The exporter's graphs through profiles, (FP16 conversion,) the builder calls, the
    runner and verification on the photo and real class names."""
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(version))
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    # The tiny random SAM3 is ~10x touchier than a trained one (1e-3 relative noise on its
    # FPN features moves boxes by 0.01), so its FP16 boxes get a looser bar here.
    res = tensorrt_build.build_plans(export, tmp_path / "repo", {
        "buckets": (1, 2, 4), "tolerances": {"max_abs_boxes": 0.1}})
    ed, bb = res["enc_dec"], res["backbone"]
    assert ed["graph_dims"]["imgsz"] == bb["imgsz"] and ed["max_classes"] == 4
    assert {r["label"] for r in ed["verification"]["runs"]} == {
        f"text features of 4 COCO names, N={n}" for n in (1, 2, 3, 4)}
    text = ed["verification"]["inputs"]["text"]
    assert text.startswith("text features of 4 COCO names (person, ...) from the checkpoint")
    assert bb["verification"]["inputs"]["pixels"] == "photo verify_astronaut.jpg"
    strong = version.startswith("11")
    assert bb["typing"] == ("strong" if strong else "weak")
    for info in res.values():
        worst = info["verification"]["worst"]
        assert all(f["cosine"] >= MIN_COSINE for f in worst.values())
        # FP16 from the graph differs from FP32; the weak stand-in runs the FP32 graph as is
        assert any(f["max_abs"] > 0 for f in worst.values()) == strong
    out = capsys.readouterr().out
    assert f"TensorRT {version}: {bb['typing']}ly typed" in out
    assert "enc_dec: verified against onnxruntime cpu fp32" in out


# On a lent GPU: the FP32 reference is the restructured PyTorch modules ---------------------


def _need_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA")


@pytest.mark.gpu
def test_reference_on_the_gpu_matches_onnxruntime(export, tiny_checkpoint, real_inputs):
    _need_cuda()
    graphs = {m: export / f"{m}.onnx" for m in specs.GRAPH_MODELS}
    gpu = plan_verify.pick_reference(graphs, _dims(export), tiny_checkpoint)
    assert isinstance(gpu, plan_verify.TorchCudaReference)
    assert gpu.name == "torch cuda fp32 (restructured modules)"
    cpu = plan_verify.OnnxCpuReference(graphs)
    for model in specs.GRAPH_MODELS:
        want, got = cpu.run(model, real_inputs[model]), gpu.run(model, real_inputs[model])
        for name in want:
            assert plan_verify.cosine(want[name], got[name]) >= 0.99999, (model, name)


@pytest.mark.gpu
def test_build_verifies_against_the_gpu_reference(export, tmp_path, monkeypatch):
    _need_cuda()
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("11.4.0.106"))
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    res = tensorrt_build.build_plans(export, tmp_path / "repo", {
        "buckets": (1, 4), "tolerances": {"max_abs_boxes": 0.1}})
    for info in res.values():
        assert info["verification"]["reference"] == "torch cuda fp32 (restructured modules)"


def test_build_plans_into_a_repository_uses_its_text_encoder(export, tiny_checkpoint, tmp_path,
                                                             monkeypatch):
    """`dart-triton build --no-plans` then `build-plans` on the serving GPU: verification
    encodes the class names with the repository's own text encoder."""
    from dart_triton.export.repository import build_repository

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.9.0.34"))
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    repo = tmp_path / "repo"
    build_repository(tiny_checkpoint, repo, backend="tensorrt", max_classes=4,
                     build_plans=False, log=lambda *_: None)
    assert not list(repo.rglob("model.plan"))
    res = tensorrt_build.build_plans(export, repo, {"max_classes": 4})
    text = res["enc_dec"]["verification"]["inputs"]["text"]
    assert text.endswith(f"from {plan_verify.text_encoder_dir(repo)}")
