"""Client-side checks and numpy encoding of `dart` request inputs.

Catching obvious mistakes here gives a clear ValueError instead of a terse
server-side shape/dtype rejection after a network round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dart_triton import specs

# dtypes come from the contract so a spec change cannot drift from the client.
_CONTRACT = specs.dart_spec(specs.GraphDims())


def _dtype(name: str) -> str:
    return _CONTRACT.input(name).numpy_dtype


def check_image(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a C-contiguous uint8 ``[H, W, 3]`` array, or raise ValueError."""
    if not isinstance(image, np.ndarray):
        kind = type(image).__name__
        raise ValueError(f"image must be a numpy uint8 array of shape [H, W, 3] (RGB), got {kind}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape [H, W, 3] (RGB), got {list(image.shape)}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"image is empty: shape {list(image.shape)}")
    if max(h, w) > specs.MAX_IMAGE_SIDE:
        raise ValueError(
            f"image is {w}x{h}; the server accepts at most {specs.MAX_IMAGE_SIDE} px per side"
        )
    return np.ascontiguousarray(image)


def class_list(classes: Sequence[str]) -> list[str]:
    """``classes`` as a list; a bare string would silently become one class per character."""
    if isinstance(classes, str):
        raise ValueError("classes must be a list of names, not a single string")
    return list(classes)


def encode_classes(classes: Sequence[str]) -> np.ndarray:
    """UTF-8 encode class names into the BYTES tensor Triton expects, or raise ValueError."""
    names = class_list(classes)
    if not 1 <= len(names) <= specs.MAX_REQUEST_CLASSES:
        raise ValueError(f"need 1 to {specs.MAX_REQUEST_CLASSES} classes, got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
    return np.array([n.encode("utf-8") for n in names], dtype=_dtype(specs.CLASSES))


def option_arrays(
    score_threshold: float | None,
    nms_iou: float | None,
    max_detections: int | None,
) -> dict[str, np.ndarray]:
    """The optional inputs that were given, as ``[1]`` arrays keyed by tensor name.

    Options left as None are not sent, so the server's own defaults apply.
    """
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if nms_iou is not None and not 0.0 <= nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in [0, 1] (1 = NMS off), got {nms_iou}")
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    given = {
        specs.SCORE_THRESHOLD: score_threshold,
        specs.NMS_IOU: nms_iou,
        specs.MAX_DETECTIONS: max_detections,
    }
    return {
        name: np.array([value], dtype=_dtype(name))
        for name, value in given.items()
        if value is not None
    }
