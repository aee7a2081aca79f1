"""Boxes, masks (when the detections carry them) and "name score" (or, tracked,
"name #id score") labels drawn with supervision."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from dart_triton.contract.detections import Detections


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


@lru_cache(maxsize=1)
def _mask_annotator() -> Any:
    import supervision as sv

    return sv.MaskAnnotator(opacity=0.45)


def annotate(image: np.ndarray, detections: Detections,
             track_ids: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``image`` (RGB uint8) with the detections drawn on it, their masks too
    when they have them (ValueError when those are not at the image's size).

    With ``track_ids`` (one per detection) labels read ``name #id score`` and each
    track keeps its colour from frame to frame; otherwise colours follow the class.
    """
    import supervision as sv

    if not len(detections):
        return image.copy()
    masks = None
    if detections.masks is not None:
        from .masks import decode_masks

        if tuple(detections.image_size or ()) != image.shape[:2]:
            raise ValueError(f"masks are {detections.image_size} (H, W), the image "
                             f"{image.shape[:2]}")
        masks = decode_masks(detections)
    sv_dets = sv.Detections(
        xyxy=detections.boxes.astype(np.float64),
        mask=masks,
        confidence=detections.scores,
        class_id=detections.class_ids.astype(np.int64),
    )
    labels = detections.labels()
    colours = None
    if track_ids is not None:
        ids = np.asarray(track_ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(detections):
            raise ValueError(f"{len(ids)} track ids for {len(detections)} detections")
        labels = [f"{n} #{i} {s:.2f}"
                  for n, i, s in zip(detections.names, ids.tolist(), detections.scores,
                                     strict=True)]
        colours = ids
    box_annotator, label_annotator = _annotators(image.shape[1], image.shape[0])
    # supervision draws numpy images as OpenCV BGR: flip so palette colours come out right.
    out = np.ascontiguousarray(image[..., ::-1])
    if masks is not None:
        out = _mask_annotator().annotate(out, sv_dets, custom_color_lookup=colours)
    out = box_annotator.annotate(out, sv_dets, custom_color_lookup=colours)
    out = label_annotator.annotate(out, sv_dets, labels=labels, custom_color_lookup=colours)
    return np.ascontiguousarray(out[..., ::-1])
