"""Triton python model `postprocess`: logic in dart_triton/triton/postprocess_model.py (unit-tested, shared)."""

from dart_triton.triton.postprocess_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
