import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou as _box_iou

from dart_triton.contract.validation import DetectOptions
from dart_triton.model.postprocess import nms, postprocess, select
from dart_triton.model.preprocess import preprocess


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
    dets = postprocess(boxes, logits, presence, (100, 200), ["x"],
        DetectOptions(score_threshold=0.0, nms_iou=1.0))
    expected = 1 / (1 + np.exp(-logits[0])) * 0.5
    np.testing.assert_allclose(np.sort(dets.scores)[::-1], np.sort(expected)[::-1], rtol=1e-6)


def test_boxes_in_pixels_and_clipped():
    boxes, logits, presence = _raw(1)
    b, s, ids = select(boxes, logits, presence, (100, 200),
        DetectOptions(score_threshold=0.0, nms_iou=1.0))
    np.testing.assert_allclose(b[0], [20, 10, 100, 50], rtol=1e-5)  # x by W=200, y by H=100
    assert b[:, 3].max() <= 100  # y2 = 1.2 clipped to the image


def test_per_class_and_agnostic_nms():
    boxes, logits, presence = _raw(2)
    kw = dict(score_threshold=0.0, nms_iou=0.7)
    b, s, ids = select(boxes, logits, presence, (100, 100), DetectOptions(**kw))
    assert len(s) == 4  # the near-duplicate is suppressed within each class only
    b, s, ids = select(boxes, logits, presence, (100, 100),
        DetectOptions(class_agnostic_nms=True, **kw))
    assert len(s) == 2
    b, s, ids = select(boxes, logits, presence, (100, 100),
        DetectOptions(score_threshold=0.0, nms_iou=1.0))
    assert len(s) == 6  # 1.0 turns NMS off


def test_threshold_cap_and_order():
    boxes, logits, presence = _raw(2)
    b, s, ids = select(boxes, logits, presence, (100, 100),
        DetectOptions(score_threshold=0.85, nms_iou=1.0))
    assert np.all(s > 0.85) and len(s) == 4
    b, s, ids = select(boxes, logits, presence, (100, 100),
        DetectOptions(score_threshold=0.0, nms_iou=1.0, max_detections=3))
    assert len(s) == 3 and np.all(np.diff(s) <= 0)
    assert ids.dtype == np.int32 and s.dtype == np.float32 and b.dtype == np.float32


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of one xyxy box and another (torchvision's)."""
    return float(_box_iou(torch.from_numpy(a), torch.from_numpy(b))[0, 0])


def test_nms_matches_bruteforce():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (60, 2))], 1)
    scores = rng.uniform(0, 1, 60)
    groups = rng.integers(0, 3, 60)
    keep = nms(boxes, scores, groups, 0.5)
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(groups[j] != groups[i] or box_iou(boxes[[i]], boxes[[j]]) <= 0.5
               for j in kept):
            kept.append(int(i))
    assert keep.tolist() == kept


@pytest.mark.parametrize("kw", [dict(score_threshold=2.0), dict(nms_iou=0.0),
                                dict(max_detections=0)])
def test_bad_options(kw):
    with pytest.raises(ValueError):
        select(*_raw(), (10, 10), DetectOptions(**kw))


# --- NMS at scale: per-group blocks, candidate caps, bounded memory ----------------------


def _greedy_reference(boxes, scores, groups, iou):
    """Greedy NMS as written in the textbooks: one box at a time, by descending score."""
    kept: list[int] = []
    for i in np.lexsort((np.arange(len(scores)), -scores)):
        if all(groups[j] != groups[i] or box_iou(boxes[[i]], boxes[[j]]) <= iou
               for j in kept):
            kept.append(int(i))
    return kept


def _random_boxes(rng, n):
    xy = rng.uniform(0, 50, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(0, 30, (n, 2))], 1)


@pytest.fixture(params=["numpy", "torch"])
def array_ops(request):
    """Each kind of input: numpy arrays, and torch tensors (as on a GPU, here on the CPU)."""
    return request.param


def _as(kind: str, *arrays):
    return tuple(torch.from_numpy(a) for a in arrays) if kind == "torch" else arrays


