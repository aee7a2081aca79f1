"""The mask head for kept detections equals SAM3's own mask decoder, query by query."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dart_triton.model.checkpoint import TEXT_MAX_LENGTH
from dart_triton.model.parts import load_parts
from dart_triton.model.preprocess import preprocess
from dart_triton.model.text_encoder import TextEncoder
from tests.conftest import TEST_MAX_CLASSES
from tests.parity import NAMES
from tests.tolerances import MASK_LOGIT_RTOL


@pytest.fixture(scope="module")
def mask_parts(any_tiny_checkpoint):
    return load_parts(any_tiny_checkpoint, max_classes=TEST_MAX_CLASSES, masks=True)


@torch.no_grad()
def test_kept_queries_get_sam3s_mask_logits(mask_parts, photo):
    """Prompts 0 and 2 of three, queries picked out of order: each row is Sam3Model's
    pred_masks for that prompt and query (the detection head's memory and queries in)."""
    parts = mask_parts
    pixels, _ = preprocess(photo, parts.dims.imgsz)
    names = NAMES[:3]
    text, mask = TextEncoder.from_sam3(parts.model, parts.tokenizer).encode(names)
    levels = parts.backbone(torch.from_numpy(pixels))
    assert len(levels) == 1 + len(parts.dims.mask_levels)
    _, _, _, memory, queries = parts.head(levels[0], torch.from_numpy(text),
                                          torch.from_numpy(mask))
    prompts, picks = [0, 2], [[5, 0, 3], [1, 1, 4]]  # variant c has 6 queries
    kept = torch.stack([queries[p][q] for p, q in zip(prompts, picks, strict=True)])
    got = parts.mask_head(*levels[1:], memory[prompts], torch.from_numpy(text[prompts]),
                          torch.from_numpy(mask[prompts]), kept)
    m = parts.dims.mask_hw
    assert got.shape == (2, 3, m, m)
    for row, (p, q) in enumerate(zip(prompts, picks, strict=True)):
        tok = parts.tokenizer([names[p]], padding="max_length", max_length=TEXT_MAX_LENGTH,
                              truncation=True, return_tensors="pt")
        ref = parts.model(pixel_values=torch.from_numpy(pixels), input_ids=tok["input_ids"],
                          attention_mask=tok["attention_mask"]).pred_masks[0, q]
        scale = float(ref.abs().max())
        np.testing.assert_allclose(got[row].numpy(), ref.numpy(), rtol=0,
                                   atol=MASK_LOGIT_RTOL * scale)


def test_detection_head_hands_over_mask_inputs_only_when_built_with_masks(tiny_checkpoint):
    plain = load_parts(tiny_checkpoint, max_classes=2)
    d = plain.dims
    out = plain.head(torch.zeros(1, d.fpn_dim, d.feat_hw, d.feat_hw),
                     torch.zeros(2, d.text_len, d.text_dim),
                     torch.ones(2, d.text_len, dtype=torch.int32))
    assert len(out) == 3 and plain.mask_head is None
