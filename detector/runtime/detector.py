"""The vehicle-side detector: an exported ONNX model run by onnxruntime on OpenCV frames.

Only numpy, OpenCV and onnxruntime are imported here (no torch, no PIL).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from ..resize_rule import resized_size
from . import contract as C
from .providers import create_session

log = logging.getLogger(__name__)

# Frames outside these sides are refused (the model resizes to ~320..1333 px inside anyway).
MIN_SIDE = 16
MAX_SIDE = 8192


class ModelError(ValueError):
    """The file is not an ONNX model exported by ``detector export`` (or a newer contract)."""


class InputError(ValueError):
    """A frame given to :meth:`Detector.predict` has the wrong type, dtype, rank, channels or size."""


@dataclass
class Detections:
    """Detections of one image, in decreasing score order.

    boxes: float32 [K, 4] x1, y1, x2, y2 in the pixels of the image given (x right, y down).
    scores: float32 [K].
    labels: int64 [K] model labels 1..C: ``names[i] == class_names[labels[i] - 1]``.
    names: the class name of each detection.
    image_size: (height, width) of the image given.
    An image without detections has ``boxes.shape == (0, 4)`` and empty scores, labels, names.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    image_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, image_size: tuple[int, int] = (0, 0)) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
            [],
            image_size,
        )


@dataclass
class ModelInfo:
    """What the model's metadata says (see ``detector.runtime.contract``)."""

    class_names: list[str]
    category_ids: list[int] | None
    input_format: str
    batch_size: int
    detections_per_image: int
    score_threshold: float
    precision: str
    contract: int
    metadata: dict[str, str] = field(default_factory=dict)
    # (width, height) of a static export, None when the model takes any size
    input_size: tuple[int, int] | None = None
    # the model's resize (detector.resize_rule); None in metadata older than these keys
    min_size: int | None = None
    max_size: int | None = None


def read_model_info(session: ort.InferenceSession, path: str) -> ModelInfo:
    """Check the session's model against the contract and parse its metadata, or raise ModelError."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    hint = "export it with `detector export CHECKPOINT --out model.onnx`"
    if meta.get(C.KEY_FORMAT) != C.FORMAT_TAG:
        raise ModelError(
            f"{path}: not a detector ONNX model (metadata '{C.KEY_FORMAT}' is "
            f"{meta.get(C.KEY_FORMAT)!r}, expected {C.FORMAT_TAG!r}); {hint}"
        )
    missing = [k for k in C.REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(
            f"{path}: detector metadata incomplete, missing {', '.join(missing)}; {hint}"
        )
    try:
        contract = int(meta[C.KEY_CONTRACT])
        class_names = json.loads(meta[C.KEY_CLASS_NAMES])
        category_ids = json.loads(meta.get(C.KEY_CATEGORY_IDS, "null"))
        batch = int(meta[C.KEY_BATCH])
        detections = int(meta[C.KEY_DETECTIONS])
        threshold = float(meta[C.KEY_SCORE_THRESHOLD])
    except (ValueError, TypeError) as e:
        raise ModelError(f"{path}: unreadable detector metadata: {e}") from None
    if contract > C.CONTRACT_VERSION:
        raise ModelError(
            f"{path}: output contract {contract} is newer than this runtime's ({C.CONTRACT_VERSION}); "
            "update the runtime"
        )
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise ModelError(f"{path}: metadata class_names is not a JSON list of strings")
    input_format = meta[C.KEY_INPUT_FORMAT]
    if input_format not in C.INPUT_FORMATS:
        raise ModelError(
            f"{path}: unknown input_format {input_format!r} (one of {', '.join(C.INPUT_FORMATS)})"
        )

    inputs = session.get_inputs()
    expected_type = "tensor(uint8)" if input_format == C.INPUT_RAW else "tensor(float)"
    if len(inputs) != 1 or inputs[0].name != C.INPUT_NAME or len(inputs[0].shape) != 4:
        raise ModelError(f"{path}: expected one rank-4 input named {C.INPUT_NAME!r}")
    if inputs[0].type != expected_type:
        raise ModelError(f"{path}: input is {inputs[0].type} but metadata says {input_format}")
    if inputs[0].shape[0] != batch:
        raise ModelError(f"{path}: input batch {inputs[0].shape[0]} but metadata says {batch}")
    outputs = {o.name for o in session.get_outputs()}
    if not set(C.OUTPUT_NAMES) <= outputs:
        raise ModelError(
            f"{path}: outputs {sorted(outputs)} lack {sorted(set(C.OUTPUT_NAMES) - outputs)}"
        )
    input_size = _input_size(meta, path)
    resize = [int(meta[k]) if k in meta else None for k in (C.KEY_MIN_SIZE, C.KEY_MAX_SIZE)]
    return ModelInfo(
        input_size=input_size,
        min_size=resize[0],
        max_size=resize[1],
        class_names=class_names,
        category_ids=[int(c) for c in category_ids] if isinstance(category_ids, list) else None,
        input_format=input_format,
        batch_size=batch,
        detections_per_image=detections,
        score_threshold=threshold,
        precision=meta.get(C.KEY_PRECISION, "fp32"),
        contract=contract,
        metadata=meta,
    )


def _input_size(meta: dict[str, str], path: str) -> tuple[int, int] | None:
    """(width, height) from the metadata's input_size ("WxH"), None for a dynamic export."""
    text = meta.get(C.KEY_INPUT_SIZE, C.INPUT_SIZE_DYNAMIC)
    if text == C.INPUT_SIZE_DYNAMIC:
        return None
    try:
        width, height = (int(v) for v in text.split("x"))
    except ValueError:
        raise ModelError(
            f"{path}: metadata {C.KEY_INPUT_SIZE} {text!r} is not WIDTHxHEIGHT"
        ) from None
    return width, height


