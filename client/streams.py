"""Where frames come from (a video file, a folder of frames, any URL FFmpeg opens) and where
annotated frames go (an H.264 MP4, or a folder of JPEG frames).

PyAV (FFmpeg in this process) reads and writes: no ffmpeg subprocess to start or to lose
to a Ctrl-C, read timeouts on network streams, and an MP4 whose index is written when the
sink closes, after an interruption too.

Frames are decoded on a thread of their own. A file or a folder is read with back-pressure
(nothing is skipped). A live source (RTSP, RTMP, UDP, SRT, an HTTP stream without a
duration, or ``live=True``) keeps only the newest frame: the frames that arrive while the
consumer is busy (K requests in flight) are dropped and counted, and a lost stream is
reopened with exponential backoff.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

# What `video` accepts as a video file, and what `--classes` refuses as a class name.
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                  ".m2ts", ".mts", ".flv", ".wmv", ".3gp", ".mjpeg", ".mjpg", ".y4m")
# Containers that hold the H.264 stream `Mp4Sink` writes.
WRITABLE_SUFFIXES = (".mp4", ".mov", ".mkv")
# URL schemes that are live by nature; http(s) is live when the stream has no duration.
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "rtp", "srt", "udp", "tcp"})
DEFAULT_FPS = 30.0
# Seconds FFmpeg may block opening a URL / waiting for the next packet before giving up
# (then a live stream is reopened).
OPEN_TIMEOUT, READ_TIMEOUT = 15.0, 10.0
# Reopening a lost live stream: 0.5, 1, 2, 4, ... seconds between tries, at most 10.
BACKOFF, BACKOFF_MAX = 0.5, 10.0


class VideoError(RuntimeError):
    """A source or sink that cannot be read or written; ``str(err)`` is one line naming it.

    ``stats`` is set when frames were already written (the outputs are complete up to
    them) before the failure.
    """

    stats: Any = None


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # RGB uint8 [H, W, 3]
    number: int  # 1-based position in the source, dropped frames included
    time: float  # seconds: stream time (files, folders), arrival time (live; monotonic)


@dataclass
class SourceStats:
    dropped: int = 0  # live: frames that arrived while K requests were in flight
    reopened: int = 0  # live: times the stream was reopened after it was lost
    error: str | None = None  # why reading stopped early (set by the reader thread)


def is_url(spec: str | Path) -> bool:
    return isinstance(spec, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec) is not None


def natural_key(name: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_suffixes() -> frozenset[str]:
    """Extensions Pillow reads (``.jpg``, ``.png``, ...), lower case."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def frame_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (numbers as numbers)."""
    suffixes = image_suffixes()
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
    return sorted(files, key=lambda p: natural_key(p.name))


def _ffmpeg_reason(err: BaseException, logs: list[tuple[int, str, str]] = ()) -> str:
    """One line: FFmpeg's own last complaint, else the exception's text without errno noise."""
    said = [" ".join(msg.split()) for _, _, msg in logs if msg.strip()]
    text = getattr(err, "strerror", None) or str(err)
    text = re.sub(r"^\[Errno -?\d+\] ", "", " ".join(str(text).split()))
    if said and said[-1] not in text:
        return f"{text} ({said[-1]})" if text else said[-1]
    return text or type(err).__name__


