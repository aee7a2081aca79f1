"""Raw head outputs -> detections (SAM3 processor semantics, plus NMS and a cap).

score = sigmoid(logit) * sigmoid(presence): the presence token gates every query of a
class at once, so a class absent from the image scores low everywhere (DART §3.2).
"""

from __future__ import annotations

import numpy as np

from .detections import Detections
from .specs import DEFAULT_MAX_DETECTIONS, DEFAULT_NMS_IOU, DEFAULT_SCORE_THRESHOLD
from .validation import check_options


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] for xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS within each group; indices kept, by descending score.

    Boxes of different groups never suppress each other: they are shifted apart by
    more than the largest coordinate (the usual batched-NMS offset trick).
    """
    order = np.lexsort((np.arange(len(scores)), -scores))
    if iou >= 1.0 or len(order) <= 1:
        return order
    offset = groups.astype(np.float64)[:, None] * (np.abs(boxes).max() * 2 + 1)
    shifted = boxes.astype(np.float64) + offset
    ious = box_iou(shifted[order], shifted[order])
    keep = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1 :] &= ious[i, i + 1 :] <= iou
    return order[keep]


def select(
    boxes: np.ndarray,
    logits: np.ndarray,
    presence_logits: np.ndarray,
    original_size: tuple[int, int] | np.ndarray,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    nms_iou: float = DEFAULT_NMS_IOU,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    class_agnostic_nms: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes [N,Q,4] xyxy in [0,1], logits [N,Q], presence [N,1] -> (boxes, scores, class ids).

    Keeps scores > threshold (as SAM3's processor), runs per-class NMS (or one
    class-agnostic pass), sorts by score and caps at `max_detections`. Boxes come back
    in original-image pixels, clipped to the image.
    """
    check_options(score_threshold, nms_iou, max_detections)
    n, q = logits.shape
    scores = (_sigmoid(logits) * _sigmoid(presence_logits.reshape(n, 1))).reshape(-1)
    class_ids = np.repeat(np.arange(n, dtype=np.int32), q)
    h, w = (int(v) for v in original_size)
    scale = np.array([w, h, w, h], dtype=np.float64)
    pixel_boxes = (boxes.reshape(-1, 4).astype(np.float64) * scale).clip(0, scale)

    keep = np.flatnonzero(scores > score_threshold)
    groups = np.zeros_like(class_ids[keep]) if class_agnostic_nms else class_ids[keep]
    keep = keep[nms(pixel_boxes[keep], scores[keep], groups, nms_iou)][:max_detections]
    return (pixel_boxes[keep].astype(np.float32), scores[keep].astype(np.float32),
            class_ids[keep])


def postprocess(boxes, logits, presence_logits, original_size, class_names: list[str],
                score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                nms_iou: float = DEFAULT_NMS_IOU,
                max_detections: int = DEFAULT_MAX_DETECTIONS,
                class_agnostic_nms: bool = False) -> Detections:
    """`select`, wrapped as Detections for the request's class names."""
    return Detections(*select(boxes, logits, presence_logits, original_size, score_threshold,
                              nms_iou, max_detections, class_agnostic_nms), tuple(class_names))


def merge_chunks(chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Concatenate per-chunk (boxes, logits, presence) along the prompt axis."""
    return tuple(np.concatenate(parts, axis=0) for parts in zip(*chunks, strict=True))
