"""The runtime's error types (shared by the model reader, the detector and the image reader)."""

from __future__ import annotations


class ModelError(ValueError):
    """The file is not an ONNX model exported by ``detector export`` (or a newer contract)."""


class InputError(ValueError):
    """A frame given to :meth:`Detector.predict` has the wrong type, dtype, rank, channels or size."""


class ImageError(InputError):
    """An image file cannot be used: unreadable, truncated, or too large to decode safely."""
