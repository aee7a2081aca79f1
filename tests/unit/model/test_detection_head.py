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
