"""Input checks shared by the in-process pipelines and the Triton models.

Every check raises `ValueError` with a message that names the problem, so a bad
request gets a clear error instead of a crash deep inside a graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dart_triton.contract.specs import (
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_NMS_IOU,
    DEFAULT_SCORE_THRESHOLD,
    MAX_CLASS_NAME_BYTES,
    MAX_IMAGE_FILE_BYTES,
    MAX_IMAGE_SIDE,
    MAX_REQUEST_CLASSES,
)

MIN_IMAGE_SIDE = 8


def check_image(image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"IMAGE must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"IMAGE must be UINT8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"IMAGE must have shape [H, W, 3] (RGB), got {list(image.shape)}")
    check_image_size(*image.shape[:2])
    return image


def check_image_size(h: int, w: int, what: str = "IMAGE") -> None:
    """Each side `MIN_IMAGE_SIDE` to `MAX_IMAGE_SIDE` pixels (for a file: as its header
    declares, checked before decoding)."""
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(f"{what} is {h}x{w}: each side must be at least {MIN_IMAGE_SIDE} pixels")
    if max(h, w) > MAX_IMAGE_SIDE:
        raise ValueError(f"{what} is {h}x{w}: each side must be at most {MAX_IMAGE_SIDE} pixels")


def image_file_bytes(raw: object) -> bytes:
    """The one element of an IMAGE_BYTES tensor ([1] BYTES), size-checked."""
    items = list(np.asarray(raw, dtype=object).reshape(-1))
    if len(items) != 1 or not isinstance(items[0], bytes | np.bytes_):
        raise ValueError(f"IMAGE_BYTES must hold exactly one file's bytes, got {len(items)} "
                         "element(s)")
    data = bytes(items[0])
    if not data:
        raise ValueError("IMAGE_BYTES is empty")
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise ValueError(f"IMAGE_BYTES is {len(data)} bytes; an image file is at most "
                         f"{MAX_IMAGE_FILE_BYTES} bytes")
    return data


def decode_class_names(raw: Sequence[object]) -> list[str]:
    """Class names from str or UTF-8 bytes (Triton BYTES tensors arrive as bytes)."""
    names = []
    for i, item in enumerate(raw):
        if isinstance(item, bytes | np.bytes_):
            _check_name_bytes(i, len(item))  # before decoding: a huge name is refused at once
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"CLASSES[{i}] is not valid UTF-8: {exc.reason}") from None
        if not isinstance(item, str):
            raise ValueError(f"CLASSES[{i}] must be a string, got {type(item).__name__}")
        names.append(item)
    return check_classes(names)


def check_classes(
    classes: Sequence[str], max_classes: int | None = MAX_REQUEST_CLASSES
) -> list[str]:
    if isinstance(classes, str):
        raise ValueError("CLASSES must be a list of class names, not a single string")
    names = list(classes)
    if not names:
        raise ValueError("CLASSES is empty: give at least one class name")
    if max_classes is not None:
        check_class_count(len(names), max_classes)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"CLASSES[{i}] must be a string, got {type(name).__name__}")
        if 4 * len(name) > MAX_CLASS_NAME_BYTES:  # else short enough in any encoding
            _check_name_bytes(i, len(name.encode("utf-8", "surrogatepass")))
        if not name.strip():
            raise ValueError(f"CLASSES[{i}] is empty or whitespace only")
    return names


def check_class_count(count: int, max_classes: int = MAX_REQUEST_CLASSES) -> None:
    if count > max_classes:
        raise ValueError(f"CLASSES has {count} names; at most {max_classes} per request")


def _check_name_bytes(index: int, size: int) -> None:
    """SAM3 reads 32 tokens of a name; see `specs.MAX_CLASS_NAME_BYTES` for the limit."""
    if size > MAX_CLASS_NAME_BYTES:
        raise ValueError(f"CLASSES[{index}] is {size} bytes long; a class name is at most "
                         f"{MAX_CLASS_NAME_BYTES} bytes of UTF-8 (SAM3 reads only 32 tokens)")


@dataclass(frozen=True)
class DetectOptions:
    """A request's options, checked once, when made (a bad value raises ValueError).

    The first three are the optional request tensors; `class_agnostic_nms` is for
    in-process callers (one NMS pass over all classes)."""

    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    nms_iou: float = DEFAULT_NMS_IOU
    max_detections: int = DEFAULT_MAX_DETECTIONS
    class_agnostic_nms: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"SCORE_THRESHOLD must be in [0, 1], got {self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"NMS_IOU must be in (0, 1] (1 turns NMS off), got {self.nms_iou}")
        if self.max_detections < 1:
            raise ValueError(f"MAX_DETECTIONS must be at least 1, got {self.max_detections}")


@dataclass(frozen=True)
class MaskOptions:
    """RETURN_MASKS and MASK_THRESHOLD, checked when made. A mask pixel is kept where the
    sigmoid of its (resized) logit is above the threshold, as in SAM3's processor."""

    return_masks: bool = False
    mask_threshold: float = DEFAULT_MASK_THRESHOLD

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"MASK_THRESHOLD must be in (0, 1), got {self.mask_threshold}")


@dataclass(frozen=True)
class DetectRequest:
    """One detection request, read and checked: the image, as pixels (UINT8 [H, W, 3],
    checked) or as the bytes of an image file (decoded, and its header checked, by
    `model.image_files`); the class names (1 to `MAX_REQUEST_CLASSES`); the options."""

    image: np.ndarray | None
    names: list[str]
    options: DetectOptions = field(default_factory=DetectOptions)
    image_bytes: bytes | None = None
    masks: MaskOptions = field(default_factory=MaskOptions)

    def __post_init__(self) -> None:
        if (self.image is None) == (self.image_bytes is None):
            raise ValueError(ONE_IMAGE)


# A request's image comes one way or the other, never both.
ONE_IMAGE = ("give exactly one of IMAGE (UINT8 [H, W, 3] RGB pixels) and IMAGE_BYTES (the "
             "bytes of a JPEG, PNG or WebP file)")
