"""The size the detector resizes an image to: one integer rule for training, evaluation, export
and the runtime.

torchvision scales an image by ``min(min_size / short_side, max_size / long_side)`` and floors
``side * scale``: in float64 in eager PyTorch, in float32 when traced, and TensorRT imports the
float64 of an ONNX graph as float32; for hundreds of sizes these disagree by a pixel, which moves
every detection. Here the size is exact rational arithmetic in integers,
``floor(side * target / reference)`` where ``target / reference`` is whichever of
``min_size / short_side`` and ``max_size / long_side`` is smaller. The model's transform uses it
(``detector.model.use_integer_resize``), the exported graph computes it in int64 and the runtime
uses it to refuse frames that would resize to nothing.

Plain Python with no imports: :func:`resized_size` uses only ``+ - * // <``, so the same code runs
on Python ints, numpy integer arrays and torch int64 tensors (traced into the ONNX graph).
"""

from __future__ import annotations

from typing import Any


def _select(condition: Any, if_true: Any, if_false: Any) -> Any:
    """``if_true`` where ``condition`` else ``if_false``, in arithmetic only (bool * int)."""
    return if_false + (if_true - if_false) * condition


def resized_size(height: Any, width: Any, min_size: int, max_size: int) -> tuple[Any, Any]:
    """(resized height, resized width) of a ``height`` x ``width`` image.

    The short side becomes ``min_size`` unless the long side would then exceed ``max_size``; then
    the long side becomes ``max_size``. Both sides are floored: ``side * target // reference``.
    """
    short = _select(height < width, height, width)
    long = _select(height < width, width, height)
    # min_size / short <= max_size / long, compared without division
    by_short = min_size * long <= max_size * short
    target = _select(by_short, min_size, max_size)
    reference = _select(by_short, short, long)
    return height * target // reference, width * target // reference
