"""`dart-triton video`: one input, or several cameras into one server.

With several inputs, ``--out`` (and ``--tracks``) are folders that get one file per
input, named after it; every input shares the ``--in-flight`` budget. Mistakes are
answered as in `cli`: one line, exit 2 before any request is sent.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dart_triton.contract import specs

from . import cli_common
from .cli_common import UsageError, is_folder_arg
from .errors import DartClientError
from .tracking import DEFAULT_LOW as _TRACK_LOW

if TYPE_CHECKING:  # video is imported when it runs (PyAV, supervision)
    from .video import VideoJob


def _video_source(raw: str) -> str | Path:
    """IN as `open_source` takes it: a URL as is, else an existing video file or frames folder."""
    from .images import still_image_format
    from .streams import frame_files, is_url

    if is_url(raw):
        return raw
    src = Path(raw)
    if not src.exists():
        raise UsageError(f"{src}: no such video file or folder of frames (or give a URL, "
                         "e.g. rtsp://host/stream)")
    if src.is_dir():
        if not frame_files(src):
            raise UsageError(f"{src} is a folder without image files; give a video file, a "
                             "folder of frames, or a URL")
        return src
    still = still_image_format(src)
    if still:
        raise UsageError(f"{src} is a still image ({still}), not a video; use "
                         f"dart-triton detect {src} --classes ...")
    return src


def _input_files(sources: Sequence[str | Path]) -> list[Path]:
    return [s for s in sources if isinstance(s, Path) and s.is_file()]


def _one_output(args: argparse.Namespace, src: str | Path) -> VideoJob:
    """``--out`` (a video file, or a folder of frames) and ``--tracks`` of one input."""
    from .video import WRITABLE_SUFFIXES, VideoJob

    out = Path(args.out)
    source_file = _input_files([src])
    if is_folder_arg(args.out):
        if isinstance(src, Path) and src.is_dir() and out.resolve() == src.resolve():
            raise UsageError(f"--out {args.out} is the input folder: its frames would be "
                             "overwritten")
        cli_common.check_writable_folder(out, "--out")
    else:
        if out.suffix.lower() not in WRITABLE_SUFFIXES:
            raise UsageError(f"--out {args.out}: neither a video file "
                             f"({', '.join(WRITABLE_SUFFIXES)}) nor a folder of frames "
                             "(end it with /)")
        cli_common.refuse_overwriting([out], source_file, "--out")
        cli_common.check_writable_file(out, "--out")
    tracks = None
    if args.tracks is not None:
        if not is_folder_arg(args.tracks) and Path(args.tracks).resolve() == out.resolve():
            raise UsageError(f"--tracks {Path(args.tracks)} is the --out file")
        tracks = cli_common.output_file(args.tracks, "--tracks", "tracks.txt", source_file)
    return VideoJob(src, out, tracks)


def stream_names(sources: Sequence[str | Path]) -> list[str]:
    """A file name stem per input: a file's stem, a folder's name, a URL's host and path;
    ``-2``, ``-3``, ... when two inputs would get the same."""
    names = []
    for src in sources:
        if isinstance(src, Path):
            name = src.name if src.is_dir() else src.stem
        else:
            parts = urlsplit(src)
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{parts.netloc}{parts.path}").strip("_.")
        names.append(name or "stream")
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _many_outputs(args: argparse.Namespace, sources: Sequence[str | Path]) -> list[VideoJob]:
    """Several inputs: ``--out DIR/`` gets ``NAME.mp4`` and ``--tracks DIR/`` ``NAME.txt``."""
    from .video import VideoJob

    for option, value in (("--out", args.out), ("--tracks", args.tracks)):
        if value is not None and not is_folder_arg(value):
            raise UsageError(f"{option} {value}: {len(sources)} inputs need a folder that "
                             "gets one file per input (end it with /)")
    out = Path(args.out)
    cli_common.check_writable_folder(out, "--out")
    tracks = None if args.tracks is None else Path(args.tracks)
    if tracks is not None:
        cli_common.check_writable_folder(tracks, "--tracks")
    inputs = _input_files(sources)
    jobs = []
    for src, name in zip(sources, stream_names(sources), strict=True):
        dst = out / f"{name}.mp4"
        mot = None if tracks is None else tracks / f"{name}.txt"
        cli_common.refuse_overwriting([p for p in (dst, mot) if p is not None], inputs, "--out")
        jobs.append(VideoJob(src, dst, mot))
    return jobs


def _positive_number(kind: type, option: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} takes a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{option} must be > 0, got {text}")
        return value

    return parse


def video_main(argv: Sequence[str] | None = None) -> int:
    parser = cli_common.Parser(
        prog="dart-triton video",
        description="Annotate every frame of a video, a folder of frames or a stream through a "
                    "Triton `dart` server, optionally tracking objects (ByteTrack, per class). "
                    "Several inputs (cameras) run at once and share the in-flight budget.",
        epilog="IN: a video file, a folder of frames (sorted by name; --fps gives their rate, "
               "default 30), or any URL FFmpeg opens (rtsp://, rtmp://, http://, ...). Several "
               "IN: --out DIR/ gets NAME.mp4 per input (and --tracks DIR/ NAME.txt), NAME "
               "after the input; frames are taken round robin. A live "
               "stream keeps only the newest frame while K requests are in flight (the others "
               "are dropped and counted) and is reopened with backoff when lost. With --track, "
               "boxes scoring at least --score-threshold start tracks and boxes down to "
               f"{_TRACK_LOW} continue them (ByteTrack's two stages); only tracked boxes are "
               "drawn and written. Ctrl-C stops cleanly (exit 130): the MP4 and the MOT file "
               "hold every frame written so far. "
               "Exit status: 0 ok, 1 a video, a stream or the server failed, 2 a usage error.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IN")
    cli_common.add_server_args(parser)
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="annotated video (.mp4, .mov, .mkv; H.264), or a folder (ends "
                             "with / or exists) that gets one JPEG per frame: 000001.jpg, ...; "
                             "several IN: a folder that gets NAME.mp4 per input")
    parser.add_argument("--track", action="store_true",
                        help="track objects: stable IDs, drawn as 'name #id score'")
    parser.add_argument("--tracks", metavar="OUT.txt",
                        help="write MOTChallenge lines frame,id,x,y,w,h,score,class,-1,-1 "
                             "(implies --track); several IN: a folder that gets NAME.txt each")
    parser.add_argument("--in-flight", type=int, default=4, metavar="K",
                        help="requests kept in flight, over all inputs together; raise it "
                             "until FPS stops growing")
    parser.add_argument("--fps", type=_positive_number(float, "--fps"), metavar="F",
                        help="frame rate of a folder of frames (default 30); for a video it "
                             "overrides the rate of the output")
    parser.add_argument("--max-frames", type=int, metavar="N",
                        help="stop after N frames (of each input)")
    parser.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                        help="treat IN as live (drop frames while K are in flight, reopen when "
                             "lost); default: rtsp/rtmp/udp/srt URLs and streams without a "
                             "duration")
    parser.add_argument("--reconnect", type=int, default=10, metavar="N",
                        help="live: reopen attempts in a row before giving up (default 10; "
                             "0.5, 1, 2, ... 10 s apart)")
    parser.add_argument("--encode", choices=("none", "jpeg"), default="none",
                        help="jpeg: send each frame as a JPEG file (IMAGE_BYTES; a 1080p frame "
                             "is ~0.3 MB instead of 6.2 MB of pixels); none (default): pixels")
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q",
                        help="with --encode jpeg: JPEG quality 1..95 (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli_common.add_mask_args(parser, "drawn on each frame (with --track, each tracked box "
                                     "with its own mask)")
    args = parser.parse_args(argv)
    args.track = args.track or args.tracks is not None
    try:
        if args.in_flight < 1:
            raise UsageError(f"--in-flight must be >= 1, got {args.in_flight}")
        if args.max_frames is not None and args.max_frames < 1:
            raise UsageError(f"--max-frames must be >= 1, got {args.max_frames}")
        if args.reconnect < 0:
            raise UsageError(f"--reconnect must be >= 0, got {args.reconnect}")
        if not 1 <= args.jpeg_quality <= 95:
            raise UsageError(f"--jpeg-quality must be in 1..95, got {args.jpeg_quality}")
        classes = cli_common.class_names(args.classes)
        options = cli_common.request_options(args)
        cli_common.check_urls(args)
        cli_common.require("av", "video", "dart-triton video")
        cli_common.require("supervision", "draw", "dart-triton video")
        if args.track:
            cli_common.require("trackers", "video", "--track")
        sources = [_video_source(raw) for raw in args.inputs]
        jobs = ([_one_output(args, sources[0])] if len(sources) == 1
                else _many_outputs(args, sources))
    except UsageError as e:
        cli_common.say("video", f"error: {e}")
        return 2
    return _run(args, jobs, classes, options)


def _written(job: VideoJob) -> str:
    return f"{job.dst}" + (f" and {job.tracks}" if job.tracks else "")


def _run(args: argparse.Namespace, jobs: list[VideoJob], classes: list[str],
         options: dict[str, Any]) -> int:
    from .images import jpeg_bytes
    from .tracking import MultiClassTracker
    from .video import VideoError, VideoInterrupted, annotate_videos

    tracker = None
    if args.track:
        high = (args.score_threshold if args.score_threshold is not None
                else specs.DEFAULT_SCORE_THRESHOLD)
        # ByteTrack's second stage needs the boxes between low and high too.
        options["score_threshold"] = min(high, _TRACK_LOW)

        def tracker(rate: float) -> MultiClassTracker:  # the source's rate, once it is open
            return MultiClassTracker(classes, frame_rate=rate, high=high)
    encode = ((lambda frame: jpeg_bytes(frame, args.jpeg_quality)) if args.encode == "jpeg"
              else (lambda frame: frame))
    client = cli_common.make_client(args, concurrency=args.in_flight)
    try:
        if not cli_common.server_ready(client, "video"):
            return 1
        results = annotate_videos(
            jobs,
            lambda frame: client.detect_async(encode(frame), classes, **options),
            in_flight=args.in_flight,
            max_frames=args.max_frames,
            progress=not args.no_progress,
            fps=args.fps,
            live=args.live,
            reconnect=args.reconnect,
            tracker=tracker,
            warn=lambda message: cli_common.say("video", f"warning: {message}"),
        )
    except DartClientError as e:
        cli_common.say("video", f"server error ({client.url}): {e}")
        return 1
    except VideoError as e:  # an input could not be opened
        cli_common.say("video", f"error: {e}")
        return 1
    except (ValueError, OSError) as e:  # a frame the server's rules refuse, a full disk
        cli_common.say("video", f"error: {e}")
        return 1
    except VideoInterrupted as e:
        for job, stats in zip(jobs, e.streams, strict=True):
            cli_common.say("video", f"interrupted after {stats.frames} frames; {_written(job)} are "
                         "complete up to there")
        return 130
    except KeyboardInterrupt:
        cli_common.say("video", "interrupted before the first frame")
        return 130
    finally:
        client.close()
    status = 0
    for job, stats in zip(jobs, results, strict=True):
        if stats.error:
            status = 1
            cli_common.say("video", f"error: {stats.error}" + (
                f"; {_written(job)} hold the {stats.frames} frames before it"
                if stats.frames else ""))
            if stats.frames:  # what was written is still a result: its summary too
                cli_common.print_out(f"{job.dst}: {stats.summary()}")
            continue
        cli_common.print_out(f"{job.dst}: {stats.summary()} "
                  f"(model {args.model}, {args.protocol} {client.url}, {args.in_flight} in "
                  "flight" + (f", {len(jobs)} inputs" if len(jobs) > 1 else "") + ")"
                  + (f"; tracks in {job.tracks}" if job.tracks else ""))
    return status
