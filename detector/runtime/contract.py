"""The contract between ``detector export`` and the deploy runtime: names, formats, metadata keys.

Imports nothing but the standard library, so the exporter (torch side) and the runtime (numpy,
OpenCV and onnxruntime only) share one definition.

Output contract version 1 (see docs/model-contract.md):

* one input ``images`` of a fixed batch size N chosen at export, dynamic height and width:
  ``float32 [N, 3, H, W]`` RGB in 0..1 (``float32_nchw_rgb``) or ``uint8 [N, H, W, 3]`` BGR
  (``uint8_nhwc_bgr``, what OpenCV and most cameras give);
* four outputs, fixed shapes, the same for N = 1 and N > 1 (K = detections per image):
  ``boxes float32 [N, K, 4]`` x1, y1, x2, y2 in input-image pixels; ``scores float32 [N, K]``
  sorted in decreasing order; ``labels int64 [N, K]`` model labels (1..C, class_names[label - 1]);
  ``num_detections int64 [N]``. Rows at and after ``num_detections[i]`` are padding: zeros, label 0.
"""

from __future__ import annotations

FORMAT_TAG = "detector-onnx"
CONTRACT_VERSION = 1

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")

INPUT_FLOAT = "float32_nchw_rgb"  # float32 [N, 3, H, W], RGB, values 0..1
INPUT_RAW = "uint8_nhwc_bgr"  # uint8 [N, H, W, 3], BGR, values 0..255
INPUT_FORMATS = (INPUT_FLOAT, INPUT_RAW)

# metadata_props keys written by the exporter; the runtime refuses a model without REQUIRED_KEYS.
KEY_FORMAT = "detector_format"
KEY_CONTRACT = "output_contract"
KEY_CLASS_NAMES = "class_names"  # JSON list of str; model label i + 1 <-> class_names[i]
KEY_CATEGORY_IDS = "category_ids"  # JSON list of int (COCO category id per class) or "null"
KEY_INPUT_FORMAT = "input_format"
KEY_BATCH = "batch_size"
KEY_DETECTIONS = "detections_per_image"
KEY_SCORE_THRESHOLD = "score_threshold"  # the in-graph threshold: nothing below it comes out
KEY_NMS_THRESHOLD = "nms_threshold"
KEY_MIN_SIZE = "min_size"
KEY_MAX_SIZE = "max_size"
KEY_PRECISION = "precision"  # fp32 | fp16 (fp16: backbone, RPN head and box head in half)
KEY_ARCH = "arch"
KEY_CONFIG_HASH = "config_hash"
KEY_VERSION = "detector_version"
KEY_EXPORTER = "exporter"
KEY_OPSET = "opset"
# "WxH" (e.g. "1920x1080") for a static export: the input is [N, H, W, 3] / [N, 3, H, W] with
# these numbers and the runtime refuses frames of any other size; "dynamic" (or absent) otherwise.
KEY_INPUT_SIZE = "input_size"
INPUT_SIZE_DYNAMIC = "dynamic"
# TensorRT optimisation profile of a dynamic export, in the format of onnxruntime's TensorRT
# provider options of the same names: "images:NxHxWx3" (raw input) or "images:Nx3xHxW" (float).
# Absent in a static export (one shape, no profile needed).
KEY_TRT_PROFILE_MIN = "trt_profile_min_shapes"
KEY_TRT_PROFILE_OPT = "trt_profile_opt_shapes"
KEY_TRT_PROFILE_MAX = "trt_profile_max_shapes"
TRT_PROFILE_KEYS = (KEY_TRT_PROFILE_MIN, KEY_TRT_PROFILE_OPT, KEY_TRT_PROFILE_MAX)
# JSON list of floats, one per class_names entry: the runtime drops a class's detections scoring
# below its value (unless the caller passes its own threshold). Absent: KEY_SCORE_THRESHOLD only.
KEY_CLASS_SCORE_THRESHOLDS = "class_score_thresholds"

REQUIRED_KEYS = (
    KEY_FORMAT,
    KEY_CONTRACT,
    KEY_CLASS_NAMES,
    KEY_INPUT_FORMAT,
    KEY_BATCH,
    KEY_DETECTIONS,
    KEY_SCORE_THRESHOLD,
)

# BGR pixel value that normalises to ~0 (ImageNet mean): what padding is filled with, as
# torchvision pads the normalised batch with zeros.
MEAN_BGR_UINT8 = (104, 116, 124)
