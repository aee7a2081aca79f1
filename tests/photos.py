"""Real photographs from scikit-image's bundled samples (no download), written as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# RGB photographs that ship inside the scikit-image wheel.
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
           "immunohistochemistry")


def write_photos(out_dir: Path, names: tuple[str, ...] = SAMPLES) -> Path:
    from PIL import Image
    from skimage import data

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = np.asarray(getattr(data, name)())[..., :3]
        Image.fromarray(image).save(out_dir / f"{name}.png")
    return out_dir
