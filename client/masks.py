"""The masks `dart` returns (``masks=True``): COCO compressed RLE, decoded with pycocotools.

``Detections.masks[i]`` holds the RLE ``counts`` of detection ``i`` and
``Detections.image_size`` the (H, W) it is at; `rle` joins them into what
``pycocotools.mask.decode`` takes, `decode_masks` decodes them all at once.
"""

from __future__ import annotations

import numpy as np

from dart_triton.contract.detections import Detections


def rle(detections: Detections, i: int) -> dict:
    """The COCO RLE ``{"size": [H, W], "counts": bytes}`` of detection ``i``'s mask."""
    return detections.rle(i)


def decode_masks(detections: Detections) -> np.ndarray:
    """bool ``[K, H, W]``: every detection's mask at the image's size; ValueError without
    masks or for counts that do not fill exactly H x W pixels."""
    from pycocotools import mask as mask_utils

    if detections.masks is None or detections.image_size is None:
        raise ValueError("these detections have no masks (ask for them: masks=True)")
    h, w = detections.image_size
    if not len(detections):
        return np.zeros((0, h, w), dtype=bool)
    for i, counts in enumerate(detections.masks):
        # pycocotools' decoder trusts the runs to fill H x W exactly (it writes past its
        # buffer otherwise): an answer that does not is refused first.
        runs = run_lengths(counts)
        if runs is None or sum(runs) != h * w:
            raise ValueError(f"malformed mask {i}: its RLE does not cover {h}x{w} pixels")
    decoded = mask_utils.decode([detections.rle(i) for i in range(len(detections))])
    return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)  # from [H, W, K]


def run_lengths(counts: bytes) -> list[int] | None:
    """The run lengths of COCO compressed-RLE ``counts`` (pycocotools' rleFrString: 5 bits
    a character, offset 48, the third run on stored as a difference); None when malformed."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts):
                return None
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


def encode_mask(mask: np.ndarray) -> bytes:
    """The COCO RLE counts of one bool ``[H, W]`` mask (what `dart` sends as MASKS)."""
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def largest_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The outline of the mask's largest part as ``[N, 2]`` (x, y) pixels, N >= 3; None when
    the mask has no such outline (empty, or a line a pixel thin). Needs OpenCV."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    outlines = [c.reshape(-1, 2) for c in contours if len(c) >= 3]
    if not outlines:
        return None
    return max(outlines, key=lambda c: cv2.contourArea(c.astype(np.float32)))
