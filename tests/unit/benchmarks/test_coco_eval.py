"""coco-eval without a server: ground truth fed back through the real mapping/JSONL/eval path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dart_triton.benchmarks import coco_eval
from dart_triton.client.errors import DartClientError
from dart_triton.contract.detections import Detections

# Non-contiguous ids, listed out of order, as in COCO's instances files.
CATEGORIES = [{"id": 44, "name": "bottle"}, {"id": 1, "name": "person"},
              {"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"},
              {"id": 18, "name": "dog"}]
SORTED_CAT_IDS = sorted(c["id"] for c in CATEGORIES)
NAME_OF = {c["id"]: c["name"] for c in CATEGORIES}
# image id -> (width, height, fill value that identifies the image to the fake detector)
IMAGES = {139: (320, 240, 30), 285: (300, 200, 80), 632: (256, 256, 130), 724: (400, 300, 180)}
# (image id, category id, x, y, w, h): small (< 32²), medium and large (> 96²) areas.
BOXES = [
    (139, 1, 10, 10, 20, 20), (139, 3, 60, 40, 50, 60), (139, 18, 150, 100, 120, 100),
    (285, 44, 5, 150, 16, 30), (285, 1, 100, 20, 40, 40), (285, 90, 140, 60, 150, 90),
    (632, 3, 20, 20, 200, 180), (632, 18, 220, 10, 24, 24),
    (724, 90, 30, 30, 60, 50), (724, 44, 300, 200, 28, 28), (724, 1, 100, 120, 180, 160),
    (724, 3, 10, 200, 45, 45),
]


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    pytest.importorskip("faster_coco_eval", reason="the eval extra is not installed")
    images_dir = tmp_path / "val"
    images_dir.mkdir()
    images = []
    for image_id, (w, h, fill) in IMAGES.items():
        name = f"{image_id:012d}.png"
        Image.new("RGB", (w, h), (fill, fill, fill)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    anns = [
        {"id": n + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
         "iscrowd": 0, "segmentation": [_diamond(x, y, w, h)]}
        for n, (i, c, x, y, w, h) in enumerate(BOXES)
    ]
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(
        {"images": images[::-1], "annotations": anns, "categories": CATEGORIES}))
    return images_dir, annotations


Shift = Callable[[int, int, int, int, int], tuple[int, int, int, int]]


def _diamond(x: float, y: float, w: float, h: float) -> list[float]:
    """A polygon that fills its box only in part, so mask AP is not box AP in disguise."""
    return [x, y + h / 2, x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h]


def _mask_counts(image_id: int, x: int, y: int, w: int, h: int) -> bytes:
    """The RLE counts of the (shifted) ground-truth polygon, as `dart` would send them."""
    from pycocotools import mask as mask_utils

    width, height, _ = IMAGES[image_id]
    return mask_utils.merge(mask_utils.frPyObjects([_diamond(x, y, w, h)], height, width))[
        "counts"]


def _no_shift(k: int, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
    return x, y, w, h


def _shift(k: int, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
    # Integer pixels stay exact in float32; shifts of 0, w/4 and w/2 straddle IoU thresholds.
    return x + (k % 3) * w // 4, y + (k % 2) * h // 8, w, h


def _score(k: int) -> float:
    return 1.0 - k / 64  # distinct and exact in float32, so rankings cannot tie


def _fake_detector(shift: Shift = _no_shift, calls: list[int] | None = None,
                   fail_after: int | None = None, masks: bool = False,
                   ) -> Callable[[np.ndarray], Detections]:
    """Answers with the (shifted) ground truth of whichever image it is shown; ``masks``:
    the ground-truth polygons too, as RLE masks."""
    by_fill = {fill: image_id for image_id, (_, _, fill) in IMAGES.items()}

    def detect(image: np.ndarray) -> Detections:
        image_id = by_fill[int(image[0, 0, 0])]
        if fail_after is not None and calls is not None and len(calls) >= fail_after:
            raise DartClientError("server restarting", "UNAVAILABLE")
        if calls is not None:
            calls.append(image_id)
        rows = [(k, c, *shift(k, x, y, w, h)) for k, (i, c, x, y, w, h) in enumerate(BOXES)
                if i == image_id]
        return Detections(
            boxes=np.array([[x, y, x + w, y + h] for _, _, x, y, w, h in rows], np.float32),
            scores=np.array([_score(k) for k, *_ in rows], np.float32),
            class_ids=np.array([SORTED_CAT_IDS.index(c) for _, c, *_ in rows], np.int32),
            # What the server echoes: the (templated) prompts, in sorted-category order.
            class_names=[f"a photo of a {NAME_OF[c]}" for c in SORTED_CAT_IDS],
            masks=[_mask_counts(image_id, *r[2:]) for r in rows] if masks else None,
            image_size=image.shape[:2] if masks else None,
        )

    return detect


def _main(images_dir: Path, annotations: Path, out: Path, detect, *extra: str) -> int:
    argv = ["--images", str(images_dir), "--annotations", str(annotations),
            "--output", str(out), "--concurrency", "3", "--no-progress", *extra]
    return coco_eval.main(argv, detect=detect)


def _metrics(out: Path) -> dict[str, float]:
    return json.loads((out / coco_eval.METRICS_NAME).read_text())["metrics"]


def _jsonl_ids(out: Path) -> list[int]:
    lines = (out / coco_eval.JSONL_NAME).read_text().splitlines()
    return [json.loads(line)["image_id"] for line in lines]


def test_ground_truth_gives_ap_one(coco, tmp_path, capsys):
    images_dir, annotations = coco
    out = tmp_path / "out"
    assert _main(images_dir, annotations, out, _fake_detector(),
                 "--prompt-template", "a photo of a {}") == 0
    assert _metrics(out) == {name: 1.0 for name in coco_eval.METRIC_NAMES}
    assert "100.0" in capsys.readouterr().out
    # CLASS_IDS went back to COCO's ids and names, not prompt indices or prompts.
    results = json.loads((out / coco_eval.RESULTS_NAME).read_text())
    got = sorted((r["image_id"], r["category_id"], r["category_name"], tuple(r["bbox"]))
                 for r in results)
    want = sorted((i, c, NAME_OF[c], (x, y, w, h)) for i, c, x, y, w, h in BOXES)
    assert got == want
    assert sorted(_jsonl_ids(out)) == sorted(IMAGES)
    record = json.loads((out / coco_eval.METRICS_NAME).read_text())
    assert record["images"] == len(IMAGES) and record["score_threshold"] == 0.05
    assert record["prompt_template"] == "a photo of a {}"


def test_shifted_boxes_match_the_evaluator_run_directly(coco, tmp_path):
    from faster_coco_eval import COCO, COCOeval_faster

    images_dir, annotations = coco
    out = tmp_path / "out"
    assert _main(images_dir, annotations, out, _fake_detector(_shift)) == 0

    direct = [{"image_id": i, "category_id": c, "bbox": list(_shift(k, x, y, w, h)),
               "score": _score(k)} for k, (i, c, x, y, w, h) in enumerate(BOXES)]
    (tmp_path / "direct.json").write_text(json.dumps(direct))
    gt = COCO(str(annotations))
    ev = COCOeval_faster(gt, gt.loadRes(str(tmp_path / "direct.json")), iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    expected = dict(zip(coco_eval.METRIC_NAMES, map(float, ev.stats[:6]), strict=True))

    assert _metrics(out) == expected
    assert 0.0 < expected["AP"] < 1.0


def test_resume_after_server_failure_and_truncated_line(coco, tmp_path, capsys):
    images_dir, annotations = coco
    out = tmp_path / "out"
    one_at_a_time = ("--concurrency", "1")

    # A server restart mid-run: what finished is kept, the command says how to resume.
    calls: list[int] = []
    detect = _fake_detector(calls=calls, fail_after=2)
    assert _main(images_dir, annotations, out, detect, *one_at_a_time) == 1
    assert "rerun the same command" in capsys.readouterr().err
    first = _jsonl_ids(out)
    assert first == calls and len(first) == 2

    # The rerun only sends the images that are missing.
    calls = []
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls)) == 0
    assert sorted(calls) == sorted(set(IMAGES) - set(first))
    assert _metrics(out)["AP"] == 1.0

    # A crash mid-write leaves half a line: that image is redone, nothing else.
    jsonl = out / coco_eval.JSONL_NAME
    lines = jsonl.read_text().splitlines(keepends=True)
    last_id = json.loads(lines[-1])["image_id"]
    jsonl.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    calls = []
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls)) == 0
    assert calls == [last_id]
    assert sorted(_jsonl_ids(out)) == sorted(IMAGES)  # every line parses again
    assert _metrics(out)["AP"] == 1.0

    # Nothing left to do: no requests at all.
    calls = []
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls)) == 0
    assert calls == []


def test_limit_and_changed_settings(coco, tmp_path):
    images_dir, annotations = coco
    out = tmp_path / "out"
    calls: list[int] = []
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls), "--limit", "2") == 0
    assert sorted(calls) == sorted(IMAGES)[:2]  # the first N by id
    record = json.loads((out / coco_eval.METRICS_NAME).read_text())
    assert record["images"] == 2 and record["metrics"]["AP"] == 1.0

    # Detections made with another threshold must not be mixed in silently.
    with pytest.raises(SystemExit, match="score_threshold"):
        _main(images_dir, annotations, out, _fake_detector(), "--score-threshold", "0.5")
    calls = []
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls),
                 "--score-threshold", "0.5", "--overwrite") == 0
    assert sorted(calls) == sorted(IMAGES)


def test_read_done_skips_malformed_lines(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"image_id": 1, "detections": []}\nnot json\n'
                     '{"image_id": 2, "detections": [{"score": 1}]}\n{"image_id": 3, "det')
    assert coco_eval.read_done(jsonl) == {1: [], 2: [{"score": 1}]}
    assert jsonl.read_text().endswith("}\n")  # partial tail cut, appends start clean
    assert coco_eval.read_done(tmp_path / "missing.jsonl") == {}


def test_server_imgsz_from_model_config():
    from dart_triton.client.server_errors import config_parameter

    assert config_parameter({"parameters": {"imgsz": {"string_value": "1008"}}}, "imgsz") == "1008"
    assert config_parameter({"parameters": {}}, "imgsz") is None
    assert config_parameter({}, "imgsz") is None


def test_missing_image_is_a_clear_error(coco, tmp_path, capsys):
    images_dir, annotations = coco
    (images_dir / "000000000632.png").unlink()
    assert _main(images_dir, annotations, tmp_path / "out", _fake_detector()) == 2
    assert "000000000632.png" in capsys.readouterr().err


# --- mask AP ---------------------------------------------------------------------------------
def test_mask_ap_of_ground_truth_is_one(coco, tmp_path, capsys):
    images_dir, annotations = coco
    out = tmp_path / "out"
    assert _main(images_dir, annotations, out, _fake_detector(masks=True),
                 "--iou-type", "bbox", "segm") == 0
    record = json.loads((out / coco_eval.METRICS_NAME).read_text())
    ones = {name: 1.0 for name in coco_eval.METRIC_NAMES}
    assert record["metrics_by_iou_type"] == {"bbox": ones, "segm": ones}
    assert record["metrics"] == ones and record["masks"] is True
    printed = capsys.readouterr().out
    assert "COCO box AP" in printed and "COCO mask AP" in printed
    results = json.loads((out / coco_eval.RESULTS_NAME).read_text())
    assert len(results) == len(BOXES)
    assert all(set(r["segmentation"]) == {"size", "counts"} for r in results)


def test_mask_ap_matches_the_evaluator_run_directly(coco, tmp_path):
    from faster_coco_eval import COCO, COCOeval_faster

    images_dir, annotations = coco
    out = tmp_path / "out"
    assert _main(images_dir, annotations, out, _fake_detector(_shift, masks=True),
                 "--iou-type", "segm") == 0

    direct = [{"image_id": i, "category_id": c, "score": _score(k),
               "segmentation": {"size": [IMAGES[i][1], IMAGES[i][0]],
                                "counts": _mask_counts(i, *_shift(k, x, y, w, h)).decode()}}
              for k, (i, c, x, y, w, h) in enumerate(BOXES)]
    gt = COCO(str(annotations))
    ev = COCOeval_faster(gt, gt.loadRes(direct), iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    expected = dict(zip(coco_eval.METRIC_NAMES, map(float, ev.stats[:6]), strict=True))
    record = json.loads((out / coco_eval.METRICS_NAME).read_text())
    assert record["metrics"] == expected and list(record["metrics_by_iou_type"]) == ["segm"]
    assert 0.0 < expected["AP"] < 1.0


def test_masks_are_a_setting_of_the_detections(coco, tmp_path):
    images_dir, annotations = coco
    out = tmp_path / "out"
    assert _main(images_dir, annotations, out, _fake_detector()) == 0
    # Boxes-only detections cannot give mask AP ...
    with pytest.raises(SystemExit, match="masks"):
        _main(images_dir, annotations, out, _fake_detector(masks=True), "--iou-type", "segm")
    calls: list[int] = []
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls, masks=True),
                 "--iou-type", "segm", "--overwrite") == 0
    assert sorted(calls) == sorted(IMAGES)
    # ... while detections with masks still serve box AP, and are remembered as having them.
    calls = []
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls)) == 0
    assert calls == [] and _metrics(out)["AP"] == 1.0
    assert _main(images_dir, annotations, out, _fake_detector(calls=calls, masks=True),
                 "--iou-type", "segm") == 0
    assert calls == [] and _metrics(out)["AP"] == 1.0
    with pytest.raises(SystemExit, match="mask_threshold"):
        _main(images_dir, annotations, out, _fake_detector(masks=True), "--iou-type", "segm",
              "--mask-threshold", "0.7")


def test_mask_ap_errors_are_one_line(coco, tmp_path, capsys):
    images_dir, annotations = coco
    # A detector (server) that sends no masks.
    assert _main(images_dir, annotations, tmp_path / "a", _fake_detector(),
                 "--iou-type", "segm") == 2
    assert "without masks" in capsys.readouterr().err
    assert _main(images_dir, annotations, tmp_path / "b", _fake_detector(masks=True),
                 "--iou-type", "segm", "--mask-threshold", "1") == 2
    assert "--mask-threshold must be in (0, 1)" in capsys.readouterr().err
    assert _main(images_dir, annotations, tmp_path / "b", _fake_detector(masks=True),
                 "--iou-type", "segm", "--model", "dart_ensemble") == 2
    assert "needs --model dart" in capsys.readouterr().err
    # Ground truth without masks.
    data = json.loads(annotations.read_text())
    for ann in data["annotations"][:3]:
        del ann["segmentation"]
    annotations.write_text(json.dumps(data))
    assert _main(images_dir, annotations, tmp_path / "c", _fake_detector(masks=True),
                 "--iou-type", "segm") == 2
    err = capsys.readouterr().err
    assert "3 annotations" in err and "no segmentation" in err
