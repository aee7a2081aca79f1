"""Python client of the `dart` Triton model (importable as ``dart_triton.client``).

Names are resolved lazily so that importing the package does not pull in
tritonclient, supervision or imageio until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Detections": "dart_triton.contract.detections",
    "DartClientError": ".errors",
    "DartClient": ".triton_client",
    "DetectionFuture": ".triton_client",
    "ThreadLocalDetector": ".thread_local",
    "load_image": ".images",
    "annotate": ".draw",
    "annotate_video": ".video",
    "decode_masks": ".masks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
