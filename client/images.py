"""Image files <-> RGB uint8 arrays, the only form the client sends."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What Pillow raises on a damaged or hostile file: truncated data (OSError), bad headers
# (SyntaxError, ValueError, EOFError in some plugins), a decompression bomb.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageFileError(OSError):
    """An image file that cannot be read; ``str(err)`` names the file and the reason."""


def load_image(path: str | Path, *, exif: bool = True) -> np.ndarray:
    """Read an image file as an RGB uint8 ``[H, W, 3]`` array, or raise `ImageFileError`.

    ``exif=True`` applies the EXIF orientation, so boxes match what viewers show;
    datasets whose annotations refer to the stored pixels want ``exif=False``.
    """
    try:
        with Image.open(path) as img:
            if exif:
                img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise ImageFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path}: is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{path}: not an image file Pillow can read") from None
    except _DECODE_ERRORS as e:
        raise ImageFileError(f"{path}: cannot read image: {e}") from None


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
