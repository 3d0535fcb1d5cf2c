"""Evaluate stage: COCO mAP with pycocotools, a PR-curve plot and a predictions-vs-truth grid.

A ``.pt`` model runs in PyTorch; an exported ``.onnx`` runs through ``detector.runtime``, scored
the same way. The deployment numbers computed here (per-class and per-size AP, per-class score
thresholds, the confusion matrix and its mistakes) are written by ``detector.report``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from .data import CocoSet, DetectionDataset, make_loader
from .fileio import atomic_write_json, atomic_write_with, read_image_rgb

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    map: float = 0.0  # AP@[.5:.95], area all, 100 detections
    ap50: float = 0.0
    ap75: float = 0.0
    ap_small: float = -1.0
    ap_medium: float = -1.0
    ap_large: float = -1.0
    ar100: float = 0.0
    ar_small: float = -1.0
    ar_medium: float = -1.0
    ar_large: float = -1.0
    per_class_ap: dict[str, float] = field(default_factory=dict)
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    # class -> AP, AP50, AP75, AR100 and AP/AR per size; -1 where the set has no such box
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0
    summary: str = ""
    absent_classes: list[str] = field(default_factory=list)  # no box in this set: not measured

    def as_row(self) -> dict[str, float]:
        return {"mAP": self.map, "AP50": self.ap50, "AP75": self.ap75, "AR100": self.ar100}


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    cset: CocoSet,
    device: torch.device,
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the model over every image of ``cset``; COCO results (xywh, COCO category ids).

    Batches hold images of one size only (see ``same_size_batches``), so every image's
    detections are what it gets alone and the metrics do not depend on ``batch_size``.
    """
    model.eval()
    loader = make_loader(
        DetectionDataset(cset), same_size_batches(cset, batch_size), batch_size, num_workers
    )
    category_of_label = dict(enumerate(cset.category_ids, start=1))
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        outputs = model([img.to(device, non_blocking=True) for img in images])
        for target, out in zip(targets, outputs, strict=True):
            image_id = int(target["image_id"])
            boxes = out["boxes"].float().cpu().numpy()
            for (x1, y1, x2, y2), score, label in zip(
                boxes,
                out["scores"].float().cpu().tolist(),
                out["labels"].cpu().tolist(),
                strict=True,
            ):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": category_of_label[int(label)],
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                        "score": float(score),
                    }
                )
    return results


def same_size_batches(cset: CocoSet, batch_size: int) -> list[list[int]]:
    """Dataset indices in order, batched only with images of the same width and height.

    A batch is padded to its largest image and the backbone sees the padding: a smaller image's
    features near its border, hence its detections, change with whatever shares its batch
    (torchvision's references evaluate at batch size 1; on the mixed-size raccoon val set, batches
    of 4 moved mAP by up to 5 points, either way). Same-size images pad identically, so batching
    them changes nothing; a camera's frames are all one size and keep the full batch.
    """
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image_id in enumerate(cset.image_ids):
        info = cset.image_info(image_id)
        by_size.setdefault((int(info["width"]), int(info["height"])), []).append(index)
    size = max(batch_size, 1)
    batches = [
        group[i : i + size] for group in by_size.values() for i in range(0, len(group), size)
    ]
    return sorted(batches, key=lambda batch: batch[0])


