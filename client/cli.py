"""`dart-triton detect` and `dart-triton video` (and the helpers `label` shares).

Every mistake is answered with one line on stderr that names the file or option:
exit 2 for a usage error (found before any request is sent: paths, options, classes),
1 for a runtime failure (an unreadable image or video, the server). Output paths are
checked, and their folders created, before any inference, so a typo costs no server time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dart_triton.contract import specs

from .cli_common import (
    Parser,
    UsageError,
    add_send_arg,
    add_server_args,
    check_urls,
    check_writable_file,
    check_writable_folder,
    class_names,
    is_folder_arg,
    make_client,
    output_file,
    print_out,
    readable_image,
    refuse_overwriting,
    request_options,
    require,
    say,
    server_ready,
)
from .errors import DartClientError
from .tracking import DEFAULT_LOW as _TRACK_LOW

# Requests kept in flight when `detect` is given several images.
_DETECT_IN_FLIGHT = 4

def annotation_paths(images: Sequence[Path], out: str | Path) -> list[Path]:
    """Where ``--annotate OUT`` puts each annotated image.

    OUT is a folder when it ends with ``/``, already is a folder, or has no extension:
    one file per image, named after the image. Otherwise it is the file for the one
    image; its extension must be one Pillow writes.
    """
    from .images import writable_suffixes

    path = Path(out)
    if not is_folder_arg(out) and path.suffix:
        if path.suffix.lower() not in writable_suffixes():
            raise UsageError(f"--annotate {out}: unknown image extension {path.suffix!r}; use "
                             ".png or .jpg, or a folder (end it with /)")
        if len(images) > 1:
            raise UsageError(f"--annotate {out}: {len(images)} images need a folder, not one "
                             "file (end it with /)")
        return [path]
    names = [p.name if p.suffix.lower() in writable_suffixes() else f"{p.name}.png"
             for p in images]
    # Prefix an index only when file names collide (same name in different folders).
    unique = len(set(names)) == len(names)
    return [path / (n if unique else f"{i:04d}_{n}") for i, n in enumerate(names)]


def _image_paths(values: Sequence[Path]) -> list[Path]:
    if not values:
        raise UsageError("no IMAGE given: dart-triton detect IMAGE... --classes NAME...")
    for path in values:
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give image files (e.g. {path}/*.jpg)")
        if not path.exists():
            raise UsageError(f"{path}: no such image file")
    return list(values)


def _output_paths(args: argparse.Namespace) -> tuple[Path | None, list[Path] | None]:
    """``--json`` file and ``--annotate`` files, checked and their folders created."""
    json_out = None
    if args.json is not None:
        json_out = output_file(args.json, "--json", "detections.json", args.images)
    annotated = None
    if args.annotate is not None:
        require("supervision", "draw", "--annotate")
        annotated = annotation_paths(args.images, args.annotate)
        refuse_overwriting(annotated, args.images, "--annotate")
        if json_out is not None:
            refuse_overwriting(annotated, [json_out], "--annotate")
        if len(annotated) == 1 and annotated[0] == Path(args.annotate):
            check_writable_file(annotated[0], "--annotate")
        else:
            check_writable_folder(Path(args.annotate), "--annotate")
    return json_out, annotated


def detect_main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        prog="dart-triton detect",
        description="Detect open-vocabulary classes in images through a Triton `dart` server. "
                    "An image that cannot be read is named on stderr and skipped; the others "
                    "are still detected and written, and the exit status is then 1.",
        epilog="Images go before --classes (or after `--`: --classes cat -- img.jpg). "
               "Exit status: 0 ok, 1 an image or the server failed, 2 a usage error.",
    )
    parser.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    add_server_args(parser)
    parser.add_argument("--json", metavar="OUT.json",
                        help="write detections to this file instead of printing them")
    add_send_arg(parser)
    parser.add_argument("--annotate", metavar="OUT",
                        help="annotated image: a file (.png, .jpg) for one image, or a folder "
                             "(ends with /, exists, or has no extension; created) that gets "
                             "one file per image, named after it")
    args = parser.parse_args(argv)
    try:
        classes = class_names(args.classes)
        args.images = _image_paths(args.images)
        options = request_options(args)
        check_urls(args)
        json_out, annotated = _output_paths(args)
    except UsageError as e:
        say("detect", f"error: {e}")
        return 2

    from .draw import annotate
    from .images import ImageInput, load_image, save_image
    from .pipeline import in_order
    from .server_errors import RefusalAsResult

    failed: list[Path] = []

    def skip(path: Path, reason: str) -> None:
        failed.append(path)
        say("detect", f"skipped {path}: {reason}" if str(path) not in reason
            else f"skipped {reason}")

    def readable() -> Iterator[tuple[int, ImageInput]]:
        # Read lazily, so only the in-flight images are held in memory.
        for i, path in enumerate(args.images):
            image, reason, warning = readable_image(path, args.send)
            if image is None:
                skip(path, reason)
                continue
            if warning:
                say("detect", f"warning: {path}: {warning}")
            yield i, image

    client = make_client(args, concurrency=_DETECT_IN_FLIGHT)
    records: list[dict] = []
    status = 0
    try:
        if not server_ready(client, "detect"):
            return 1
        for (i, image), dets in in_order(
            readable(), lambda item: RefusalAsResult(
                client.detect_async(item[1].payload, classes, **options)),
            _DETECT_IN_FLIGHT,
        ):
            if isinstance(dets, DartClientError):  # the server refused this file
                skip(image.path, f"the server refused it: {dets}")
                continue
            records.append({"file_name": str(image.path), "image_id": i,
                            "width": image.width, "height": image.height,
                            "detections": dets.to_coco(i)})
            if annotated:
                pixels = image.pixels if image.pixels is not None else load_image(image.path)
                save_image(annotated[i], annotate(pixels, dets))
    except DartClientError as e:
        say("detect", f"server error ({client.url}): {e}")
        status = 1
    except OSError as e:  # an annotated image that could not be saved after all
        say("detect", f"error: cannot write {e.filename or ''}: {e.strerror or e}")
        status = 1
    except KeyboardInterrupt:
        say("detect", "interrupted; nothing written")
        return 130
    finally:
        client.close()
    if failed:
        status = 1
    if not records:
        return status or 1

    # One image given: plain COCO results list; several: which file each list belongs to.
    payload = records[0]["detections"] if len(args.images) == 1 else records
    text = json.dumps(payload, indent=2)
    if json_out:
        json_out.write_text(text + "\n")
        for r in records:
            found = ", ".join(f"{d['category_name']} {d['score']:.2f}" for d in r["detections"])
            print_out(f"{r['file_name']}: {len(r['detections'])} detections"
                   + (f" ({found})" if found else ""))
    else:
        print_out(text)
    if annotated:
        where = annotated[0] if len(annotated) == 1 else Path(args.annotate)
        print(f"annotated image(s) written to {where}", file=sys.stderr)
    return status


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


def _video_outputs(args: argparse.Namespace, src: str | Path) -> tuple[Path, Path | None]:
    """``--out`` (a video file, or a folder of frames) and ``--tracks``, checked, folders made."""
    from .video import WRITABLE_SUFFIXES

    out = Path(args.out)
    source_file = [src] if isinstance(src, Path) and src.is_file() else []
    if is_folder_arg(args.out):
        if isinstance(src, Path) and src.is_dir() and out.resolve() == src.resolve():
            raise UsageError(f"--out {args.out} is the input folder: its frames would be "
                             "overwritten")
        check_writable_folder(out, "--out")
    else:
        if out.suffix.lower() not in WRITABLE_SUFFIXES:
            raise UsageError(f"--out {args.out}: neither a video file "
                             f"({', '.join(WRITABLE_SUFFIXES)}) nor a folder of frames "
                             "(end it with /)")
        refuse_overwriting([out], source_file, "--out")
        check_writable_file(out, "--out")
    tracks = None
    if args.tracks is not None:
        if not is_folder_arg(args.tracks) and Path(args.tracks).resolve() == out.resolve():
            raise UsageError(f"--tracks {Path(args.tracks)} is the --out file")
        tracks = output_file(args.tracks, "--tracks", "tracks.txt", source_file)
    return out, tracks


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
    parser = Parser(
        prog="dart-triton video",
        description="Annotate every frame of a video, a folder of frames or a stream through a "
                    "Triton `dart` server, optionally tracking objects (ByteTrack, per class).",
        epilog="IN: a video file, a folder of frames (sorted by name; --fps gives their rate, "
               "default 30), or any URL FFmpeg opens (rtsp://, rtmp://, http://, ...). A live "
               "stream keeps only the newest frame while K requests are in flight (the others "
               "are dropped and counted) and is reopened with backoff when lost. With --track, "
               "boxes scoring at least --score-threshold start tracks and boxes down to "
               f"{_TRACK_LOW} continue them (ByteTrack's two stages); only tracked boxes are "
               "drawn and written. Ctrl-C stops cleanly (exit 130): the MP4 and the MOT file "
               "hold every frame written so far. "
               "Exit status: 0 ok, 1 the video, the stream or the server failed, 2 a usage error.",
    )
    parser.add_argument("input", metavar="IN")
    add_server_args(parser)
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="annotated video (.mp4, .mov, .mkv; H.264), or a folder (ends "
                             "with / or exists) that gets one JPEG per frame: 000001.jpg, ...")
    parser.add_argument("--track", action="store_true",
                        help="track objects: stable IDs, drawn as 'name #id score'")
    parser.add_argument("--tracks", metavar="OUT.txt",
                        help="write MOTChallenge lines frame,id,x,y,w,h,score,class,-1,-1 "
                             "(implies --track)")
    parser.add_argument("--in-flight", type=int, default=4, metavar="K",
                        help="requests kept in flight; raise it until FPS stops growing")
    parser.add_argument("--fps", type=_positive_number(float, "--fps"), metavar="F",
                        help="frame rate of a folder of frames (default 30); for a video it "
                             "overrides the rate of the output")
    parser.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
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
        classes = class_names(args.classes)
        options = request_options(args)
        check_urls(args)
        require("av", "video", "dart-triton video")
        require("supervision", "draw", "dart-triton video")
        if args.track:
            require("trackers", "video", "--track")
        src = _video_source(args.input)
        out, tracks = _video_outputs(args, src)
    except UsageError as e:
        say("video", f"error: {e}")
        return 2

    from .images import jpeg_bytes
    from .tracking import MultiClassTracker
    from .video import VideoError, VideoInterrupted, annotate_video

    tracker = None
    if args.track:
        high = (args.score_threshold if args.score_threshold is not None
                else specs.DEFAULT_SCORE_THRESHOLD)
        # ByteTrack's second stage needs the boxes between low and high too.
        options["score_threshold"] = min(high, _TRACK_LOW)

        def tracker(rate: float) -> MultiClassTracker:  # the source's rate, once it is open
            return MultiClassTracker(classes, frame_rate=rate, high=high)
    written = f"{out}" + (f" and {tracks}" if tracks else "")
    encode = ((lambda frame: jpeg_bytes(frame, args.jpeg_quality)) if args.encode == "jpeg"
              else (lambda frame: frame))
    client = make_client(args, concurrency=args.in_flight)
    try:
        if not server_ready(client, "video"):
            return 1
        stats = annotate_video(
            src,
            out,
            lambda frame: client.detect_async(encode(frame), classes, **options),
            in_flight=args.in_flight,
            max_frames=args.max_frames,
            progress=not args.no_progress,
            fps=args.fps,
            live=args.live,
            reconnect=args.reconnect,
            tracker=tracker,
            tracks=tracks,
            warn=lambda message: say("video", f"warning: {message}"),
        )
    except DartClientError as e:
        say("video", f"server error ({client.url}): {e}")
        return 1
    except VideoError as e:
        done = e.stats.frames if e.stats is not None else 0
        say("video", f"error: {e}" + (f"; {written} hold the {done} frames before it"
                                       if done else ""))
        if done:  # what was written is still a result: its summary goes to stdout as usual
            print_out(f"{out}: {e.stats.summary()}")
        return 1
    except (ValueError, OSError) as e:  # a frame the server's rules refuse, a full disk
        say("video", f"error: {e}")
        return 1
    except VideoInterrupted as e:
        say("video", f"interrupted after {e.stats.frames} frames; {written} are complete "
                      "up to there")
        return 130
    except KeyboardInterrupt:
        say("video", "interrupted before the first frame")
        return 130
    finally:
        client.close()
    print_out(f"{out}: {stats.summary()} "
           f"(model {args.model}, {args.protocol} {client.url}, {args.in_flight} in flight)"
           + (f"; tracks in {tracks}" if tracks else ""))
    return 0
