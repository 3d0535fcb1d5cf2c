"""Parity: the exported graph under ONNX Runtime against the eager PyTorch model, on real frames.

Two runs of the same model can still break ties differently: a barely trained model gives many
proposals the same objectness, PyTorch and ONNX Runtime keep different ones among them, and the
detections built from them sit elsewhere with the same scores. Such swaps among equal scores are
recognised (and counted in the report); any other difference fails.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from ..model import detection_branches
from ..runtime import contract as C
from .errors import ExportError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Parity tolerances (PyTorch fp32 eager vs ONNX Runtime): the same detections, boxes within
# 0.5 px, scores within 1e-3.
BOX_TOLERANCE = 0.5  # pixels, max |coordinate difference| of matched boxes
SCORE_TOLERANCE = 1e-3
# An fp16 graph is also compared with the fp32 model, where exactness cannot be asked: half
# precision moves boxes by pixels, and for a weakly trained model through another proposal by
# tens of pixels (PyTorch's own fp16 does the same). So it must find every detection scoring
# >= 0.5 with the same label, IoU >= 0.75 and a score within 0.05; weaker ones may differ.
# When no PyTorch detection reaches 0.5 (a weak model), the first of the lower thresholds that
# one reaches is used instead, and the report says so.
FP16_MIN_IOU = 0.75
FP16_SCORE_TOLERANCE = 0.05
FP16_REQUIRED_SCORE = 0.5
FP16_FALLBACK_SCORES = (0.25, 0.1)
# Scores this close on one side are a tie (the same features give the same score).
TIE_TOLERANCE = 1e-5


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
    # pairs with the same label and score but other boxes, where that score is tied on its side:
    # the two runtimes broke a tie among equal scores differently (a weakly trained model)
    tie_swaps: int = 0
    # detections on one side only whose label and score are tied on both sides: NMS among equal
    # scores kept a different number of them (which of two equal boxes suppresses the other
    # depends on the order the sort gives ties)
    tie_count_differences: int = 0
    # images whose RPN broke ties among equal objectness differently: compared again with
    # PyTorch's proposals fed to both sides (the heads then agree, and the RPN up to its tie)
    rpn_tie_images: int = 0
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
    notes: list[str] = field(default_factory=list)
    synthetic_only: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def format(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        synthetic = "  (synthetic frames only: pass --images for real ones)"
        edge = f", or below score {self.required_score}" if self.required_score > 0 else ""
        if self.min_iou is not None:
            box = f"(lowest IoU {self.worst_iou:.3f}, at least {self.min_iou})"
        else:
            box = f"(tolerance {self.box_tolerance})"
        lines = [
            f"parity {verdict} (PyTorch eager fp32 vs ONNX Runtime {self.provider}):",
            f"  images compared        {self.images}" + (synthetic if self.synthetic_only else ""),
            f"  detections             {self.detections_torch} PyTorch, {self.detections_onnx} "
            f"ONNX, {self.matched} matched, {self.tolerated} tolerated (threshold edge{edge})",
            f"  max box difference     {self.max_box_diff:.4f} px {box}",
            f"  max score difference   {self.max_score_diff:.6f} (tolerance {self.score_tolerance})",
        ]
        if self.tie_swaps:
            lines.append(
                f"  tie swaps              {self.tie_swaps} (same label and score, other box: "
                "PyTorch and ONNX Runtime kept different ones among equal scores)"
            )
        if self.tie_count_differences:
            lines.append(
                f"  tie count differences  {self.tie_count_differences} (on one side only, with "
                "a label and score tied on both sides: NMS among equal scores kept a different "
                "number of them)"
            )
        if self.rpn_tie_images:
            lines.append(
                f"  RPN ties               {self.rpn_tie_images} image(s) where equal objectness "
                "scores were broken differently: compared with PyTorch's proposals fed to both "
                "sides, and the RPN up to its first tie"
            )
        if self.required_score > 0:
            lines.append(
                f"  detections below score {self.required_score} may differ (half precision)"
            )
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  MISMATCH {failure}" for failure in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more mismatches")
        return "\n".join(lines)


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


def _is_tied(dets: dict[str, np.ndarray], i: int, tolerance: float) -> bool:
    """Another detection of the same label has a score within ``tolerance`` of detection i's."""
    same = (dets["labels"] == dets["labels"][i]) & (
        np.abs(dets["scores"] - dets["scores"][i]) <= tolerance
    )
    return int(same.sum()) >= 2