def coco_metrics(cset: CocoSet, results: list[dict[str, Any]]) -> tuple[Metrics, COCOeval | None]:
    """pycocotools COCOeval over the classes the model knows."""
    metrics = Metrics(num_images=len(cset.image_ids), num_detections=len(results))
    known = set(cset.coco.cats)
    evaluated = [c for c in cset.category_ids if c in known]  # classes this file has
    has_gt = any(
        a["category_id"] in set(evaluated) for a in cset.coco.dataset.get("annotations", [])
    )
    results = [r for r in results if r["category_id"] in known]
    boxed = {a["category_id"] for a in cset.coco.dataset.get("annotations", [])}
    metrics.absent_classes = [
        name for name, c in zip(cset.class_names, cset.category_ids, strict=True) if c not in boxed
    ]
    if not results or not has_gt:
        present = [n for n in cset.class_names if n not in metrics.absent_classes]
        metrics.per_class_ap = dict.fromkeys(present, 0.0)
        metrics.per_class_ap50 = dict.fromkeys(present, 0.0)
        metrics.summary = "no detections" if has_gt else "no ground-truth boxes to evaluate against"
        return metrics, None
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        detections = cset.coco.loadRes(results)
        evaluator = COCOeval(cset.coco, detections, "bbox")
        evaluator.params.catIds = evaluated
        evaluator.params.imgIds = list(cset.image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    metrics.map, metrics.ap50, metrics.ap75 = float(stats[0]), float(stats[1]), float(stats[2])
    metrics.ap_small, metrics.ap_medium, metrics.ap_large = (float(s) for s in stats[3:6])
    metrics.ar100 = float(stats[8])
    metrics.ar_small, metrics.ar_medium, metrics.ar_large = (float(s) for s in stats[9:12])
    metrics.summary = "\n".join(
        line for line in captured.getvalue().splitlines() if line.startswith(" Average")
    )
    metrics.per_class = per_class_table(evaluator, cset)
    for name, row in metrics.per_class.items():
        if name in metrics.absent_classes:
            continue
        metrics.per_class_ap[name] = max(row["AP"], 0.0)
        metrics.per_class_ap50[name] = max(row["AP50"], 0.0)
    return metrics, evaluator


AREAS = ("all", "small", "medium", "large")  # COCOeval's areaRngLbl order


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_class_table(evaluator: COCOeval, cset: CocoSet) -> dict[str, dict[str, float]]:
    """AP, AP50, AP75, AR100 and AP/AR per size for each class COCOeval scored.

    COCOeval sorts ``params.catIds``; its arrays are indexed in that order, not the file's.
    """
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall, class, area, max dets]
    recall = evaluator.eval["recall"]  # [IoU thresholds, class, area, max dets]
    column = {int(c): k for k, c in enumerate(evaluator.params.catIds)}
    table: dict[str, dict[str, float]] = {}
    for name, category in zip(cset.class_names, cset.category_ids, strict=True):
        k = column.get(int(category))
        if k is None:
            continue
        row = {
            "AP": _mean_valid(precision[:, :, k, 0, -1]),
            "AP50": _mean_valid(precision[0, :, k, 0, -1]),
            "AP75": _mean_valid(precision[5, :, k, 0, -1]),
            "AR100": _mean_valid(recall[:, k, 0, -1]),
        }
        for a, area in enumerate(AREAS[1:], start=1):
            row[f"AP_{area}"] = _mean_valid(precision[:, :, k, a, -1])
            row[f"AR_{area}"] = _mean_valid(recall[:, k, a, -1])
        table[name] = row
    return table


