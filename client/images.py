"""Image files <-> RGB uint8 arrays, the only form the client sends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def load_image(path: str | Path, *, exif: bool = True) -> np.ndarray:
    """Read an image file as an RGB uint8 ``[H, W, 3]`` array.

    ``exif=True`` applies the EXIF orientation, so boxes match what viewers show;
    datasets whose annotations refer to the stored pixels want ``exif=False``.
    """
    with Image.open(path) as img:
        if exif:
            img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))


def save_image(path: str | Path, image: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
