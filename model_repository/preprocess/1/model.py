"""Triton python model `preprocess`: logic in dart_triton/triton/preprocess_model.py (unit-tested, shared)."""

from dart_triton.triton.preprocess_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