def plot_pr_curves(
    evaluator: COCOeval | None, class_names: list[str], category_ids: list[int], path: Path
) -> None:
    """Precision-recall at IoU 0.5, one curve per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    if evaluator is not None:
        recall = evaluator.params.recThrs
        precision = evaluator.eval["precision"][0, :, :, 0, -1]
        names = dict(zip(category_ids, class_names, strict=True))
        for k, category in enumerate(evaluator.params.catIds[:20]):  # 80 curves help nobody
            name, curve = names[category], precision[:, k]
            if (curve > -1).any():
                ax.plot(
                    recall,
                    np.clip(curve, 0, 1),
                    label=f"{name} (AP50 {curve[curve > -1].mean():.3f})",
                )
        if len(class_names) <= 20:
            ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no detections", ha="center")
    ax.set(
        xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="PR curve, IoU 0.5"
    )
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_with(path, lambda f: f.write(buffer.getvalue()))


def draw_grid(
    cset: CocoSet,
    results: list[dict[str, Any]],
    path: Path,
    num_images: int = 8,
    score_threshold: float = 0.5,
    tile: int = 320,
) -> None:
    """Ground truth (green) and predictions (red, with score) on the first images, tiled."""
    names = dict(zip(cset.category_ids, cset.class_names, strict=True))
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if r["score"] >= score_threshold:
            by_image.setdefault(r["image_id"], []).append(r)
    dataset = DetectionDataset(cset)
    tiles = []
    for image_id in cset.image_ids[:num_images]:
        image = cv2.cvtColor(dataset.load_image(image_id), cv2.COLOR_RGB2BGR)
        scale = tile / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
        for x1, y1, x2, y2 in cset.boxes[image_id] * scale:
            cv2.rectangle(image, (int(x1), int(y1)), (int(x2), int(y2)), (0, 200, 0), 2)
        for r in by_image.get(image_id, []):
            x, y, w, h = (v * scale for v in r["bbox"])
            cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (0, 0, 230), 1)
            text = f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}"
            cv2.putText(
                image,
                text,
                (int(x), max(int(y) - 3, 10)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4,
                (0, 0, 230),
                1,
                cv2.LINE_AA,
            )
        canvas = np.full((tile, tile, 3), 255, np.uint8)
        canvas[: image.shape[0], : image.shape[1]] = image
        tiles.append(canvas)
    if not tiles:
        return
    columns = min(4, len(tiles))
    while len(tiles) % columns:
        tiles.append(np.full((tile, tile, 3), 255, np.uint8))
    rows = [np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    ok, encoded = cv2.imencode(".png", np.vstack(rows))
    if ok:
        atomic_write_with(path, lambda f: f.write(encoded.tobytes()))


@dataclass
class Evaluation:
    """One model scored on one set: what the report is made from."""

    metrics: Metrics
    results: list[dict[str, Any]]  # COCO results, every detection the model output
    evaluator: COCOeval | None
    cset: CocoSet
    model_name: str = ""
    min_score: float = 0.0  # nothing below it was scored (the model's own score threshold)
    notes: list[str] = field(default_factory=list)


def run_evaluation(
    model: torch.nn.Module,
    cset: CocoSet,
    device: torch.device,
    out_dir: Path | None = None,
    batch_size: int = 4,
    grid_images: int = 8,
    draw_score_threshold: float = 0.5,
    num_workers: int = 0,
    model_name: str = "",
    progress: bool = True,
) -> Evaluation:
    """Predict with a PyTorch model, score with COCOeval; ``out_dir``: results, PR curve, grid."""
    results = predict(model, cset, device, batch_size, num_workers, progress)
    metrics, evaluator = coco_metrics(cset, results)
    min_score = float(getattr(getattr(model, "roi_heads", None), "score_thresh", 0.0))
    evaluation = Evaluation(metrics, results, evaluator, cset, model_name, min_score)
    if out_dir is not None:
        write_outputs(evaluation, out_dir, grid_images, draw_score_threshold)
    return evaluation


def evaluate(
    model: torch.nn.Module,
    cset: CocoSet,
    device: torch.device,
    out_dir: Path | None = None,
    batch_size: int = 4,
    grid_images: int = 8,
    draw_score_threshold: float = 0.5,
    num_workers: int = 0,
    progress: bool = True,
) -> Metrics:
    """Predict, score with COCOeval and (with ``out_dir``) write results JSON, PR curve and grid."""
    return run_evaluation(
        model,
        cset,
        device,
        out_dir,
        batch_size,
        grid_images,
        draw_score_threshold,
        num_workers,
        progress=progress,
    ).metrics


def write_outputs(
    evaluation: Evaluation, out_dir: Path, grid_images: int = 8, draw_score_threshold: float = 0.5
) -> None:
    """predictions.json (COCO results), pr_curve.png and predictions_grid.png in ``out_dir``."""
    cset = evaluation.cset
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "predictions.json", evaluation.results, indent=None)
    plot_pr_curves(
        evaluation.evaluator, cset.class_names, cset.category_ids, out_dir / "pr_curve.png"
    )
    if grid_images > 0:
        draw_grid(
            cset,
            evaluation.results,
            out_dir / "predictions_grid.png",
            grid_images,
            draw_score_threshold,
        )


def onnx_metadata(model_path: Path) -> dict[str, str]:
    """The metadata an ONNX model was exported with (``detector.runtime.contract`` keys)."""
    import onnx

    from .runtime import ModelError
    from .runtime.contract import KEY_CLASS_NAMES, KEY_SCORE_THRESHOLD

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError... for a file that is not ONNX
        raise ModelError(f"{model_path}: not a readable ONNX file ({e})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    for key in (KEY_CLASS_NAMES, KEY_SCORE_THRESHOLD):
        if key not in meta:
            raise ModelError(
                f"{model_path}: no '{key}' in the metadata; evaluate a file written by "
                "`detector export`"
            )
    return meta


def onnx_class_names(model_path: Path) -> list[str]:
    from .runtime.contract import KEY_CLASS_NAMES

    return [str(n) for n in json.loads(onnx_metadata(model_path)[KEY_CLASS_NAMES])]


def onnx_score_threshold(model_path: Path) -> float:
    """The in-graph score threshold an ONNX model was exported with."""
    from .runtime.contract import KEY_SCORE_THRESHOLD

    return float(onnx_metadata(model_path)[KEY_SCORE_THRESHOLD])


def predict_onnx(
    model_path: Path,
    cset: CocoSet,
    min_score: float = 0.0,
    providers: list[str] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float, float]:
    """Run an exported model through ``detector.runtime`` over ``cset``; (COCO results, the score
    threshold that applied: ``min_score`` or the in-graph one if higher, the in-graph one).

    The runtime is given an explicit threshold, so per-class deployment thresholds stored in the
    file do not cut the curve that mAP integrates. Images are read as for the PyTorch model and
    batched by size, so both see the same pixels.
    """
    from .runtime import Detector

    in_graph = onnx_score_threshold(model_path)
    applied = max(float(min_score), in_graph)
    detector = Detector(model_path, providers=providers, score_threshold=applied)
    results: list[dict[str, Any]] = []
    batches = same_size_batches(cset, detector.batch_size)
    bar = tqdm(total=len(cset.image_ids), desc="evaluate onnx", leave=False, disable=not progress)
    for batch in batches:
        image_ids = [cset.image_ids[i] for i in batch]
        frames = [
            np.ascontiguousarray(read_image_rgb(cset.image_path(i))[..., ::-1]) for i in image_ids
        ]
        for image_id, det in zip(image_ids, detector.predict(frames), strict=True):
            for (x1, y1, x2, y2), score, label in zip(
                det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
            ):
                results.append(
                    {
                        "image_id": int(image_id),
                        "category_id": cset.category_ids[int(label) - 1],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score),
                    }
                )
        bar.update(len(batch))
    bar.close()
    return results, applied, in_graph


def run_onnx_evaluation(
    model_path: Path,
    cset: CocoSet,
    out_dir: Path | None = None,
    min_score: float = 0.0,
    providers: list[str] | None = None,
    grid_images: int = 8,
    draw_score_threshold: float = 0.5,
    progress: bool = True,
) -> Evaluation:
    """COCO metrics of the exported file itself, run by the deploy runtime."""
    results, applied, in_graph = predict_onnx(model_path, cset, min_score, providers, progress)
    metrics, evaluator = coco_metrics(cset, results)
    note = (
        f"{model_path.name}: scored every detection with score >= {applied:g}; the file's "
        f"in-graph threshold ({in_graph:g}, set at export) drops the "
        "rest before they leave the graph"
    )
    evaluation = Evaluation(metrics, results, evaluator, cset, model_path.name, applied, [note])
    if out_dir is not None:
        write_outputs(evaluation, out_dir, grid_images, draw_score_threshold)
    return evaluation


def format_metrics(metrics: Metrics) -> str:
    lines = [
        f"mAP@[.5:.95] {metrics.map:.4f}  AP50 {metrics.ap50:.4f}  AP75 {metrics.ap75:.4f}  "
        f"AR100 {metrics.ar100:.4f}  ({metrics.num_images} images, {metrics.num_detections} detections)"
    ]
    if metrics.per_class_ap:
        width = max(len(n) for n in metrics.per_class_ap)
        lines.append(f"  {'class':<{width}}  AP      AP50")
        for name, ap in metrics.per_class_ap.items():
            lines.append(f"  {name:<{width}}  {ap:.4f}  {metrics.per_class_ap50[name]:.4f}")
    if metrics.absent_classes:
        lines.append(
            f"  not in this set (no boxes, not measured): {', '.join(metrics.absent_classes)}"
        )
    return "\n".join(lines)


# --- deployment numbers: per-class score thresholds and the confusion matrix ---------------


@dataclass
class ClassPoints:
    """One class's detections at IoU 0.5 as COCOeval matched them, highest score first."""

    scores: np.ndarray  # float [D]
    true_positive: np.ndarray  # bool [D]
    gt_boxes: int  # non-ignored ground-truth boxes


