"""What served-vs-reference tests share: the class names they ask for, raw request inputs,
and the comparisons (each with the float bound of `tests.tolerances`)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from dart_triton.contract import specs
from tests.tolerances import BOX_ATOL_PER_PIXEL, SCORE_ATOL, SERVED_SCORE_ATOL

NAMES = ["person", "rocket", "flag", "helmet", "sky", "glove", "tree", "car", "cup", "dog",
         "boat", "bird"]


def assert_same(served, ref, side: int = 512, score_atol: float = SCORE_ATOL):
    assert len(served) == len(ref)
    np.testing.assert_array_equal(served.class_ids, ref.class_ids)
    np.testing.assert_allclose(served.scores, ref.scores, atol=score_atol)
    np.testing.assert_allclose(served.boxes, ref.boxes, atol=BOX_ATOL_PER_PIXEL * side)


EVERY_QUERY = dict(score_threshold=0.0, nms_iou=1.0, max_detections=100_000)


def assert_served_same(served, ref, side: int = 512, score_atol: float = SERVED_SCORE_ATOL):
    assert len(served) == len(ref)
    np.testing.assert_array_equal(served.class_ids, ref.class_ids)
    np.testing.assert_allclose(served.scores, ref.scores, atol=score_atol)
    np.testing.assert_allclose(served.boxes, ref.boxes, atol=BOX_ATOL_PER_PIXEL * side)


def raw_inputs(image, classes, extra=()):
    inputs = []
    if image is not None:
        t = grpcclient.InferInput(specs.IMAGE, list(image.shape),
                                  {np.uint8: "UINT8", np.float32: "FP32"}[image.dtype.type])
        t.set_data_from_numpy(image)
        inputs.append(t)
    if classes is not None:
        arr = np.array(classes, dtype=object).reshape(-1)
        t = grpcclient.InferInput(specs.CLASSES, list(arr.shape), "BYTES")
        t.set_data_from_numpy(arr)
        inputs.append(t)
    for name, value, dtype in extra:
        t = grpcclient.InferInput(name, [1], dtype)
        numpy_dtype = {"FP32": np.float32, "INT32": np.int32}[dtype]
        t.set_data_from_numpy(np.array([value], dtype=numpy_dtype))
        inputs.append(t)
    return inputs


def mask_ious(served, ref) -> list[float]:
    """IoU of each served mask with the reference's (1 where both are empty)."""
    from dart_triton.model.masks import decode_rle

    assert served.image_size == ref.image_size and len(served.masks) == len(ref.masks)
    ious = []
    for a, b in zip(served.masks, ref.masks, strict=True):
        ma, mb = decode_rle(a, served.image_size), decode_rle(b, ref.image_size)
        union = int((ma | mb).sum())
        ious.append(1.0 if union == 0 else int((ma & mb).sum()) / union)
    return ious


def assert_same_masks(served, ref, side: int = 512, score_atol: float = SERVED_SCORE_ATOL):
    """Same detections (`assert_served_same`), and every mask within MASK_MIN_IOU."""
    from tests.tolerances import MASK_MIN_IOU

    assert_served_same(served, ref, side, score_atol)
    assert len(served) > 0, "no detection kept: the comparison would be empty"
    ious = mask_ious(served, ref)
    assert min(ious) >= MASK_MIN_IOU, f"worst mask IoU {min(ious):.4f}"
