"""Mask logits -> COCO compressed RLE at the image's size, a bounded block at a time.

What `Sam3Processor.post_process_instance_segmentation` does to a query's mask: sigmoid,
bilinear resize to the image (align_corners false), then ``> mask_threshold``. Done here
without ever holding every mask at image size: a request for 1000 detections on an
8192 x 8192 image would otherwise hold 1000 x 64 MiB. Each mask is resized only where it
can exceed the threshold (bilinear output is a convex combination of the 4 nearest
logits, so it exceeds the threshold only next to a cell that does), in row bands of at
most `MASK_BLOCK_PIXELS`, and run-length encoded column by column as COCO RLE wants.
The interpolation weights are PyTorch's (`upsample_bilinear2d`: along width, then height).
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as coco_mask

from dart_triton.contract.specs import MASK_BLOCK_PIXELS


def _taps(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(lower index, upper index, upper weight) per output pixel, as PyTorch computes them
    for bilinear with align_corners false (float32 source coordinates, clamped at 0)."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    dst = torch.arange(out_size, dtype=torch.float32)
    src = ((dst + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().to(torch.int64).clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo.to(device), hi.to(device), (src - lo).to(device)


def _span(lo: torch.Tensor, hi: torch.Tensor, first: int, last: int) -> tuple[int, int]:
    """Output pixels [start, stop) whose taps reach input cells [first, last]."""
    start = int(torch.searchsorted(hi, first))  # first pixel with hi >= first
    stop = int(torch.searchsorted(lo, last, right=True))  # pixels with lo <= last
    return start, stop


def _coco_rle(columns: np.ndarray, before: int, after: int, size: tuple[int, int]) -> bytes:
    """Compressed RLE counts of a mask that is `before` zeros, then `columns` (bool
    [H, w], column-major), then `after` zeros."""
    flat = columns.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    if flat.size and flat[0]:  # COCO counts start with a run of zeros
        runs.insert(0, 0)
    if flat.size and flat[-1]:
        runs.append(0)
    if not runs:
        runs = [0]
    runs[0] += before
    runs[-1] += after
    h, w = size
    return coco_mask.frPyObjects({"size": [h, w], "counts": runs}, h, w)["counts"]


def mask_rle(probs: torch.Tensor, size: tuple[int, int], threshold: float,
             block_pixels: int = MASK_BLOCK_PIXELS) -> bytes:
    """One mask's probabilities [m, m'] -> COCO compressed RLE counts at `size` (H, W)."""
    h, w = (int(v) for v in size)
    above = probs > threshold
    if not bool(above.any()):
        return _coco_rle(np.zeros((0, 0), bool), h * w, 0, (h, w))
    rows = torch.nonzero(above.any(dim=1)).flatten()
    cols = torch.nonzero(above.any(dim=0)).flatten()
    y_lo, y_hi, y_w = _taps(h, probs.shape[0], probs.device)
    x_lo, x_hi, x_w = _taps(w, probs.shape[1], probs.device)
    y0, y1 = _span(y_lo, y_hi, int(rows[0]), int(rows[-1]))
    x0, x1 = _span(x_lo, x_hi, int(cols[0]), int(cols[-1]))
    xs = slice(x0, x1)
    across = probs[:, x_lo[xs]] * (1 - x_w[xs]) + probs[:, x_hi[xs]] * x_w[xs]  # [m, x1-x0]
    columns = np.zeros((h, x1 - x0), dtype=bool, order="F")
    band = max(1, block_pixels // max(1, x1 - x0))
    for top in range(y0, y1, band):
        ys = slice(top, min(top + band, y1))
        wy = y_w[ys, None]
        rows_out = across[y_lo[ys]] * (1 - wy) + across[y_hi[ys]] * wy
        columns[ys] = (rows_out > threshold).cpu().numpy()
    return _coco_rle(columns, x0 * h, (w - x1) * h, (h, w))


def mask_rles(logits: torch.Tensor, size: tuple[int, int], threshold: float,
              block_pixels: int = MASK_BLOCK_PIXELS) -> list[bytes]:
    """Mask logits [K, m, m'] (any device) -> K COCO compressed RLE counts at `size`."""
    probs = torch.sigmoid(logits.float())
    return [mask_rle(p, size, threshold, block_pixels) for p in probs]


def decode_rle(counts: bytes, size: tuple[int, int]) -> np.ndarray:
    """COCO compressed RLE counts -> bool [H, W] (tests and references)."""
    return coco_mask.decode({"size": [int(size[0]), int(size[1])], "counts": counts}).astype(bool)
