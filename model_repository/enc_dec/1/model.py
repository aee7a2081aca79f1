"""Triton python model `enc_dec`: logic in dart_triton/triton/graph_model.py (unit-tested, shared)."""

from dart_triton.triton.graph_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
