"""Triton python model `enc_dec`.

The logic lives in dart_triton/triton/graph_model.py (shared and unit-tested)."""

from dart_triton.triton.graph_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