def class_points(evaluator: COCOeval | None, cset: CocoSet) -> dict[str, ClassPoints]:
    """Per class, COCOeval's own IoU-0.5 matching over all areas (crowd regions ignored)."""
    points: dict[str, ClassPoints] = {}
    names = dict(zip(cset.category_ids, cset.class_names, strict=True))
    if evaluator is None:
        return points
    num_areas, num_images = len(evaluator.params.areaRng), len(evaluator.params.imgIds)
    for k, category in enumerate(evaluator.params.catIds):
        scores, matched, gt_boxes = [], [], 0
        for i in range(num_images):
            record = evaluator.evalImgs[k * num_areas * num_images + i]  # area "all"
            if record is None:
                continue
            gt_boxes += int((~np.asarray(record["gtIgnore"], bool)).sum())
            if not len(record["dtScores"]):
                continue
            keep = ~np.asarray(record["dtIgnore"], bool)[0]  # [IoU thresholds, D]: row 0 is 0.5
            scores.extend(np.asarray(record["dtScores"], float)[keep].tolist())
            matched.extend((np.asarray(record["dtMatches"])[0][keep] > 0).tolist())
        order = np.argsort(-np.asarray(scores, float), kind="mergesort")
        points[names[int(category)]] = ClassPoints(
            np.asarray(scores, float)[order], np.asarray(matched, bool)[order], gt_boxes
        )
    return points