@pytest.mark.parametrize("seed", range(6))
def test_nms_is_greedy_nms(array_ops, seed):
    """Groups of unequal sizes and tied scores: the same boxes, in the same order, as the
    reference."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    boxes, scores = _random_boxes(rng, n), rng.integers(0, 12, n).astype(np.float64)
    groups = rng.integers(0, int(rng.integers(1, 40)), n)
    keep = nms(*_as(array_ops, boxes, scores, groups), 0.5, max_candidates=None,
               max_per_group=None)
    assert keep.tolist() == _greedy_reference(boxes, scores, groups, 0.5)


def test_torch_in_torch_out(array_ops):
    import torch

    rng = np.random.default_rng(7)
    boxes, scores, groups = _random_boxes(rng, 80), rng.uniform(0, 1, 80), rng.integers(0, 4, 80)
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), 0.5)
    assert isinstance(keep, torch.Tensor) and keep.device == torch.device("cpu")
    assert keep.tolist() == _greedy_reference(boxes, scores, groups, 0.5)
    raw = _sam3_like_raw(3, 20)
    from_torch = select(*(torch.from_numpy(a) for a in raw), torch.tensor([48, 64]),
        DetectOptions(0.2))
    for a, b in zip(from_torch, select(*raw, (48, 64), DetectOptions(0.2)), strict=True):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_candidate_caps(array_ops):
    rng = np.random.default_rng(3)
    n = 2000
    boxes, scores, groups = _random_boxes(rng, n), rng.uniform(0, 1, n), rng.integers(0, 5, n)
    inputs = _as(array_ops, boxes, scores, groups)
    full = nms(*inputs, 0.5, max_candidates=None, max_per_group=None)
    # Overall cap: NMS over the best 300 boxes is exactly the start of uncapped NMS.
    capped = nms(*inputs, 0.5, max_candidates=300, max_per_group=None)
    assert 0 < len(capped) < len(full) and capped.tolist() == full[: len(capped)].tolist()
    assert set(capped.tolist()) <= set(np.argsort(-scores)[:300].tolist())
    # Per-group cap: each group's best 50 boxes take part, and exactly those.
    per_group = nms(*inputs, 0.5, max_candidates=None, max_per_group=50)
    best = np.concatenate([np.flatnonzero(groups == g)[np.argsort(-scores[groups == g])[:50]]
                           for g in range(5)])
    ref = best[nms(boxes[best], scores[best], groups[best], 0.5, max_candidates=None,
                   max_per_group=None)]
    assert per_group.tolist() == ref.tolist()
    # NMS off: every index, sorted; no cap applies.
    assert len(nms(*inputs, 1.0, max_candidates=10)) == n


def _sam3_like_raw(n, q=200, seed=0):
    """Random head outputs shaped like SAM3's: n classes x q queries."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.8, (n, q, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.01, 0.3, (n, q, 2))], -1).astype(np.float32)
    return (boxes, rng.normal(size=(n, q)).astype(np.float32),
            rng.normal(size=(n, 1)).astype(np.float32))


@pytest.mark.parametrize("n", [80, 1024])
def test_score_threshold_zero_at_scale(n):
    """SCORE_THRESHOLD 0 sends every one of n x 200 boxes to NMS; the answer is the start
    of what NMS over all of them (no overall cap) returns."""
    from dart_triton.contract import specs

    raw = _sam3_like_raw(n)
    boxes, scores, ids = select(*raw, (480, 640), DetectOptions(score_threshold=0.0))
    assert len(scores) == specs.DEFAULT_MAX_DETECTIONS and np.all(np.diff(scores) <= 0)
    logits, presence = raw[1].astype(np.float64), raw[2].astype(np.float64)
    all_scores = (1 / (1 + np.exp(-logits)) / (1 + np.exp(-presence))).reshape(-1)
    pixel = (raw[0].reshape(-1, 4).astype(np.float64) * [640, 480, 640, 480]).clip(
        0, [640, 480, 640, 480])
    full = nms(pixel, all_scores, np.repeat(np.arange(n), 200), specs.DEFAULT_NMS_IOU,
               max_candidates=None)[: len(scores)]
    np.testing.assert_array_equal(ids, full // 200)
    np.testing.assert_allclose(boxes, pixel[full], rtol=1e-6)
    np.testing.assert_allclose(scores, all_scores[full], rtol=1e-6)


_MEMORY_PROBE = """
import resource
import numpy as np
from dart_triton.contract.validation import DetectOptions
from dart_triton.model.postprocess import nms, select

def _sam3_like_raw(n, q=200):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.8, (n, q, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.01, 0.3, (n, q, 2))], -1)
    return (boxes.astype(np.float32), rng.normal(size=(n, q)).astype(np.float32),
            rng.normal(size=(n, 1)).astype(np.float32))

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

raw = _sam3_like_raw(1024)
select(*_sam3_like_raw(2), (480, 640),
    DetectOptions(score_threshold=0.0))  # load torch's kernels first
before = peak_mb()
select(*raw, (480, 640), DetectOptions(score_threshold=0.0))
select(*raw, (480, 640), DetectOptions(score_threshold=0.0, max_detections=10**6))
# No overall cap: all 204,800 boxes go through NMS, a block of groups at a time.
boxes = raw[0].reshape(-1, 4).astype(np.float64)
nms(boxes, raw[1].reshape(-1), np.repeat(np.arange(1024), 200), 0.7, max_candidates=None)
print(peak_mb() - before)
"""


def test_nms_memory_stays_bounded():
    """Peak RSS growth of SCORE_THRESHOLD 0 over 1024 classes x 200 queries, in a fresh
    process (numbers from another test's allocations cannot leak in)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True,
                         timeout=240, check=True)
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 500, f"peak memory grew by {growth_mb:.0f} MB"
