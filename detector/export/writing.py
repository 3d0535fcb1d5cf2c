"""Export a model: trace, simplify, check, compare with PyTorch, write the file with its metadata.

Static export (``input_size``): the input is one camera resolution, every shape computation folds
to a constant and TensorRT builds one engine without a profile. Dynamic export: any height and
width, with TensorRT optimisation profiles (min / opt / max input shapes) in the metadata.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torchvision
from torch import nn

from ..fileio import atomic_write_with
from ..model import detection_branches, use_integer_resize
from ..runtime import contract as C
from .errors import ExportError, ParityError
from .graph import (
    DeployWrapper,
    declare_output_shapes,
    node_count,
    simplify,
    tensorrt_problems,
    trace_probe,
    trace_to_onnx,
)
from .parity import (
    ParityReport,
    find_parity_images,
    load_frames,
    ort_session,
    parity_batches,
    run_graph,
    run_parity,
    synthetic_frames,
)

log = logging.getLogger(__name__)

MIN_OPSET = 17
Size = tuple[int, int]  # (width, height), as the command line writes it: 1920x1080


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
    nodes_traced: int = 0
    nodes_written: int = 0

    def format(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        lines = [
            f"exported {self.path} ({self.size_bytes / 1e6:.1f} MB, {self.seconds:.1f} s): "
            f"input images {self.input_format} [{shape}], batch {self.batch}, {self.precision}, "
            f"opset {self.opset}, {self.exporter}, {self.nodes_written} nodes "
            f"({self.nodes_traced} as traced)",
        ]
        lines.append(self.parity.format() if self.parity else "parity check skipped (--no-parity)")
        return "\n".join(lines)


def _detector_version() -> str:
    try:
        from importlib.metadata import version

        return version("detector")
    except Exception:  # not installed: running from a source tree
        return "unknown"


def default_profiles(model: nn.Module) -> tuple[Size, Size, Size]:
    """TensorRT profile (min, opt, max) frame sizes (W, H) for a dynamic export: from half the
    model's min_size (square) through its max_size x min_size landscape frame to a square of
    twice max_size (at least 1920: a 1080p camera in either orientation)."""
    min_size, max_size = int(model.transform.min_size[-1]), int(model.transform.max_size)
    low = max(min_size // 2, 32)
    high = max(2 * max_size, 1920)
    return (low, low), (max_size, min_size), (high, high)


def profile_shape(size: Size, batch: int, raw_input: bool) -> str:
    """A profile entry in onnxruntime's TensorRT option format, e.g. ``images:1x1080x1920x3``."""
    w, h = size
    dims = (batch, h, w, 3) if raw_input else (batch, 3, h, w)
    return f"{C.INPUT_NAME}:" + "x".join(str(d) for d in dims)


def check_profiles(profiles: tuple[Size, Size, Size]) -> None:
    low, opt, high = profiles
    for axis, name in ((0, "width"), (1, "height")):
        if not (1 <= low[axis] <= opt[axis] <= high[axis]):
            raise ExportError(
                f"TensorRT profile {name}s must satisfy 1 <= min <= opt <= max, got "
                f"{low[axis]}, {opt[axis]}, {high[axis]} (--profile-min/--profile-opt/--profile-max)"
            )


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
    input_size: Size | None = None,
    profiles: tuple[Size, Size, Size] | None = None,
    class_score_thresholds: list[float] | None = None,
) -> dict[str, str]:
    heads = [h for _, h, _ in detection_branches(model)]
    transform = model.transform
    meta = {
        C.KEY_FORMAT: C.FORMAT_TAG,
        C.KEY_CONTRACT: str(C.CONTRACT_VERSION),
        C.KEY_CLASS_NAMES: json.dumps(list(class_names), ensure_ascii=False),
        C.KEY_CATEGORY_IDS: json.dumps(list(category_ids) if category_ids is not None else None),
        C.KEY_INPUT_FORMAT: C.INPUT_RAW if raw_input else C.INPUT_FLOAT,
        C.KEY_BATCH: str(batch),
        C.KEY_DETECTIONS: str(sum(int(h.detections_per_img) for h in heads)),
        C.KEY_SCORE_THRESHOLD: repr(min(float(h.score_thresh) for h in heads)),
        C.KEY_NMS_THRESHOLD: repr(float(heads[0].nms_thresh)),
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
        C.KEY_INPUT_SIZE: f"{input_size[0]}x{input_size[1]}"
        if input_size
        else C.INPUT_SIZE_DYNAMIC,
    }
    if profiles is not None:
        for key, size in zip(C.TRT_PROFILE_KEYS, profiles, strict=True):
            meta[key] = profile_shape(size, batch, raw_input)
    if class_score_thresholds is not None:
        meta[C.KEY_CLASS_SCORE_THRESHOLDS] = json.dumps([float(t) for t in class_score_thresholds])
    return meta


