"""Triton python model `postprocess`.

The logic lives in dart_triton/triton/postprocess_model.py (shared and unit-tested)."""

from dart_triton.triton.postprocess_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