def score_thresholds(points: dict[str, ClassPoints], target_precision: float) -> dict[str, Any]:
    """Per class: the score threshold at max F1 and the lowest one reaching ``target_precision``.

    A threshold keeps every detection scoring at least it, so the candidates are the detection
    scores themselves. Classes without ground truth in the set get no entry (nothing to pick from).
    """
    per_class: dict[str, dict[str, Any]] = {}
    for name, p in points.items():
        if p.gt_boxes == 0:
            continue
        tp = np.cumsum(p.true_positive)
        fp = np.cumsum(~p.true_positive)
        last_of_score = np.append(p.scores[1:] != p.scores[:-1], True) if len(p.scores) else []
        candidates = np.flatnonzero(last_of_score)
        entry: dict[str, Any] = {
            "max_f1_threshold": 1.0,  # never right on this set: keep nothing
            "max_f1": 0.0,
            "precision_at_max_f1": 0.0,
            "recall_at_max_f1": 0.0,
            "target_precision_threshold": None,
            "recall_at_target_precision": None,
            "gt_boxes": p.gt_boxes,
        }
        if tp.size and tp[-1] > 0:
            precision = tp / (tp + fp)
            recall = tp / p.gt_boxes
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            best = candidates[np.argmax(f1[candidates])]
            entry.update(
                max_f1_threshold=float(p.scores[best]),
                max_f1=float(f1[best]),
                precision_at_max_f1=float(precision[best]),
                recall_at_max_f1=float(recall[best]),
            )
            reaching = candidates[precision[candidates] >= target_precision - 1e-12]
            if reaching.size:  # the lowest such threshold keeps the most recall
                entry["target_precision_threshold"] = float(p.scores[reaching[-1]])
                entry["recall_at_target_precision"] = float(recall[reaching[-1]])
        per_class[name] = entry
    return {"target_precision": float(target_precision), "per_class": per_class}


