"""Triton python model `text_encoder`.

The logic lives in dart_triton/triton/text_encoder_model.py (shared and unit-tested)."""

from dart_triton.triton.text_encoder_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
