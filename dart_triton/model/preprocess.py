"""Image -> pixel values, with the semantics of SAM3's processor in `transformers`.

Resize to imgsz x imgsz (bilinear, antialiased like PIL), scale to [0, 1], normalise
with mean = std = 0.5. torch does the resize so the same code runs on CPU or GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from dart_triton.contract.validation import check_image

MEAN = 0.5
STD = 0.5


def preprocess(image: np.ndarray, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """UINT8 [H, W, 3] RGB -> (pixel_values FP32 [1, 3, S, S], original_size INT32 [H, W])."""
    image = check_image(image)
    # The float conversion is a copy either way; doing it in numpy gives torch a writable
    # array, where torch.from_numpy on a read-only one (np.asarray of a PIL image) warns.
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return preprocess_tensor(pixels, imgsz).numpy(), np.array(image.shape[:2], dtype=np.int32)


def preprocess_tensor(image: torch.Tensor, imgsz: int) -> torch.Tensor:
    """UINT8 (or float, 0-255) [H, W, 3] tensor, any device -> FP32 [1, 3, S, S] on it."""
    x = image.permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(
        x, size=(imgsz, imgsz), mode="bilinear", align_corners=False, antialias=True
    )
    # Round-and-clamp like PIL's 8-bit resize, so features match the reference processor.
    x = x.round().clamp(0, 255)
    return ((x / 255.0 - MEAN) / STD).contiguous()
