"""Export a checkpoint to ONNX (fixed batch size, dynamic height/width) and check it against PyTorch.

The graph is a :class:`DeployWrapper` around the checkpoint's Faster R-CNN, traced by the
TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):

* the dynamo exporter (``torch.export``) cannot export torchvision's Faster R-CNN: it stops at
  data-dependent control flow (``if boxes.numel() == 0`` in ``batched_nms``, detection counts
  that exist only at run time: ``GuardOnDataDependentSymNode``), and torchvision 0.29 ships no
  ONNX translation for ``torchvision::nms`` / ``roi_align`` for it. The TorchScript exporter has
  symbolic functions for both and torchvision's own ONNX tests use it.
* torchvision's model exported as is breaks for batch > 1 (pytorch/vision#8937): the RoI heads
  split their proposals per image with sizes frozen into the graph at trace time. The wrapper
  runs the transform, backbone, FPN and RPN on the whole batch and the RoI heads once per image
  (a loop unrolled N times), so nothing depends on another image's proposal count.
* the wrapper pads every image's detections to K = ``detections_per_image`` rows, so outputs have
  fixed shapes ``[N, K, ...]`` plus ``num_detections[N]``; the contract is the same for N = 1.
* three trace-time traps are removed in the exported copy (the eager model is untouched):
  torchvision's traced resize computes the resized size in float32 (a 418 px side becomes 319 px
  in ONNX, 320 px in PyTorch, moving every box), so the graph computes it in float64 like eager
  PyTorch; the box coder's ``reshape(box_sum, -1)`` fails in ONNX Runtime when the RPN keeps no
  proposal (a dark frame with a mobilenet model, whose RPN drops objectness < 0.05); and its
  ``if box_sum > 0`` branches would be frozen at trace time.

Unless told not to, the export compares ONNX Runtime with the PyTorch model on real images and
refuses to write a model whose detections differ; the file is written atomically.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import sys
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .runtime import contract as C

# torch (and detector.fileio, which needs Pillow) are imported when an export runs, so that
# building the `detector` CLI parser works where only the runtime is installed (the vehicle).
if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

MIN_OPSET = 17
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Parity tolerances (PyTorch fp32 eager vs ONNX Runtime): the same detections, boxes within
# 0.5 px, scores within 1e-3.
BOX_TOLERANCE = 0.5  # pixels, max |coordinate difference| of matched boxes
SCORE_TOLERANCE = 1e-3
# An fp16 graph is also compared with the fp32 model, where exactness cannot be asked: half
# precision moves boxes by pixels, and for a weakly trained model through another proposal by
# tens of pixels (PyTorch's own fp16 does the same). So it must find every detection scoring
# >= 0.5 with the same label, IoU >= 0.75 and a score within 0.05; weaker ones may differ.
# This catches a broken fp16 graph (overflow, garbage, lost detections), not precision drift:
# measure that with an evaluation of the fp16 model.
FP16_MIN_IOU = 0.75
FP16_SCORE_TOLERANCE = 0.05
FP16_REQUIRED_SCORE = 0.5


class ExportError(RuntimeError):
    """The model cannot be exported as asked (bad options, unreadable checkpoint, invalid graph)."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree on real images; nothing was written."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# The exported graph
# --------------------------------------------------------------------------------------------


_TORCH_CLASSES: dict[str, type] = {}


