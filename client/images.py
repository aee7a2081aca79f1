"""Image files: sent as they are (their bytes) or as RGB uint8 arrays, and saved."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What Pillow raises on a damaged or hostile file: truncated data (OSError), bad headers
# (SyntaxError, ValueError, EOFError in some plugins), a decompression bomb.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageFileError(OSError):
    """An image file that cannot be read; ``str(err)`` names the file and the reason."""


@contextlib.contextmanager
def _read_errors(path: str | Path) -> Iterator[None]:
    """Reading an image file: any failure becomes one ImageFileError naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise ImageFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path}: is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{path}: not an image file Pillow can read") from None
    except _DECODE_ERRORS as e:
        raise ImageFileError(f"{path}: cannot read image: {e}") from None


def load_image(path: str | Path, *, exif: bool = True) -> np.ndarray:
    """Read an image file as an RGB uint8 ``[H, W, 3]`` array, or raise `ImageFileError`.

    ``exif=True`` applies the EXIF orientation, so boxes match what viewers show;
    datasets whose annotations refer to the stored pixels want ``exif=False``.
    """
    with _read_errors(path), Image.open(path) as img:
        if exif:
            img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))


# Files sent as they are (IMAGE_BYTES): what the server decodes. Others go as pixels.
SENT_AS_FILES = ("JPEG", "PNG", "WEBP")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageInput:
    """One image as a request carries it: the file's bytes (IMAGE_BYTES) or its pixels
    (IMAGE), and the upright size the server sees either way."""

    path: Path
    width: int
    height: int
    data: bytes | None = None
    pixels: np.ndarray | None = None

    @property
    def payload(self) -> np.ndarray | bytes:
        return self.data if self.data is not None else self.pixels


def _whole(data: bytes, fmt: str) -> bool:
    """Whether a JPEG, PNG or WebP file ends as its format says (a cut file does not)."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"  # EOI, maybe padded
    if fmt == "PNG":
        return b"IEND" in data[-12:]
    return len(data) >= 8 + int.from_bytes(data[4:8], "little")  # WebP: the RIFF size


def read_image_input(path: str | Path, send: str = "file", *, exif: bool = True) -> ImageInput:
    """``path`` ready to send. ``send="file"``: a JPEG, PNG or WebP file goes as its bytes
    (only the header is read here), unless it needs what the server does not do (``exif``
    False for a file with an EXIF rotation); everything else, and ``send="pixels"``, goes
    decoded. Raises `ImageFileError` naming the file."""
    path = Path(path)
    if send == "file":
        with _read_errors(path), Image.open(path) as img:
            fmt, (w, h) = img.format, img.size
            frames = getattr(img, "n_frames", 1)
            orientation = img.getexif().get(0x0112, 1) if fmt in SENT_AS_FILES else 1
        if fmt in SENT_AS_FILES and frames == 1 and (exif or orientation in (None, 1)):
            if exif and orientation in _ROTATED:
                w, h = h, w
            data = path.read_bytes()
            if not _whole(data, fmt):  # cheap to see here; the server would refuse it
                raise ImageFileError(f"{path}: cannot read image: image file is truncated "
                                     f"(its {fmt} end is missing)")
            return ImageInput(path, w, h, data=data)
    pixels = load_image(path, exif=exif)
    return ImageInput(path, pixels.shape[1], pixels.shape[0], pixels=pixels)


def image_size(image: np.ndarray | bytes) -> tuple[int, int]:
    """(H, W) of an image as the server sees it: an array's own shape, or a file's upright
    size from its header (the server applies the EXIF orientation), without decoding."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    try:
        with Image.open(io.BytesIO(bytes(image))) as img:
            (w, h), orientation = img.size, img.getexif().get(0x0112, 1)
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read the image file's header: {e}") from None
    return (w, h) if orientation in _ROTATED else (h, w)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """An RGB uint8 frame as the bytes of a JPEG file (for IMAGE_BYTES)."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=quality)
    return out.getvalue()


def still_image_format(path: str | Path) -> str | None:
    """Pillow's format name when ``path`` is a single-frame image (e.g. ``"JPEG"``), else None.

    Only the header is read. Animated images (GIF, APNG, WebP) count as videos.
    """
    try:
        with Image.open(path) as img:
            return img.format if getattr(img, "n_frames", 1) == 1 else None
    except _DECODE_ERRORS:
        return None


@cache
def writable_suffixes() -> frozenset[str]:
    """File extensions Pillow can write (``.png``, ``.jpg``, ...), lower case."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


def save_image(path: str | Path, image: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