def match_tie_swaps(
    ref: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    ref_left: list[int],
    test_left: list[int],
    tolerance: float,
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Pair leftover detections that are tie swaps: same label, scores within ``tolerance``,
    and that score tied on both sides (within TIE_TOLERANCE: either runtime could have kept
    either box)."""
    used: set[int] = set()
    swaps, still_ref = [], []
    for i in sorted(ref_left, key=lambda i: -float(ref["scores"][i])):
        found = None
        if _is_tied(ref, i, TIE_TOLERANCE):
            for j in test_left:
                same = test["labels"][j] == ref["labels"][i]
                close = abs(float(test["scores"][j]) - float(ref["scores"][i])) <= tolerance
                if j not in used and same and close and _is_tied(test, j, TIE_TOLERANCE):
                    found = j
                    break
        if found is None:
            still_ref.append(i)
        else:
            used.add(found)
            swaps.append((i, found))
    return swaps, still_ref, [j for j in test_left if j not in used]


def _pair_failure(report: ParityReport, ref: dict, test: dict, i: int, j: int) -> str | None:
    """Record pair (i, j) in the report; the failure line when it is out of tolerance."""
    box_diff = float(np.abs(test["boxes"][j] - ref["boxes"][i]).max())
    score_diff = float(abs(test["scores"][j] - ref["scores"][i]))
    report.max_box_diff = max(report.max_box_diff, box_diff)
    report.max_score_diff = max(report.max_score_diff, score_diff)
    if report.min_iou is not None:
        overlap = box_iou(ref["boxes"][i], test["boxes"][j])
        report.worst_iou = min(report.worst_iou, overlap)
        box_bad = overlap < report.min_iou
    else:
        box_bad = box_diff > report.box_tolerance
    if not box_bad and score_diff <= report.score_tolerance:
        return None
    return (
        f"label {int(ref['labels'][i])} box {np.round(ref['boxes'][i], 2).tolist()} "
        f"score {ref['scores'][i]:.4f} vs ONNX box {np.round(test['boxes'][j], 2).tolist()} "
        f"score {test['scores'][j]:.4f} (box diff {box_diff:.3f} px, score diff {score_diff:.5f})"
    )


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
    pairs, ref_left, test_left = match_detections(ref, test)
    failed: list[tuple[int, int, str]] = []
    for i, j, _, _ in pairs:
        if max(ref["scores"][i], test["scores"][j]) < report.required_score:
            report.matched += 1
            report.tolerated += 1  # weak on both sides: half precision may move it (fp16 only)
            continue
        failure = _pair_failure(report, ref, test, i, j)
        if failure is None:
            report.matched += 1
        else:
            failed.append((i, j, failure))
    # A pair out of tolerance may be a tie broken the other way: try pairing by score.
    ref_left += [i for i, _, _ in failed]
    test_left += [j for _, j, _ in failed]
    swaps, ref_left, test_left = match_tie_swaps(
        ref, test, ref_left, test_left, report.score_tolerance
    )
    report.tie_swaps += len(swaps)
    swapped = {i for i, _ in swaps}
    for i, j, failure in failed:
        if i not in swapped and j in test_left:
            report.failures.append(f"{where}: {failure}")
            ref_left.remove(i)
            test_left.remove(j)
    ref_left = _drop_tie_counts(report, ref, test, ref_left)
    test_left = _drop_tie_counts(report, test, ref, test_left)
    _one_sided(report, ref, "PyTorch", ref_left, score_threshold, max_detections, where)
    _one_sided(report, test, "ONNX", test_left, score_threshold, max_detections, where)


def _drop_tie_counts(
    report: ParityReport, dets: dict[str, np.ndarray], other: dict[str, np.ndarray], left: list[int]
) -> list[int]:
    """``left`` without the detections whose score is tied on their side and that the other side
    also has with the same label and score (counted in ``report.tie_count_differences``)."""
    still = []
    for i in left:
        on_other = (other["labels"] == dets["labels"][i]) & (
            np.abs(other["scores"] - dets["scores"][i]) <= TIE_TOLERANCE
        )
        if _is_tied(dets, i, TIE_TOLERANCE) and bool(on_other.any()):
            report.tie_count_differences += 1
        else:
            still.append(i)
    return still


def _one_sided(
    report: ParityReport,
    dets: dict[str, np.ndarray],
    side: str,
    missing: list[int],
    score_threshold: float,
    max_detections: int,
    where: str,
) -> None:
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


def parity_batches(frames_bgr: list[np.ndarray], batch: int) -> list[list[np.ndarray]]:
    """Groups of ``batch`` frames, each resized to its group's first frame (a batch shares H, W)."""
    groups = []
    for start in range(0, len(frames_bgr), batch):
        group = frames_bgr[start : start + batch]
        group = group + [group[-1]] * (batch - len(group))
        h, w = group[0].shape[:2]
        groups.append([f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h)) for f in group])
    return groups


