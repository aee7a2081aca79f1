"""Typed parameters of the served models: written by `export`, read by `triton_models`.

A Triton ``config.pbtxt`` carries parameters as strings (``parameters { key: "imgsz"
value { string_value: "1008" } }``). Each served model's parameters are one dataclass
here; `to_strings` writes them (in field order) and `from_strings` reads them back, typed
and checked, so neither side spells a key or parses a value by hand.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dart_triton.contract.specs import DEFAULT_MAX_CLASSES, MAX_REQUEST_CLASSES

P = TypeVar("P", bound="ModelParameters")
# Triton's own parameter: GPU input tensors reach a python model as they are (DLPack),
# not copied to host memory first.
GPU_INPUTS_KEY = "FORCE_CPU_ONLY_INPUT_TENSORS"


def _write(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _read(kind: Any, key: str, text: str) -> Any:
    try:
        if kind is bool:
            if text not in ("yes", "no"):
                raise ValueError("expected yes or no")
            return text == "yes"
        if kind is int:
            return int(text)
        if typing.get_origin(kind) is tuple:
            return tuple(int(v) for v in text.split(",") if v.strip())
        return text
    except ValueError as exc:
        raise ValueError(f"model parameter {key}={text!r}: {exc}") from None


@dataclass(frozen=True)
class ModelParameters:
    """Base: ``gpu_inputs`` (Triton's FORCE_CPU_ONLY_INPUT_TENSORS "no") is written last
    when set; keys a model does not know (Triton's own) are ignored when read."""

    def to_strings(self, gpu_inputs: bool = False) -> dict[str, str]:
        out = {f.name: _write(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if gpu_inputs:
            out[GPU_INPUTS_KEY] = "no"
        return out

    @classmethod
    def from_strings(cls: type[P], values: Mapping[str, str]) -> P:
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _read(hints[f.name], f.name, values[f.name])
                      for f in dataclasses.fields(cls) if f.name in values})


@dataclass(frozen=True)
class PreprocessParameters(ModelParameters):
    imgsz: int
    max_classes: int = MAX_REQUEST_CLASSES  # the ensemble's gate: at most one enc_dec pass


@dataclass(frozen=True)
class TextEncoderParameters(ModelParameters):
    warm_vocabulary: str = ""  # names encoded at load (a file in the version directory)
    max_classes: int = MAX_REQUEST_CLASSES


@dataclass(frozen=True)
class PostprocessParameters(ModelParameters):
    pass


@dataclass(frozen=True)
class DartParameters(ModelParameters):
    imgsz: int
    max_classes: int
    enc_dec_buckets: tuple[int, ...] = ()  # N buckets enc_dec passes are padded to
    backbone: str = "vit"  # what serves `backbone` (`BackboneChoice.describe`)
    masks: bool = False  # built with --masks: a `mask_decoder` model serves RETURN_MASKS
    mask_levels: str = ""  # the backbone outputs mask_decoder reads, comma-separated
    # enc_dec batches requests (`specs.shared_enc_dec_spec`): prompt rows go as one item
    shared_passes: bool = False
    # Passes of one request in flight at once (0: all): with shared passes, a request with
    # many prompts queues a few at a time, so the passes of other requests go in between.
    passes_in_flight: int = 0


@dataclass(frozen=True)
class OnnxGraphParameters(ModelParameters):
    """backbone / enc_dec in ONNX Runtime inside the python backend."""

    graph: str = "model.onnx"
    max_classes: int = DEFAULT_MAX_CLASSES
    ort_threads: int = 0  # threads per session; 0 = all cores


@dataclass(frozen=True)
class TorchGraphParameters(ModelParameters):
    """backbone / enc_dec as PyTorch modules inside the python backend."""

    precision: str = "fp32"
    compile: str = "none"
    cuda_graphs: bool = False
    max_classes: int = DEFAULT_MAX_CLASSES
    enc_dec_buckets: tuple[int, ...] = ()
