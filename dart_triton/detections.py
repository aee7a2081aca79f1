"""The detection result every pipeline, Triton model and client returns.

Defined once in the light client package (numpy only) so that clients do not import
torch; the in-process pipelines return the very same type.
"""

from dart_triton.client.detections import Detections

__all__ = ["Detections"]