def ort_session(onnx_bytes: bytes, device: str = "cpu") -> Any:
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs
    return ort.InferenceSession(onnx_bytes, options, providers=providers)


def graph_feed(group: list[np.ndarray], raw_input: bool) -> np.ndarray:
    """The graph's input for a group of HxWx3 BGR frames."""
    bgr = np.stack(group)
    if raw_input:
        return bgr
    return np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def run_graph(session: Any, groups: list[list[np.ndarray]], raw_input: bool) -> list[list[Any]]:
    """ONNX Runtime's outputs for each group of frames."""
    return [
        session.run(list(C.OUTPUT_NAMES), {C.INPUT_NAME: graph_feed(group, raw_input)})
        for group in groups
    ]


def _fp16_required_score(references: list[dict[str, np.ndarray]], report: ParityReport) -> None:
    """Lower the fp16 check's score when no PyTorch detection reaches it, and say so."""
    top = max((float(r["scores"].max()) for r in references if len(r["scores"])), default=0.0)
    if top >= FP16_REQUIRED_SCORE:
        return
    lower = next((s for s in FP16_FALLBACK_SCORES if top >= s), None)
    if lower is None:
        report.notes.append(
            f"no PyTorch detection reaches {FP16_FALLBACK_SCORES[-1]} (best {top:.3f}): the "
            "fp16 graph was only checked for its padding and its count of weak detections"
        )
        report.required_score = FP16_FALLBACK_SCORES[-1]
        return
    report.notes.append(
        f"no PyTorch detection reaches {FP16_REQUIRED_SCORE} (best {top:.3f}): fp16 compared "
        f"at score {lower} instead"
    )
    report.required_score = lower


def merge_report(report: ParityReport, part: ParityReport) -> None:
    """Add one image's comparison (``part``) to ``report``."""
    counts = ("detections_torch", "detections_onnx", "matched", "tolerated", "tie_swaps")
    for name in (*counts, "tie_count_differences"):
        setattr(report, name, getattr(report, name) + getattr(part, name))
    report.max_box_diff = max(report.max_box_diff, part.max_box_diff)
    report.max_score_diff = max(report.max_score_diff, part.max_score_diff)
    report.worst_iou = min(report.worst_iou, part.worst_iou)
    report.failures += part.failures


def _empty_like(report: ParityReport) -> ParityReport:
    return ParityReport(
        images=0,
        provider=report.provider,
        score_tolerance=report.score_tolerance,
        min_iou=report.min_iou,
        required_score=report.required_score,
    )


def first_tie(scores: np.ndarray) -> int | None:
    """Index of the first score (in decreasing order) equal to the next one, None without ties."""
    tied = np.flatnonzero(np.abs(np.diff(np.sort(scores)[::-1])) <= TIE_TOLERANCE)
    return int(tied[0]) if tied.size else None