# --- sources ------------------------------------------------------------------------------
class _Handoff:
    """Frames from the reader thread to the consumer.

    Not live: a bounded queue, the reader waits (nothing is lost). Live: one slot holding
    the newest frame; a frame that replaces one the consumer has not taken is dropped.
    """

    _END = object()

    def __init__(self, live: bool, depth: int, stats: SourceStats) -> None:
        self.live = live
        self.stats = stats
        self.stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._slot: Any = None
        self._ended = False
        self._cond = threading.Condition()

    def put(self, frame: Frame) -> bool:
        """Hand a frame over; False once the consumer has stopped."""
        if self.live:
            with self._cond:
                if self._slot is not None:
                    self.stats.dropped += 1
                self._slot = frame
                self._cond.notify()
            return not self.stop.is_set()
        while not self.stop.is_set():
            try:
                self._queue.put(frame, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def end(self) -> None:
        if self.live:
            with self._cond:
                self._ended = True
                self._cond.notify()
        else:
            while not self.stop.is_set():
                try:
                    self._queue.put(self._END, timeout=0.2)
                    return
                except queue.Full:
                    continue

    def get(self) -> Frame | None:
        """The next frame, or None at the end."""
        if self.live:
            with self._cond:
                while self._slot is None and not self._ended:
                    self._cond.wait(0.5)
                frame, self._slot = self._slot, None
                return frame
        item = self._queue.get()
        return None if item is self._END else item


class FrameSource:
    """Frames of a file, folder or URL, decoded on a reader thread; iterate once, then close.

    ``fps`` is the rate of the source (``fps=`` overrides it; folders default to 30);
    ``expected`` the frame count when known. ``stats.error`` says why reading stopped
    early, if it did.
    """

    def __init__(self, name: str, fps: float, live: bool, expected: int | None,
                 produce: Callable[[_Handoff], None], depth: int = 8,
                 discard: Callable[[], None] | None = None) -> None:
        self.name = name
        self.fps = fps
        self.live = live
        self.expected = expected
        self.stats = SourceStats()
        self._handoff = _Handoff(live, depth, self.stats)
        self._produce = produce
        self._discard = discard  # frees what `produce` would have, if it never runs
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            self._produce(self._handoff)
        except Exception as e:  # never lose a reader failure silently
            self.stats.error = f"{self.name}: {_ffmpeg_reason(e)}"
        finally:
            self._handoff.end()

    def __iter__(self) -> Iterator[Frame]:
        if self._thread is not None:
            raise RuntimeError("a FrameSource is iterated once")
        self._thread = threading.Thread(target=self._run, name="dart-frames", daemon=True)
        self._thread.start()
        while (frame := self._handoff.get()) is not None:
            yield frame

    def close(self) -> None:
        """Stop the reader; a blocked network read gives up within READ_TIMEOUT."""
        self._handoff.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        elif self._discard is not None:
            self._discard()
            self._discard = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _folder_source(folder: Path, fps: float | None) -> FrameSource:
    from .images import ImageFileError, load_image

    files = frame_files(folder)
    if not files:
        raise VideoError(f"{folder}: no image files in this folder")
    rate = fps or DEFAULT_FPS
    source: FrameSource

    def produce(handoff: _Handoff) -> None:
        for number, path in enumerate(files, 1):
            try:
                image = load_image(path)
            except ImageFileError as e:
                source.stats.error = str(e)
                return
            if not handoff.put(Frame(image, number, (number - 1) / rate)):
                return

    source = FrameSource(str(folder), rate, False, len(files), produce)
    return source


def _open_av(target: str) -> tuple[Any, Any]:
    """(container, video stream) of a file or URL, or VideoError with FFmpeg's reason."""
    import av
    import av.logging

    options = {"rtsp_transport": "tcp"} if target.lower().startswith("rtsp") else {}
    av.logging.set_level(av.logging.ERROR)  # captured below, never printed
    try:
        with av.logging.Capture() as logs:
            try:
                container = av.open(target, options=options,
                                    timeout=(OPEN_TIMEOUT, READ_TIMEOUT))
            except (av.FFmpegError, OSError, ValueError) as e:
                raise VideoError(f"{target}: cannot read as a video: "
                                 f"{_ffmpeg_reason(e, logs)}") from None
        if not container.streams.video:
            container.close()
            said = f" ({' '.join(logs[-1][2].split())})" if logs else ""
            raise VideoError(f"{target}: cannot read as a video: no video stream found{said}")
    finally:
        av.logging.set_level(None)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads: decoding keeps up with the server
    return container, stream


def _av_source(target: str, fps: float | None, live: bool | None, reconnect: int) -> FrameSource:
    container, stream = _open_av(target)
    rate = float(stream.average_rate or stream.guessed_rate or 0) or DEFAULT_FPS
    if live is None:
        scheme = urlsplit(target).scheme.lower() if is_url(target) else ""
        live = scheme in LIVE_SCHEMES or (bool(scheme) and container.duration is None)
    expected = None if live else (stream.frames or None)
    opened = [container]
    source: FrameSource

    seen = 0  # frames read so far, over every (re)opening: the next Frame.number

    def decode(container: Any, handoff: _Handoff) -> bool:
        """Frames of one opened container; False once the consumer has stopped."""
        nonlocal seen
        try:
            for frame in container.decode(video=0):
                seen += 1
                when = time.monotonic() if live else (
                    frame.time if frame.time is not None else (seen - 1) / rate)
                image = frame.to_ndarray(format="rgb24")
                if not handoff.put(Frame(image, seen, float(when))):
                    return False
        finally:
            container.close()
        return True

    def produce(handoff: _Handoff) -> None:
        failures = 0
        container: Any = opened.pop()
        while True:
            reason, before = "the stream ended", seen
            try:
                if not decode(container, handoff):
                    return
            except Exception as e:  # a broken file, a dropped connection, a read timeout
                reason = _ffmpeg_reason(e)
            if seen > before:  # frames came: an outage starts its count of tries afresh
                failures = 0
            if not live:
                if reason != "the stream ended":
                    source.stats.error = f"{target}: cannot decode the video: {reason}"
                return
            # Live: reopen with backoff until a frame comes, at most `reconnect` tries in a row.
            while True:
                if failures >= reconnect:
                    source.stats.error = (f"{target}: stream lost ({reason}); gave up after "
                                          f"{reconnect} reopen attempt(s)")
                    return
                if handoff.stop.wait(min(BACKOFF * 2 ** failures, BACKOFF_MAX)):
                    return
                failures += 1
                try:
                    container, _ = _open_av(target)
                except VideoError as e:
                    reason = str(e).split(": ", 1)[-1]
                    continue
                source.stats.reopened += 1
                break

    source = FrameSource(target, fps or rate, live, expected, produce, discard=container.close)
    return source


def open_source(spec: str | Path, *, fps: float | None = None, live: bool | None = None,
                reconnect: int = 10) -> FrameSource:
    """A `FrameSource` for a video file, a folder of frames or a URL (VideoError if not)."""
    if is_url(spec):
        return _av_source(str(spec), fps, live, reconnect)
    path = Path(spec)
    if path.is_dir():
        return _folder_source(path, fps)
    if not path.exists():
        raise VideoError(f"{path}: no such video file or folder")
    return _av_source(str(path), fps, bool(live), reconnect)


# --- sinks --------------------------------------------------------------------------------
@dataclass
class Mp4Sink:
    """H.264 (yuv420p) into an MP4/MOV/MKV, opened at the first frame (its size).

    Odd sides are padded by one pixel (4:2:0 needs even sides); a frame of another size
    than the first (a live stream that came back at another resolution) is resized to
    it. ``vfr``: frame times become presentation times (a live stream with dropped frames
    plays at real speed); otherwise frames are 1/fps apart.
    """

    path: Path
    fps: float
    vfr: bool = False
    warn: Callable[[str], None] | None = None
    frames: int = 0
    _container: Any = None
    _stream: Any = None
    _size: tuple[int, int] | None = None
    _time_base: Fraction = Fraction(1, 1000)
    _first_time: float = 0.0
    _last_pts: int = -1
    _resized: bool = field(default=False, repr=False)

    def _open(self, width: int, height: int) -> None:
        import av

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            rate = Fraction(self.fps).limit_denominator(1001)
            stream = self._container.add_stream("libx264", rate=rate)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{self.path}: cannot write a video there: "
                             f"{_ffmpeg_reason(e)}") from None
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        # Kept here: once the header is written, stream.time_base is the muxer's (1/12800).
        self._time_base = Fraction(1, 1000) if self.vfr else 1 / rate
        stream.time_base = self._time_base
        # The encoder's too: frames are rescaled to it, and at 1/rate two frames that
        # arrived within one period would share a timestamp.
        stream.codec_context.time_base = self._time_base
        self._stream = stream
        self._size = (width, height)

    def write(self, image: np.ndarray, time_s: float | None = None) -> None:
        import av

        h, w = image.shape[:2]
        if self._size is None:
            self._open(w + w % 2, h + h % 2)
            self._first_time = time_s or 0.0
        width, height = self._size  # type: ignore[misc]
        if (w + w % 2, h + h % 2) != (width, height):
            from PIL import Image

            if not self._resized and self.warn:
                self.warn(f"frame {self.frames + 1} is {w}x{h}, the video {width}x{height}: "
                          "resized")
            self._resized = True
            image = np.asarray(Image.fromarray(image).resize((width, height)))
            h, w = height, width
        if (w, h) != (width, height):
            image = np.pad(image, ((0, height - h), (0, width - w), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        if self.vfr and time_s is not None:
            pts = round((time_s - self._first_time) * 1000)
        else:
            pts = self.frames
        pts = max(pts, self._last_pts + 1)
        frame.pts, frame.time_base = pts, self._time_base
        self._last_pts = pts
        try:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        except (av.FFmpegError, OSError) as e:  # a full disk, a vanished folder
            raise VideoError(f"{self.path}: cannot write frame {self.frames + 1}: "
                             f"{_ffmpeg_reason(e)}") from None
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and write the MP4 index: the file is playable from here on."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None


@dataclass
class FolderSink:
    """One JPEG per frame, ``000001.jpg`` on: file N is frame N of the MOT file."""

    folder: Path
    quality: int = 95
    frames: int = 0

    def write(self, image: np.ndarray, time_s: float | None = None) -> None:
        from PIL import Image

        self.frames += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(self.folder / f"{self.frames:06d}.jpg", quality=self.quality)

    def close(self) -> None:
        pass


def open_sink(dst: str | Path, fps: float, *, vfr: bool = False, folder: bool | None = None,
              warn: Callable[[str], None] | None = None) -> Mp4Sink | FolderSink:
    """A folder of frames when ``dst`` ends with /, is a folder or has no extension."""
    if folder is None:
        folder = str(dst).endswith("/") or Path(dst).is_dir() or not Path(dst).suffix
    if folder:
        return FolderSink(Path(dst))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    return Mp4Sink(Path(dst), fps, vfr=vfr, warn=warn)


@contextlib.contextmanager
def closing_all(*things: Any) -> Iterator[None]:
    """Close every thing on the way out, the last one first, even if one close fails."""
    try:
        yield
    finally:
        errors = []
        for thing in reversed(things):
            try:
                thing.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]
