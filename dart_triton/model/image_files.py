"""IMAGE_BYTES: an image file's bytes -> RGB pixels, checked before anything is decoded.

The header alone gives the format and the declared size (Pillow reads it without
decoding); a file that is not JPEG, PNG or WebP, or that declares a side outside 8..8192
pixels, is refused there, so a 100x100-pixel file declaring 60000x60000 costs nothing.
Then it is decoded: a JPEG on a GPU device by nvJPEG (`torchvision.io.decode_jpeg`),
everything else by Pillow on the CPU. The EXIF orientation is applied as the client
applies it to a file it sends as pixels (`ImageOps.exif_transpose`), so both forms of
one photograph give the same pixels on the CPU.

In KServe's JSON form a BYTES element is text, so a file can come base64-encoded: bytes
that do not start like a JPEG, PNG or WebP file but are valid base64 are decoded first.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dart_triton.contract.validation import check_image_size

FORMATS = ("JPEG", "PNG", "WEBP")
# What Pillow raises on damaged data: truncated (OSError), bad headers (SyntaxError,
# ValueError, EOFError in some plugins).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


# How the files of FORMATS begin (WebP: "RIFF", 4 size bytes, "WEBP").
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")


def file_bytes(data: bytes) -> bytes:
    """The file itself: `data`, or what it decodes to when it is base64 text."""
    if data.startswith(_MAGIC):
        return data
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)  # MIME wraps lines
    except (binascii.Error, ValueError):
        return data  # not base64 either: Pillow says what it is not


def open_checked(data: bytes) -> Image.Image:
    """The file opened lazily (header read, pixels not), its format and size checked."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ValueError("IMAGE_BYTES is not a JPEG, PNG or WebP file") from None
    except Image.DecompressionBombError:
        # Pillow's own guard (over twice Image.MAX_IMAGE_PIXELS) fires on the header too.
        raise ValueError("IMAGE_BYTES declares an image of far more pixels than allowed: "
                         "each side must be at most 8192 pixels") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(f"IMAGE_BYTES has an unreadable header: {exc}") from None
    w, h = image.size
    check_image_size(h, w, f"IMAGE_BYTES ({image.format})")
    return image


def decode(data: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    """UINT8 [H, W, 3] RGB pixels on `device`, EXIF orientation applied."""
    data = file_bytes(data)
    image = open_checked(data)
    device = torch.device(device)
    try:
        if device.type == "cuda" and image.format == "JPEG":
            from torchvision.io import ImageReadMode, decode_jpeg

            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            chw = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device,
                              apply_exif_orientation=True)
            return chw.permute(1, 2, 0)
        image.load()
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (*_DECODE_ERRORS, RuntimeError) as exc:  # RuntimeError: nvJPEG's refusals
        message = " ".join(str(exc).split())  # one line
        raise ValueError(f"IMAGE_BYTES ({image.format}) could not be decoded: {message}") \
            from None
    return torch.from_numpy(rgb.copy()).to(device)
