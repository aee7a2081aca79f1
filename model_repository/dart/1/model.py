"""Triton python model `dart`: logic in dart_triton/triton/dart_model.py (unit-tested, shared)."""

from dart_triton.triton.dart_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
