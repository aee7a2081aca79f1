"""What the client's commands share: one-line usage errors, the server and request options,
output-path checks made before any request, and the first contact with the server.

`detect` and `video` (`client.cli`) and `label` (`client.label`) use these; each mistake
is one line on stderr naming the file or option (exit 2), before any server time is spent.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from dart_triton.contract import specs

from .triton_client import DEFAULT_URLS, DartClient

# Option -> the request tensor it sets, to name the option in the tensor's error message.
OPTION_TENSORS = {
    "--score-threshold": specs.SCORE_THRESHOLD,
    "--nms-iou": specs.NMS_IOU,
    "--max-detections": specs.MAX_DETECTIONS,
    "--mask-threshold": specs.MASK_THRESHOLD,
}


class UsageError(ValueError):
    """A mistake in the command line; the message names the option or file."""


class Parser(argparse.ArgumentParser):
    """argparse that answers a mistake in one line (not usage + error) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def say(command: str, message: str) -> None:
    print(f"dart-triton {command}: {one_line(message)}", file=sys.stderr)


def print_out(text: str) -> None:
    """Print to stdout; a reader that went away (``detect ... | head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", nargs="+", required=True, metavar="NAME",
                        help="class names to detect, after the input file(s): "
                             "--classes person 'traffic light' or --classes person,dog")
    parser.add_argument("--url", action="append", metavar="U",
                        help=f"Triton address (default grpc {DEFAULT_URLS['grpc']}, "
                             f"http {DEFAULT_URLS['http']}); repeat it to spread requests "
                             "over several servers")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default="dart", help="dart or dart_ensemble (default: dart)")
    parser.add_argument("--score-threshold", type=float, metavar="T",
                        help=f"server default {specs.DEFAULT_SCORE_THRESHOLD}")
    parser.add_argument("--nms-iou", type=float, metavar="IOU",
                        help=f"server default {specs.DEFAULT_NMS_IOU}; 1.0 turns NMS off")
    parser.add_argument("--max-detections", type=int, metavar="N",
                        help=f"server default {specs.DEFAULT_MAX_DETECTIONS}")


def add_mask_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--masks`` (``what`` says what the command does with them) and ``--mask-threshold``."""
    parser.add_argument("--masks", action="store_true",
                        help=f"also ask for each detection's mask (model dart only): {what}")
    parser.add_argument("--mask-threshold", type=float, metavar="P",
                        help="with --masks: a pixel is in a mask where its probability is "
                             f"above P, in (0, 1) (server default {specs.DEFAULT_MASK_THRESHOLD})")


def request_options(args: argparse.Namespace) -> dict:
    """The request options, checked by the server's own rules, or UsageError naming the option.

    The mask options are there only with ``--masks``, so a request without is as before."""
    from .inputs import mask_arrays, option_arrays

    options = {
        "score_threshold": args.score_threshold,
        "nms_iou": args.nms_iou,
        "max_detections": args.max_detections,
    }
    threshold = getattr(args, "mask_threshold", None)
    if threshold is not None and not getattr(args, "masks", False):
        raise UsageError("--mask-threshold needs --masks")
    if getattr(args, "masks", False) and args.model == specs.DART_ENSEMBLE:
        raise UsageError(f"--masks needs --model {specs.DART}: {specs.DART_ENSEMBLE} "
                         "returns boxes only")
    try:
        option_arrays(**options)
        if getattr(args, "masks", False):
            threshold = specs.DEFAULT_MASK_THRESHOLD if threshold is None else threshold
            mask_arrays(True, threshold)
            options |= {"masks": True, "mask_threshold": threshold}
    except ValueError as e:
        message = str(e)
        for option, tensor in OPTION_TENSORS.items():
            message = message.replace(tensor, option)
        raise UsageError(message) from None
    return options


def media_suffixes() -> frozenset[str]:
    from .images import writable_suffixes
    from .video import WRITABLE_SUFFIXES, readable_suffixes

    try:
        videos = readable_suffixes()
    except ImportError:  # the `video` extra is optional
        videos = WRITABLE_SUFFIXES
    return writable_suffixes() | frozenset(videos)


