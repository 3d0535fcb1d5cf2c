"""Deploy runtime: run an ONNX model written by ``detector export`` with onnxruntime.

Imports only numpy, OpenCV and onnxruntime (never torch or PIL), so it installs on the vehicle
without the training stack::

    from detector.runtime import Detector
    det = Detector("model.onnx", providers=["tensorrt", "cuda"], trt_cache_dir="/var/cache/trt")
    for d in det.predict([frame_bgr]):
        print(d.boxes, d.scores, d.names)
"""

from .contract import CONTRACT_VERSION, INPUT_FLOAT, INPUT_RAW, OUTPUT_NAMES
from .detector import Detections, Detector, ModelInfo, check_frame
from .draw import draw_detections
from .errors import ImageError, InputError, ModelError
from .images import read_image
from .providers import (
    DEFAULT_PROVIDERS,
    ProviderError,
    TensorRTOptions,
    cuda_devices,
    provider_name,
)

__all__ = [
    "CONTRACT_VERSION",
    "DEFAULT_PROVIDERS",
    "INPUT_FLOAT",
    "INPUT_RAW",
    "OUTPUT_NAMES",
    "Detections",
    "Detector",
    "ImageError",
    "InputError",
    "ModelError",
    "ModelInfo",
    "ProviderError",
    "TensorRTOptions",
    "check_frame",
    "cuda_devices",
    "draw_detections",
    "provider_name",
    "read_image",
]
