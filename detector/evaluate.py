"""Evaluate stage: COCO mAP with pycocotools, a PR-curve plot and a predictions-vs-truth grid."""

from __future__ import annotations

import contextlib
import io
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
from .fileio import atomic_write_json, atomic_write_with

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
    per_class_ap: dict[str, float] = field(default_factory=dict)
    per_class_ap50: dict[str, float] = field(default_factory=dict)
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
    metrics.summary = "\n".join(
        line for line in captured.getvalue().splitlines() if line.startswith(" Average")
    )
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall, class, area, max dets]
    for name, category in zip(cset.class_names, cset.category_ids, strict=True):
        if category not in evaluated or name in metrics.absent_classes:
            continue
        k = evaluated.index(category)
        all_iou = precision[:, :, k, 0, -1]
        iou50 = precision[0, :, k, 0, -1]
        metrics.per_class_ap[name] = (
            float(all_iou[all_iou > -1].mean()) if (all_iou > -1).any() else 0.0
        )
        metrics.per_class_ap50[name] = (
            float(iou50[iou50 > -1].mean()) if (iou50 > -1).any() else 0.0
        )
    return metrics, evaluator


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
    results = predict(model, cset, device, batch_size, num_workers, progress)
    metrics, evaluator = coco_metrics(cset, results)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "predictions.json", results, indent=None)
        plot_pr_curves(evaluator, cset.class_names, cset.category_ids, out_dir / "pr_curve.png")
        if grid_images > 0:
            draw_grid(
                cset, results, out_dir / "predictions_grid.png", grid_images, draw_score_threshold
            )
    return metrics


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