def _write_metadata(proto: onnx.ModelProto, metadata: dict[str, str], arch: str) -> None:
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "detector"
    proto.producer_version = metadata[C.KEY_VERSION]
    classes = len(json.loads(metadata[C.KEY_CLASS_NAMES]))
    proto.doc_string = (
        f"{arch} detector for {classes} classes; output contract {C.CONTRACT_VERSION}: "
        "boxes[N,K,4] x1y1x2y2 px, scores[N,K], labels[N,K] int64 (0 = padding), num_detections[N]"
    )


def _same_outputs(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> bool:
    return all(
        np.array_equal(x, y)
        for run_a, run_b in zip(a, b, strict=True)
        for x, y in zip(run_a, run_b, strict=True)
    )


def simplify_if_identical(
    proto: onnx.ModelProto, groups: list[list[np.ndarray]], raw_input: bool, device: str
) -> onnx.ModelProto:
    """The onnxsim-simplified graph when its outputs on ``groups`` are bit-identical to the
    traced graph's, else the traced graph (logged either way, with node counts)."""
    before = node_count(proto)
    simplified = simplify(proto)
    if simplified is None:
        return proto
    traced = run_graph(ort_session(proto.SerializeToString(), device), groups, raw_input)
    try:
        simple = run_graph(ort_session(simplified.SerializeToString(), device), groups, raw_input)
    except Exception as e:  # onnxruntime's errors carry no common type
        log.warning("onnxsim's graph fails under ONNX Runtime (%s); keeping the traced graph", e)
        return proto
    if not _same_outputs(traced, simple):
        log.warning(
            "onnxsim's graph (%d nodes) differs from the traced one (%d nodes) on the parity "
            "frames; keeping the traced graph",
            node_count(simplified),
            before,
        )
        return proto
    log.info("graph simplified by onnxsim: %d -> %d nodes", before, node_count(simplified))
    return simplified


def _frames_for_export(
    parity_frames: list[np.ndarray] | None,
    parity_names: list[str] | None,
    parity: bool,
    input_size: Size | None,
) -> tuple[list[np.ndarray], list[str], bool]:
    """(frames, names, synthetic_only): the parity frames plus a flat gray one (the empty path),
    or synthetic frames only; at ``input_size`` for a static export."""
    import cv2

    frames = list(parity_frames or [])
    names = list(parity_names or [f"image{i}" for i in range(len(frames))])
    if input_size is not None:
        frames = [
            f if f.shape[:2] == input_size[::-1] else cv2.resize(f, input_size) for f in frames
        ]
    synthetic_only = not frames
    size = input_size[::-1] if input_size else (frames[0].shape[:2] if frames else (320, 427))
    extra_frames, extra_names = synthetic_frames(size)
    if not synthetic_only:
        return frames + extra_frames[:1], names + extra_names[:1], False
    if parity:
        log.warning(
            "parity: no real images (pass --images DIR, or set data.val_annotations); checking "
            "synthetic frames only, which may have no detections"
        )
    return extra_frames, extra_names, True


def _example_input(frame: np.ndarray, batch: int, raw_input: bool, device: str) -> torch.Tensor:
    example_bgr = np.stack([frame] * batch)
    if raw_input:
        return torch.from_numpy(example_bgr).to(device)
    rgb = np.ascontiguousarray(example_bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    return torch.from_numpy(rgb / np.float32(255.0)).to(device)


def _check_options(
    opset: int, batch: int, fp16: bool, device: str, input_size: Size | None
) -> None:
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below {MIN_OPSET}, the lowest this exporter supports")
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    if input_size is not None and min(input_size) < 1:
        raise ExportError(f"input size must be positive, got {input_size[0]}x{input_size[1]}")
    if fp16 and device == "cpu":
        log.warning(
            "fp16 export on the CPU: the graph is meant for CUDA/TensorRT; onnxruntime's CPU "
            "provider runs it through inserted float32 casts (slow), which is what parity uses here"
        )


def _traced_graph(
    wrapper: DeployWrapper, example: torch.Tensor, opset: int, static: bool
) -> onnx.ModelProto:
    try:
        onnx_bytes = trace_to_onnx(wrapper, example, opset, dynamic_size=not static)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    return onnx.load_model_from_string(onnx_bytes)


def _checked_bytes(proto: onnx.ModelProto) -> bytes:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
    problems = tensorrt_problems(proto)
    if problems:
        log.warning(
            "TensorRT 10 may not parse this graph: %s%s",
            "; ".join(problems[:5]),
            f" (and {len(problems) - 5} more)" if len(problems) > 5 else "",
        )
    return proto.SerializeToString()


def _resolved_profiles(
    model: nn.Module, input_size: Size | None, profiles: tuple[Size, Size, Size] | None
) -> tuple[Size, Size, Size] | None:
    if input_size is not None:
        if profiles is not None:
            raise ExportError("a static export (input size given) takes no TensorRT profile")
        return None
    profiles = profiles or default_profiles(model)
    check_profiles(profiles)
    return profiles


def _check_class_thresholds(thresholds: list[float] | None, class_names: list[str]) -> None:
    if thresholds is not None and len(thresholds) != len(class_names):
        raise ExportError(
            f"{len(thresholds)} class score thresholds for {len(class_names)} classes"
        )


@dataclass(frozen=True)
class _GraphSettings:
    """The options that shape the graph, passed together to the steps of :func:`export_model`."""

    batch: int
    raw_input: bool
    fp16: bool
    opset: int
    input_size: Size | None
    device: str


def _log_export(arch: str, s: _GraphSettings) -> None:
    log.info(
        "exporting %s, batch %d, %s input %s, %s, opset %d",
        arch or "model",
        s.batch,
        "uint8 BGR" if s.raw_input else "float RGB",
        f"{s.input_size[0]}x{s.input_size[1]}" if s.input_size else "of any size",
        "fp16" if s.fp16 else "fp32",
        s.opset,
    )


def _onnx_graph(
    wrapper: DeployWrapper,
    example: torch.Tensor,
    frames: list[np.ndarray],
    s: _GraphSettings,
    simplify_graph: bool,
) -> tuple[onnx.ModelProto, int]:
    """The traced (and, where outputs stay identical, simplified) graph and its traced node count."""
    proto = _traced_graph(wrapper, example, s.opset, static=s.input_size is not None)
    traced_nodes = node_count(proto)
    declare_output_shapes(proto, s.batch, wrapper.detections)
    if simplify_graph:
        groups = parity_batches(frames, s.batch)
        proto = simplify_if_identical(proto, groups, s.raw_input, s.device)
        declare_output_shapes(proto, s.batch, wrapper.detections)
    return proto, traced_nodes


def _parity_or_refuse(
    model: nn.Module,
    onnx_bytes: bytes,
    frames: list[np.ndarray],
    names: list[str],
    synthetic_only: bool,
    example: torch.Tensor,
    out: str | Path,
    s: _GraphSettings,
) -> ParityReport:
    """Compare ONNX Runtime with PyTorch; raise :class:`ParityError` when they differ."""
    report = run_parity(
        model,
        onnx_bytes,
        frames,
        names,
        batch=s.batch,
        raw_input=s.raw_input,
        fp16=s.fp16,
        device=s.device,
        synthetic_only=synthetic_only,
        probe=lambda: ort_session(trace_probe(model, s.raw_input, s.opset, example[:1]), s.device),
    )
    if not report.passed:
        raise ParityError(
            f"export refused: ONNX Runtime does not reproduce the PyTorch detections; "
            f"{out} was not written.\n{report.format()}",
            report,
        )
    return report


def _input_shape(s: _GraphSettings) -> list[Any]:
    h, w = (s.input_size[1], s.input_size[0]) if s.input_size else ("H", "W")
    return [s.batch, h, w, 3] if s.raw_input else [s.batch, 3, h, w]


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
    raw_input: bool = True,
    opset: int = 17,
    input_size: Size | None = None,
    profiles: tuple[Size, Size, Size] | None = None,
    simplify_graph: bool = True,
    class_score_thresholds: list[float] | None = None,
    parity_frames: list[np.ndarray] | None = None,
    parity_names: list[str] | None = None,
    parity: bool = True,
    device: str = "cpu",
) -> ExportReport:
    """Export an eval-mode torchvision Faster R-CNN; see :func:`export_onnx` for the options.

    ``parity_frames`` are HxWx3 uint8 BGR images; a flat gray frame is always added (the empty
    path). The model's resize is switched to the integer rule (``use_integer_resize``), which the
    graph computes too. Raises :class:`ParityError` without writing anything when parity fails.
    """
    started = time.perf_counter()
    _check_options(opset, batch, fp16, device, input_size)
    settings = _GraphSettings(batch, raw_input, fp16, opset, input_size, device)
    model = use_integer_resize(model.eval().to(device))
    profiles = _resolved_profiles(model, input_size, profiles)
    _check_class_thresholds(class_score_thresholds, class_names)
    wrapper = DeployWrapper(model, batch, raw_input=raw_input, fp16=fp16).to(device).eval()
    frames, names, synthetic_only = _frames_for_export(
        parity_frames, parity_names, parity, input_size
    )
    _log_export(arch, settings)
    # Trace with a real frame when there is one: a trace sees one path through the model.
    example = _example_input(frames[0], batch, raw_input, device)
    proto, traced_nodes = _onnx_graph(wrapper, example, frames, settings, simplify_graph)
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
        input_size=input_size,
        profiles=profiles,
        class_score_thresholds=class_score_thresholds,
    )
    _write_metadata(proto, metadata, arch)
    onnx_bytes = _checked_bytes(proto)
    report_parity = None
    if parity:
        report_parity = _parity_or_refuse(
            model, onnx_bytes, frames, names, synthetic_only, example, out, settings
        )

    atomic_write_with(out, lambda f: f.write(onnx_bytes))
    return ExportReport(
        path=Path(out),
        batch=batch,
        input_format=metadata[C.KEY_INPUT_FORMAT],
        precision=metadata[C.KEY_PRECISION],
        opset=opset,
        exporter="torchscript (dynamo=False)" + (", onnxsim" if simplify_graph else ""),
        input_shape=_input_shape(settings),
        size_bytes=len(onnx_bytes),
        seconds=time.perf_counter() - started,
        metadata=metadata,
        parity=report_parity,
        nodes_traced=traced_nodes,
        nodes_written=node_count(proto),
    )


