"""Exported graphs: ONNX Runtime == PyTorch, no fused attention, dynamic N."""

import json

import numpy as np
import onnx
import pytest

from dart_triton import specs
from dart_triton.cli import main as cli
from dart_triton.export.onnx_export import (
    FUSED_ATTENTION_OPS,
    MIN_COSINE,
    export_graphs,
    fused_attention_nodes,
)
from dart_triton.runtime import OrtGraph


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


def test_cli_export_with_mask_levels(tiny_checkpoint, tmp_path, capsys):
    code = cli(["export", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path),
                "--max-classes", "2", "--with-mask-levels"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cosine" in printed and "FAIL" not in printed
    graph = onnx.load(str(tmp_path / "backbone.onnx")).graph
    assert [o.name for o in graph.output] == [
        specs.FPN_FEATURES, specs.FPN_FEATURES_4X, specs.FPN_FEATURES_2X]
    assert json.loads((tmp_path / "dart_graphs.json").read_text())["dims"]["max_classes"] == 2


def test_cli_export_bad_checkpoint(tmp_path, capsys):
    assert cli(["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