def _torch_classes() -> dict[str, type]:
    """Define the torch modules on first use (torch is imported lazily)."""
    if _TORCH_CLASSES:
        return _TORCH_CLASSES
    import torch
    from torch import nn

    def _cast(obj: Any, dtype: torch.dtype) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(dtype) if obj.is_floating_point() else obj
        if isinstance(obj, OrderedDict):
            return OrderedDict((k, _cast(v, dtype)) for k, v in obj.items())
        if isinstance(obj, dict):
            return {k: _cast(v, dtype) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(_cast(v, dtype) for v in obj)
        return obj

    class _Half(nn.Module):
        """Run ``module`` in float16: inputs are cast to half, outputs back to float32."""

        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module.half()

        def forward(self, *args: Any) -> Any:
            return _cast(self.module(*_cast(args, torch.float16)), torch.float32)

    class DeployWrapper(nn.Module):
        """Faster R-CNN with a fixed batch of stacked images in and fixed-shape tensors out.

        ``forward(images)`` takes ``float32 [N, 3, H, W]`` RGB 0..1, or with ``raw_input``
        ``uint8 [N, H, W, 3]`` BGR, and returns ``boxes [N, K, 4]`` (x1, y1, x2, y2 in input pixels),
        ``scores [N, K]``, ``labels int64 [N, K]`` and ``num_detections int64 [N]``; rows past
        ``num_detections[i]`` are zeros. Resizing, normalisation and box rescaling are the model's own
        (GeneralizedRCNNTransform), so the results are those of ``model(list_of_images)``.
        """

        def __init__(
            self, model: nn.Module, batch: int, raw_input: bool = False, fp16: bool = False
        ):
            super().__init__()
            if batch < 1:
                raise ExportError(f"batch must be >= 1, got {batch}")
            model = copy.deepcopy(model).eval()
            if fp16:
                # The heavy convolutions and the box head in half precision; anchors, box decoding,
                # NMS and RoIAlign stay in float32, where half would cost whole pixels at 1333 px.
                model.backbone = _Half(model.backbone)
                model.rpn.head = _Half(model.rpn.head)
                model.roi_heads.box_head = _Half(model.roi_heads.box_head)
            for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
                coder.decode = types.MethodType(_decode_traceable, coder)
            model.transform.resize = types.MethodType(_resize_exact, model.transform)
            self.model = model
            self.batch = batch
            self.raw_input = raw_input
            self.detections = int(model.roi_heads.detections_per_img)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            m = self.model
            if self.raw_input:
                images = images.permute(0, 3, 1, 2).flip(1).to(torch.float32) / 255.0
            frames = [images[i] for i in range(self.batch)]
            original_sizes = [(f.shape[-2], f.shape[-1]) for f in frames]
            image_list, _ = m.transform(frames)
            features = m.backbone(image_list.tensors)
            proposals, _ = m.rpn(image_list, features)
            k = self.detections
            boxes, scores, labels, counts = [], [], [], []
            for i in range(self.batch):
                # The RoI heads see one image at a time: torchvision splits a batch's proposals with
                # sizes that the tracer would freeze (pytorch/vision#8937).
                feats = OrderedDict((name, f[i : i + 1]) for name, f in features.items())
                size = image_list.image_sizes[i]
                dets, _ = m.roi_heads(feats, [proposals[i]], [size])
                det = m.transform.postprocess(dets, [size], [original_sizes[i]])[0]
                counts.append(torch.ones_like(det["labels"]).sum())
                boxes.append(torch.cat([det["boxes"], det["boxes"].new_zeros(k, 4)])[:k])
                scores.append(torch.cat([det["scores"], det["scores"].new_zeros(k)])[:k])
                labels.append(torch.cat([det["labels"], det["labels"].new_zeros(k)])[:k])
            return torch.stack(boxes), torch.stack(scores), torch.stack(labels), torch.stack(counts)

    for cls in (_Half, DeployWrapper):
        cls.__qualname__ = cls.__name__
    _TORCH_CLASSES.update(_Half=_Half, DeployWrapper=DeployWrapper)
    globals().update(_TORCH_CLASSES)
    return _TORCH_CLASSES


def __getattr__(name: str) -> Any:  # export.DeployWrapper before the first export
    if name in ("DeployWrapper", "_Half"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resize_exact(self: Any, image: torch.Tensor, target: Any = None) -> tuple[torch.Tensor, Any]:
    """GeneralizedRCNNTransform.resize with the output size computed as eager PyTorch does.

    Eager PyTorch computes ``int(side * min(min_size / short, max_size / long))`` in float64;
    torchvision's traced path does it in float32 and hands ONNX a scale factor, so e.g. a 418 px
    side becomes 319 px in ONNX Runtime and 320 px in PyTorch: every detection moves. Here the
    graph computes the size in float64 (1-D tensors: the exporter demotes 0-d doubles to float)
    and gives Resize explicit sizes, which also matches eager's recomputed scale (in / out).
    """
    import torch
    from torch.onnx import operators

    if self.training or self.fixed_size is not None or target is not None:
        return type(self).resize(self, image, target)
    shape = operators.shape_as_tensor(image)[-2:].to(torch.float64)
    sides = torch.cat(
        [shape.min(dim=0, keepdim=True).values, shape.max(dim=0, keepdim=True).values]
    )
    limits = torch.tensor([float(self.min_size[-1]), float(self.max_size)], dtype=torch.float64)
    scale = (limits / sides).min(dim=0, keepdim=True).values
    size = torch.floor(shape * scale).to(torch.int64)
    out_size: list[Any] = (
        [size[0], size[1]] if torch.jit.is_tracing() else [int(size[0]), int(size[1])]
    )
    image = torch.nn.functional.interpolate(
        image[None], size=out_size, mode="bilinear", align_corners=False
    )[0]
    return image, target


def _decode_traceable(
    self: Any, rel_codes: torch.Tensor, boxes: Sequence[torch.Tensor]
) -> torch.Tensor:
    """BoxCoder.decode without ``reshape(box_sum, -1)`` and ``if box_sum > 0``.

    Both are fine in eager mode; traced, the branch is frozen and ONNX Runtime cannot reshape an
    empty tensor to ``(0, -1)``, which crashes on a frame where the RPN keeps no proposal.
    """
    import torch

    concat_boxes = torch.cat(list(boxes), dim=0)
    width = rel_codes.shape[-1]
    pred = self.decode_single(rel_codes.reshape(-1, width), concat_boxes)
    return pred.reshape(-1, width // 4, 4)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclass
class ParityReport:
    images: int
    provider: str
    detections_torch: int = 0
    detections_onnx: int = 0
    matched: int = 0
    # detections present on one side only whose score is within the tolerance of the in-graph
    # threshold (or of the K-th score when K detections came out): a rounding difference, allowed;
    # for fp16 also the detections below required_score
    tolerated: int = 0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    box_tolerance: float = BOX_TOLERANCE
    score_tolerance: float = SCORE_TOLERANCE
    # fp16: matched boxes are held to an IoU instead of box_tolerance
    min_iou: float | None = None
    worst_iou: float = 1.0
    # detections scoring below this on both sides are not held to the tolerances, and may exist on
    # one side only (fp16 graphs: 0.5; fp32: 0, every detection counts)
    required_score: float = 0.0
    synthetic_only: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def format(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"parity {verdict} (PyTorch eager fp32 vs ONNX Runtime {self.provider}):",
            f"  images compared        {self.images}"
            + (
                "  (synthetic frames only: pass --images for real ones)"
                if self.synthetic_only
                else ""
            ),
            f"  detections             {self.detections_torch} PyTorch, {self.detections_onnx} ONNX, "
            f"{self.matched} matched, {self.tolerated} tolerated (threshold edge"
            + (f", or below score {self.required_score}" if self.required_score > 0 else "")
            + ")",
            f"  max box difference     {self.max_box_diff:.4f} px "
            + (
                f"(lowest IoU {self.worst_iou:.3f}, at least {self.min_iou})"
                if self.min_iou is not None
                else f"(tolerance {self.box_tolerance})"
            ),
            f"  max score difference   {self.max_score_diff:.6f} (tolerance {self.score_tolerance})",
        ]
        if self.required_score > 0:
            lines.append(
                f"  detections below score {self.required_score} may differ (half precision)"
            )
        for failure in self.failures[:20]:
            lines.append(f"  MISMATCH {failure}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more mismatches")
        return "\n".join(lines)


@dataclass
class ExportReport:
    path: Path
    batch: int
    input_format: str
    precision: str
    opset: int
    exporter: str
    input_shape: list[Any]
    size_bytes: int
    seconds: float
    metadata: dict[str, str]
    parity: ParityReport | None

    def format(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        lines = [
            f"exported {self.path} ({self.size_bytes / 1e6:.1f} MB, {self.seconds:.1f} s): "
            f"input images {self.input_format} [{shape}], batch {self.batch}, {self.precision}, "
            f"opset {self.opset}, {self.exporter}",
        ]
        lines.append(self.parity.format() if self.parity else "parity check skipped (--no-parity)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Parity check
# --------------------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two x1, y1, x2, y2 boxes."""
    w = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    h = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = w * h
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def match_detections(
    ref: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
) -> tuple[list[tuple[int, int, float, float]], list[int], list[int]]:
    """Greedy matching in decreasing reference score: each reference detection takes the unused
    test detection of the same label whose box is nearest (max |coordinate difference|).

    Returns ``(pairs (i_ref, i_test, box_diff, score_diff), unmatched_ref, unmatched_test)``.
    """
    used = np.zeros(len(test["scores"]), dtype=bool)
    pairs: list[tuple[int, int, float, float]] = []
    unmatched_ref: list[int] = []
    for i in np.argsort(-ref["scores"], kind="stable"):
        candidates = np.flatnonzero(~used & (test["labels"] == ref["labels"][i]))
        if candidates.size == 0:
            unmatched_ref.append(int(i))
            continue
        dist = np.abs(test["boxes"][candidates] - ref["boxes"][i]).max(axis=1)
        j = int(candidates[int(np.argmin(dist))])
        used[j] = True
        pairs.append(
            (int(i), j, float(dist.min()), float(abs(test["scores"][j] - ref["scores"][i])))
        )
    return pairs, unmatched_ref, [int(j) for j in np.flatnonzero(~used)]


def compare_detections(
    ref: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    report: ParityReport,
    *,
    score_threshold: float,
    max_detections: int,
    where: str,
) -> None:
    """Add one image's comparison to ``report`` (failures get a line naming ``where``)."""
    report.detections_torch += len(ref["scores"])
    report.detections_onnx += len(test["scores"])
    pairs, unmatched_ref, unmatched_test = match_detections(ref, test)
    for i, j, box_diff, score_diff in pairs:
        report.matched += 1
        if max(ref["scores"][i], test["scores"][j]) < report.required_score:
            report.tolerated += 1  # weak on both sides: half precision may move it (fp16 only)
            continue
        report.max_box_diff = max(report.max_box_diff, box_diff)
        report.max_score_diff = max(report.max_score_diff, score_diff)
        if report.min_iou is not None:
            overlap = box_iou(ref["boxes"][i], test["boxes"][j])
            report.worst_iou = min(report.worst_iou, overlap)
            box_bad = overlap < report.min_iou
        else:
            box_bad = box_diff > report.box_tolerance
        if box_bad or score_diff > report.score_tolerance:
            report.failures.append(
                f"{where}: label {int(ref['labels'][i])} box {np.round(ref['boxes'][i], 2).tolist()} "
                f"score {ref['scores'][i]:.4f} vs ONNX box {np.round(test['boxes'][j], 2).tolist()} "
                f"score {test['scores'][j]:.4f} (box diff {box_diff:.3f} px, score diff {score_diff:.5f})"
            )
    for side, dets, missing in (("PyTorch", ref, unmatched_ref), ("ONNX", test, unmatched_test)):
        # A detection may exist on one side only when its score is at the edge: the in-graph
        # threshold, or the K-th score when the K-detection cap was reached.
        edges = [score_threshold]
        if len(dets["scores"]) >= max_detections:
            edges.append(float(dets["scores"].min()))
        for i in missing:
            score = float(dets["scores"][i])
            if (
                score < report.required_score
                or min(abs(score - e) for e in edges) <= report.score_tolerance
            ):
                report.tolerated += 1
            else:
                report.failures.append(
                    f"{where}: {side} only: label {int(dets['labels'][i])} score {score:.4f} "
                    f"box {np.round(dets['boxes'][i], 2).tolist()}"
                )


def _torch_reference(
    model: nn.Module, rgb_float: np.ndarray, device: str
) -> list[dict[str, np.ndarray]]:
    import torch

    with torch.inference_mode():
        out = model([torch.from_numpy(img).to(device) for img in rgb_float])
    return [
        {
            "boxes": o["boxes"].float().cpu().numpy(),
            "scores": o["scores"].float().cpu().numpy(),
            "labels": o["labels"].cpu().numpy(),
        }
        for o in out
    ]


def _parity_batches(frames_bgr: list[np.ndarray], batch: int) -> list[list[np.ndarray]]:
    """Groups of ``batch`` frames, each resized to its group's first frame (a batch shares H, W)."""
    groups = []
    for start in range(0, len(frames_bgr), batch):
        group = frames_bgr[start : start + batch]
        group = group + [group[-1]] * (batch - len(group))
        h, w = group[0].shape[:2]
        groups.append([f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h)) for f in group])
    return groups


def run_parity(
    model: nn.Module,
    onnx_bytes: bytes,
    frames_bgr: list[np.ndarray],
    names: list[str],
    *,
    batch: int,
    raw_input: bool,
    fp16: bool,
    device: str = "cpu",
    synthetic_only: bool = False,
) -> ParityReport:
    """Run the eager model and the ONNX graph on the same frames and compare every detection."""
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs
    session = ort.InferenceSession(onnx_bytes, options, providers=providers)
    report = ParityReport(
        images=0, provider=session.get_providers()[0], synthetic_only=synthetic_only
    )
    if fp16:
        report.min_iou, report.score_tolerance = FP16_MIN_IOU, FP16_SCORE_TOLERANCE
        report.required_score = FP16_REQUIRED_SCORE
    score_threshold = float(model.roi_heads.score_thresh)
    max_detections = int(model.roi_heads.detections_per_img)
    groups = _parity_batches(frames_bgr, batch)
    group_names = [names[i : i + batch] for i in range(0, len(names), batch)]
    for group, group_name in zip(groups, group_names, strict=True):
        bgr = np.stack(group)
        rgb_float = (
            np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        )
        feed = bgr if raw_input else rgb_float
        boxes, scores, labels, counts = session.run(list(C.OUTPUT_NAMES), {C.INPUT_NAME: feed})
        reference = _torch_reference(model, rgb_float, device)
        for i, name in enumerate(group_name):
            n = int(counts[i])
            if (
                not (0 <= n <= boxes.shape[1])
                or np.any(labels[i, n:] != 0)
                or np.any(scores[i, n:] != 0)
            ):
                report.failures.append(f"{name}: padding rows past num_detections={n} are not zero")
            test = {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
            compare_detections(
                reference[i],
                test,
                report,
                score_threshold=score_threshold,
                max_detections=max_detections,
                where=name,
            )
            report.images += 1
    return report


def find_parity_images(
    images: str | Path | None, checkpoint: dict[str, Any], limit: int
) -> list[Path]:
    """``images`` (a folder or one file), else the first ``limit`` images of the checkpoint
    config's ``data.val_annotations`` when that file exists here, else none."""
    if images is not None:
        path = Path(images)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise ExportError(f"--images {path}: no such file or folder")
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ExportError(f"--images {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
        return found[:limit]
    from .fileio import resolve_inside

    data = (checkpoint.get("config") or {}).get("data") or {}
    annotations = data.get("val_annotations") or ""
    if not annotations or not Path(annotations).is_file():
        return []
    try:
        with open(annotations, encoding="utf-8") as f:
            coco = json.load(f)
        root = data.get("val_images")
        if root is None:
            beside = Path(annotations).parent / "images"
            root = beside if beside.is_dir() else Path(annotations).parent
        found = []
        for image in coco.get("images", []):
            path = resolve_inside(root, str(image.get("file_name", "")))
            if path.is_file():
                found.append(path)
            if len(found) >= limit:
                break
        return found
    except (OSError, ValueError) as e:
        log.warning("parity: cannot read validation images from %s: %s", annotations, e)
        return []


def _load_frames(paths: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    from .fileio import ImageReadError, read_image_rgb

    frames, names = [], []
    for path in paths:
        try:
            frames.append(np.ascontiguousarray(read_image_rgb(path)[..., ::-1]))
            names.append(path.name)
        except ImageReadError as e:
            log.warning("parity: skipping %s", e)
    return frames, names


def _synthetic_frames(size: tuple[int, int]) -> tuple[list[np.ndarray], list[str]]:
    h, w = size
    gray = np.full((h, w, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = np.stack(
        [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx ^ yy) & 255], -1
    )
    return [gray, pattern.astype(np.uint8)], ["<flat gray>", "<gradient>"]


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _detector_version() -> str:
    try:
        from importlib.metadata import version

        return version("detector")
    except Exception:  # not installed: running from a source tree
        return "unknown"


def build_metadata(
    model: nn.Module,
    *,
    class_names: list[str],
    category_ids: list[int] | None,
    arch: str,
    config_hash: str,
    batch: int,
    raw_input: bool,
    fp16: bool,
    opset: int,
) -> dict[str, str]:
    import torch
    import torchvision

    transform = model.transform
    return {
        C.KEY_FORMAT: C.FORMAT_TAG,
        C.KEY_CONTRACT: str(C.CONTRACT_VERSION),
        C.KEY_CLASS_NAMES: json.dumps(list(class_names), ensure_ascii=False),
        C.KEY_CATEGORY_IDS: json.dumps(list(category_ids) if category_ids is not None else None),
        C.KEY_INPUT_FORMAT: C.INPUT_RAW if raw_input else C.INPUT_FLOAT,
        C.KEY_BATCH: str(batch),
        C.KEY_DETECTIONS: str(int(model.roi_heads.detections_per_img)),
        C.KEY_SCORE_THRESHOLD: repr(float(model.roi_heads.score_thresh)),
        C.KEY_NMS_THRESHOLD: repr(float(model.roi_heads.nms_thresh)),
        C.KEY_MIN_SIZE: str(int(transform.min_size[-1])),
        C.KEY_MAX_SIZE: str(int(transform.max_size)),
        C.KEY_PRECISION: "fp16" if fp16 else "fp32",
        C.KEY_ARCH: arch,
        C.KEY_CONFIG_HASH: config_hash,
        C.KEY_VERSION: _detector_version(),
        C.KEY_EXPORTER: (
            f"torch.onnx.export dynamo=False (TorchScript) torch {torch.__version__} "
            f"torchvision {torchvision.__version__}"
        ),
        C.KEY_OPSET: str(opset),
    }


def _trace_to_onnx(wrapper: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    import torch

    if wrapper.raw_input:
        dynamic = {C.INPUT_NAME: {1: "height", 2: "width"}}
    else:
        dynamic = {C.INPUT_NAME: {2: "height", 3: "width"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TracerWarnings about constants are expected (sizes, anchors, scales); parity checks
        # that what was frozen is right for other images and sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[C.INPUT_NAME],
            output_names=list(C.OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _declare_output_shapes(proto: Any, batch: int, detections: int) -> None:
    """Write the fixed output shapes into the graph (the tracer leaves K symbolic: it comes
    from slicing a concatenation whose length is only known at run time)."""
    shapes = {
        "boxes": [batch, detections, 4],
        "scores": [batch, detections],
        "labels": [batch, detections],
        "num_detections": [batch],
    }
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        wanted = shapes[output.name]
        del dims[:]
        for value in wanted:
            dims.add().dim_value = value


def export_model(
    model: nn.Module,
    out: str | Path,
    *,
    class_names: list[str],
    category_ids: list[int] | None = None,
    arch: str = "",
    config_hash: str = "",
    batch: int = 1,
    fp16: bool = False,
    raw_input: bool = False,
    opset: int = 17,
    parity_frames: list[np.ndarray] | None = None,
    parity_names: list[str] | None = None,
    parity: bool = True,
    device: str = "cpu",
) -> ExportReport:
    """Export an eval-mode torchvision Faster R-CNN; see :func:`export_onnx` for the options.

    ``parity_frames`` are HxWx3 uint8 BGR images; a flat gray frame is always added (the empty
    path). Raises :class:`ParityError` without writing anything when parity fails.
    """
    import onnx
    import torch

    started = time.perf_counter()
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below {MIN_OPSET}, the lowest this exporter supports")
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    if fp16 and device == "cpu":
        log.warning(
            "fp16 export on the CPU: the graph is meant for CUDA/TensorRT; onnxruntime's CPU "
            "provider runs it through inserted float32 casts (slow), which is what parity uses here"
        )
    model = model.eval().to(device)
    wrapper = _torch_classes()["DeployWrapper"](model, batch, raw_input=raw_input, fp16=fp16)
    wrapper = wrapper.to(device).eval()

    frames = list(parity_frames or [])
    names = list(parity_names or [f"image{i}" for i in range(len(frames))])
    synthetic_only = not frames
    size = frames[0].shape[:2] if frames else (320, 427)
    extra_frames, extra_names = _synthetic_frames(size)
    if synthetic_only:
        if parity:
            log.warning(
                "parity: no real images (pass --images DIR, or set data.val_annotations); checking "
                "synthetic frames only, which may have no detections"
            )
        frames, names = extra_frames, extra_names
    else:
        frames, names = frames + extra_frames[:1], names + extra_names[:1]

    # Trace with a real frame when there is one: a trace sees one path through the model.
    h, w = frames[0].shape[:2]
    example_bgr = np.stack([frames[0]] * batch)
    if raw_input:
        example = torch.from_numpy(example_bgr).to(device)
    else:
        example = torch.from_numpy(
            np.ascontiguousarray(example_bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
            / 255.0
        ).to(device)
    log.info(
        "exporting %s, batch %d, %s input, %s, opset %d",
        arch or "model",
        batch,
        "uint8 BGR" if raw_input else "float RGB",
        "fp16" if fp16 else "fp32",
        opset,
    )
    try:
        onnx_bytes = _trace_to_onnx(wrapper, example, opset)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e

    proto = onnx.load_model_from_string(onnx_bytes)
    metadata = build_metadata(
        model,
        class_names=class_names,
        category_ids=category_ids,
        arch=arch,
        config_hash=config_hash,
        batch=batch,
        raw_input=raw_input,
        fp16=fp16,
        opset=opset,
    )
    _declare_output_shapes(proto, batch, wrapper.detections)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "detector"
    proto.producer_version = metadata[C.KEY_VERSION]
    proto.doc_string = (
        f"{arch} detector for {len(class_names)} classes; output contract {C.CONTRACT_VERSION}: "
        "boxes[N,K,4] x1y1x2y2 px, scores[N,K], labels[N,K] int64 (0 = padding), num_detections[N]"
    )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
    onnx_bytes = proto.SerializeToString()

    report_parity = None
    if parity:
        report_parity = run_parity(
            model,
            onnx_bytes,
            frames,
            names,
            batch=batch,
            raw_input=raw_input,
            fp16=fp16,
            device=device,
            synthetic_only=synthetic_only,
        )
        if not report_parity.passed:
            raise ParityError(
                f"export refused: ONNX Runtime does not reproduce the PyTorch detections; "
                f"{out} was not written.\n{report_parity.format()}",
                report_parity,
            )

    from .fileio import atomic_write_with

    atomic_write_with(out, lambda f: f.write(onnx_bytes))
    shape: list[Any] = [batch, "H", "W", 3] if raw_input else [batch, 3, "H", "W"]
    return ExportReport(
        path=Path(out),
        batch=batch,
        input_format=metadata[C.KEY_INPUT_FORMAT],
        precision=metadata[C.KEY_PRECISION],
        opset=opset,
        exporter="torchscript (dynamo=False)",
        input_shape=shape,
        size_bytes=len(onnx_bytes),
        seconds=time.perf_counter() - started,
        metadata=metadata,
        parity=report_parity,
    )


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    batch: int = 1,
    fp16: bool = False,
    raw_input: bool = False,
    opset: int = 17,
    parity_images: str | Path | None = None,
    device: str = "cpu",
    *,
    parity: bool = True,
    parity_limit: int = 8,
) -> ExportReport:
    """Export a checkpoint written by this pipeline to ONNX at ``out`` (written atomically).

    batch: the fixed batch size N of the graph (height and width stay dynamic).
    fp16: backbone, RPN head and box head in float16 (for CUDA / TensorRT); input and outputs
        keep their float32 types.
    raw_input: the graph takes ``uint8 [N, H, W, 3]`` BGR frames (OpenCV / camera order) and
        converts and normalises inside; otherwise ``float32 [N, 3, H, W]`` RGB in 0..1.
    parity_images: a folder or an image for the parity check; default: the first
        ``parity_limit`` images of the checkpoint config's ``data.val_annotations``.
    parity: compare PyTorch and ONNX Runtime and refuse to write the model when they differ.
    device: where PyTorch traces and runs the reference ("cpu", "cuda", "cuda:1").
    """
    from .fileio import refuse_overwrite
    from .model import WeightsError, load_model

    refuse_overwrite(out, checkpoint)
    try:
        model, ckpt = load_model(checkpoint)
    except WeightsError as e:
        raise ExportError(str(e)) from None
    frames: list[np.ndarray] = []
    names: list[str] = []
    if parity:
        frames, names = _load_frames(find_parity_images(parity_images, ckpt, parity_limit))
    return export_model(
        model,
        out,
        class_names=list(ckpt["class_names"]),
        category_ids=[int(c) for c in ckpt["category_ids"]] if ckpt.get("category_ids") else None,
        arch=str(ckpt.get("arch", "")),
        config_hash=str(ckpt.get("config_hash", "")),
        batch=batch,
        fp16=fp16,
        raw_input=raw_input,
        opset=opset,
        parity_frames=frames,
        parity_names=names,
        parity=parity,
        device=device,
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint written by training (e.g. runs/x/best.pt)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="ONNX file to write (default: the checkpoint's name with .onnx)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="fixed batch size N of the graph (height and width stay dynamic)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="half-precision backbone/RPN/box head, for CUDA or TensorRT",
    )
    parser.add_argument(
        "--raw-input",
        action="store_true",
        help="graph input uint8 [N,H,W,3] BGR frames instead of float32 [N,3,H,W] RGB 0..1",
    )
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset (>= {MIN_OPSET})")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of images for the parity check (default: the config's val set)",
    )
    parser.add_argument("--parity-images", type=int, default=8, help="how many images parity uses")
    parser.add_argument(
        "--no-parity", action="store_true", help="skip the PyTorch vs ONNX Runtime check"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu | cuda | cuda:N (tracing and reference)"
    )


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else Path(args.checkpoint).with_suffix(".onnx")
    try:
        report = export_onnx(
            args.checkpoint,
            out,
            batch=args.batch,
            fp16=args.fp16,
            raw_input=args.raw_input,
            opset=args.opset,
            parity_images=args.images,
            device=args.device,
            parity=not args.no_parity,
            parity_limit=args.parity_images,
        )
    except ParityError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    except (ExportError, ValueError, OSError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0


def _main(argv: list[str] | None = None) -> int:  # python -m detector.export
    parser = argparse.ArgumentParser(prog="detector export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())


__all__ = [  # and DeployWrapper (defined on first use, see __getattr__)
    "ExportError",
    "ExportReport",
    "ParityError",
    "ParityReport",
    "add_arguments",
    "compare_detections",
    "export_model",
    "export_onnx",
    "match_detections",
    "run",
]
