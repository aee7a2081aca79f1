"""Boxes and "name score" labels drawn onto an image, with supervision."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from .detections import Detections


@lru_cache(maxsize=8)
def _annotators(width: int, height: int) -> tuple[Any, Any]:
    # Imported lazily: supervision is slow to import and only drawing needs it.
    # Sizes scale with resolution so labels stay legible on 4K and on thumbnails;
    # cached because a video builds them once per resolution, not once per frame.
    import supervision as sv

    thickness = sv.calculate_optimal_line_thickness((width, height))
    scale = sv.calculate_optimal_text_scale((width, height))
    boxes = sv.BoxAnnotator(thickness=thickness)
    labels = sv.LabelAnnotator(
        text_scale=scale,
        text_thickness=max(1, thickness // 2),
        text_padding=max(2, thickness * 2),
        smart_position=True,
    )
    return boxes, labels


def annotate(image: np.ndarray, detections: Detections) -> np.ndarray:
    """A copy of ``image`` (RGB uint8) with the detections drawn on it."""
    import supervision as sv

    if not len(detections):
        return image.copy()
    sv_dets = sv.Detections(
        xyxy=detections.boxes.astype(np.float64),
        confidence=detections.scores,
        class_id=detections.class_ids.astype(np.int64),
    )
    box_annotator, label_annotator = _annotators(image.shape[1], image.shape[0])
    # supervision draws numpy images as OpenCV BGR: flip so palette colours come out right.
    out = np.ascontiguousarray(image[..., ::-1])
    out = box_annotator.annotate(out, sv_dets)
    out = label_annotator.annotate(out, sv_dets, labels=detections.labels())
    return np.ascontiguousarray(out[..., ::-1])
