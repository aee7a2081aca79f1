"""`dart-triton detect` and `dart-triton video`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dart_triton import specs

from .errors import DartClientError
from .triton_client import DEFAULT_URLS, DartClient

# Requests kept in flight when `detect` is given several images.
_DETECT_IN_FLIGHT = 4


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", nargs="+", required=True, metavar="NAME",
                        help="class names to detect (quote names with spaces: 'traffic light'); "
                             "put it after the input file(s)")
    parser.add_argument("--url", help=f"Triton address (default grpc {DEFAULT_URLS['grpc']}, "
                                      f"http {DEFAULT_URLS['http']})")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default="dart", help="dart or dart_ensemble (default: dart)")
    parser.add_argument("--score-threshold", type=float, metavar="T",
                        help=f"server default {specs.DEFAULT_SCORE_THRESHOLD}")
    parser.add_argument("--nms-iou", type=float, metavar="IOU",
                        help=f"server default {specs.DEFAULT_NMS_IOU}; 1.0 turns NMS off")
    parser.add_argument("--max-detections", type=int, metavar="N",
                        help=f"server default {specs.DEFAULT_MAX_DETECTIONS}")


def _options(args: argparse.Namespace) -> dict:
    return {
        "score_threshold": args.score_threshold,
        "nms_iou": args.nms_iou,
        "max_detections": args.max_detections,
    }


def _fail(command: str, err: Exception, url: str) -> int:
    if isinstance(err, DartClientError):
        print(f"dart-triton {command}: server error ({url}): {err}", file=sys.stderr)
        return 1
    print(f"dart-triton {command}: error: {err}", file=sys.stderr)
    return 2


def _annotation_paths(images: Sequence[Path], out: Path) -> list[Path]:
    """One image: ``out`` is the file (or a directory to put it in). Several: a directory."""
    if len(images) == 1 and not out.is_dir():
        return [out]
    names = [p.name for p in images]
    # Prefix an index only when file names collide (same name in different folders).
    unique = len(set(names)) == len(names)
    return [out / (n if unique else f"{i:04d}_{n}") for i, n in enumerate(names)]


def detect_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dart-triton detect",
        description="Detect open-vocabulary classes in images through a Triton `dart` server.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _add_server_args(parser)
    parser.add_argument("--json", type=Path, metavar="OUT",
                        help="write detections here instead of printing them")
    parser.add_argument("--annotate", type=Path, metavar="OUT",
                        help="annotated image file (one image) or directory (several)")
    args = parser.parse_args(argv)

    from .draw import annotate
    from .images import load_image, save_image
    from .pipeline import in_order

    client = DartClient(args.url, args.protocol, args.model, concurrency=_DETECT_IN_FLIGHT)
    annotated = _annotation_paths(args.images, args.annotate) if args.annotate else None
    records = []
    try:
        # Images are decoded lazily, so only the in-flight ones are held in memory.
        loaded = ((i, path, load_image(path)) for i, path in enumerate(args.images))

        def submit(item: tuple[int, Path, object]):
            return client.detect_async(item[2], args.classes, **_options(args))

        for (i, path, image), dets in in_order(loaded, submit, _DETECT_IN_FLIGHT):
            h, w = image.shape[:2]
            records.append({"file_name": str(path), "image_id": i, "width": w, "height": h,
                            "detections": dets.to_coco(i)})
            if annotated:
                save_image(annotated[i], annotate(image, dets))
    except (DartClientError, ValueError, OSError) as e:
        return _fail("detect", e, client.url)
    finally:
        client.close()

    # One image: plain COCO results list; several: which file each list belongs to.
    payload = records[0]["detections"] if len(records) == 1 else records
    text = json.dumps(payload, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        for r in records:
            found = ", ".join(f"{d['category_name']} {d['score']:.2f}" for d in r["detections"])
            print(f"{r['file_name']}: {len(r['detections'])} detections"
                  + (f" ({found})" if found else ""))
    else:
        print(text)
    if annotated:
        where = annotated[0] if len(annotated) == 1 else annotated[0].parent
        print(f"annotated image(s) written to {where}", file=sys.stderr)
    return 0


def video_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dart-triton video",
        description="Annotate every frame of a video through a Triton `dart` server.",
    )
    parser.add_argument("input", type=Path, metavar="IN")
    _add_server_args(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.mp4")
    parser.add_argument("--in-flight", type=int, default=4, metavar="K",
                        help="requests kept in flight; raise it until FPS stops growing")
    parser.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    args = parser.parse_args(argv)
    if args.in_flight < 1:
        parser.error("--in-flight must be >= 1")
    if not args.input.is_file():
        parser.error(f"no such video: {args.input}")

    from .video import annotate_video

    client = DartClient(args.url, args.protocol, args.model, concurrency=args.in_flight)
    options = _options(args)
    try:
        stats = annotate_video(
            args.input,
            args.out,
            lambda frame: client.detect_async(frame, args.classes, **options),
            in_flight=args.in_flight,
            max_frames=args.max_frames,
        )
    except (DartClientError, ValueError, OSError) as e:
        return _fail("video", e, client.url)
    finally:
        client.close()
    print(f"{args.out}: {stats.summary()} "
          f"(model {args.model}, {args.protocol} {client.url}, {args.in_flight} in flight)")
    return 0
