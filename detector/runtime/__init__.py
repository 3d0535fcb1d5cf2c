"""Deploy runtime: run an ONNX model written by ``detector export`` with onnxruntime.

Imports only numpy, OpenCV and onnxruntime (never torch or PIL), so it installs on the vehicle
without the training stack::

    from detector.runtime import Detector
    det = Detector("model.onnx", trt_cache_dir="/var/cache/detector-trt")
    for d in det.predict([frame_bgr]):
        print(d.boxes, d.scores, d.names)
"""

from .contract import CONTRACT_VERSION, INPUT_FLOAT, INPUT_RAW, OUTPUT_NAMES
from .detector import Detections, Detector, InputError, ModelError, ModelInfo, check_frame
from .draw import draw_detections
from .providers import DEFAULT_PROVIDERS, ProviderError, cuda_devices, provider_name

__all__ = [
    "CONTRACT_VERSION",
    "DEFAULT_PROVIDERS",
    "INPUT_FLOAT",
    "INPUT_RAW",
    "OUTPUT_NAMES",
    "Detections",
    "Detector",
    "InputError",
    "ModelError",
    "ModelInfo",
    "ProviderError",
    "check_frame",
    "cuda_devices",
    "draw_detections",
    "provider_name",
]
