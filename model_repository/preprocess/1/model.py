"""Triton python model `preprocess`.

The logic lives in dart_triton/triton/preprocess_model.py (shared and unit-tested)."""

from dart_triton.triton.preprocess_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
