"""`dart_triton.client.Detections`: the result type, defined in the contract."""

from dart_triton.contract.detections import Detections

__all__ = ["Detections"]
