"""Triton python model `text_encoder`: logic in dart_triton/triton/text_encoder_model.py (unit-tested, shared)."""

from dart_triton.triton.text_encoder_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