def rpn_tie_check(
    model: nn.Module,
    probe: Any,
    frame_bgr: np.ndarray,
    reference: dict[str, np.ndarray],
    part: ParityReport,
    *,
    raw_input: bool,
    device: str,
    where: str,
    **limits: Any,
) -> bool:
    """Compare again with PyTorch's proposals fed to the ONNX RoI heads (``probe``: the
    :class:`~detector.export.graph.ProposalProbe` session); True (and ``part`` rewritten) when
    the heads agree and the RPNs agree up to their first tied objectness score."""
    from .graph import ProposalProbe

    feed = graph_feed([frame_bgr], raw_input)
    with torch.inference_mode():
        eager = ProposalProbe(model, raw_input).eval().to(device)
        e_boxes, e_scores = (
            t.cpu().numpy()
            for t in eager(torch.from_numpy(feed).to(device), torch.zeros(0, 4, device=device))[:2]
        )
    o_boxes, o_scores, boxes, scores, labels = probe.run(
        None, {C.INPUT_NAME: feed, "proposals": e_boxes}
    )
    tie = first_tie(e_scores)
    if tie is None:
        return False
    # Before the first tie both RPNs must keep the same proposals, in the same order.
    same_prefix = len(o_scores) > tie and np.allclose(o_scores[:tie], e_scores[:tie], atol=1e-5)
    same_prefix = same_prefix and np.abs(o_boxes[:tie] - e_boxes[:tie]).max(initial=0) <= 0.5
    if not same_prefix:
        return False
    again = _empty_like(part)
    test = {"boxes": boxes, "scores": scores, "labels": labels}
    compare_detections(reference, test, again, where=f"{where} (PyTorch proposals)", **limits)
    if not again.passed:
        return False
    part.__dict__.update(again.__dict__)
    return True


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
    probe: Callable[[], Any] | None = None,
) -> ParityReport:
    """Run the eager model and the ONNX graph on the same frames and compare every detection.

    ``probe`` makes the ONNX ProposalProbe session (called once, when an image differs): an
    image whose difference comes from the RPN's ties is then compared with fixed proposals."""
    session = ort_session(onnx_bytes, device)
    report = ParityReport(
        images=0, provider=session.get_providers()[0], synthetic_only=synthetic_only
    )
    groups = parity_batches(frames_bgr, batch)
    group_names = [names[i : i + batch] for i in range(0, len(names), batch)]
    outputs = run_graph(session, groups, raw_input)
    references = [_torch_reference(model, graph_feed(g, False), device) for g in groups]
    if fp16:
        report.min_iou, report.score_tolerance = FP16_MIN_IOU, FP16_SCORE_TOLERANCE
        report.required_score = FP16_REQUIRED_SCORE
        _fp16_required_score([r for refs in references for r in refs], report)
    heads = [h for _, h, _ in detection_branches(model)]
    limits = {
        "score_threshold": min(float(h.score_thresh) for h in heads),
        "max_detections": sum(int(h.detections_per_img) for h in heads),
    }
    probe_session = None
    for output, reference, group, group_name in zip(
        outputs, references, groups, group_names, strict=False
    ):
        boxes, scores, labels, counts = output
        for i, name in enumerate(group_name):
            n = int(counts[i])
            padding_bad = np.any(labels[i, n:] != 0) or np.any(scores[i, n:] != 0)
            if not (0 <= n <= boxes.shape[1]) or padding_bad:
                report.failures.append(f"{name}: padding rows past num_detections={n} are not zero")
            test = {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
            part = _empty_like(report)
            compare_detections(reference[i], test, part, where=name, **limits)
            if not part.passed and probe is not None and not fp16 and len(heads) == 1:
                probe_session = probe_session or probe()
                tie_args = {"raw_input": raw_input, "device": device, "where": name}
                if rpn_tie_check(
                    model, probe_session, group[i], reference[i], part, **tie_args, **limits
                ):
                    report.rpn_tie_images += 1
            merge_report(report, part)
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
    data = (checkpoint.get("config") or {}).get("data") or {}
    annotations = data.get("val_annotations") or ""
    if not annotations or not Path(annotations).is_file():
        return []
    try:
        return _val_images(Path(annotations), data.get("val_images"), limit)
    except (OSError, ValueError) as e:
        log.warning("parity: cannot read validation images from %s: %s", annotations, e)
        return []


def _val_images(annotations: Path, root: str | None, limit: int) -> list[Path]:
    from ..fileio import resolve_inside

    with open(annotations, encoding="utf-8") as f:
        coco = json.load(f)
    if root is None:
        beside = annotations.parent / "images"
        root = str(beside if beside.is_dir() else annotations.parent)
    found = []
    for image in coco.get("images", []):
        path = resolve_inside(root, str(image.get("file_name", "")))
        if path.is_file():
            found.append(path)
        if len(found) >= limit:
            break
    return found


def load_frames(paths: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    """HxWx3 uint8 BGR frames of ``paths`` (unreadable ones are skipped with a warning)."""
    from ..fileio import ImageReadError, read_image_rgb

    frames, names = [], []
    for path in paths:
        try:
            frames.append(np.ascontiguousarray(read_image_rgb(path)[..., ::-1]))
            names.append(path.name)
        except ImageReadError as e:
            log.warning("parity: skipping %s", e)
    return frames, names


def synthetic_frames(size: tuple[int, int]) -> tuple[list[np.ndarray], list[str]]:
    h, w = size
    gray = np.full((h, w, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = np.stack(
        [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx ^ yy) & 255], -1
    )
    return [gray, pattern.astype(np.uint8)], ["<flat gray>", "<gradient>"]
