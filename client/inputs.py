"""Client-side checks and numpy encoding of `dart` request inputs.

The checks are the server's own (`dart_triton.contract.validation`): catching mistakes here gives
the same clear ValueError without a network round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dart_triton.contract import specs, validation

# dtypes come from the contract so a spec change cannot drift from the client.
_CONTRACT = specs.dart_spec(specs.GraphDims())


def _dtype(name: str) -> str:
    return _CONTRACT.input(name).numpy_dtype


def check_image(image: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous uint8 ``[H, W, 3]`` array, or ValueError (the server's rules)."""
    return np.ascontiguousarray(validation.check_image(image))


def image_arrays(image: np.ndarray | bytes) -> dict[str, np.ndarray]:
    """The request's image: pixels as IMAGE, or an image file's bytes as IMAGE_BYTES
    (sent as they are; the server reads the header and decodes)."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        validation.image_file_bytes(np.array([data], dtype=object))  # size: the server's rule
        return {specs.IMAGE_BYTES: np.array([data], dtype=_dtype(specs.IMAGE_BYTES))}
    return {specs.IMAGE: check_image(image)}


def class_list(classes: Sequence[str]) -> list[str]:
    """``classes`` as a list; a bare string would silently become one class per character."""
    return validation.check_classes(classes)


def encode_classes(classes: Sequence[str]) -> np.ndarray:
    """UTF-8 encode class names into the BYTES tensor Triton expects, or raise ValueError."""
    return np.array([n.encode("utf-8") for n in class_list(classes)],
                    dtype=_dtype(specs.CLASSES))


def option_arrays(
    score_threshold: float | None,
    nms_iou: float | None,
    max_detections: int | None,
) -> dict[str, np.ndarray]:
    """The optional inputs that were given, as ``[1]`` arrays keyed by tensor name.

    Options left as None are not sent, so the server's own defaults apply.
    """
    validation.DetectOptions(
        specs.DEFAULT_SCORE_THRESHOLD if score_threshold is None else score_threshold,
        specs.DEFAULT_NMS_IOU if nms_iou is None else nms_iou,
        specs.DEFAULT_MAX_DETECTIONS if max_detections is None else max_detections)
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


def mask_arrays(masks: bool, mask_threshold: float = specs.DEFAULT_MASK_THRESHOLD
                ) -> dict[str, np.ndarray]:
    """RETURN_MASKS and MASK_THRESHOLD when masks are asked for; nothing otherwise, so a
    request without masks is exactly what it was before masks existed."""
    validation.MaskOptions(bool(masks), float(mask_threshold))  # ValueError: out of (0, 1)
    if not masks:
        return {}
    return {
        specs.RETURN_MASKS: np.array([True], dtype=_dtype(specs.RETURN_MASKS)),
        specs.MASK_THRESHOLD: np.array([mask_threshold], dtype=_dtype(specs.MASK_THRESHOLD)),
    }