def check_frame_size(frame: np.ndarray, info: ModelInfo, index: int = 0) -> None:
    """Refuse a frame the model cannot take: another size than a static export's, or one whose
    short side the model would resize to 0 pixels (a very elongated frame)."""
    h, w = frame.shape[:2]
    if info.input_size is not None and (w, h) != info.input_size:
        sw, sh = info.input_size
        raise InputError(
            f"frame {index}: size {w}x{h}, but the model was exported for {sw}x{sh} frames only "
            f"(detector export --input-size {sw}x{sh}); resize the frame to {sw}x{sh} or export "
            "without --input-size for frames of any size"
        )
    if info.min_size is not None and info.max_size is not None:
        new_h, new_w = resized_size(h, w, info.min_size, info.max_size)
        if min(new_h, new_w) < 1:
            raise InputError(
                f"frame {index}: size {w}x{h} would be resized to {new_w}x{new_h} by the model "
                f"(min_size {info.min_size}, max_size {info.max_size}): too elongated; crop it"
            )


def check_frame(frame: Any, index: int = 0) -> np.ndarray:
    """Refuse anything but an HxWx3 uint8 BGR image with a clear message."""
    what = f"frame {index}"
    if not isinstance(frame, np.ndarray):
        raise InputError(
            f"{what}: expected a numpy array HxWx3 uint8 BGR (as cv2.imread or VideoCapture.read "
            f"give), got {type(frame).__name__}"
        )
    if frame.dtype != np.uint8:
        hint = (
            " (scale 0..1 floats with (frame * 255).round().astype(np.uint8))"
            if frame.dtype.kind == "f"
            else ""
        )
        raise InputError(f"{what}: expected dtype uint8, got {frame.dtype}{hint}")
    if frame.ndim != 3:
        hint = (
            "; a grayscale image needs cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)"
            if frame.ndim == 2
            else ""
        )
        raise InputError(f"{what}: expected 3 dimensions HxWx3, got shape {frame.shape}{hint}")
    if frame.shape[2] != 3:
        hint = {
            1: "; convert with cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)",
            4: "; drop alpha with cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)",
        }.get(frame.shape[2], "")
        if frame.shape[0] == 3:
            hint = "; this looks channels-first (3xHxW): pass HxWx3 (frame.transpose(1, 2, 0))"
        raise InputError(f"{what}: expected 3 channels (BGR) last, got shape {frame.shape}{hint}")
    h, w = frame.shape[:2]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise InputError(
            f"{what}: size {w}x{h} outside the supported {MIN_SIDE}..{MAX_SIDE} pixels per side"
        )
    return frame