def thresholds_file_for(checkpoint: Path) -> Path:
    """``thresholds.json`` beside the checkpoint, else the one evaluation folder's under it."""
    beside = checkpoint.parent / "thresholds.json"
    if beside.is_file():
        return beside
    found = sorted(checkpoint.parent.glob("eval-*/thresholds.json"))
    if len(found) == 1:
        return found[0]
    where = f"{beside} (nor one eval-*/thresholds.json beside it: found {len(found)})"
    raise ExportError(
        f"--score-threshold auto: no {where}; run `detector evaluate {checkpoint}` first, or "
        "name the file with --thresholds FILE"
    )


def read_class_thresholds(path: Path, class_names: list[str]) -> list[float]:
    """Per-class score thresholds from ``detector evaluate``'s thresholds.json: each class's
    ``target_precision_threshold``, else its ``max_f1_threshold``."""
    try:
        per_class = json.loads(Path(path).read_text(encoding="utf-8"))["per_class"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(
            f"{path}: not a thresholds.json written by detector evaluate: {e}"
        ) from None
    values = []
    for name in class_names:
        entry = per_class.get(name) if isinstance(per_class, dict) else None
        if not isinstance(entry, dict):
            raise ExportError(
                f"{path}: no thresholds for class {name!r}; evaluate this checkpoint again "
                "(its classes are " + ", ".join(class_names) + ")"
            )
        value = entry.get("target_precision_threshold")
        if value is None:
            value = entry.get("max_f1_threshold")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
            raise ExportError(f"{path}: class {name!r}: threshold {value!r} is not in 0..1")
        values.append(float(value))
    return values


def class_thresholds(
    score_threshold: str | float | None,
    thresholds: str | Path | None,
    checkpoint: Path,
    class_names: list[str],
) -> list[float] | None:
    """The per-class thresholds to store: None (the in-graph threshold only), one float for every
    class, or ``auto`` (from ``thresholds`` or the thresholds.json of the checkpoint's run)."""
    if score_threshold is None:
        if thresholds is not None:
            raise ExportError("--thresholds FILE needs --score-threshold auto")
        return None
    if str(score_threshold).strip().lower() == "auto":
        path = Path(thresholds) if thresholds is not None else thresholds_file_for(checkpoint)
        values = read_class_thresholds(path, class_names)
        log.info(
            "per-class score thresholds from %s: %s",
            path,
            dict(zip(class_names, values, strict=True)),
        )
        return values
    try:
        value = float(score_threshold)
    except ValueError:
        raise ExportError(
            f"--score-threshold: 'auto' or a number, got {score_threshold!r}"
        ) from None
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ExportError(f"--score-threshold {value} is not in 0..1")
    return [value] * len(class_names)


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    batch: int = 1,
    fp16: bool = False,
    raw_input: bool = True,
    opset: int = 17,
    parity_images: str | Path | None = None,
    device: str = "cpu",
    *,
    parity: bool = True,
    parity_limit: int = 8,
    input_size: Size | None = None,
    profiles: tuple[Size, Size, Size] | None = None,
    simplify_graph: bool = True,
    score_threshold: str | float | None = None,
    thresholds: str | Path | None = None,
) -> ExportReport:
    """Export a checkpoint written by this pipeline to ONNX at ``out`` (written atomically).

    batch: the fixed batch size N of the graph.
    fp16: backbone, RPN head and box head in float16 (for CUDA / TensorRT); input and outputs
        keep their float32 types.
    raw_input: the graph takes ``uint8 [N, H, W, 3]`` BGR frames (OpenCV / camera order) and
        converts and normalises inside (the default); False: ``float32 [N, 3, H, W]`` RGB 0..1.
    input_size: (width, height) of a static export (the camera's resolution); None: any size,
        with TensorRT ``profiles`` (min, opt, max) of (width, height), default from the model.
    simplify_graph: simplify with onnxsim when its outputs are bit-identical on the frames.
    score_threshold, thresholds: per-class score thresholds stored in the metadata, see
        :func:`class_thresholds` (the in-graph threshold stays the model's).
    parity_images: a folder or an image for the parity check; default: the first
        ``parity_limit`` images of the checkpoint config's ``data.val_annotations``.
    parity: compare PyTorch and ONNX Runtime and refuse to write the model when they differ.
    device: where PyTorch traces and runs the reference ("cpu", "cuda", "cuda:1").
    """
    from ..fileio import refuse_overwrite
    from ..model import WeightsError, load_model

    refuse_overwrite(out, checkpoint)
    try:
        model, ckpt = load_model(checkpoint)
    except WeightsError as e:
        raise ExportError(str(e)) from None
    class_names = list(ckpt["class_names"])
    per_class = class_thresholds(score_threshold, thresholds, Path(checkpoint), class_names)
    frames: list[np.ndarray] = []
    names: list[str] = []
    if parity:
        frames, names = load_frames(find_parity_images(parity_images, ckpt, parity_limit))
    return export_model(
        model,
        out,
        class_names=class_names,
        category_ids=[int(c) for c in ckpt["category_ids"]] if ckpt.get("category_ids") else None,
        arch=str(ckpt.get("arch", "")),
        config_hash=str(ckpt.get("config_hash", "")),
        batch=batch,
        fp16=fp16,
        raw_input=raw_input,
        opset=opset,
        input_size=input_size,
        profiles=profiles,
        simplify_graph=simplify_graph,
        class_score_thresholds=per_class,
        parity_frames=frames,
        parity_names=names,
        parity=parity,
        device=device,
    )