def chosen_thresholds(thresholds: dict[str, Any]) -> dict[str, float]:
    """The threshold a deployment takes per class: target precision's, else max F1's."""
    chosen = {}
    for name, entry in thresholds["per_class"].items():
        value = entry.get("target_precision_threshold")
        chosen[name] = float(entry["max_f1_threshold"] if value is None else value)
    return chosen


@dataclass
class Mistake:
    """A false positive (a detection) or a missed ground-truth box, for the gallery."""

    kind: str  # "false_positive" | "missed"
    image_id: int
    box: tuple[float, float, float, float]  # xyxy, image pixels
    class_name: str  # predicted class (false positive) or true class (missed)
    score: float | None  # detection score; for a miss the best same-class score below threshold
    detail: str  # "background", "is <true class>", "no detection", ...


@dataclass
class Confusion:
    """Counts at IoU ``iou`` and the per-class thresholds: rows truth, columns prediction, the
    last row and column "background" (a detection on no object / an object nobody detected)."""

    labels: list[str]  # class names + "background"
    matrix: np.ndarray  # int [C + 1, C + 1]
    thresholds: dict[str, float]
    iou: float
    mistakes: list[Mistake] = field(default_factory=list)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes [N, 4] x [M, 4] -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _greedy_match(
    iou: np.ndarray, allowed: np.ndarray, det_free: np.ndarray, gt_free: np.ndarray, limit: float
) -> list[tuple[int, int]]:
    """Detections in row order (highest score first) take the free box they overlap most."""
    pairs = []
    for d in np.flatnonzero(det_free):
        candidates = np.where(gt_free & allowed[d] & (iou[d] >= limit), iou[d], -1.0)
        if candidates.size and candidates.max() >= 0:
            g = int(candidates.argmax())
            det_free[d], gt_free[g] = False, False
            pairs.append((int(d), g))
    return pairs


def _crowd_boxes(cset: CocoSet, image_id: int) -> np.ndarray:
    boxes = [
        (x, y, x + w, y + h)
        for a in cset.coco.imgToAnns.get(image_id, [])
        if a.get("iscrowd", 0)
        for x, y, w, h in [a["bbox"]]
    ]
    return np.asarray(boxes, float).reshape(-1, 4)


def confusion_matrix(
    cset: CocoSet, results: list[dict[str, Any]], thresholds: dict[str, float], iou: float = 0.5
) -> Confusion:
    """Match each image's detections kept by their class threshold to its ground truth.

    Same-class matches first (greedy by score, as COCOeval), then what is left across classes
    (a raccoon boxed as a dog); detections left over are false positives on background (unless
    inside a crowd region, which is ignored, as COCOeval does), boxes left over are missed.
    """
    names = cset.class_names
    label_of = cset.label_of_category
    size = len(names) + 1
    confusion = Confusion([*names, "background"], np.zeros((size, size), int), thresholds, iou)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        label = label_of.get(r["category_id"])
        if label is not None and r["score"] >= thresholds.get(names[label - 1], 1.0):
            by_image.setdefault(r["image_id"], []).append(r)
    below: dict[int, list[dict[str, Any]]] = {}  # for a miss, the best score it did get
    for r in results:
        if r["category_id"] in label_of:
            below.setdefault(r["image_id"], []).append(r)
    for image_id in cset.image_ids:
        dets = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        _match_image(confusion, cset, image_id, dets, below.get(image_id, []))
    return confusion