class Detector:
    """Run an ONNX model written by ``detector export`` on BGR frames.

    >>> det = Detector("model.onnx")                 # TensorRT -> CUDA -> CPU, whichever works
    >>> result = det.predict(cv2.imread("frame.jpg"))  # one HxWx3 uint8 BGR frame -> Detections
    >>> results = det.predict([frame1, frame2, frame3])  # a list -> list of Detections

    providers: names in order of preference ("tensorrt", "cuda", "cpu" or onnxruntime names);
        default TensorRT, CUDA, CPU. The one chosen and the reasons others were skipped are logged.
    trt_cache_dir: TensorRT engine + timing cache folder (``trt_engine_cache_path``); without it
        TensorRT rebuilds its engines at every start (minutes).
    trt_fp16: let TensorRT use fp16 kernels (``trt_fp16_enable``).
    score_threshold: drop detections below it (default: the threshold the model was exported with;
        a lower value cannot bring back what the graph already dropped).

    Lists are run in batches of the model's fixed batch size N (the last batch padded with a copy
    of its last frame, whose results are dropped). Frames of the same size are batched together;
    frames of different sizes that share a batch are padded at the right and bottom to the largest
    height and width with the ImageNet mean colour, and their boxes are clipped to their own image
    (the model then resizes the padded canvas, so results can differ slightly from running that
    frame alone). A camera stream has one frame size and never pads.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        trt_cache_dir: str | os.PathLike | None = None,
        score_threshold: float | None = None,
        *,
        trt_fp16: bool = False,
        device_id: int = 0,
        threads: int | None = None,
    ):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: model file not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: provider start-up failures stay visible
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session, self.skipped_providers = create_session(
                self.path,
                providers,
                session_options=options,
                device_id=device_id,
                trt_cache_dir=trt_cache_dir,
                trt_fp16=trt_fp16,
            )
        except (
            ort_errors.InvalidProtobuf,
            ort_errors.InvalidGraph,
            ort_errors.Fail,
            ort_errors.NotImplemented,
        ) as e:
            raise ModelError(f"{self.path}: onnxruntime cannot load this file: {e}") from None
        self.provider = self.session.get_providers()[0]
        self.info = read_model_info(self.session, str(self.path))
        if self.info.precision == "fp16" and self.provider == "CPUExecutionProvider":
            log.warning(
                "%s: fp16 model on the CPU provider runs through float casts (slow); "
                "export without --fp16 for CPU",
                self.path,
            )
        self.score_threshold = (
            self.info.score_threshold if score_threshold is None else float(score_threshold)
        )
        if self.score_threshold < self.info.score_threshold:
            log.warning(
                "score_threshold %.3f is below the model's in-graph threshold %.3f, which applies",
                self.score_threshold,
                self.info.score_threshold,
            )
        self._output_names = list(C.OUTPUT_NAMES)

    # convenience views of the metadata
    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def category_ids(self) -> list[int] | None:
        return self.info.category_ids

    @property
    def batch_size(self) -> int:
        return self.info.batch_size

    @property
    def input_format(self) -> str:
        return self.info.input_format

    def __call__(self, frames: Any) -> Detections | list[Detections]:
        return self.predict(frames)

    def predict(self, frames: Any) -> Detections | list[Detections]:
        """One HxWx3 uint8 BGR frame -> :class:`Detections`; a list (or an NxHxWx3 array) of
        frames -> a list of :class:`Detections` in the same order."""
        single = isinstance(frames, np.ndarray) and frames.ndim != 4
        if single:
            batch = [frames]
        elif isinstance(frames, (np.ndarray, list, tuple)):
            batch = list(frames)
        else:
            raise InputError(
                f"expected an HxWx3 uint8 BGR frame or a list of them, got {type(frames).__name__}"
            )
        batch = [check_frame(f, i) for i, f in enumerate(batch)]
        for i, f in enumerate(batch):
            check_frame_size(f, self.info, i)
        results: list[Detections | None] = [None] * len(batch)
        # Same-size frames share batches (no padding); the sort is stable, results keep input order.
        order = sorted(range(len(batch)), key=lambda i: batch[i].shape[:2])
        n = self.info.batch_size
        for start in range(0, len(order), n):
            chunk = order[start : start + n]
            for index, result in zip(chunk, self._run([batch[i] for i in chunk]), strict=True):
                results[index] = result
        return results[0] if single else results  # type: ignore[return-value]

    def _run(self, frames: list[np.ndarray]) -> list[Detections]:
        n = self.info.batch_size
        height = max(f.shape[0] for f in frames)
        width = max(f.shape[1] for f in frames)
        canvases = []
        for f in frames:
            if f.shape[:2] == (height, width):
                canvases.append(f)
            else:
                canvas = np.empty((height, width, 3), np.uint8)
                canvas[:] = C.MEAN_BGR_UINT8
                canvas[: f.shape[0], : f.shape[1]] = f
                canvases.append(canvas)
        canvases += [canvases[-1]] * (n - len(canvases))
        bgr = np.stack(canvases)
        if self.info.input_format == C.INPUT_RAW:
            feed = bgr
        else:
            feed = np.ascontiguousarray(
                bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32
            ) / np.float32(255.0)
        boxes, scores, labels, counts = self.session.run(self._output_names, {C.INPUT_NAME: feed})
        results = []
        for i, f in enumerate(frames):
            h, w = f.shape[:2]
            k = int(counts[i])
            b = boxes[i, :k].astype(np.float32, copy=True)
            s = scores[i, :k].astype(np.float32, copy=True)
            lab = labels[i, :k].astype(np.int64, copy=True)
            keep = s >= self.score_threshold
            if (h, w) != (height, width):  # padded: clip to the frame, drop boxes left outside it
                np.clip(b[:, 0::2], 0, w, out=b[:, 0::2])
                np.clip(b[:, 1::2], 0, h, out=b[:, 1::2])
                keep &= ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
            b, s, lab = b[keep], s[keep], lab[keep]
            names = [self._name(int(x)) for x in lab]
            results.append(Detections(b.reshape(-1, 4), s, lab, names, (h, w)))
        return results

    def _name(self, label: int) -> str:
        if 1 <= label <= len(self.info.class_names):
            return self.info.class_names[label - 1]
        return str(label)

    def category_id(self, label: int) -> int:
        """COCO category id of a model label (the metadata's category_ids, else the label)."""
        ids = self.info.category_ids
        if ids and 1 <= label <= len(ids):
            return int(ids[label - 1])
        return int(label)

    def __repr__(self) -> str:
        return (
            f"Detector({str(self.path)!r}, provider={self.provider}, batch={self.batch_size}, "
            f"input={self.input_format}, classes={len(self.class_names)})"
        )
