"""Batched detection-only enc-dec == Sam3Model run once per prompt."""

import pytest
import torch

from dart_triton.model.parts import load_parts
from dart_triton.model.text_encoder import TextEncoder
from tests.tolerances import HEAD_ATOL

PROMPTS = ["person", "a red car", "dog", "traffic light", "umbrella", "cup", "kite", "bus"]


@pytest.mark.parametrize("n", [1, 3, "max"])
def test_batched_equals_per_prompt(any_tiny_checkpoint, n):
    parts = load_parts(any_tiny_checkpoint, max_classes=5)
    n = parts.dims.max_classes if n == "max" else n
    size = parts.dims.imgsz
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    feats_np, mask_np = TextEncoder.from_sam3(parts.model, parts.tokenizer).encode(PROMPTS[:n])
    with torch.no_grad():
        features = parts.backbone(x)[0]
        boxes, logits, presence = parts.head(features, torch.from_numpy(feats_np),
                                             torch.from_numpy(mask_np))
        assert boxes.shape == (n, parts.dims.num_queries, 4)
        assert logits.shape == (n, parts.dims.num_queries) and presence.shape == (n, 1)
        for i, prompt in enumerate(PROMPTS[:n]):
            tok = parts.tokenizer([prompt], padding="max_length", max_length=32,
                                  return_tensors="pt")
            ref = parts.model(pixel_values=x, input_ids=tok["input_ids"],
                              attention_mask=tok["attention_mask"])
            assert (boxes[i] - ref.pred_boxes[0]).abs().max() <= HEAD_ATOL
            assert (logits[i] - ref.pred_logits[0]).abs().max() <= HEAD_ATOL
            assert (presence[i] - ref.presence_logits[0]).abs().max() <= HEAD_ATOL


def test_a_shared_pass_gives_each_frame_what_it_gets_alone(tiny_checkpoint):
    """Rows of three frames in one pass (frame_index), in a mixed order: every row equals
    the same prompt decoded with its own frame alone (the image-only work ran per frame)."""
    parts = load_parts(tiny_checkpoint, max_classes=5)
    size = parts.dims.imgsz
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, size, size, generator=gen)
    feats_np, mask_np = TextEncoder.from_sam3(parts.model, parts.tokenizer).encode(PROMPTS[:6])
    text, mask = torch.from_numpy(feats_np), torch.from_numpy(mask_np)
    index = torch.tensor([2, 0, 0, 1, 2, 0])
    with torch.no_grad():
        features = torch.cat([parts.backbone(pixels[k:k + 1])[0] for k in range(3)])
        shared = parts.head(features, text, mask, index)
        for k in range(3):
            rows = index == k
            alone = parts.head(features[k:k + 1], text[rows], mask[rows])
            for s, a in zip(shared, alone, strict=True):
                torch.testing.assert_close(s[rows], a, atol=1e-5, rtol=1e-5)