def require(module: str, extra: str, what: str) -> None:
    """UsageError when an optional dependency is missing, before any request is sent."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs {module}: pip install 'dart-triton[{extra}]'")


def class_names(values: Sequence[str]) -> list[str]:
    """``--classes`` values as class names: commas split names; paths are refused.

    ``--classes`` takes every word after it, so ``detect --classes cat img.jpg`` would
    silently ask for a class called "img.jpg". A value that is an existing file, or ends
    in an image or video extension, is refused with the two ways to say it right.
    """
    from .inputs import class_list

    media = media_suffixes()
    for value in values:
        if Path(value).is_file() or Path(value).suffix.lower() in media:
            raise UsageError(
                f"--classes {value!r} looks like a file path, not a class name: put the "
                f"files before --classes, or end the class list with -- (... --classes cat "
                f"-- {value})"
            )
    names = [name.strip() for value in values for name in value.split(",")]
    if not all(names):
        raise UsageError(f"--classes {','.join(values)!r} has an empty name")
    try:
        return class_list(names)
    except ValueError as e:
        raise UsageError(f"--classes: {e}") from None


def is_folder_arg(raw: str | Path) -> bool:
    return (isinstance(raw, str) and raw.endswith(("/", os.sep))) or Path(raw).is_dir()


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    for p in (folder, *folder.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_writable_file(path: Path, option: str) -> None:
    """Create ``path``'s folder and prove the file can be written, without truncating it."""
    if blocker := file_in_the_way(path.parent):
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):
                pass
        else:
            with open(path, "xb"):
                pass
            path.unlink()
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write there ({e.strerror or e})") from None


def check_writable_folder(folder: Path, option: str) -> None:
    if blocker := file_in_the_way(folder):
        raise UsageError(f"{option} {folder}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(
            f"{option} {folder}: cannot create or write to this folder ({e.strerror or e})"
        ) from None


def refuse_overwriting(outputs: Sequence[Path], inputs: Sequence[Path], option: str) -> None:
    sources = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in sources:
            raise UsageError(f"{option} {out} would overwrite the input file {out}")


def output_file(raw: str | Path, option: str, example: str, inputs: Sequence[Path]) -> Path:
    """A file option (``--json``, ``--tracks``): not a folder, not an input, writable."""
    if is_folder_arg(raw):
        raise UsageError(f"{option} {raw} is a folder; give a file name, e.g. "
                         f"{Path(raw) / example}")
    path = Path(raw)
    refuse_overwriting([path], inputs, option)
    check_writable_file(path, option)
    return path


def add_send_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--send", choices=("file", "pixels"), default="file",
                        help="file (default): a JPEG, PNG or WebP file goes to the server as "
                             "its bytes, as it is (IMAGE_BYTES; other formats as pixels); "
                             "pixels: every image decoded here and sent as RGB pixels")


def readable_image(path: Path, send: str, *, exif: bool = True
                   ) -> tuple[Any, str, str | None]:
    """(ImageInput, "", warning) for an image the server can take, else (None, reason,
    None): the file is unreadable or its size out of range (the server's rule)."""
    from dart_triton.contract.validation import check_image_size

    from .images import ImageFileError, read_image_input

    # Pillow also warns about damaged files (TIFF/EXIF "Truncated File Read"): held back,
    # so a skipped file gets one line and a readable one at most one more.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = read_image_input(path, send, exif=exif)
            check_image_size(image.height, image.width)
        except (ImageFileError, ValueError) as e:
            return None, image_reason(e), None
    return image, "", str(caught[0].message) if caught else None


def check_urls(args: argparse.Namespace) -> None:
    """``--url`` given twice is a mistake: the same server would get twice the load."""
    seen: set[str] = set()
    for url in args.url or ():
        if not url.strip():
            raise UsageError("--url is empty: give HOST:PORT, e.g. 127.0.0.1:8001")
        if url in seen:
            raise UsageError(f"--url {url} is given twice")
        seen.add(url)


def make_client(args: argparse.Namespace, *, concurrency: int) -> DartClient:
    """The client of every command: the one place that turns ``--url`` (repeatable) into
    one. With several URLs, requests are spread over them (round robin under the in-flight
    limit; a failing server is set aside and retried later)."""
    return DartClient(args.url or None, args.protocol, args.model, concurrency=concurrency)


def server_ready(client: DartClient, command: str) -> bool:
    """One line, before any image or frame is read, when nothing serves the model.

    With several servers, any one ready will do; the others are named in a warning.
    """
    missing = client.unready()
    if len(missing) < len(client.urls):
        if missing:
            say(command, f"warning: no model {client.model!r} ready at {', '.join(missing)}; "
                          "using the other server(s) (those are retried later)")
        return True
    say(command, f"error: no model {client.model!r} ready at {client.url} ({client.protocol}); "
                  "is `dart-triton serve` running there? (see --url, --protocol)")
    return False


def image_reason(err: Exception) -> str:
    from .images import ImageFileError

    # ImageFileError names the file itself; the server's shape rules name IMAGE.
    return str(err) if isinstance(err, ImageFileError) else str(err).replace("IMAGE", "image")


