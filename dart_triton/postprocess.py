"""Raw head outputs -> detections (SAM3 processor semantics, plus NMS and a cap).

score = sigmoid(logit) * sigmoid(presence): the presence token gates every query of a
class at once, so a class absent from the image scores low everywhere (DART §3.2).

The work runs where the inputs are: torch tensors on a GPU stay there; numpy arrays (and
CPU tensors) run in numpy, single-threaded, because on a busy CPU each of torch's
multi-threaded operations can wait milliseconds for a thread. Results come back as numpy.
"""

from __future__ import annotations

import numpy as np
import torch

from .detections import Detections
from .specs import (
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_NMS_IOU,
    DEFAULT_SCORE_THRESHOLD,
    PRE_NMS_TOPK,
    PRE_NMS_TOPK_PER_GROUP,
)
from .validation import check_options

# Box pairs per NMS block. NMS groups are handled a block at a time, so one block's float64
# IoU matrix and its temporaries stay in the tens of MB, whatever the request.
NMS_BLOCK_PAIRS = 1 << 20

Array = np.ndarray | torch.Tensor


class _NumpyOps:
    """The few operations whose numpy and torch spellings differ; numpy for the CPU."""

    xp = np

    @staticmethod
    def array(x, dtype: str) -> np.ndarray:
        return np.asarray(x.detach() if isinstance(x, torch.Tensor) else x, dtype=dtype)

    @staticmethod
    def argsort(x: np.ndarray, descending: bool = False) -> np.ndarray:
        """Stable: ties keep index order, in either direction."""
        return np.argsort(-x if descending else x, kind="stable")

    @staticmethod
    def run_lengths(x: np.ndarray) -> np.ndarray:
        """Lengths of the runs of equal values in x."""
        return np.diff(np.flatnonzero(np.concatenate([[True], x[1:] != x[:-1], [True]])))

    @staticmethod
    def repeat(x: np.ndarray, counts) -> np.ndarray:
        return np.repeat(x, counts)

    @staticmethod
    def arange(n: int, dtype: str = "int64") -> np.ndarray:
        return np.arange(n, dtype=dtype)

    @staticmethod
    def nonzero(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    @staticmethod
    def numpy(x: np.ndarray) -> np.ndarray:
        return x


class _TorchOps:
    """The same operations for torch tensors, on their device."""

    xp = torch

    def __init__(self, device: torch.device):
        self.device = device

    def array(self, x, dtype: str) -> torch.Tensor:
        x = x.detach() if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x))
        return x.to(self.device, getattr(torch, dtype))

    def argsort(self, x: torch.Tensor, descending: bool = False) -> torch.Tensor:
        return torch.sort(x, descending=descending, stable=True).indices

    def run_lengths(self, x: torch.Tensor) -> torch.Tensor:
        return torch.unique_consecutive(x, return_counts=True)[1]

    def repeat(self, x: torch.Tensor, counts) -> torch.Tensor:
        return torch.repeat_interleave(x, counts)

    def arange(self, n: int, dtype: str = "int64") -> torch.Tensor:
        return torch.arange(n, dtype=getattr(torch, dtype), device=self.device)

    def nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mask).flatten()

    def numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()


def _ops_for(x) -> _NumpyOps | _TorchOps:
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        return _TorchOps(x.device)
    return _NumpyOps()


