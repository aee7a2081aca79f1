"""Tracking on a synthetic stream of detections: boxes moving linearly, one hidden for a few
frames, one that fades below the track-start threshold. IDs must stay stable and unique
across classes, and the MOT file must be exactly the ground truth (no server needed)."""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from dart_triton.contract.detections import Detections

pytest.importorskip("trackers")
pytest.importorskip("supervision")

CLASSES = ("car", "person")
FRAMES = 20
HIDDEN = range(8, 12)  # frames (1-based) in which object C is not detected
FADED = range(7, 13)  # frames in which D scores 0.2: under `high`, over ByteTrack's low 0.1


def ground_truth(frame: int) -> list[tuple[str, int, tuple[float, ...], float]]:
    """(object, class, xyxy, score) of every detection in ``frame`` (1-based)."""
    f = frame - 1
    objects = [
        ("A", 0, (10.5 + 4 * f, 20.25, 50.5 + 4 * f, 60.25), 0.9),  # car, moving right
        ("C", 0, (200.0, 10.0 + 3 * f, 230.0, 40.0 + 3 * f), 0.8),  # car, moving down
        ("B", 1, (300.0 - 5 * f, 100.0, 330.0 - 5 * f, 170.0), 0.7),  # person, moving left
        ("D", 1, (40.0, 150.0 + 2 * f, 70.0, 200.0 + 2 * f), 0.2 if frame in FADED else 0.9),
    ]
    if frame in HIDDEN:
        objects = [o for o in objects if o[0] != "C"]
    if frame > FADED.stop - 1:  # D leaves after fading
        objects = [o for o in objects if o[0] != "D"]
    return objects


def detections(frame: int) -> Detections:
    objs = ground_truth(frame)
    return Detections(np.array([o[2] for o in objs], np.float32), np.array([o[3] for o in objs]),
                      np.array([o[1] for o in objs]), CLASSES)


# Tracks are confirmed on their 2nd frame; per-class ByteTracks both number from 0, the
# global IDs go class by class in order of confirmation: A, C (cars), then B, D (persons).
EXPECTED_IDS = {"A": 1, "C": 2, "B": 3, "D": 4}


def expected_mot() -> str:
    lines = []
    for frame in range(2, FRAMES + 1):
        rows = sorted((EXPECTED_IDS[o], c, box, s) for o, c, box, s in ground_truth(frame))
        for tid, cls, (x1, y1, x2, y2), score in rows:
            lines.append(f"{frame},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},"
                         f"{score:.4f},{cls},-1,-1\n")
    return "".join(lines)


def test_ids_stable_unique_and_mot_exact(tmp_path):
    from dart_triton.client.tracking import MotWriter, MultiClassTracker

    tracker = MultiClassTracker(CLASSES, frame_rate=30, high=0.3)
    writer = MotWriter(tmp_path / "tracks.txt")
    seen: dict[int, set[tuple[str, int]]] = {}
    for frame in range(1, FRAMES + 1):
        tracked = tracker.update(detections(frame))
        writer.write(frame, tracked)
        truth = {tuple(np.float32(v) for v in o[2]): o[0] for o in ground_truth(frame)}
        for box, tid, cls in zip(tracked.detections.boxes, tracked.ids.tolist(),
                                 tracked.detections.class_ids.tolist(), strict=True):
            seen.setdefault(tid, set()).add((truth[tuple(box)], cls))
        if frame == 1:
            assert len(tracked) == 0  # nothing confirmed yet
    writer.close()
    # One object and one class per ID; C kept its ID across the gap, D across its fade.
    assert {tid: next(iter(objs))[0] for tid, objs in seen.items()} == {
        v: k for k, v in EXPECTED_IDS.items()}
    assert all(len(objs) == 1 for objs in seen.values())
    assert tracker.tracks_seen == 4
    text = (tmp_path / "tracks.txt").read_text()
    assert text.splitlines()[0] == "2,1,14.50,20.25,40.00,40.00,0.9000,0,-1,-1"
    assert text == expected_mot()


def test_low_scores_do_not_start_tracks():
    """A box between ByteTrack's low threshold and `high` continues a track, never starts one."""
    from dart_triton.client.tracking import MultiClassTracker

    tracker = MultiClassTracker(CLASSES, high=0.5)
    box = np.array([[10, 10, 50, 50]], np.float32)
    for _ in range(5):
        tracked = tracker.update(Detections(box, np.array([0.3]), np.array([1]), CLASSES))
        assert len(tracked) == 0
    assert tracker.tracks_seen == 0


def test_video_pipeline_tracks_out_of_order_answers(tmp_path):
    """The same stream through `annotate_video`: a folder of frames in, 3 requests in flight
    answered out of order, the tracker fed in frame order: the MOT file is still exact and
    the annotated frames come out one per input frame."""
    from PIL import Image

    from dart_triton.client.tracking import MultiClassTracker
    from dart_triton.client.video import annotate_video

    frames = tmp_path / "frames"
    frames.mkdir()
    for frame in range(1, FRAMES + 1):  # unpadded names: frame_2 sorts before frame_10
        image = np.zeros((240, 352, 3), np.uint8)
        image[0, 0, 0] = frame  # which frame the detector is looking at (PNG is lossless)
        Image.fromarray(image).save(frames / f"frame_{frame}.png")

    pool = ThreadPoolExecutor(3)

    def detect(image: np.ndarray) -> Detections:
        time.sleep(random.uniform(0, 0.01))
        return detections(int(image[0, 0, 0]))

    def submit(image: np.ndarray) -> Future[Detections]:
        return pool.submit(detect, image)

    out, mot = tmp_path / "annotated", tmp_path / "tracks.txt"
    stats = annotate_video(frames, out, submit, in_flight=3, progress=False, fps=30,
                           tracker=MultiClassTracker(CLASSES, frame_rate=30, high=0.3),
                           tracks=mot)
    pool.shutdown()
    assert stats.frames == FRAMES and stats.tracks == 4
    assert mot.read_text() == expected_mot()
    assert stats.tracked_boxes == len(expected_mot().splitlines())
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [f"{i:06d}.jpg" for i in range(1, FRAMES + 1)]
    assert Image.open(written[0]).size == (352, 240)