def _xyxy(results: list[dict[str, Any]]) -> np.ndarray:
    boxes = [(x, y, x + w, y + h) for r in results for x, y, w, h in [r["bbox"]]]
    return np.asarray(boxes, float).reshape(-1, 4)


def _match_image(
    confusion: Confusion,
    cset: CocoSet,
    image_id: int,
    dets: list[dict[str, Any]],
    all_dets: list[dict[str, Any]],
) -> None:
    names, background = cset.class_names, len(cset.class_names)
    gt_boxes, gt_labels = cset.boxes[image_id].astype(float), cset.labels[image_id] - 1
    det_boxes = _xyxy(dets)
    det_labels = np.asarray([cset.label_of_category[r["category_id"]] - 1 for r in dets], int)
    iou = box_iou(det_boxes, gt_boxes)
    det_free = np.ones(len(dets), bool)
    gt_free = np.ones(len(gt_boxes), bool)
    same = det_labels[:, None] == gt_labels[None, :]

    def false_positive(d: int, detail: str) -> Mistake:
        box = tuple(float(v) for v in det_boxes[d])
        return Mistake(
            "false_positive", image_id, box, names[det_labels[d]], dets[d]["score"], detail
        )

    for d, g in _greedy_match(iou, same, det_free, gt_free, confusion.iou):
        confusion.matrix[gt_labels[g], det_labels[d]] += 1
    for d, g in _greedy_match(iou, ~same, det_free, gt_free, confusion.iou):
        confusion.matrix[gt_labels[g], det_labels[d]] += 1
        confusion.mistakes.append(false_positive(d, f"is {names[gt_labels[g]]}"))
    crowd = _crowd_boxes(cset, image_id)
    for d in np.flatnonzero(det_free):
        if crowd.size and _inside_fraction(det_boxes[d], crowd).max() >= confusion.iou:
            continue
        confusion.matrix[background, det_labels[d]] += 1
        # A person reads "the box is off" differently from "nothing there".
        overlap = iou[d][same[d]].max() if same[d].any() else 0.0
        detail = f"box off (IoU {overlap:.2f})" if overlap >= 0.1 else "background"
        confusion.mistakes.append(false_positive(d, detail))
    for g in np.flatnonzero(gt_free):
        confusion.matrix[gt_labels[g], background] += 1
        confusion.mistakes.append(
            _miss(cset, image_id, gt_boxes[g], gt_labels[g], all_dets, confusion.iou)
        )


def _inside_fraction(box: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Share of ``box`` inside each region (COCOeval's IoU against a crowd region)."""
    lt = np.maximum(box[:2], regions[:, :2])
    rb = np.minimum(box[2:], regions[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    return inter / max(float(np.prod(box[2:] - box[:2])), 1e-12)


def _miss(
    cset: CocoSet,
    image_id: int,
    box: np.ndarray,
    label: int,
    all_dets: list[dict[str, Any]],
    iou: float,
) -> Mistake:
    name = cset.class_names[label]
    same = [r for r in all_dets if cset.label_of_category[r["category_id"]] - 1 == label]
    overlaps = box_iou(_xyxy(same), box[None, :])[:, 0] if same else np.zeros(0)
    scores = [r["score"] for r, o in zip(same, overlaps, strict=True) if o >= iou]
    best = max(scores) if scores else None
    detail = "no detection" if best is None else "scored below the threshold"
    return Mistake("missed", image_id, tuple(float(v) for v in box), name, best, detail)
