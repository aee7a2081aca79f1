"""DART: SAM3 as a real-time multi-class open-vocabulary detector, served on NVIDIA Triton."""

from importlib import metadata as _metadata

DISTRIBUTION = "dart-triton"

try:
    # The installed distribution's version: a wheel's, or the editable install's.
    __version__ = _metadata.version(DISTRIBUTION)
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
