"""`dart-triton detect` (and the helpers `label` shares; `video` is in `video_cli`).

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

from .cli_common import (
    Parser,
    UsageError,
    add_mask_args,
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
    add_mask_args(parser, "each detection gets a COCO RLE `segmentation` ({size: [H, W], "
                          "counts}) in the JSON, and --annotate draws the masks")
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
    except ValueError as e:  # masks that do not fit their image: an off-contract answer
        say("detect", f"error: {e}")
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
