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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dart_triton.contract.detections import Detections

from .draw import annotate
from .pipeline import SupportsResult, interleaved
from .streams import (
    VIDEO_SUFFIXES,
    WRITABLE_SUFFIXES,
    Frame,
    FrameSource,
    VideoError,
    closing_all,
    open_sink,
    open_source,
)
from .tracking import MotWriter, MultiClassTracker

__all__ = ["WRITABLE_SUFFIXES", "VideoError", "VideoInterrupted", "VideoJob", "VideoStats",
           "annotate_video", "annotate_videos", "readable_suffixes"]


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
    error: str | None = None  # the source failed, or gave no frame

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
    """Ctrl-C; the outputs were closed and hold ``stats.frames`` whole frames (``streams``:
    the stats of each input, when there were several)."""

    def __init__(self, stats: VideoStats | Sequence[VideoStats]) -> None:
        self.streams = [stats] if isinstance(stats, VideoStats) else list(stats)
        self.stats = self.streams[0]
        super().__init__(f"interrupted after {sum(s.frames for s in self.streams)} frames")


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


class VideoJob(NamedTuple):
    """One input of `annotate_videos`: its source, its annotated output, its MOT file."""

    src: str | Path
    dst: str | Path
    tracks: str | Path | None = None


TrackerArg = MultiClassTracker | Callable[[float], MultiClassTracker] | None


class _Stream:
    """One input's source and outputs, and what has been written to them."""

    def __init__(self, job: VideoJob, source: FrameSource, tracker: TrackerArg,
                 warn: Callable[[str], None]) -> None:
        self.job, self.source = job, source
        if tracker is not None and not isinstance(tracker, MultiClassTracker):
            tracker = tracker(source.fps)
        self.tracker: MultiClassTracker | None = tracker
        self.sink: Any = open_sink(job.dst, source.fps, vfr=source.live, warn=warn)
        try:
            self.mot = MotWriter(job.tracks) if job.tracks is not None else None
        except BaseException:
            self.sink.close()
            raise
        self.frames = self.boxes = 0

    def closables(self) -> list[Any]:
        return [x for x in (self.source, self.mot, self.sink) if x is not None]

    def write(self, frame: Frame, detections: Detections, guard: _HeldInterrupts) -> None:
        if self.tracker is not None:
            tracked = self.tracker.update(
                detections, timestamp=frame.time if self.source.live else None)
            image = annotate(frame.image, tracked.detections, tracked.ids)
        else:
            image = annotate(frame.image, detections)
        with guard.held():
            self.sink.write(image, frame.time)
            self.frames += 1
            if self.tracker is not None:
                self.boxes += len(tracked)
            if self.mot is not None:
                self.mot.write(self.frames, tracked)

    def stats(self, seconds: float, *, finished: bool = False) -> VideoStats:
        error = self.source.stats.error
        if finished and error is None and self.frames == 0:
            error = f"{self.job.src}: no frame could be decoded"
        return VideoStats(self.frames, seconds, self.source.stats.dropped,
                          self.source.stats.reopened,
                          self.tracker.tracks_seen if self.tracker else 0, self.boxes,
                          self.source.live, error)


def annotate_video(
    src: str | Path,
    dst: str | Path,
    submit: Callable[[np.ndarray], SupportsResult[Detections]],
    *,
    tracks: str | Path | None = None,
    **options: Any,
) -> VideoStats:
    """Write ``dst`` (an MP4, or a folder of frames) with every frame of ``src`` annotated.

    ``src`` is a video file, a folder of frames (sorted by name, ``fps`` apart, default
    30) or a URL FFmpeg opens. ``submit(frame)`` starts detection of one frame and returns
    something with a blocking ``result()`` (e.g. ``DartClient.detect_async`` with the
    classes bound); ``options`` are `annotate_videos`' (in_flight, tracker, ...).

    Raises VideoError (outputs complete up to the frames in ``err.stats``) when the
    source cannot be opened or stops early, and VideoInterrupted on Ctrl-C.
    """
    (result,) = annotate_videos([VideoJob(src, dst, tracks)], submit, **options)
    if result.error:
        err = VideoError(result.error)
        err.stats = result
        raise err
    return result


def annotate_videos(
    jobs: Sequence[VideoJob],
    submit: Callable[[np.ndarray], SupportsResult[Detections]],
    *,
    in_flight: int = 4,
    max_frames: int | None = None,
    progress: bool = True,
    fps: float | None = None,
    live: bool | None = None,
    reconnect: int = 10,
    tracker: TrackerArg = None,
    warn: Callable[[str], None] = _stderr,
) -> list[VideoStats]:
    """Annotate several inputs at once (cameras into one server): frames are taken round
    robin and up to ``in_flight`` requests are pending over all of them together; each
    input's results are used in its frame order and written to its own outputs.

    With ``tracker`` (a function of a source's frame rate that makes one; an instance
    only for one input) each input is tracked on its own and, with its job's ``tracks``,
    written as MOTChallenge lines. ``max_frames`` counts per input. An input whose
    source fails stops alone: its stats carry the error, the others go on. Raises
    VideoInterrupted (every output complete up to its frames) on Ctrl-C. Timing covers
    decode, inference and encode: the throughput a user of the whole pipeline sees.
    """
    from tqdm import tqdm

    if any(job.tracks is not None for job in jobs) and tracker is None:
        raise ValueError("tracks (a MOT file) needs a tracker")
    if isinstance(tracker, MultiClassTracker) and len(jobs) > 1:
        raise ValueError("several inputs need a tracker each: pass a function of the "
                         "frame rate that makes one")
    streams: list[_Stream] = []
    try:
        for job in jobs:
            source = open_source(job.src, fps=fps, live=live, reconnect=reconnect)
            try:
                streams.append(_Stream(job, source, tracker, warn))
            except BaseException:
                source.close()
                raise
    except BaseException:
        for stream in streams:
            with closing_all(*stream.closables()):
                pass
        raise
    start = time.perf_counter()
    expected = [s.source.expected if max_frames is None or s.source.expected is None
                else min(s.source.expected, max_frames) for s in streams]
    total = None if None in expected else sum(e for e in expected if e is not None)
    guard = _HeldInterrupts()
    closables = [x for stream in streams for x in stream.closables()]
    try:
        with guard, closing_all(*closables), tqdm(
            total=total, unit="frame", disable=not progress
        ) as bar:
            frames = [itertools.islice(s.source, max_frames) for s in streams]

            def send(frame: Frame) -> SupportsResult[Detections]:
                # Not cut short by Ctrl-C: an interrupt inside the client's send (gRPC's
                # C core) could leave it holding a lock that closing it then waits on.
                with guard.held():
                    return submit(frame.image)

            try:
                for index, frame, detections in interleaved(frames, send, in_flight):
                    streams[index].write(frame, detections, guard)
                    bar.update()
            finally:
                guard.hold_from_now()  # closing the outputs is not cut short by Ctrl-C
    except KeyboardInterrupt:
        seconds = time.perf_counter() - start
        raise VideoInterrupted([s.stats(seconds) for s in streams]) from None
    seconds = time.perf_counter() - start
    return [s.stats(seconds, finished=True) for s in streams]
