"""Our pipeline's detections == the naive SAM3 pipeline's, on a real photograph."""

import numpy as np
import pytest

from dart_triton.contract.passes import plan_passes
from dart_triton.pipeline.detectors import DartPipeline
from tests.tolerances import BOX_ATOL_PER_PIXEL, SCORE_ATOL


@pytest.fixture(scope="module")
def dart(parts):
    return DartPipeline.from_parts(parts)


def assert_same(a, b, image_side: int):
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=SCORE_ATOL)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=BOX_ATOL_PER_PIXEL * image_side)


@pytest.mark.parametrize("classes", [
    ["person", "rocket", "flag"],
    # more than max_classes (4): three enc_dec passes
    ["person", "rocket", "flag", "helmet", "sky", "glove", "tree", "car", "cup", "dog"],
])
def test_dart_equals_naive(dart, naive, photo, classes):
    ours = dart.detect(photo, classes)
    ref = naive.detect(photo, classes)
    assert len(ours) > 0
    assert_same(ours, ref, max(photo.shape))
    assert list(ours.class_names) == classes


def test_every_query_without_threshold_or_nms(dart, naive, parts, photo):
    kw = dict(score_threshold=0.0, nms_iou=1.0, max_detections=10_000)
    ours = dart.detect(photo, ["person", "rocket", "flag"], **kw)
    assert len(ours) == 3 * parts.dims.num_queries
    assert_same(ours, naive.detect(photo, ["person", "rocket", "flag"], **kw), 512)


def test_detections_are_in_image_pixels(dart, photo):
    wide = np.ascontiguousarray(np.concatenate([photo, photo], axis=1))  # 512 x 1024
    dets = dart.detect(wide, ["person"], score_threshold=0.0, nms_iou=1.0)
    assert dets.boxes[:, [0, 2]].max() <= 1024 and dets.boxes[:, [1, 3]].max() <= 512
    assert dets.boxes[:, [0, 2]].max() > 512  # x spans the full width


def test_onnx_runtime_pipeline_matches(tiny_checkpoint, dart, photo, tmp_path):
    from dart_triton.export.onnx_export import export_graphs

    export_graphs(tiny_checkpoint, tmp_path, max_classes=4, check=False, log=lambda *_: None)
    ort = DartPipeline.from_checkpoint(tiny_checkpoint, max_classes=4, onnx_dir=tmp_path)
    classes = ["person", "rocket", "flag", "helmet", "sky"]
    assert_same(ort.detect(photo, classes), dart.detect(photo, classes), 512)


def test_chunks():
    assert [(p.start, p.stop) for p in plan_passes(3, 16)] == [(0, 3)]
    assert [p.stop - p.start for p in plan_passes(80, 16)] == [16] * 5
    assert [p.stop - p.start for p in plan_passes(10, 4)] == [4, 4, 2]
    # with buckets, each pass is padded up to the next bucket; no padding without them
    assert all(p.rows == p.stop - p.start for p in plan_passes(10, 4))
    assert [(p.start, p.stop, p.rows) for p in plan_passes(10, 4, (1, 4))] == [
        (0, 4, 4), (4, 8, 4), (8, 10, 4)]


@pytest.mark.parametrize("image, classes, message", [
    ("photo", [], "CLASSES is empty"),
    ("photo", ["person", ""], r"CLASSES\[1\] is empty"),
    ("photo", ["   "], r"CLASSES\[0\] is empty or whitespace"),
    ("photo", "person", "not a single string"),
    ("photo", ["x"] * 1025, "at most 1024"),
    (np.zeros((64, 64, 3), np.float32), ["person"], "UINT8"),
    (np.zeros((64, 64), np.uint8), ["person"], r"shape \[H, W, 3\]"),
    (np.zeros((64, 64, 4), np.uint8), ["person"], r"shape \[H, W, 3\]"),
    (np.zeros((1, 1, 3), np.uint8), ["person"], "at least 8 pixels"),
    (np.zeros((0, 0, 3), np.uint8), ["person"], "at least 8 pixels"),
    (np.zeros((8200, 8, 3), np.uint8), ["person"], "at most 8192"),
    ([[1, 2, 3]], ["person"], "numpy array"),
])
def test_bad_inputs(dart, naive, photo, image, classes, message):
    image = photo if isinstance(image, str) else image
    for pipeline in (dart, naive):
        with pytest.raises(ValueError, match=message):
            pipeline.detect(image, classes)


@pytest.mark.parametrize("kw, message", [
    (dict(score_threshold=-0.1), "SCORE_THRESHOLD"),
    (dict(score_threshold=1.5), "SCORE_THRESHOLD"),
    (dict(nms_iou=0.0), "NMS_IOU"),
    (dict(max_detections=0), "MAX_DETECTIONS"),
])
def test_bad_options(dart, photo, kw, message):
    with pytest.raises(ValueError, match=message):
        dart.detect(photo, ["person"], **kw)
