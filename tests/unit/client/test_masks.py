"""Masks on demand, client side: COCO RLE round trips, the request `masks=True` makes, and
`detect --masks`, `label --masks` (COCO and YOLO segmentation) against the in-process fake
Triton of `test_client` (which answers MASKS as `dart` does: RLE of each box's pixels)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dart_triton.client.errors import DartClientError
from dart_triton.client.masks import decode_masks, encode_mask, rle, run_lengths
from dart_triton.contract import specs
from dart_triton.contract.detections import Detections
from tests.helpers import run_cli
from tests.unit.client.test_client import (  # noqa: F401 - fake_url: test_client's fixture
    _Recorder,
    fake_url,
)

CLASSES = ["person", "rocket", "cup"]


def _random_masks(k: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.random((k, h, w)) < rng.random((k, 1, 1))
    if k:
        masks[0] = False  # an empty mask is a mask too
    return masks


def _dets(masks: np.ndarray) -> Detections:
    k, h, w = masks.shape
    boxes = np.tile(np.array([[1, 2, 5, 7]], np.float32), (k, 1))
    return Detections(boxes, np.linspace(0.9, 0.4, k), np.arange(k) % 3, CLASSES,
                      masks=tuple(encode_mask(m) for m in masks), image_size=(h, w))


# --- RLE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 37, 53), (1, 8, 8), (0, 12, 9)])
def test_rle_round_trip(shape):
    masks = _random_masks(*shape)
    dets = _dets(masks)
    decoded = decode_masks(dets)
    assert decoded.dtype == bool and decoded.shape == shape
    assert np.array_equal(decoded, masks)
    for i in range(len(dets)):
        from pycocotools import mask as mask_utils

        one = rle(dets, i)
        assert one["size"] == [shape[1], shape[2]]
        assert np.array_equal(mask_utils.decode(one).astype(bool), masks[i])
        assert sum(run_lengths(one["counts"])) == shape[1] * shape[2]


def test_malformed_rle_and_missing_masks_are_value_errors():
    masks = _random_masks(2, 10, 10)
    good = _dets(masks)
    too_long = Detections(good.boxes, good.scores, good.class_ids, CLASSES,
                          masks=good.masks, image_size=(9, 10))
    with pytest.raises(ValueError, match="does not cover 9x10 pixels"):
        decode_masks(too_long)
    cut = Detections(good.boxes, good.scores, good.class_ids, CLASSES,
                     masks=(good.masks[0], b"1\x7f"), image_size=(10, 10))
    with pytest.raises(ValueError, match="malformed mask 1"):
        decode_masks(cut)
    plain = Detections(good.boxes, good.scores, good.class_ids, CLASSES)
    with pytest.raises(ValueError, match="no masks"):
        decode_masks(plain)
    with pytest.raises(ValueError, match="masks for"):
        Detections(good.boxes, good.scores, good.class_ids, CLASSES, masks=good.masks[:1],
                   image_size=(10, 10))


def test_to_coco_segmentation_loads_in_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    masks = _random_masks(4, 30, 40, seed=3)
    dets = _dets(masks)
    results = json.loads(json.dumps(dets.to_coco(7)))  # JSON: the counts are str
    assert all(r["segmentation"]["size"] == [30, 40] for r in results)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert "segmentation" not in Detections.empty(CLASSES).to_coco(7) and \
        "segmentation" not in _plain(dets).to_coco(7)[0]

    gt = COCO()
    gt.dataset = {"images": [{"id": 7, "width": 40, "height": 30}], "annotations": [],
                  "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}
    gt.createIndex()
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    dt = gt.loadRes(segm_only)
    for ann, mask in zip(dt.loadAnns(dt.getAnnIds()), masks, strict=True):
        assert np.array_equal(dt.annToMask(ann).astype(bool), mask)
        assert ann["area"] == mask.sum()
    assert np.array_equal(mask_utils.decode(results[2]["segmentation"]).astype(bool), masks[2])


def _plain(dets: Detections) -> Detections:
    return Detections(dets.boxes, dets.scores, dets.class_ids, dets.class_names)


# --- the request ----------------------------------------------------------------------------
def test_mask_inputs_only_when_asked():
    from dart_triton.client.inputs import mask_arrays

    assert mask_arrays(False) == {}
    arrays = mask_arrays(True, 0.25)
    flag = arrays[specs.RETURN_MASKS]
    assert flag.dtype == bool and flag.tolist() == [True]
    assert arrays[specs.MASK_THRESHOLD].dtype == np.float32
    assert arrays[specs.MASK_THRESHOLD].tolist() == [0.25]
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="MASK_THRESHOLD must be in"):
            mask_arrays(True, bad)


def test_image_size_of_pixels_and_files_with_exif_rotation():
    from dart_triton.client.images import image_size

    assert image_size(np.zeros((21, 34, 3), np.uint8)) == (21, 34)
    for orientation, want in ((1, (21, 34)), (6, (34, 21)), (3, (21, 34)), (8, (34, 21))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = io.BytesIO()
        Image.new("RGB", (34, 21)).save(out, "JPEG", exif=exif)
        assert image_size(out.getvalue()) == want, orientation
    with pytest.raises(ValueError, match="header"):
        image_size(b"not an image")


def test_fake_server_returns_masks_only_when_asked(fake_url):  # noqa: F811 - the fixture
    from dart_triton.client.triton_client import DartClient

    protocol, url, recorder = fake_url
    with DartClient(url, protocol) as client:
        _masks_only_when_asked(client, recorder)


def _masks_only_when_asked(client, recorder: _Recorder) -> None:
    frame = np.full((40, 64, 3), 7, np.uint8)
    plain = client.detect(frame, CLASSES)
    assert recorder.requests[-1] == {specs.IMAGE, specs.CLASSES}  # as before masks existed
    assert plain.masks is None and plain.image_size is None

    dets = client.detect(frame, CLASSES, masks=True, mask_threshold=0.3)
    assert recorder.requests[-1] == {specs.IMAGE, specs.CLASSES, specs.RETURN_MASKS,
                                     specs.MASK_THRESHOLD}
    assert dets.image_size == (40, 64) and len(dets.masks) == len(dets) == 3
    masks = decode_masks(dets)
    for box, mask in zip(dets.boxes.astype(int), masks, strict=True):
        want = np.zeros((40, 64), bool)
        want[box[1]:box[3], box[0]:box[2]] = True
        assert np.array_equal(mask, want)

    # A file sent as it is: the size comes from its header.
    data = io.BytesIO()
    Image.fromarray(frame).save(data, "PNG")
    future = client.detect_async(data.getvalue(), CLASSES, masks=True)
    assert future.result().image_size == (40, 64)
    streamed = list(client.detect_stream([frame, frame], CLASSES, masks=True))
    assert all(d.masks == dets.masks for d in streamed)
    with pytest.raises(ValueError, match="MASK_THRESHOLD"):
        client.detect(frame, CLASSES, masks=True, mask_threshold=1.5)


def test_masks_of_the_wrong_count_are_a_server_error():
    from dart_triton.client.request import Request, parse_result

    class Result:
        def as_numpy(self, name):
            return {specs.BOXES: np.zeros((2, 4), np.float32),
                    specs.SCORES: np.zeros(2, np.float32),
                    specs.CLASS_IDS: np.zeros(2, np.int32),
                    specs.MASKS: np.array([b"0"], dtype=object)}.get(name)

    with pytest.raises(DartClientError, match=r"malformed response.*1 masks for 2"):
        parse_result(Result(), Request([], None, ["a"], (4, 4)), "dart")


# --- drawing and tracking -------------------------------------------------------------------
def test_annotate_draws_masks_at_the_image_size(photo):
    pytest.importorskip("supervision")
    from dart_triton.client.draw import annotate

    image = np.ascontiguousarray(photo[:200, :300])
    mask = np.zeros((1, 200, 300), bool)
    mask[0, 50:150, 100:200] = True
    dets = Detections(np.array([[90, 40, 210, 160]], np.float32), [0.9], [0], CLASSES,
                      masks=(encode_mask(mask[0]),), image_size=(200, 300))
    with_mask, without = annotate(image, dets), annotate(image, _plain(dets))
    inside = (slice(80, 120), slice(130, 170))  # well inside the mask, away from the label
    assert (with_mask[inside] != without[inside]).any()
    assert np.array_equal(with_mask[190:, :50], image[190:, :50])  # far outside: untouched
    with pytest.raises(ValueError, match="masks are"):
        annotate(np.ascontiguousarray(photo[:100, :300]), dets)


def test_tracked_boxes_keep_their_masks():
    pytest.importorskip("trackers")
    from dart_triton.client.tracking import MultiClassTracker

    masks = _random_masks(3, 50, 60, seed=5)
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [30, 0, 50, 15]], np.float32)
    dets = Detections(boxes, [0.9, 0.8, 0.7], [1, 0, 1], CLASSES,
                      masks=tuple(encode_mask(m) for m in masks), image_size=(50, 60))
    tracker = MultiClassTracker(CLASSES, min_frames=1)
    for _ in range(3):
        tracked = tracker.update(dets)
    assert len(tracked) == 3 and tracked.detections.image_size == (50, 60)
    decoded = decode_masks(tracked.detections)
    for box, mask in zip(tracked.detections.boxes, decoded, strict=True):
        row = next(i for i in range(3) if np.array_equal(boxes[i], box))
        assert np.array_equal(mask, masks[row])


# --- command lines, against the fake server -------------------------------------------------
def test_cli_detect_masks_json_and_annotate(fake_url, photo_dir, tmp_path, capsys):  # noqa: F811 - the fixture
    pytest.importorskip("supervision")
    from pycocotools import mask as mask_utils

    from dart_triton.client.cli import detect_main

    protocol, url, recorder = fake_url
    image = photo_dir / "coffee.png"
    out = tmp_path / "dets.json"
    code, _, err = run_cli(detect_main, [image, "--classes", *CLASSES, "--url", url,
                                         "--protocol", protocol, "--masks", "--json", out,
                                         "--annotate", tmp_path / "drawn.png"], capsys)
    assert code == 0, err
    assert specs.RETURN_MASKS in recorder.requests[-1]
    results = json.loads(out.read_text())
    with Image.open(image) as src:
        w, h = src.size
    assert len(results) == 3
    for r in results:
        x, y, bw, bh = (int(v) for v in r["bbox"])
        mask = mask_utils.decode(r["segmentation"]).astype(bool)
        assert r["segmentation"]["size"] == [h, w] and mask.shape == (h, w)
        assert mask.sum() == max(0, min(x + bw, w) - x) * bh
    assert (tmp_path / "drawn.png").is_file()

    code, _, err = run_cli(detect_main, [image, "--classes", "cup", "--url", url,
                                         "--mask-threshold", "0.4"], capsys)
    assert code == 2 and err == ["dart-triton detect: error: --mask-threshold needs --masks"]
    code, _, err = run_cli(detect_main, [image, "--classes", "cup", "--url", url, "--masks",
                                         "--mask-threshold", "1"], capsys)
    assert code == 2 and "--mask-threshold must be in (0, 1)" in err[0] and len(err) == 1
    code, _, err = run_cli(detect_main, [image, "--classes", "cup", "--url", url, "--masks",
                                         "--model", "dart_ensemble"], capsys)
    assert code == 2 and err == ["dart-triton detect: error: --masks needs --model dart: "
                                 "dart_ensemble returns boxes only"]


def _label_dir(photo_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (root / f"{name}.png").symlink_to(photo_dir / f"{name}.png")
    return root


def _yolo_lines(label_dir: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().splitlines() for p in sorted(label_dir.glob("*.txt"))}


def test_cli_label_masks_coco_and_yolo(fake_url, photo_dir, tmp_path, capsys):  # noqa: F811 - the fixture
    pytest.importorskip("cv2")
    from pycocotools.coco import COCO

    from dart_triton.client.label import label_main

    protocol, url, _ = fake_url
    images = _label_dir(photo_dir, tmp_path)
    out = tmp_path / "dataset"
    common = [images, "--classes", *CLASSES, "--out", out, "--protocol", protocol,
              "--no-progress", "--masks"]
    code, stdout, err = run_cli(label_main, [*common, "--format", "coco", "--url", url], capsys)
    assert code == 0, err
    coco = COCO(str(out / "annotations" / "instances.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 9 and "9 masks" in stdout
    for ann in anns:
        image = coco.loadImgs([ann["image_id"]])[0]
        mask = coco.annToMask(ann).astype(bool)
        assert mask.shape == (image["height"], image["width"])
        assert ann["area"] == mask.sum() and ann["segmentation"]["size"] == list(mask.shape)
        x, y, w, h = (int(v) for v in ann["bbox"])
        assert mask[y:y + h, x:x + w].sum() == mask.sum()  # the mask lies in its box

    # --format changes without asking a server again (none is there); masks become polygons.
    code, stdout, err = run_cli(label_main, [*common, "--format", "yolo", "--url", "127.0.0.1:9"],
                                capsys)
    assert code == 0, err
    lines = _yolo_lines(out / "labels")
    assert sorted(lines) == ["astronaut", "chelsea", "coffee"]
    count = 0
    for stem, rows in lines.items():
        for row in rows:
            cls, *coords = row.split()
            values = [float(v) for v in coords]
            assert int(cls) in range(len(CLASSES)) and len(values) % 2 == 0
            assert len(values) >= 6 and all(0.0 <= v <= 1.0 for v in values), (stem, row)
            count += 1
    assert count == 9
    # A polygon outlines its box: the fake's masks are the boxes' pixels.
    with Image.open(images / "coffee.png") as src:
        w, h = src.size
    journal = [json.loads(line) for line in
               (out / ".dart-label" / "journal.jsonl").read_text().splitlines()]
    record = next(r for r in journal if r["file"] == "coffee.png")
    boxes = sorted((d["class"], d["bbox"]) for d in record["detections"])
    polygons = sorted((int(r.split()[0]), np.array(r.split()[1:], float).reshape(-1, 2))
                      for r in lines["coffee"])
    for (cls, (x, y, bw, bh)), (pcls, xy) in zip(boxes, polygons, strict=True):
        assert cls == pcls
        np.testing.assert_allclose(xy.min(0), [x / w, y / h], atol=1e-5)
        np.testing.assert_allclose(xy.max(0), [(x + bw - 1) / w, (y + bh - 1) / h], atol=1e-5)


def test_cli_label_masks_is_a_setting_of_the_journal(fake_url, photo_dir, tmp_path, capsys):  # noqa: F811 - the fixture
    from dart_triton.client.label import label_main

    protocol, url, _ = fake_url
    images = _label_dir(photo_dir, tmp_path)
    common = [images, "--classes", "cup", "--out", tmp_path / "ds", "--url", url,
              "--protocol", protocol, "--no-progress", "--format", "coco"]
    code, _, err = run_cli(label_main, common, capsys)
    assert code == 0, err
    code, _, err = run_cli(label_main, [*common, "--masks"], capsys)
    assert code == 2 and "different masks, mask_threshold" in err[0] and len(err) == 1
    code, _, err = run_cli(label_main, [*common, "--masks", "--overwrite"], capsys)
    assert code == 0, err


def test_yolo_polygon_skips_masks_without_an_outline(tmp_path, capsys):
    pytest.importorskip("cv2")
    from dart_triton.client.label import Categories, write_dataset

    masks = np.zeros((3, 20, 30), bool)
    masks[0, 5:12, 4:20] = True
    masks[1, 10, 3:25] = True  # one pixel thin: its outline has 2 points
    # masks[2] is empty
    dets = _dets(masks)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (30, 20)).save(images / "a.png")
    record = {"file": "a.png", "width": 30, "height": 20,
              "detections": [{"bbox": d["bbox"], "score": d["score"], "class": d["category_id"],
                              "segmentation": d["segmentation"]} for d in dets.to_coco(0)]}
    written = write_dataset(tmp_path / "ds", images, [record], ["a"],
                            Categories(CLASSES, [0, 1, 2]), "yolo", 0.7, masks=True)
    assert written == 1
    (line,) = (tmp_path / "ds" / "labels" / "a.txt").read_text().splitlines()
    assert line.split()[0] == "0" and len(line.split()) == 9  # a rectangle: 4 corners
    assert "2 of 3 masks have no outline" in capsys.readouterr().err


def test_cli_video_masks_tracked(fake_url, photo, tmp_path, capsys):  # noqa: F811 - the fixture
    pytest.importorskip("av")
    pytest.importorskip("trackers")
    from dart_triton.client.video_cli import video_main

    protocol, url, recorder = fake_url
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):  # a real photo, panning: the first pixel (the fake's box x) changes
        Image.fromarray(np.ascontiguousarray(photo[i * 4:i * 4 + 96, :128])).save(
            frames / f"{i:03d}.png")
    out = tmp_path / "out"
    code, stdout, err = run_cli(video_main, [frames, "--classes", "cup", "rocket", "--out",
                                             f"{out}/", "--url", url, "--protocol", protocol,
                                             "--masks", "--track", "--encode", "jpeg",
                                             "--no-progress"], capsys)
    assert code == 0, err
    assert "4 frames" in stdout and len(list(out.glob("*.jpg"))) == 4
    assert all(specs.RETURN_MASKS in r and specs.IMAGE_BYTES in r for r in recorder.requests)
