"""One `dart` request as tritonclient sends it, and its answer read back as `Detections`.

Transport-neutral: `DartClient` builds a `Request` once and may send it to several servers
(retries, another server), over gRPC or HTTP (``tc`` is the tritonclient module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dart_triton.contract import specs
from dart_triton.contract.detections import Detections

from .errors import DartClientError
from .inputs import class_list, encode_classes, image_arrays, mask_arrays, option_arrays

_CONTRACT = specs.dart_spec(specs.GraphDims())
OUTPUTS = specs.DETECTION_OUTPUTS


@dataclass(frozen=True)
class Request:
    """A request ready to send: its input tensors, the outputs it asks for (None: all the
    model has), its class names, and with masks the (H, W) they come at."""

    inputs: list[Any]
    outputs: list[Any] | None
    classes: list[str]
    image_size: tuple[int, int] | None = None


def requested_outputs(tc: Any, protocol: str) -> list[Any]:
    """BOXES, SCORES, CLASS_IDS: what a request without masks asks for (binary over HTTP)."""
    if protocol == "grpc":
        return [tc.InferRequestedOutput(n) for n in OUTPUTS]
    return [tc.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS]


def build_request(
    tc: Any,
    outputs: list[Any],
    image: np.ndarray | bytes,
    classes: Sequence[str],
    score_threshold: float | None = None,
    nms_iou: float | None = None,
    max_detections: int | None = None,
    masks: bool = False,
    mask_threshold: float = specs.DEFAULT_MASK_THRESHOLD,
) -> Request:
    """The request's tensors, checked by the server's rules first (ValueError).

    Without ``masks`` it is exactly a boxes-only request. With them it adds RETURN_MASKS
    and MASK_THRESHOLD and names no outputs, so Triton returns all of them, MASKS included:
    naming MASKS to a model without it (dart_ensemble) would fail on Triton's "unexpected
    output" before the model's own one-line refusal could say to use `dart`.
    """
    classes = class_list(classes)
    arrays = {
        **image_arrays(image),
        specs.CLASSES: encode_classes(classes),
        **option_arrays(score_threshold, nms_iou, max_detections),
        **mask_arrays(masks, mask_threshold),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), _CONTRACT.input(name).triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    if not masks:
        return Request(inputs, outputs, classes)
    from .images import image_size

    return Request(inputs, None, classes, image_size(image))


def parse_result(result: Any, request: Request, model: str) -> Detections:
    """The answer as Detections, or DartClientError: an off-contract answer is the server's
    fault, not the caller's."""
    names = [*OUTPUTS, specs.MASKS] if request.image_size is not None else list(OUTPUTS)
    arrays = [result.as_numpy(name) for name in names]
    missing = [n for n, a in zip(names, arrays, strict=True) if a is None]
    if missing:
        raise DartClientError(f"model {model!r} returned no {', '.join(missing)}")
    masks = None
    if request.image_size is not None:
        masks = tuple(bytes(m) for m in arrays[3].reshape(-1))
    try:
        return Detections(*arrays[:3], class_names=tuple(request.classes), masks=masks,
                          image_size=request.image_size)
    except ValueError as e:
        raise DartClientError(f"malformed response from {model!r}: {e}") from e