def _pairwise_iou(a: Array, b: Array, xp) -> Array:
    """IoU [..., M, N] of xyxy boxes a [..., M, 4] and b [..., N, 4]; 0 for an empty union."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    area_a = (a[..., 2] - a[..., 0]).clip(min=0) * (a[..., 3] - a[..., 1]).clip(min=0)
    area_b = (b[..., 2] - b[..., 0]).clip(min=0) * (b[..., 3] - b[..., 1]).clip(min=0)
    inter = ((xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0])).clip(min=0)
             * (xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1])).clip(min=0))
    union = area_a + area_b - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0)


def box_iou(a: Array, b: Array) -> np.ndarray:
    """IoU matrix [len(a), len(b)] for xyxy boxes."""
    ops = _ops_for(a)
    return ops.numpy(_pairwise_iou(ops.array(a, "float64"), ops.array(b, "float64"), ops.xp))


def _greedy(boxes: Array, keep: Array, iou: float, xp) -> Array:
    """Greedy NMS in each row of boxes [G, K, 4], sorted by descending score. `keep` [G, K]
    marks the real boxes (padding is at the end of a row); it is updated in place and
    returned, marking the kept ones."""
    spares = _pairwise_iou(boxes, boxes, xp) <= iou  # spares[g, i, j]: box i lets box j live
    for i in range(boxes.shape[1] - 1):  # the rows of a block advance together
        keep[:, i + 1 :] &= spares[:, i, i + 1 :] | ~keep[:, i, None]
    return keep


def _group_runs(groups: Array, ops) -> tuple[Array, Array, Array]:
    """For groups listed in score order -> (perm, counts, starts): `perm` lists the positions
    group by group, score order kept inside a group; group j is perm[starts[j]:][:counts[j]]."""
    perm = ops.argsort(groups)
    counts = ops.run_lengths(groups[perm])
    return perm, counts, ops.xp.cumsum(counts, 0) - counts


def _candidates(order: Array, groups: Array, max_candidates: int | None,
                max_per_group: int | None, ops) -> Array:
    """The best `max_per_group` of each group, then the best `max_candidates` of those."""
    if max_per_group is not None:
        perm, counts, starts = _group_runs(groups[order], ops)
        rank = ops.arange(len(perm)) - ops.repeat(starts, counts)
        best = ops.xp.zeros_like(order, dtype=bool)
        best[perm[rank < max_per_group]] = True
        order = order[best]  # still by descending score
    return order if max_candidates is None else order[:max_candidates]


def nms(boxes: Array, scores: Array, groups: Array, iou: float, *,
        max_candidates: int | None = PRE_NMS_TOPK,
        max_per_group: int | None = PRE_NMS_TOPK_PER_GROUP) -> Array:
    """Greedy NMS within each group; indices kept, by descending score (ties: lower index).

    Boxes of different groups never suppress each other. Only the best `max_per_group`
    boxes of a group, and the best `max_candidates` of those, take part (None: no cap; see
    `specs.PRE_NMS_TOPK` for why the answer is still exact). `iou` >= 1 turns NMS off: every
    index comes back, sorted. Groups run a block at a time (`NMS_BLOCK_PAIRS`), so memory
    stays bounded. numpy in, numpy out; torch in, torch out (on the same device).
    """
    ops = _ops_for(scores)
    xp = ops.xp
    scores_a = ops.array(scores, "float64")
    order = ops.argsort(scores_a, descending=True)
    if iou < 1.0 and len(order) > 1:
        groups_a = ops.array(groups, "int64")
        order = _candidates(order, groups_a, max_candidates, max_per_group, ops)
        perm, counts, starts = _group_runs(groups_a[order], ops)
        boxes_a = ops.array(boxes, "float64")[order]
        keep = xp.zeros_like(order, dtype=bool)
        by_size = ops.argsort(counts, descending=True)  # alike sizes share a block
        sizes = counts[by_size].tolist()
        first = 0
        while first < len(sizes):
            k = sizes[first]
            block = by_size[first : first + max(1, NMS_BLOCK_PAIRS // (k * k))]
            slot = ops.arange(k)
            real = slot < counts[block, None]
            at = perm[starts[block, None] + xp.where(real, slot, 0)]  # [G, k] into order
            keep[at[_greedy(boxes_a[at], real, iou, xp)]] = True
            first += len(block)
        order = order[keep]
    if isinstance(scores, torch.Tensor):
        return order if isinstance(order, torch.Tensor) else torch.from_numpy(order)
    return ops.numpy(order)


def select(
    boxes: Array,
    logits: Array,
    presence_logits: Array,
    original_size: tuple[int, int] | Array,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    nms_iou: float = DEFAULT_NMS_IOU,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    class_agnostic_nms: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes [N,Q,4] xyxy in [0,1], logits [N,Q], presence [N,1] -> (boxes, scores, class ids).

    Keeps scores > threshold (as SAM3's processor), runs per-class NMS (or one
    class-agnostic pass), sorts by score and caps at `max_detections`. Boxes come back
    in original-image pixels, clipped to the image. numpy arrays or torch tensors in (GPU
    tensors are worked on where they are), numpy out.
    """
    check_options(score_threshold, nms_iou, max_detections)
    ops = _ops_for(logits)
    xp = ops.xp
    logits = ops.array(logits, "float64")
    n, q = logits.shape
    presence = ops.array(presence_logits, "float64").reshape(n, 1)
    scores = (1.0 / (1.0 + xp.exp(-logits)) * (1.0 / (1.0 + xp.exp(-presence)))).reshape(-1)
    class_ids = ops.repeat(ops.arange(n, "int32"), q)
    h, w = (int(v) for v in original_size)
    scale = ops.array([w, h, w, h], "float64")
    pixel_boxes = xp.minimum((ops.array(boxes, "float64").reshape(-1, 4) * scale).clip(min=0),
                             scale)

    keep = ops.nonzero(scores > score_threshold)
    groups = xp.zeros_like(class_ids[keep]) if class_agnostic_nms else class_ids[keep]
    keep = keep[nms(pixel_boxes[keep], scores[keep], groups, nms_iou)][:max_detections]
    return (ops.numpy(pixel_boxes[keep]).astype(np.float32),
            ops.numpy(scores[keep]).astype(np.float32), ops.numpy(class_ids[keep]))


def postprocess(boxes, logits, presence_logits, original_size, class_names: list[str],
                score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                nms_iou: float = DEFAULT_NMS_IOU,
                max_detections: int = DEFAULT_MAX_DETECTIONS,
                class_agnostic_nms: bool = False) -> Detections:
    """`select`, wrapped as Detections for the request's class names."""
    return Detections(*select(boxes, logits, presence_logits, original_size, score_threshold,
                              nms_iou, max_detections, class_agnostic_nms), tuple(class_names))

