"""Annotate a video: read frames, keep K requests in flight, track, draw, write in order.

Sources and sinks are in `streams` (a file, a folder of frames or a URL in; an MP4 or a
folder of frames out), tracking in `tracking`. Ctrl-C is held back while a frame and its
MOT lines are being written, and the outputs are closed on the way out: the MP4 stays
playable and the MOT file holds whole frames.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dart_triton.contract.detections import Detections

from .draw import annotate
from .pipeline import SupportsResult, in_order
from .streams import (
    VIDEO_SUFFIXES,
    WRITABLE_SUFFIXES,
    Frame,
    VideoError,
    closing_all,
    open_sink,
    open_source,
)
from .tracking import MotWriter, MultiClassTracker

__all__ = ["WRITABLE_SUFFIXES", "VideoError", "VideoInterrupted", "VideoStats",
           "annotate_video", "readable_suffixes"]


def readable_suffixes() -> tuple[str, ...]:
    """Extensions taken for video files (FFmpeg probes the content, whatever the name)."""
    return VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoStats:
    frames: int  # frames written (annotated)
    seconds: float
    dropped: int = 0  # live: frames that arrived while K requests were in flight
    reopened: int = 0  # live: times a lost stream was reopened
    tracks: int = 0  # --track: IDs handed out
    tracked_boxes: int = 0  # --track: boxes with an ID (the MOT file's lines)
    live: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = f"{self.frames} frames in {self.seconds:.2f} s: {self.fps:.1f} FPS"
        if self.tracks or self.tracked_boxes:
            text += f"; {self.tracks} tracks, {self.tracked_boxes} tracked boxes"
        if self.live:
            text += f"; live: {self.dropped} frames dropped, reopened {self.reopened} times"
        return text


class VideoInterrupted(KeyboardInterrupt):
    """Ctrl-C; the outputs were closed and hold ``stats.frames`` whole frames."""

    def __init__(self, stats: VideoStats) -> None:
        super().__init__(f"interrupted after {stats.frames} frames")
        self.stats = stats


class _HeldInterrupts:
    """SIGINT raises KeyboardInterrupt, except inside `held()`, where it waits for the end.

    A frame half muxed into the MP4, or half of a frame's MOT lines, would break the
    promise that an interrupted run leaves complete files. Only the main thread can set
    signal handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> _HeldInterrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]

    def _handler(self, signum: int, frame: object) -> None:
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    def hold_from_now(self) -> None:
        """Hold every SIGINT from here to the end (closing the outputs)."""
        self._depth += 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending and sys.exc_info()[0] is None:
                self._pending = False
                raise KeyboardInterrupt


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def annotate_video(
    src: str | Path,
    dst: str | Path,
    submit: Callable[[np.ndarray], SupportsResult[Detections]],
    *,
    in_flight: int = 4,
    max_frames: int | None = None,
    progress: bool = True,
    fps: float | None = None,
    live: bool | None = None,
    reconnect: int = 10,
    tracker: MultiClassTracker | Callable[[float], MultiClassTracker] | None = None,
    tracks: str | Path | None = None,
    warn: Callable[[str], None] = _stderr,
) -> VideoStats:
    """Write ``dst`` (an MP4, or a folder of frames) with every frame of ``src`` annotated.

    ``src`` is a video file, a folder of frames (sorted by name, ``fps`` apart, default
    30) or a URL FFmpeg opens. ``submit(frame)`` starts detection of one frame and returns
    something with a blocking ``result()`` (e.g. ``DartClient.detect_async`` with the
    classes bound); up to ``in_flight`` frames wait on it at a time, and results are used
    in frame order. With ``tracker`` (or a function of the source's frame rate that makes
    one), boxes are drawn with their track IDs and, with ``tracks``, written as
    MOTChallenge lines.

    Raises VideoError (outputs complete up to the frames in ``err.stats``) when the
    source cannot be opened or stops early, and VideoInterrupted on Ctrl-C. Timing covers
    decode, inference and encode: the throughput a user of the whole pipeline sees.
    """
    from tqdm import tqdm

    if tracks is not None and tracker is None:
        raise ValueError("tracks (a MOT file) needs a tracker")
    source = open_source(src, fps=fps, live=live, reconnect=reconnect)
    try:
        if tracker is not None and not isinstance(tracker, MultiClassTracker):
            tracker = tracker(source.fps)
        sink = open_sink(dst, source.fps, vfr=source.live, warn=warn)
        mot = MotWriter(tracks) if tracks is not None else None
    except BaseException:
        source.close()
        raise
    count = boxes = 0
    start = time.perf_counter()

    def stats() -> VideoStats:
        return VideoStats(count, time.perf_counter() - start, source.stats.dropped,
                          source.stats.reopened, tracker.tracks_seen if tracker else 0,
                          boxes, source.live)

    def submit_frame(frame: Frame) -> SupportsResult[Detections]:
        return submit(frame.image)

    total = source.expected if max_frames is None or source.expected is None else min(
        source.expected, max_frames)
    guard = _HeldInterrupts()
    try:
        with guard, closing_all(source, *([mot] if mot else []), sink), tqdm(
            total=total, unit="frame", disable=not progress
        ) as bar:
            frames = itertools.islice(source, max_frames)
            try:
                for frame, detections in in_order(frames, submit_frame, in_flight):
                    if tracker is not None:
                        tracked = tracker.update(
                            detections, timestamp=frame.time if source.live else None)
                        image = annotate(frame.image, tracked.detections, tracked.ids)
                    else:
                        image = annotate(frame.image, detections)
                    with guard.held():
                        sink.write(image, frame.time)
                        count += 1
                        if tracker is not None:
                            boxes += len(tracked)
                        if mot is not None:
                            mot.write(count, tracked)
                    bar.update()
            finally:
                guard.hold_from_now()  # closing the outputs is not cut short by Ctrl-C
    except KeyboardInterrupt:
        raise VideoInterrupted(stats()) from None
    result = stats()
    if source.stats.error or count == 0:
        err = VideoError(source.stats.error or f"{src}: no frame could be decoded")
        err.stats = result
        raise err
    return result
