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
from .errors import InputError, ModelError
from .modelfile import read_metadata
from .providers import CPU, GPU_PROVIDERS, TensorRTOptions, create_session

log = logging.getLogger(__name__)

# Frames outside these sides are refused (the model resizes to ~320..1333 px inside anyway).
MIN_SIDE = 16
MAX_SIDE = 8192


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
    class_score_thresholds: list[float] | None = None  # one per class, from the evaluation


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
        class_score_thresholds=_class_thresholds(meta, len(class_names), path),
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


def _class_thresholds(meta: dict[str, str], classes: int, path: str) -> list[float] | None:
    text = meta.get(C.KEY_CLASS_SCORE_THRESHOLDS)
    if text is None:
        return None
    try:
        values = [float(v) for v in json.loads(text)]
    except (ValueError, TypeError):
        values = []
    if len(values) != classes or not all(0.0 <= v <= 1.0 for v in values):
        raise ModelError(
            f"{path}: metadata {C.KEY_CLASS_SCORE_THRESHOLDS} must be a JSON list of {classes} "
            f"scores in 0..1 (one per class name), got {text[:200]!r}; export it again"
        )
    return values


def trt_profile_from_metadata(meta: dict[str, str]) -> tuple[str, str, str] | None:
    """The TensorRT optimisation profile (min, opt, max shapes) the export stored, if any."""
    shapes = [meta.get(k) for k in C.TRT_PROFILE_KEYS]
    if all(shapes):
        return shapes[0], shapes[1], shapes[2]  # type: ignore[return-value]
    return None


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
    >>> det = Detector("model.onnx", providers=["tensorrt"])  # TensorRT or ProviderError
    >>> result = det.predict(cv2.imread("frame.jpg"))  # one HxWx3 uint8 BGR frame -> Detections
    >>> results = det.predict([frame1, frame2, frame3])  # a list -> list of Detections

    providers: the providers allowed, in order of preference ("tensorrt", "cuda", "cpu" or
        onnxruntime names). Named providers are required: the session must run on one of them
        (on CPU only if "cpu" is named), else :class:`ProviderError` says which provider failed
        and which library is missing. None: TensorRT, CUDA, CPU, whichever starts first (a
        WARNING is logged when that is not TensorRT).
    trt_cache_dir: TensorRT engine + timing cache folder; without it TensorRT rebuilds its
        engines at every start (minutes).
    score_threshold: drop detections below it, for every class. None: the per-class thresholds
        the export stored (metadata ``class_score_thresholds``), else the model's own threshold.
        A value below the in-graph threshold cannot bring back what the graph already dropped.
    trt_fp16: let TensorRT use fp16 kernels (``trt_fp16_enable``, on by default).
    trt_workspace_bytes, trt_exclude_ops, trt_profile: see :class:`TensorRTOptions` (the profile
        defaults to the one stored in the model's metadata).
    cpu_fallback: False refuses a session in which any node would run on CPU (onnxruntime's
        ``session.disable_cpu_ep_fallback``; CUDA leaves shape nodes on CPU, so this is opt-in).
    io_binding: bind preallocated output buffers (None: on for CUDA and TensorRT).

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
        trt_fp16: bool = True,
        trt_workspace_bytes: int | None = None,
        trt_exclude_ops: Sequence[str] | None = None,
        trt_profile: tuple[str, str, str] | None = None,
        cpu_fallback: bool = True,
        io_binding: bool | None = None,
        device_id: int = 0,
        threads: int | None = None,
    ):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: model file not found")
        metadata = read_metadata(self.path)  # ModelError for a 0-byte or corrupt file
        self.tensorrt = TensorRTOptions(
            fp16=trt_fp16,
            cache_dir=trt_cache_dir,
            workspace_bytes=trt_workspace_bytes,
            exclude_ops=trt_exclude_ops,
            profile=trt_profile or trt_profile_from_metadata(metadata),
        )
        self.session, self.skipped_providers = self._create_session(
            providers, cpu_fallback, device_id, threads
        )
        self.provider = self.session.get_providers()[0]
        self.device_id = device_id
        self.info = read_model_info(self.session, str(self.path))
        if self.info.precision == "fp16" and self.provider == CPU:
            log.warning(
                "%s: fp16 model on the CPU provider runs through float casts (slow); "
                "export without --fp16 for CPU",
                self.path,
            )
        self.set_score_threshold(score_threshold)
        self._output_names = list(C.OUTPUT_NAMES)
        use_binding = self.provider in GPU_PROVIDERS if io_binding is None else io_binding
        self._binding = self._bind_outputs() if use_binding else None

    def _create_session(
        self,
        providers: Sequence[str] | None,
        cpu_fallback: bool,
        device_id: int,
        threads: int | None,
    ) -> tuple[ort.InferenceSession, dict[str, str]]:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: provider start-up failures stay visible
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            return create_session(
                self.path,
                providers,
                session_options=options,
                device_id=device_id,
                tensorrt=self.tensorrt,
                cpu_fallback=cpu_fallback,
            )
        except (
            ort_errors.InvalidProtobuf,
            ort_errors.InvalidGraph,
            ort_errors.InvalidArgument,
            ort_errors.Fail,
            ort_errors.NotImplemented,
        ) as e:
            raise ModelError(f"{self.path}: onnxruntime cannot load this file: {e}") from None

    def set_score_threshold(self, score_threshold: float | None) -> None:
        """One threshold per class: the caller's, else the export's per-class ones, else the graph's."""
        classes = len(self.info.class_names)
        if score_threshold is not None:
            per_class = [float(score_threshold)] * classes
        elif self.info.class_score_thresholds is not None:
            per_class = list(self.info.class_score_thresholds)
        else:
            per_class = [self.info.score_threshold] * classes
        self.score_threshold = (
            float(score_threshold) if score_threshold is not None else min(per_class, default=0.0)
        )
        self.per_class_thresholds = per_class
        # Index by model label (0 is padding); a label past class_names keeps the lowest value.
        self._label_threshold = np.array([0.0, *per_class, self.score_threshold], np.float32)
        if score_threshold is not None and score_threshold < self.info.score_threshold:
            log.warning(
                "score_threshold %.3f is below the model's in-graph threshold %.3f, which applies",
                score_threshold,
                self.info.score_threshold,
            )

    def describe_threshold(self) -> str:
        """How detections are filtered, for summaries ("score >= 0.5", "per-class scores")."""
        if len(set(self.per_class_thresholds)) <= 1:
            return f"score >= {self.score_threshold:g}"
        pairs = ", ".join(
            f"{n} {t:.2f}"
            for n, t in zip(self.info.class_names, self.per_class_thresholds, strict=True)
        )
        return f"per-class score thresholds ({pairs})"

    def _bind_outputs(self) -> tuple[ort.IOBinding, list[np.ndarray]]:
        """Preallocated host buffers bound to the four outputs (their shapes are fixed)."""
        n, k = self.info.batch_size, self.info.detections_per_image
        buffers = [
            np.zeros((n, k, 4), np.float32),
            np.zeros((n, k), np.float32),
            np.zeros((n, k), np.int64),
            np.zeros((n,), np.int64),
        ]
        declared = {o.name: o.shape for o in self.session.get_outputs()}
        for name, buffer in zip(C.OUTPUT_NAMES, buffers, strict=True):
            shape = declared[name]
            fixed = all(isinstance(d, int) for d in shape)
            if fixed and tuple(shape) != buffer.shape:
                raise ModelError(
                    f"{self.path}: output {name} is {shape}, but the metadata (batch {n}, "
                    f"{k} detections per image) says {list(buffer.shape)}"
                )
        binding = self.session.io_binding()
        for name, buffer in zip(C.OUTPUT_NAMES, buffers, strict=True):
            binding.bind_output(
                name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data
            )
        return binding, buffers

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

    def _feed(self, frames: list[np.ndarray]) -> tuple[np.ndarray, int, int]:
        """The model input for up to N frames (padded canvas, last frame repeated), and its H, W."""
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
            return bgr, height, width
        feed = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
        return feed / np.float32(255.0), height, width

    def _infer(self, feed: np.ndarray) -> list[np.ndarray]:
        h, w = feed.shape[1:3] if self.info.input_format == C.INPUT_RAW else feed.shape[2:4]
        try:
            if self._binding is None:
                return self.session.run(self._output_names, {C.INPUT_NAME: feed})
            binding, buffers = self._binding
            binding.bind_cpu_input(C.INPUT_NAME, feed)
            self.session.run_with_iobinding(binding)
            return buffers
        except (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.RuntimeException) as e:
            raise InputError(
                f"onnxruntime ({self.provider}) failed on a batch of {w}x{h} frames: "
                f"{str(e).strip()[:300]}"
            ) from None

    def _run(self, frames: list[np.ndarray]) -> list[Detections]:
        feed, height, width = self._feed(frames)
        boxes, scores, labels, counts = self._infer(feed)
        results = []
        for i, f in enumerate(frames):
            h, w = f.shape[:2]
            k = int(counts[i])
            b = boxes[i, :k].astype(np.float32, copy=True)
            s = scores[i, :k].astype(np.float32, copy=True)
            lab = labels[i, :k].astype(np.int64, copy=True)
            # Per-class thresholds; rows stay in score order, so the kept ones are packed first.
            index = np.clip(lab, 0, len(self._label_threshold) - 1)
            keep = s >= self._label_threshold[index]
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
