"""Multi-object tracking of `dart` detections, and MOTChallenge output.

ByteTrack comes from Roboflow's `trackers` package (supervision 0.26+ moved its own
ByteTrack there and now delegates to it). Tracks are kept per class: one ByteTrack per
class index, so a "car" box never continues a "person" track. Each ByteTrack numbers its
tracks from 0; this module gives every (class, track) pair one global ID, 1, 2, 3, ... in
the order tracks are confirmed, so IDs are unique across classes.

ByteTrack's two stages map onto DART's scores: boxes scoring at least ``high`` start and
continue tracks; boxes between ``low`` and ``high`` only continue tracks that already exist
(an object half-hidden behind another keeps its ID). The server is therefore asked for
detections down to ``low``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from dart_triton.contract.detections import Detections

# The ByteTrack paper's second-stage threshold (0.1): boxes this good may continue a track.
DEFAULT_LOW = 0.1
# Frames (at 30 FPS; scaled to the real rate) a lost track waits for its object to return.
DEFAULT_LOST_FRAMES = 30


@dataclass(frozen=True)
class Tracked:
    """The tracked boxes of one frame (detector boxes, not Kalman-smoothed), by ID."""

    detections: Detections
    ids: np.ndarray  # [K] int64, >= 1, unique across classes

    def __len__(self) -> int:
        return len(self.ids)


class MultiClassTracker:
    """One ByteTrack per class, one ID space. ``update`` once per frame, in frame order.

    ``frame_rate`` scales ByteTrack's lost-track buffer. Pass ``timestamp`` (seconds,
    increasing) when frames are not evenly spaced (a live stream that drops frames), so
    the motion model predicts over the real gap.
    """

    def __init__(self, class_names: Sequence[str], *, frame_rate: float = 30.0,
                 high: float = 0.3, lost_frames: int = DEFAULT_LOST_FRAMES,
                 min_frames: int = 2) -> None:
        if not 0.0 <= high <= 1.0:
            raise ValueError(f"high must be in [0, 1], got {high}")
        from trackers import ByteTrackTracker  # imported here: only --track needs it

        self.class_names = tuple(class_names)
        self._make = lambda: ByteTrackTracker(
            lost_track_buffer=lost_frames,
            frame_rate=frame_rate,
            track_activation_threshold=high,
            high_conf_det_threshold=high,
            minimum_consecutive_frames=min_frames,
        )
        self._trackers: dict[int, Any] = {}  # class index -> its ByteTrack, made on first use
        self._ids: dict[tuple[int, int], int] = {}  # (class, ByteTrack id) -> global ID
        self._next_id = itertools.count(1)

    @property
    def tracks_seen(self) -> int:
        """How many IDs were handed out so far."""
        return len(self._ids)

    def update(self, detections: Detections, timestamp: float | None = None) -> Tracked:
        import supervision as sv

        rows: list[np.ndarray] = []
        ids: list[int] = []
        present = set(np.unique(detections.class_ids).tolist())
        # Every class with a tracker is updated, boxes or not, so its lost tracks age.
        for cls in sorted(present | set(self._trackers)):
            tracker = self._trackers.get(cls)
            if tracker is None:
                tracker = self._trackers[cls] = self._make()
            picked = np.flatnonzero(detections.class_ids == cls)
            out = tracker.update(
                sv.Detections(
                    xyxy=detections.boxes[picked].astype(np.float64).reshape(-1, 4),
                    confidence=detections.scores[picked],
                    class_id=np.full(len(picked), cls, dtype=np.int64),
                    data={"row": picked},
                ),
                timestamp=timestamp,
            )
            if not len(out):
                continue
            local = np.asarray(out.tracker_id)
            kept = np.flatnonzero(local >= 0)
            # New tracks of one frame get IDs in ByteTrack's order, within the class order.
            for k in sorted(kept.tolist(), key=lambda k: int(local[k])):
                key = (cls, int(local[k]))
                if key not in self._ids:
                    self._ids[key] = next(self._next_id)
                rows.append(np.asarray(out.data["row"])[k])
                ids.append(self._ids[key])
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        picked = np.asarray(rows, dtype=np.int64).reshape(-1)[order]
        # Masks follow their boxes by row: a tracked box keeps the mask it came with.
        masks = (None if detections.masks is None
                 else tuple(detections.masks[i] for i in picked.tolist()))
        subset = Detections(detections.boxes[picked], detections.scores[picked],
                            detections.class_ids[picked], detections.class_names,
                            masks=masks, image_size=detections.image_size)
        return Tracked(subset, np.asarray(ids, dtype=np.int64)[order])


def mot_lines(frame: int, tracked: Tracked) -> str:
    """MOTChallenge lines ``frame,id,x,y,w,h,score,class,-1,-1`` of one frame.

    ``frame`` counts from 1; x, y is the top-left corner in pixels; ``class`` the 0-based
    index into the class list; 2 decimals for coordinates, 4 for the score.
    """
    d = tracked.detections
    lines = []
    for (x1, y1, x2, y2), score, cls, tid in zip(d.boxes.tolist(), d.scores.tolist(),
                                                d.class_ids.tolist(), tracked.ids.tolist(),
                                                strict=True):
        lines.append(f"{frame},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},"
                     f"{score:.4f},{cls},-1,-1\n")
    return "".join(lines)


class MotWriter:
    """A MOTChallenge file written a frame at a time: flushed, so it is complete up to the
    last frame written whenever the run stops."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("w")
        self.lines = 0

    def write(self, frame: int, tracked: Tracked) -> None:
        if self._file is None or not len(tracked):
            return
        self._file.write(mot_lines(frame, tracked))
        self._file.flush()
        self.lines += len(tracked)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
