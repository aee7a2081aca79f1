"""Restructured backbone == transformers' Sam3VisionModel, on every level it returns."""

import pytest
import torch

from dart_triton.contract.specs import SAM3_SCALE_FACTORS
from dart_triton.model.backbone import RestructuredBackbone
from dart_triton.model.checkpoint import load_sam3
from dart_triton.model.parts import graph_dims
from tests.helpers import mask_levels
from tests.tolerances import HEAD_ATOL


@pytest.mark.parametrize("levels", ["detect", "all"])
def test_matches_reference(any_tiny_checkpoint, levels):
    model = load_sam3(any_tiny_checkpoint)
    size = model.config.vision_config.backbone_config.image_size
    chosen = mask_levels(model.vision_encoder) if levels == "all" else None
    ours = RestructuredBackbone(model.vision_encoder, size, chosen).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.vision_encoder(x).fpn_hidden_states
        out = ours(x)
    scales = tuple(model.config.vision_config.scale_factors)
    # Sam3Model keeps every level but the last (the mask head reads them all)
    assert len(out) == (len(scales) - 1 if levels == "all" else 1)
    for level, got in zip(ours.levels, out, strict=True):
        assert got.shape == ref[level].shape
        assert (got - ref[level]).abs().max().item() <= HEAD_ATOL
    # detection reads the level Sam3Model feeds its enc-dec: fpn_hidden_states[:-1][-1]
    assert (out[0] - ref[:-1][-1]).abs().max().item() <= HEAD_ATOL
    assert out[0].shape[-1] == graph_dims(model).feat_hw
    if scales == SAM3_SCALE_FACTORS:
        # detection reads the 1x level: imgsz / 14 per side
        assert out[0].shape[-1] == size // 14
    else:  # variant c, scales [4, 2, 1]: the 2x level, stride 7
        assert out[0].shape[-1] == 2 * (size // 14) and graph_dims(model).detection_stride == 7


def test_other_resolution_rebuilds_rope(tiny_checkpoint):
    model = load_sam3(tiny_checkpoint, imgsz=154)
    ours = RestructuredBackbone(model.vision_encoder, 154).eval()
    x = torch.randn(1, 3, 154, 154)
    with torch.no_grad():
        ref = model.vision_encoder(x).fpn_hidden_states[2]
        assert (ours(x)[0] - ref).abs().max().item() <= HEAD_ATOL


def test_resolution_checks(tiny_checkpoint):
    model = load_sam3(tiny_checkpoint)
    with pytest.raises(ValueError, match="multiple of 14"):
        RestructuredBackbone(model.vision_encoder, 100)
    with pytest.raises(ValueError, match="configured for 112x112"):
        RestructuredBackbone(model.vision_encoder, 140)


def test_export_at_pretraining_size(tiny_checkpoint, tmp_path):
    """At the ViT's pretraining size the position embedding is the parameter itself."""
    from dart_triton.export.onnx_export import export_backbone
    from dart_triton.model.parts import load_parts

    parts = load_parts(tiny_checkpoint, imgsz=56)  # tiny variant a: pretrain_image_size 56
    assert export_backbone(parts, tmp_path).is_file()
