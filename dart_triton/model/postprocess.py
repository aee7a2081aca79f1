"""Raw head outputs -> detections (SAM3 processor semantics, plus NMS and a cap).

score = sigmoid(logit) * sigmoid(presence): the presence token gates every query of a
class at once, so a class absent from the image scores low everywhere (DART §3.2).

The work runs where the inputs are: torch tensors on a GPU stay there (NMS too); numpy
arrays run as CPU tensors that share their memory. NMS is torchvision's
(`batched_nms`), fed the candidates in a stable score order. Results come back as numpy.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms

from dart_triton.contract.detections import Detections
from dart_triton.contract.specs import PRE_NMS_TOPK, PRE_NMS_TOPK_PER_GROUP
from dart_triton.contract.validation import DetectOptions

Array = np.ndarray | torch.Tensor
DEFAULT_OPTIONS = DetectOptions()


def _tensor(x: Array, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """x as a torch tensor (numpy: sharing its memory where the dtype allows)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _best_per_group(order: torch.Tensor, groups: torch.Tensor, limit: int) -> torch.Tensor:
    """The entries of `order` (indices by descending score) that are among the best
    `limit` of their group; score order kept."""
    in_order = groups[order]
    perm = torch.sort(in_order, stable=True).indices  # group by group, score order inside
    counts = torch.unique_consecutive(in_order[perm], return_counts=True)[1]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(perm), device=order.device) - torch.repeat_interleave(starts, counts)
    best = torch.zeros_like(order, dtype=torch.bool)
    best[perm[rank < limit]] = True
    return order[best]


def nms(boxes: Array, scores: Array, groups: Array, iou: float, *,
        max_candidates: int | None = PRE_NMS_TOPK,
        max_per_group: int | None = PRE_NMS_TOPK_PER_GROUP) -> Array:
    """Greedy NMS within each group; indices kept, by descending score (ties: lower index).

    Boxes of different groups never suppress each other; a box is suppressed by a kept,
    better-ranked box of its group with IoU > `iou`. Only the best `max_per_group` boxes
    of a group, and the best `max_candidates` of those, take part (None: no cap; see
    `specs.PRE_NMS_TOPK` for why the answer is still exact). `iou` >= 1 turns NMS off:
    every index comes back, sorted. torchvision's NMS keeps memory linear in the boxes.
    numpy in, numpy out; torch in, torch out (on the same device).
    """
    s = _tensor(scores, torch.float64)
    order = torch.sort(s, descending=True, stable=True).indices
    if iou < 1.0 and len(order) > 1:
        g = _tensor(groups, torch.int64, s.device)
        if max_per_group is not None:
            order = _best_per_group(order, g, max_per_group)
        if max_candidates is not None:
            order = order[:max_candidates]
        # Strictly decreasing stand-in scores: torchvision's (unstable) sort then keeps
        # this order, ties included, and returns the kept ones in it.
        rank = torch.arange(len(order), 0, -1, dtype=torch.float64, device=s.device)
        keep = batched_nms(_tensor(boxes, torch.float64, s.device)[order], rank, g[order], iou)
        order = order[keep]
    return order if isinstance(scores, torch.Tensor) else order.numpy()


def select(
    boxes: Array,
    logits: Array,
    presence_logits: Array,
    original_size: tuple[int, int] | Array,
    options: DetectOptions = DEFAULT_OPTIONS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`select_kept` without the query indices."""
    return select_kept(boxes, logits, presence_logits, original_size, options)[:3]


def select_kept(
    boxes: Array,
    logits: Array,
    presence_logits: Array,
    original_size: tuple[int, int] | Array,
    options: DetectOptions = DEFAULT_OPTIONS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """boxes [N,Q,4] xyxy in [0,1], logits [N,Q], presence [N,1] -> (boxes, scores, class
    ids, query ids): the query index of each detection says whose mask it gets.

    Keeps scores > threshold (as SAM3's processor), runs per-class NMS (or one
    class-agnostic pass), sorts by score and caps at `max_detections`. Boxes come back
    in original-image pixels, clipped to the image. numpy arrays or torch tensors in (GPU
    tensors are worked on where they are), numpy out. The options were checked when
    they were made (`DetectOptions`).
    """
    logits = _tensor(logits, torch.float64)
    device = logits.device
    n, q = logits.shape
    presence = _tensor(presence_logits, torch.float64, device).reshape(n, 1)
    scores = (torch.sigmoid(logits) * torch.sigmoid(presence)).reshape(-1)
    class_ids = torch.arange(n, dtype=torch.int32, device=device).repeat_interleave(q)
    h, w = (int(v) for v in original_size)
    scale = torch.tensor([w, h, w, h], dtype=torch.float64, device=device)
    pixel_boxes = torch.minimum(
        (_tensor(boxes, torch.float64, device).reshape(-1, 4) * scale).clamp(min=0), scale)

    keep = torch.nonzero(scores > options.score_threshold).flatten()
    groups = (torch.zeros_like(class_ids[keep]) if options.class_agnostic_nms
              else class_ids[keep])
    keep = keep[nms(pixel_boxes[keep], scores[keep], groups, options.nms_iou)]
    keep = keep[:options.max_detections]
    return (pixel_boxes[keep].cpu().numpy().astype(np.float32),
            scores[keep].cpu().numpy().astype(np.float32), class_ids[keep].cpu().numpy(),
            (keep % q).cpu().numpy())


def postprocess(boxes, logits, presence_logits, original_size, class_names: list[str],
                options: DetectOptions = DEFAULT_OPTIONS) -> Detections:
    """`select`, wrapped as Detections for the request's class names."""
    return Detections(*select(boxes, logits, presence_logits, original_size, options),
                      tuple(class_names))
