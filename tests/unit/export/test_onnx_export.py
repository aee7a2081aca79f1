"""Exported graphs: ONNX Runtime == PyTorch, no fused attention, dynamic N."""

import json

import numpy as np
import onnx
import pytest

from dart_triton.cli import main as cli
from dart_triton.contract import specs
from dart_triton.export.onnx_export import (
    FUSED_ATTENTION_OPS,
    GRAPHS_JSON,
    MIN_COSINE,
    export_graphs,
    fused_attention_nodes,
    read_graphs_meta,
)
from dart_triton.export.tensorrt.profiles import graph_dims_from_onnx, read_onnx_io
from dart_triton.graphs.runtime import OrtGraph
from dart_triton.model.checkpoint import load_sam3


@pytest.fixture(scope="module")
def exported(any_tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    meta, agreements = export_graphs(any_tiny_checkpoint, out, max_classes=4, log=lambda *_: None)
    return out, meta, agreements


def test_ort_matches_pytorch(exported):
    _, _, agreements = exported
    assert {a.tensor for a in agreements} == {
        specs.FPN_FEATURES, specs.PRED_BOXES, specs.PRED_LOGITS, specs.PRESENCE_LOGITS}
    for a in agreements:
        assert a.cosine >= MIN_COSINE, a


def test_backbone_graph_has_explicit_attention(exported):
    out, _, _ = exported
    graph = onnx.load(str(out / "backbone.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & FUSED_ATTENTION_OPS and fused_attention_nodes(out / "backbone.onnx") == []
    # explicit softmax(Q·Kᵀ·scale)·V per block, real-valued RoPE (no complex ops)
    assert {"Softmax", "MatMul"} <= ops
    assert sum(n.op_type == "Softmax" for n in graph.node) >= 2
    assert not any(n.op_type.startswith("DFT") for n in graph.node)
    assert not any(i.name == "If" or n.op_type == "If" for n in graph.node for i in [n])


def test_graph_io_matches_specs(exported):
    out, meta, _ = exported
    dims = specs.GraphDims(**meta["dims"])
    for name, spec in (("backbone", specs.backbone_spec(dims)),
                       ("enc_dec", specs.enc_dec_spec(dims))):
        graph = onnx.load(str(out / f"{name}.onnx")).graph
        assert [i.name for i in graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in graph.output] == [t.name for t in spec.outputs]


@pytest.mark.parametrize("n", [1, 4])
def test_enc_dec_prompt_count_is_dynamic(exported, n):
    out, meta, _ = exported
    d = specs.GraphDims(**meta["dims"])
    rng = np.random.default_rng(0)
    boxes, logits, presence = OrtGraph(out / "enc_dec.onnx")(
        fpn_features=rng.standard_normal((1, d.fpn_dim, d.feat_hw, d.feat_hw), np.float32),
        text_features=rng.standard_normal((n, d.text_len, d.text_dim), np.float32),
        text_mask=np.ones((n, d.text_len), np.int32))
    assert boxes.shape == (n, d.num_queries, 4) and presence.shape == (n, 1)


def test_cli_export_with_masks(tiny_checkpoint, tmp_path, capsys):
    code = cli(["export", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path),
                "--max-classes", "2", "--masks"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cosine" in printed and "FAIL" not in printed
    assert "mask_logits" in printed and "encoder_memory" in printed  # each checked vs PyTorch
    graph = onnx.load(str(tmp_path / "backbone.onnx")).graph
    assert [o.name for o in graph.output] == [
        specs.FPN_FEATURES, specs.FPN_FEATURES_4X, specs.FPN_FEATURES_2X]
    dims = read_graphs_meta(tmp_path)
    for name, spec in ((specs.ENC_DEC, specs.enc_dec_spec(dims)),
                       (specs.MASK_DECODER, specs.mask_decoder_spec(dims))):
        io = read_onnx_io(tmp_path / f"{name}.onnx")
        assert list(io.inputs) == [t.name for t in spec.inputs]
        assert list(io.outputs) == [t.name for t in spec.outputs]
    assert json.loads((tmp_path / "dart_graphs.json").read_text())["dims"]["max_classes"] == 2


def test_detection_level_recorded_and_read_back(exported):
    """dart_graphs.json carries the checkpoint's scales; the graphs, the JSON and the
    TensorRT builder's reading of the graphs agree on the detection grid."""
    out, meta, _ = exported
    config = load_sam3(meta["checkpoint"]).config.vision_config
    dims = read_graphs_meta(out)
    assert dims.scale_factors == tuple(config.scale_factors)
    level = meta["detection_level"]
    assert (level["index"], level["feat_hw"]) == (dims.detection_level, dims.feat_hw)
    bb, ed = read_onnx_io(out / "backbone.onnx"), read_onnx_io(out / "enc_dec.onnx")
    h = dims.feat_hw
    assert bb.outputs[specs.FPN_FEATURES] == ed.inputs[specs.FPN_FEATURES] == (1, dims.fpn_dim,
                                                                               h, h)
    assert graph_dims_from_onnx(bb, ed, dims.max_classes, meta["dims"]) == dims
    assert graph_dims_from_onnx(None, ed, dims.max_classes, meta["dims"]) == dims


def test_graphs_json_without_scales_reads_as_stride_14(tmp_path):
    """A dart_graphs.json written before the scales were recorded (it had `extra`)."""
    dims = {"imgsz": 644, "fpn_dim": 256, "text_len": 32, "text_dim": 256, "num_queries": 200,
            "max_classes": 8, "masks": False, "extra": {}}
    (tmp_path / GRAPHS_JSON).write_text(json.dumps({"dims": dims}))
    d = read_graphs_meta(tmp_path)
    assert d.scale_factors == specs.SAM3_SCALE_FACTORS
    assert (d.feat_hw, d.detection_stride, d.max_classes) == (46, 14, 8)


def test_cli_export_detection_level_not_at_stride_14(tiny_checkpoint_c, tmp_path, capsys):
    """Variant c (scales [4, 2, 1]): detection on the 2x level, one mask level at 4x."""
    code = cli(["export", "--checkpoint", str(tiny_checkpoint_c), "--output", str(tmp_path),
                "--max-classes", "2", "--masks"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cosine" in printed and "FAIL" not in printed
    bb = read_onnx_io(tmp_path / "backbone.onnx")
    ed = read_onnx_io(tmp_path / "enc_dec.onnx")
    grid = 126 // 14
    assert bb.outputs == {specs.FPN_FEATURES: (1, 16, 2 * grid, 2 * grid),
                          specs.FPN_FEATURES_4X: (1, 16, 4 * grid, 4 * grid)}
    assert ed.inputs[specs.FPN_FEATURES] == (1, 16, 2 * grid, 2 * grid)
    dims = read_graphs_meta(tmp_path)
    assert dims.masks and dims.detection_stride == 7
    for spec, io in ((specs.backbone_spec(dims), bb), (specs.enc_dec_spec(dims), ed)):
        assert {t.name: t.dims for t in spec.outputs if -1 not in t.dims} == {
            k: v for k, v in io.outputs.items() if -1 not in v}
    hint = json.loads((tmp_path / GRAPHS_JSON).read_text())["dims"]
    assert graph_dims_from_onnx(bb, ed, 2, hint) == dims
    # without the recorded scales the graphs cannot be read as SAM3's stride-14 layout
    with pytest.raises(ValueError, match=r"fpn_features is 18x18, but 126 px .* 9x9"):
        graph_dims_from_onnx(bb, ed, 2)


def test_cli_export_bad_checkpoint(tmp_path, capsys):
    assert cli(["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_one_frame_export_is_fixed_and_recorded(exported):
    out, meta, _ = exported
    assert meta["backbone_frames"] == 1
    io = read_onnx_io(out / "backbone.onnx")
    assert {shape[0] for shape in (*io.inputs.values(), *io.outputs.values())} == {1}


def test_max_batch_export_takes_any_number_of_frames(tiny_checkpoint_d, tmp_path):
    """--max-batch > 1: dim 0 of backbone.onnx's input and outputs is "frames"; the windowed
    and global blocks, position embedding and every FPN level agree with PyTorch on three
    different frames at once; dart_graphs.json says so, and a reused --onnx-dir with the
    other frame count is not taken as is. With shared passes (the python backend),
    enc_dec.onnx also takes F frames and a frame index, and a pass of two frames' rows
    agrees with PyTorch decoding each frame alone (masks' outputs too)."""
    from dart_triton.export.onnx_export import CHECK_FRAMES, DYNAMIC_FRAMES
    from dart_triton.export.repository import _graphs_match

    meta, agreements = export_graphs(tiny_checkpoint_d, tmp_path, max_classes=2, masks=True,
                                     log=lambda *_: None, max_batch=4, shared_passes=True)
    assert meta["backbone_frames"] == meta["enc_dec_frames"] == DYNAMIC_FRAMES
    shared = {a.tensor for a in agreements if "[shared" in a.tensor}
    enc_dec = specs.enc_dec_spec(read_graphs_meta(tmp_path), frames=True)
    assert shared == {f"{t.name}[shared, frame {k}]" for t in enc_dec.outputs for k in (0, 1)}
    assert list(read_onnx_io(tmp_path / "enc_dec.onnx").inputs) == [t.name for t in
                                                                   enc_dec.inputs]
    spec = specs.backbone_spec(read_graphs_meta(tmp_path))
    batched = {a.tensor: a for a in agreements if "frames]" in a.tensor}
    assert set(batched) == {f"{t.name}[{CHECK_FRAMES} frames]" for t in spec.outputs}
    for a in agreements:
        assert a.cosine >= MIN_COSINE, a
    io = read_onnx_io(tmp_path / "backbone.onnx")
    assert {shape[0] for shape in (*io.inputs.values(), *io.outputs.values())} == {-1}
    graph = onnx.load(str(tmp_path / "backbone.onnx"), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "frames"
    assert _graphs_match(tmp_path, None, 2, masks=True, max_batch=4, shared_passes=True)
    assert not _graphs_match(tmp_path, None, 2, masks=True, max_batch=4)  # onnxruntime's
    assert not _graphs_match(tmp_path, None, 2, masks=True, max_batch=1)
    fixed = json.loads((tmp_path / GRAPHS_JSON).read_text())
    del fixed["backbone_frames"], fixed["enc_dec_frames"]  # from before the records: one frame
    (tmp_path / GRAPHS_JSON).write_text(json.dumps(fixed))
    assert _graphs_match(tmp_path, None, 2, masks=True, max_batch=1)
    assert not _graphs_match(tmp_path, None, 2, masks=True, max_batch=4)
