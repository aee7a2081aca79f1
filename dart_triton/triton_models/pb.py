"""Small helpers over `triton_python_backend_utils` shared by the python models."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from dart_triton.contract import specs
from dart_triton.contract.parameters import ModelParameters
from dart_triton.contract.validation import (
    ONE_IMAGE,
    DetectOptions,
    DetectRequest,
    MaskOptions,
    check_image,
    decode_class_names,
    image_file_bytes,
)
from dart_triton.pipeline.orchestration import ModelCallError

P = TypeVar("P", bound=ModelParameters)
T = TypeVar("T")


def log(message: str, level: str = "info") -> None:
    """One line in the server log at `level` (info, warn, error); stderr where Triton's
    logger is absent (the tests' stand-in module)."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:
        print(message, file=sys.stderr, flush=True)


def model_parameters(args: dict, kind: type[P]) -> P:
    """The model's typed parameters (`contract.parameters`), from its config."""
    config = json.loads(args["model_config"])
    return kind.from_strings({k: v.get("string_value", "")
                              for k, v in config.get("parameters", {}).items()})


def version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


def device_of(args: dict) -> str:
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return f"cuda:{args.get('model_instance_device_id', 0)}"
    return "cpu"


def optional_input(request, name: str):
    return pb_utils.get_input_tensor_by_name(request, name)


def required_input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"missing required input {name}")
    return tensor


def as_torch(tensor) -> torch.Tensor:
    """A Triton tensor as torch, zero-copy; GPU tensors stay on the GPU (DLPack)."""
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy())
    return torch.from_dlpack(tensor.to_dlpack())


def as_numpy(tensor) -> np.ndarray:
    return tensor.as_numpy() if tensor.is_cpu() else as_torch(tensor).cpu().numpy()


def from_torch(name: str, value: torch.Tensor):
    """A torch tensor as a Triton tensor; GPU tensors stay on the GPU.

    The tensor object itself goes to `from_dlpack`, not a capsule: python_backend then
    calls its ``__dlpack__(stream=...)`` with its own stream and synchronises on it, so
    the kernels that produce the tensor have finished before Triton reads it. A capsule
    from ``to_dlpack`` carries no stream and could be read while still being written.
    """
    if value.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, value.contiguous())
    return pb_utils.Tensor(name, np.ascontiguousarray(value.numpy()))


def scalar(request, name: str, default, cast):
    tensor = optional_input(request, name)
    if tensor is None:
        return default
    value = as_numpy(tensor).reshape(-1)
    if value.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got {value.size}")
    return cast(value[0])


def read_options(request) -> DetectOptions:
    """SCORE_THRESHOLD, NMS_IOU, MAX_DETECTIONS, defaults filled in, checked."""
    return DetectOptions(
        score_threshold=scalar(request, specs.SCORE_THRESHOLD,
                               specs.DEFAULT_SCORE_THRESHOLD, float),
        nms_iou=scalar(request, specs.NMS_IOU, specs.DEFAULT_NMS_IOU, float),
        max_detections=scalar(request, specs.MAX_DETECTIONS, specs.DEFAULT_MAX_DETECTIONS, int))


def read_mask_options(request) -> MaskOptions:
    """RETURN_MASKS and MASK_THRESHOLD, defaults filled in, checked."""
    return MaskOptions(
        return_masks=scalar(request, specs.RETURN_MASKS, False, bool),
        mask_threshold=scalar(request, specs.MASK_THRESHOLD, specs.DEFAULT_MASK_THRESHOLD,
                              float))


def read_classes(request, name: str = specs.CLASSES) -> list[str]:
    return decode_class_names(as_numpy(required_input(request, name)))


def read_image(request) -> tuple[np.ndarray | None, bytes | None]:
    """(IMAGE pixels checked, None) or (None, IMAGE_BYTES): exactly one is given."""
    pixels, data = optional_input(request, specs.IMAGE), optional_input(request, specs.IMAGE_BYTES)
    if (pixels is None) == (data is None):
        raise ValueError(ONE_IMAGE)
    if pixels is not None:
        return check_image(as_numpy(pixels)), None
    return None, image_file_bytes(as_numpy(data))


def read_request(request) -> DetectRequest:
    """The public contract's request (IMAGE or IMAGE_BYTES, CLASSES, options), read and
    checked once (an image file's header is checked when it is decoded)."""
    image, data = read_image(request)
    return DetectRequest(image, read_classes(request), read_options(request), data,
                         read_mask_options(request))


def error_code(exc: BaseException) -> str:
    """The one mapping of errors to Triton codes: a bad request (ValueError) is
    INVALID_ARG; a called model that is down, UNAVAILABLE; anything else, INTERNAL."""
    if isinstance(exc, ValueError):
        return "INVALID_ARG"
    if isinstance(exc, ModelCallError) and exc.unavailable:
        return "UNAVAILABLE"
    return "INTERNAL"


def error_response(exc: BaseException):
    """An error response with the code of `error_code` and a one-line message."""
    code = error_code(exc)
    known = isinstance(exc, ValueError | ModelCallError)
    text = str(exc) if known else f"internal error: {exc!r}"
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(text, getattr(pb_utils.TritonError, code)))


def respond(requests, handler) -> list:
    """One response per request; a bad request gets its error, the others still run."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handler(request)))
        except ValueError as exc:
            responses.append(error_response(exc))
    return responses


def respond_batch(requests, read: Callable[[Any], T], run: Callable[[list[T]], list[list]]
                  ) -> list:
    """One response per request of a dynamic batch, every readable request's input run in
    one call: `read(request)` -> its input (a ValueError answers that request alone, the
    others still run); `run(inputs)` -> the output tensors of each input, in order."""
    responses: list = [None] * len(requests)
    readable: list[int] = []
    inputs: list[T] = []
    for i, request in enumerate(requests):
        try:
            inputs.append(read(request))
            readable.append(i)
        except ValueError as exc:
            responses[i] = error_response(exc)
    if inputs:
        for i, tensors in zip(readable, run(inputs), strict=True):
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
    return responses
