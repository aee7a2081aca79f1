import numpy as np
import pytest
from PIL import Image

from dart_triton.postprocess import box_iou, nms, postprocess, select
from dart_triton.preprocess import preprocess


def test_preprocess_matches_pil_bilinear(photo):
    """The reference: PIL's antialiased bilinear resize, /255, (x - 0.5) / 0.5."""
    for size, image in ((112, photo), (140, np.ascontiguousarray(photo[:300, :200]))):
        pixels, original = preprocess(image, size)
        ref = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR),
                         np.float32)
        ref = (ref / 255.0 - 0.5) / 0.5
        assert pixels.shape == (1, 3, size, size) and pixels.dtype == np.float32
        diff = np.abs(pixels[0].transpose(1, 2, 0) - ref)
        assert diff.mean() < 2e-3 and diff.max() <= 2 * 2 / 255 + 1e-6
        assert original.tolist() == list(image.shape[:2])


def _raw(n=2, q=3):
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 1.2]]] * n,
                     np.float32)[:, :q]
    logits = np.array([[3.0, 2.0, 1.0]] * n, np.float32)[:, :q]
    presence = np.full((n, 1), 10.0, np.float32)
    return boxes, logits, presence


def test_scores_combine_logit_and_presence():
    boxes, logits, presence = _raw(1)
    presence[:] = 0.0  # sigmoid 0.5 gates every query
    dets = postprocess(boxes, logits, presence, (100, 200), ["x"], score_threshold=0.0,
                       nms_iou=1.0)
    expected = 1 / (1 + np.exp(-logits[0])) * 0.5
    np.testing.assert_allclose(np.sort(dets.scores)[::-1], np.sort(expected)[::-1], rtol=1e-6)


def test_boxes_in_pixels_and_clipped():
    boxes, logits, presence = _raw(1)
    b, s, ids = select(boxes, logits, presence, (100, 200), score_threshold=0.0, nms_iou=1.0)
    np.testing.assert_allclose(b[0], [20, 10, 100, 50], rtol=1e-5)  # x by W=200, y by H=100
    assert b[:, 3].max() <= 100  # y2 = 1.2 clipped to the image


def test_per_class_and_agnostic_nms():
    boxes, logits, presence = _raw(2)
    kw = dict(score_threshold=0.0, nms_iou=0.7)
    b, s, ids = select(boxes, logits, presence, (100, 100), **kw)
    assert len(s) == 4  # the near-duplicate is suppressed within each class only
    b, s, ids = select(boxes, logits, presence, (100, 100), class_agnostic_nms=True, **kw)
    assert len(s) == 2
    b, s, ids = select(boxes, logits, presence, (100, 100), score_threshold=0.0, nms_iou=1.0)
    assert len(s) == 6  # 1.0 turns NMS off


def test_threshold_cap_and_order():
    boxes, logits, presence = _raw(2)
    b, s, ids = select(boxes, logits, presence, (100, 100), score_threshold=0.85, nms_iou=1.0)
    assert np.all(s > 0.85) and len(s) == 4
    b, s, ids = select(boxes, logits, presence, (100, 100), score_threshold=0.0, nms_iou=1.0,
                       max_detections=3)
    assert len(s) == 3 and np.all(np.diff(s) <= 0)
    assert ids.dtype == np.int32 and s.dtype == np.float32 and b.dtype == np.float32


def test_nms_matches_bruteforce():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (60, 2))], 1)
    scores = rng.uniform(0, 1, 60)
    groups = rng.integers(0, 3, 60)
    keep = nms(boxes, scores, groups, 0.5)
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(groups[j] != groups[i] or box_iou(boxes[[i]], boxes[[j]])[0, 0] <= 0.5
               for j in kept):
            kept.append(int(i))
    assert keep.tolist() == kept


@pytest.mark.parametrize("kw", [dict(score_threshold=2.0), dict(nms_iou=0.0),
                                dict(max_detections=0)])
def test_bad_options(kw):
    with pytest.raises(ValueError):
        select(*_raw(), (10, 10), **kw)
