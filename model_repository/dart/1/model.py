"""Triton python model `dart`.

The logic lives in dart_triton/triton/dart_model.py (shared and unit-tested)."""

from dart_triton.triton.dart_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
