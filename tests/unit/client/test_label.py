"""`dart-triton label` on the session's real tritonserver: the COCO and YOLO datasets load in
their usual readers and hold exactly the boxes `dart-triton detect --json` gives for the
same images and threshold; an interrupted run resumes and labels each image once."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli

CLASSES = ["person", "flag", "rocket"]
THRESHOLD = "0.2"


def label(argv, capsys):
    from dart_triton.client.label import label_main

    return run_cli(label_main, argv, capsys)


@pytest.fixture()
def image_dir(tmp_path, photo) -> Path:
    """Five photo crops; two share the name x.* in different subfolders."""
    root = tmp_path / "images"
    for rel, crop in {"a/x.jpg": photo[:300, :260], "b/x.png": photo[100:, 150:],
                      "y.jpg": photo[::2, ::2], "c/z.webp": photo[200:, :300],
                      "c/d/w.png": photo[50:350, 80:400]}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(root / rel, **({"quality": 95} if rel.endswith("jpg") else {}))
    return root


def _detect_json(images: list[Path], server, tmp_path, capsys) -> dict[str, list[dict]]:
    """`dart-triton detect --json` of the images: detections by path relative to the root."""
    from dart_triton.client.cli import detect_main

    out = tmp_path / "detect.json"
    code, _, err = run_cli(detect_main, [*images, "--classes", *CLASSES, "--json", out,
                                      "--score-threshold", THRESHOLD, "--url", server.grpc_url],
                        capsys)
    assert code == 0, err
    return {r["file_name"]: r["detections"] for r in json.loads(out.read_text())}


def _dart_requests(server, at_least: int = 0) -> int:
    """Requests `dart` answered so far (statistics extension). A response can reach the
    client just before its statistics are recorded, so wait (bounded) until the count
    reaches ``at_least`` and holds still."""
    def count() -> int:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/dart/stats",
                                    timeout=30) as resp:
            stats = json.load(resp)["model_stats"]
        return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)

    deadline = time.monotonic() + 10
    last = count()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = count()
        if now == last and now >= at_least:
            break
        last = now
    return last


def test_coco_and_yolo_hold_the_boxes_of_detect(triton_server, image_dir, tmp_path, capsys):
    import supervision as sv
    from pycocotools.coco import COCO

    from dart_triton.client.label import scan_images

    paths = scan_images(image_dir)
    assert [p.relative_to(image_dir).as_posix() for p in paths] == [
        "a/x.jpg", "b/x.png", "c/d/w.png", "c/z.webp", "y.jpg"]
    expected = {str(Path(k).relative_to(image_dir).as_posix()): v
                for k, v in _detect_json(paths, triton_server, tmp_path, capsys).items()}
    assert sum(map(len, expected.values())) > 0

    out = tmp_path / "dataset"
    common = ["--classes", *CLASSES, "--out", out, "--score-threshold", THRESHOLD,
              "--url", triton_server.grpc_url, "--no-progress"]
    code, stdout, err = label([image_dir, *common, "--format", "coco"], capsys)
    assert code == 0, err
    coco = COCO(str(out / "annotations" / "instances.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    assert len(coco.getImgIds()) == 5
    for image in coco.loadImgs(coco.getImgIds()):
        dets = expected[image["source_file"]]
        with Image.open(image_dir / image["source_file"]) as src:
            assert (image["width"], image["height"]) == src.size
        assert (out / "images" / image["file_name"]).resolve() == \
            (image_dir / image["source_file"]).resolve()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        got = sorted((CLASSES[a["category_id"] - 1], a["bbox"], a["score"]) for a in anns)
        assert got == sorted((d["category_name"], d["bbox"], d["score"]) for d in dets)
        assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3]
                   for a in anns)
    assert f"5 images, {sum(map(len, expected.values()))} boxes" in stdout

    # --format may change on a rerun: the journal answers, the server is not asked again.
    before = _dart_requests(triton_server)
    code, _, err = label([image_dir, *common, "--format", "yolo"], capsys)
    assert code == 0, err
    assert _dart_requests(triton_server) == before
    assert not (out / "annotations").exists()
    labels = sorted(p.name for p in (out / "labels").iterdir())
    assert labels == ["a__x.txt", "b__x.txt", "w.txt", "y.txt", "z.txt"]
    dataset = sv.DetectionDataset.from_yolo(str(out / "images"), str(out / "labels"),
                                            str(out / "data.yaml"))
    assert dataset.classes == CLASSES and len(dataset) == 5
    sources = {json.loads(line)["file"] for line in
               (out / ".dart-label" / "journal.jsonl").read_text().splitlines()}
    assert sources == set(expected)
    for path, _, dets in dataset:
        rel = Path(path).resolve().relative_to(image_dir.resolve()).as_posix()
        want = sorted((CLASSES.index(d["category_name"]), *d["bbox"]) for d in expected[rel])
        got = sorted((int(c), x1, y1, x2 - x1, y2 - y1)
                     for c, (x1, y1, x2, y2) in zip(dets.class_id, dets.xyxy, strict=True))
        assert len(got) == len(want)
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1:] for g in got], [w[1:] for w in want], atol=0.01)


def test_merge_groups_become_one_category(triton_server, image_dir, tmp_path, capsys):
    from pycocotools.coco import COCO

    out = tmp_path / "merged"
    code, _, err = label([image_dir, "--classes", *CLASSES, "--out", out, "--format", "coco",
                          "--merge", "flag,rocket=thing", "--score-threshold", THRESHOLD,
                          "--nms-iou", "0.5", "--url", triton_server.grpc_url, "--no-progress"],
                         capsys)
    assert code == 0, err
    coco = COCO(str(out / "annotations" / "instances.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["person", "thing"]
    journal = [json.loads(line) for line in
               (out / ".dart-label" / "journal.jsonl").read_text().splitlines()]
    for record in journal:
        image = next(i for i in coco.loadImgs(coco.getImgIds())
                     if i["source_file"] == record["file"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        things = [a["bbox"] for a in anns if a["category_id"] == 2]
        raw = [d["bbox"] for d in record["detections"] if d["class"] in (1, 2)]
        persons = [d["bbox"] for d in record["detections"] if d["class"] == 0]
        assert sorted(a["bbox"] for a in anns if a["category_id"] == 1) == sorted(persons)
        assert all(b in raw for b in things) and len(things) <= len(raw)
        # No two "thing" boxes overlap beyond the NMS IoU any more.
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in things]).reshape(-1, 4)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                lt = np.maximum(boxes[i, :2], boxes[j, :2])
                rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
                inter = np.prod(np.clip(rb - lt, 0, None))
                area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
                assert inter / (area[i] + area[j] - inter) <= 0.5 + 1e-6


def test_usage_errors(image_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    closed = ["--url", "127.0.0.1:9"]
    cases = [
        (["--merge", "flag,rocket"], "write groups as a,b=name"),
        (["--merge", "flag,boat=thing"], "'boat' is not one of --classes"),
        (["--merge", "flag=a;flag,rocket=b"], "is in two groups"),
        (["--out", foreign], "did not write"),
        (["--out", image_dir], "is the image folder"),
    ]
    for extra, fragment in cases:
        argv = [image_dir, "--classes", *CLASSES, "--format", "yolo", "--out",
                tmp_path / "ds", *closed, *extra]
        code, _, err = label(argv, capsys)
        assert code == 2 and len(err) == 1 and fragment in err[0], (extra, err)
    code, _, err = label([tmp_path / "nothing", "--classes", "cat", "--format", "coco",
                          "--out", tmp_path / "ds", *closed], capsys)
    assert code == 2 and "no such folder" in err[0]


def test_interrupted_run_resumes_and_labels_each_image_once(triton_server, image_dir, tmp_path,
                                                             capsys, monkeypatch):
    """Ctrl-C after 3 answers (K = 1), a journal line cut short by the crash, a corrupt
    image: the rerun sends exactly the images not yet in the journal, each image is in
    the journal and the dataset once, and the corrupt one is reported and skipped."""
    from dart_triton.client.triton_client import DartClient

    (image_dir / "c" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "resume"
    argv = [image_dir, "--classes", *CLASSES, "--out", out, "--format", "coco",
            "--score-threshold", THRESHOLD, "--in-flight", "1", "--url",
            triton_server.grpc_url, "--no-progress"]
    real = DartClient.detect_async
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DartClient, "detect_async", interrupted)
    code, _, err = label(argv, capsys)
    assert code == 130 and "interrupted: 3 of 6 images labelled" in err[-1]
    monkeypatch.setattr(DartClient, "detect_async", real)
    journal = out / ".dart-label" / "journal.jsonl"
    assert len(journal.read_text().splitlines()) == 3
    with journal.open("a") as f:  # a crash in the middle of the 4th line
        f.write('{"file": "c/z.webp", "width": 3')

    before = _dart_requests(triton_server)
    code, stdout, err = label(argv, capsys)
    assert code == 1  # the corrupt image
    # 6 images - 3 done - 1 unreadable
    assert _dart_requests(triton_server, at_least=before + 2) == before + 2
    assert any("resuming: 3 of 6" in line for line in err)
    assert sum("broken.jpg" in line for line in err) == 1
    files = [json.loads(line)["file"] for line in journal.read_text().splitlines()]
    assert sorted(files) == ["a/x.jpg", "b/x.png", "c/d/w.png", "c/z.webp", "y.jpg"]
    data = json.loads((out / "annotations" / "instances.json").read_text())
    assert sorted(i["source_file"] for i in data["images"]) == sorted(files)
    assert "5 images" in stdout
