"""Export a checkpoint to ONNX (fixed batch size; any frame size or one static size) and check it
against PyTorch.

* :mod:`.graph`: the deploy wrapper around the Faster R-CNN, the trace-time fixes, simplification
  and the TensorRT checks;
* :mod:`.parity`: ONNX Runtime against eager PyTorch on real frames;
* :mod:`.writing`: metadata (``detector.runtime.contract``), per-class thresholds, profiles, and
  the atomic write.

Unless told not to, the export compares ONNX Runtime with the PyTorch model on real images and
refuses to write a model whose detections differ. ``detector export`` (``detector/cli.py``) is
the command line; this package imports torch.
"""

from .errors import ExportError, ParityError
from .graph import DeployWrapper, Half, tensorrt_operators, tensorrt_problems
from .parity import (
    BOX_TOLERANCE,
    FP16_MIN_IOU,
    FP16_REQUIRED_SCORE,
    FP16_SCORE_TOLERANCE,
    SCORE_TOLERANCE,
    ParityReport,
    compare_detections,
    match_detections,
)
from .writing import (
    MIN_OPSET,
    ExportReport,
    build_metadata,
    class_thresholds,
    default_profiles,
    export_model,
    export_onnx,
)

__all__ = [
    "BOX_TOLERANCE",
    "FP16_MIN_IOU",
    "FP16_REQUIRED_SCORE",
    "FP16_SCORE_TOLERANCE",
    "MIN_OPSET",
    "SCORE_TOLERANCE",
    "DeployWrapper",
    "ExportError",
    "ExportReport",
    "Half",
    "ParityError",
    "ParityReport",
    "build_metadata",
    "class_thresholds",
    "compare_detections",
    "default_profiles",
    "export_model",
    "export_onnx",
    "match_detections",
    "tensorrt_operators",
    "tensorrt_problems",
]
