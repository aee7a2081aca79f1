"""Annotate a video: decode, keep K requests in flight, draw, encode in input order."""

from __future__ import annotations

import itertools
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detections import Detections
from .draw import annotate
from .pipeline import SupportsResult, in_order

# Containers that hold the H.264 stream `annotate_video` writes.
WRITABLE_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi")


class VideoError(RuntimeError):
    """A video that cannot be read or written; ``str(err)`` is one line naming the file."""


def readable_suffixes() -> tuple[str, ...]:
    """Extensions imageio's FFMPEG reader accepts (it picks the reader by extension)."""
    import imageio.v2 as iio

    with warnings.catch_warnings():  # imageio deprecates its format table, not the reader
        warnings.simplefilter("ignore", DeprecationWarning)
        return tuple(iio.formats["FFMPEG"].extensions)


def _ffmpeg_reason(err: BaseException) -> str:
    """One line out of imageio's error, which appends ffmpeg's whole stderr."""
    text = str(err)
    head, _, stderr = text.partition("=== stderr ===")
    # ffmpeg's own verdict on the input, e.g. "[in#0 @ 0x..] moov atom not found".
    verdicts = [m.group(1) for m in re.finditer(r"^\[in#\d+ @ [^]]+\] (.+)$", stderr, re.M)]
    if verdicts:
        return verdicts[-1]
    if "does not contain any stream" in stderr:
        return "no video stream found"
    return head.strip().splitlines()[0] if head.strip() else type(err).__name__


def _frames_checked(frames: Iterator[np.ndarray], src: str | Path) -> Iterator[np.ndarray]:
    try:
        yield from frames
    except (OSError, RuntimeError, ValueError) as e:  # a stream that breaks mid-way
        raise VideoError(f"{src}: cannot decode the video: {_ffmpeg_reason(e)}") from None


@dataclass(frozen=True)
class VideoStats:
    frames: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return f"{self.frames} frames in {self.seconds:.2f} s: {self.fps:.1f} FPS"


def _frames(reader: object) -> Iterator[np.ndarray]:
    for frame in reader:  # type: ignore[attr-defined]
        # imageio yields an ndarray subclass; rgb24 already, but grey/alpha sources exist.
        frame = np.asarray(frame)
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, axis=2)
        yield np.ascontiguousarray(frame[..., :3])


def _expected_frames(meta: dict, max_frames: int | None) -> int | None:
    n = meta.get("nframes")
    if not isinstance(n, int | float) or not math.isfinite(n):
        duration, fps = meta.get("duration"), meta.get("fps")
        n = round(duration * fps) if duration and fps else None
    if max_frames is not None:
        n = max_frames if n is None else min(int(n), max_frames)
    return None if n is None else int(n)


def annotate_video(
    src: str | Path,
    dst: str | Path,
    submit: Callable[[np.ndarray], SupportsResult[Detections]],
    *,
    in_flight: int = 4,
    max_frames: int | None = None,
    progress: bool = True,
) -> VideoStats:
    """Write ``dst`` (MP4, H.264) with every frame of ``src`` annotated.

    ``submit(frame)`` starts detection of one frame and returns something with a
    blocking ``result()`` (e.g. ``DartClient.detect_async`` with the classes bound);
    up to ``in_flight`` frames wait on it at a time. Timing covers decode,
    inference and encode: the throughput a user of the whole pipeline sees.
    """
    import imageio.v2 as iio
    from tqdm import tqdm

    # imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp, i.e. fork() and Python code
    # in the child: with gRPC threads busy (a client sending frames, the writer's ffmpeg
    # starts at the first frame) the child dies in about 1 start in 15 and the pipe
    # breaks. Without preexec_fn, subprocess uses vfork+exec. (ffmpeg then shares our
    # process group and sees Ctrl-C too, which stops it anyway.)
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        reader = iio.get_reader(str(src), format="FFMPEG")
        meta = reader.get_meta_data()
    except (OSError, RuntimeError, ValueError) as e:
        raise VideoError(f"{src}: cannot read as a video: {_ffmpeg_reason(e)}") from None
    try:
        try:
            # macro_block_size=2: H.264/yuv420p needs even sides; 16 would rescale most sizes.
            writer = iio.get_writer(
                str(dst),
                format="FFMPEG",
                fps=meta.get("fps") or 30.0,
                codec="libx264",
                quality=8,
                macro_block_size=2,
            )
        except (OSError, RuntimeError, ValueError) as e:
            raise VideoError(f"{dst}: cannot write a video there: {_ffmpeg_reason(e)}") from None
        try:
            frames = itertools.islice(_frames_checked(_frames(reader), src), max_frames)
            bar = tqdm(
                total=_expected_frames(meta, max_frames), unit="frame", disable=not progress
            )
            count = 0
            start = time.perf_counter()
            with bar:
                for frame, detections in in_order(frames, submit, in_flight):
                    writer.append_data(annotate(frame, detections))
                    count += 1
                    bar.update()
            seconds = time.perf_counter() - start
        finally:
            writer.close()
    finally:
        reader.close()
    if count == 0:
        raise VideoError(f"{src}: no frame could be decoded")
    return VideoStats(count, seconds)
