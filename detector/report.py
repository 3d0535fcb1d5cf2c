"""Deployment report: what a person reads before putting a model on the car.

From one :class:`~detector.evaluate.Evaluation` (a ``.pt`` or the exported ``.onnx`` scored on a
set) this writes, in one folder:

* ``metrics.json`` / ``metrics.txt``: AP, AP50, AP75, AR100 overall and per class, AP and AR per
  box size (small < 32² px, medium < 96² px, large), -1 / "-" where the set has no such box;
* ``thresholds.json``: per class the score threshold at max F1 and the lowest one reaching the
  target precision, with the recall it leaves (read by ``detector export --score-threshold auto``);
* ``confusion.json`` / ``confusion.png``: classes and background at the chosen thresholds;
* ``gallery/``: crops of the highest-scoring false positives and of missed boxes, with scores
  (``gallery.json`` lists them);
* ``report.html``: all of it in one file, images inline, opened straight from disk;
* TensorBoard (when given a folder): a PR curve per class and the predictions grid.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .evaluate import (
    Confusion,
    Evaluation,
    Mistake,
    chosen_thresholds,
    class_points,
    confusion_matrix,
    score_thresholds,
)
from .fileio import (
    ImageReadError,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    read_image_rgb,
)

log = logging.getLogger(__name__)

SIZE_COLUMNS = ("AP", "AP50", "AP75", "AR100", "AP_small", "AP_medium", "AP_large")
CROP_SIDE = 192  # gallery crops are scaled to this longest side


@dataclass
class Report:
    out_dir: Path
    thresholds: dict[str, Any]  # thresholds.json
    used_thresholds: dict[str, float]  # per class, for the confusion matrix and gallery
    threshold_rule: str  # how they were chosen, in words
    confusion: Confusion
    gallery: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def write_report(
    evaluation: Evaluation,
    out_dir: Path,
    target_precision: float = 0.9,
    score_threshold: float | None = None,
    tensorboard_dir: Path | None = None,
    gallery_size: int = 12,
) -> Report:
    """Write every report file into ``out_dir``; ``score_threshold``: one threshold for all
    classes in the confusion matrix and gallery (default: each class's chosen threshold)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cset = evaluation.cset
    thresholds = score_thresholds(class_points(evaluation.evaluator, cset), target_precision)
    used, rule = _used_thresholds(evaluation, thresholds, score_threshold)
    confusion = confusion_matrix(cset, evaluation.results, used)
    report = Report(out_dir, thresholds, used, rule, confusion)
    atomic_write_json(out_dir / "metrics.json", metrics_json(evaluation))
    atomic_write_text(out_dir / "metrics.txt", metrics_text(evaluation) + "\n")
    atomic_write_json(out_dir / "thresholds.json", thresholds)
    atomic_write_text(out_dir / "thresholds.txt", thresholds_text(report) + "\n")
    atomic_write_json(out_dir / "confusion.json", confusion_json(confusion, rule))
    plot_confusion(confusion, out_dir / "confusion.png")
    report.gallery = write_gallery(
        evaluation, confusion.mistakes, out_dir / "gallery", gallery_size
    )
    atomic_write_json(out_dir / "gallery" / "gallery.json", report.gallery)
    if tensorboard_dir is not None:
        write_tensorboard(evaluation, out_dir, tensorboard_dir)
    atomic_write_text(out_dir / "report.html", report_html(evaluation, report))
    report.files = [
        "report.html",
        "metrics.json",
        "metrics.txt",
        "thresholds.json",
        "confusion.json",
        "confusion.png",
        "gallery/",
    ]
    return report


def _used_thresholds(
    evaluation: Evaluation, thresholds: dict[str, Any], score_threshold: float | None
) -> tuple[dict[str, float], str]:
    names = evaluation.cset.class_names
    if score_threshold is not None:
        return dict.fromkeys(names, float(score_threshold)), f"score >= {score_threshold:g}"
    chosen = chosen_thresholds(thresholds)
    fallback = 0.5
    for name in names:
        if name not in chosen:
            log.warning("%s: no ground truth in this set; shown at score >= %g", name, fallback)
    rule = (
        f"per class: the lowest score reaching precision {thresholds['target_precision']:g}, "
        "else the max-F1 score"
    )
    return {n: chosen.get(n, fallback) for n in names}, rule


# --- metrics -----------------------------------------------------------------------------------


def metrics_json(evaluation: Evaluation) -> dict[str, Any]:
    m = evaluation.metrics
    return {
        "model": evaluation.model_name,
        "annotations": str(evaluation.cset.annotations_path),
        "images": m.num_images,
        "detections": m.num_detections,
        "min_score": evaluation.min_score,
        "notes": evaluation.notes,
        "overall": {
            "AP": m.map,
            "AP50": m.ap50,
            "AP75": m.ap75,
            "AR100": m.ar100,
            "AP_small": m.ap_small,
            "AP_medium": m.ap_medium,
            "AP_large": m.ap_large,
            "AR_small": m.ar_small,
            "AR_medium": m.ar_medium,
            "AR_large": m.ar_large,
        },
        "per_class": m.per_class,
    }


def _cell(value: float) -> str:
    return "-" if value < 0 else f"{value:.3f}"


def metrics_rows(evaluation: Evaluation) -> list[list[str]]:
    """Header + one row per class + "all", columns SIZE_COLUMNS + AR per size."""
    columns = [*SIZE_COLUMNS, "AR_small", "AR_medium", "AR_large"]
    overall = metrics_json(evaluation)["overall"]
    rows = [["class", *columns]]
    for name, row in evaluation.metrics.per_class.items():
        rows.append([name, *(_cell(row[c]) for c in columns)])
    rows.append(["all", *(_cell(overall.get(c, -1.0)) for c in columns)])
    return rows


def _table_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def metrics_text(evaluation: Evaluation) -> str:
    m = evaluation.metrics
    head = (
        f"{evaluation.model_name} on {evaluation.cset.annotations_path} "
        f"({m.num_images} images, {m.num_detections} detections with score >= "
        f"{evaluation.min_score:g})"
    )
    sizes = "sizes: small < 32x32 px, medium < 96x96 px, large above; '-': no such box in the set"
    return "\n".join([head, *evaluation.notes, _table_text(metrics_rows(evaluation)), sizes])


def threshold_rows(report: Report) -> list[list[str]]:
    target = report.thresholds["target_precision"]
    rows = [
        [
            "class",
            f"thr@P>={target:g}",
            "recall there",
            "max-F1 thr",
            "max F1",
            "P / R there",
            "used",
        ]
    ]
    for name, used in report.used_thresholds.items():
        entry = report.thresholds["per_class"].get(name)
        if entry is None:
            rows.append([name, "-", "-", "-", "-", "no ground truth", f"{used:.3f}"])
            continue
        at_target = entry["target_precision_threshold"]
        rows.append(
            [
                name,
                "not reached" if at_target is None else f"{at_target:.3f}",
                "-" if at_target is None else f"{entry['recall_at_target_precision']:.3f}",
                f"{entry['max_f1_threshold']:.3f}",
                f"{entry['max_f1']:.3f}",
                f"{entry['precision_at_max_f1']:.2f} / {entry['recall_at_max_f1']:.2f}",
                f"{used:.3f}",
            ]
        )
    return rows


def thresholds_text(report: Report) -> str:
    return "\n".join(
        [
            f"score thresholds at IoU 0.5 ({report.threshold_rule})",
            _table_text(threshold_rows(report)),
        ]
    )


# --- confusion matrix --------------------------------------------------------------------------


def confusion_json(confusion: Confusion, rule: str) -> dict[str, Any]:
    return {
        "labels": confusion.labels,
        "rows": "truth",
        "columns": "prediction",
        "matrix": confusion.matrix.tolist(),
        "iou": confusion.iou,
        "thresholds": confusion.thresholds,
        "threshold_rule": rule,
    }


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_with(path, lambda f: f.write(buffer.getvalue()))


def plot_confusion(confusion: Confusion, path: Path) -> None:
    """Counts, coloured by share of their row (what became of each true class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, counts = confusion.labels[:30], confusion.matrix[:30, :30]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 2.5 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            colour = "white" if shares[i, j] > 0.6 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="truth", title=f"confusion at IoU {confusion.iou:g}")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    _save_figure(fig, path)


# --- gallery -----------------------------------------------------------------------------------


def worst_mistakes(mistakes: list[Mistake], size: int) -> tuple[list[Mistake], list[Mistake]]:
    """The highest-scoring false positives; the largest missed boxes (the most obvious misses)."""
    false_positives = sorted(
        (m for m in mistakes if m.kind == "false_positive"), key=lambda m: -(m.score or 0.0)
    )
    missed = sorted(
        (m for m in mistakes if m.kind == "missed"),
        key=lambda m: -(m.box[2] - m.box[0]) * (m.box[3] - m.box[1]),
    )
    return false_positives[:size], missed[:size]


def crop_mistake(image_bgr: np.ndarray, mistake: Mistake) -> np.ndarray:
    """The box with a margin of half its size, scaled to CROP_SIDE, outlined, captioned."""
    h, w = image_bgr.shape[:2]
    x1, y1, x2, y2 = mistake.box
    mx, my = (x2 - x1) / 2 + 8, (y2 - y1) / 2 + 8
    left, top = int(max(x1 - mx, 0)), int(max(y1 - my, 0))
    right, bottom = int(min(x2 + mx, w)), int(min(y2 + my, h))
    crop = image_bgr[top : max(bottom, top + 1), left : max(right, left + 1)]
    scale = CROP_SIDE / max(crop.shape[:2])
    crop = cv2.resize(
        crop, (max(round(crop.shape[1] * scale), 1), max(round(crop.shape[0] * scale), 1))
    )
    colour = (0, 0, 230) if mistake.kind == "false_positive" else (0, 160, 255)
    p1 = (int((x1 - left) * scale), int((y1 - top) * scale))
    p2 = (int((x2 - left) * scale), int((y2 - top) * scale))
    cv2.rectangle(crop, p1, p2, colour, 2)
    canvas = np.full((CROP_SIDE + 22, CROP_SIDE, 3), 255, np.uint8)
    canvas[: crop.shape[0], : crop.shape[1]] = crop
    cv2.putText(
        canvas,
        _caption(mistake),
        (3, CROP_SIDE + 16),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.42,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return canvas


def _caption(mistake: Mistake) -> str:
    score = "" if mistake.score is None else f" {mistake.score:.2f}"
    what = "false positive" if mistake.kind == "false_positive" else "missed"
    return f"{mistake.class_name[:14]}{score} {what}"


def write_gallery(
    evaluation: Evaluation, mistakes: list[Mistake], folder: Path, size: int
) -> list[dict[str, Any]]:
    """Crops of the worst mistakes as JPEGs in ``folder``; their list (file, image, box, score)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("false_positive_*.jpg"), *folder.glob("missed_*.jpg")]:
        old.unlink()  # crops of an earlier evaluation into the same folder
    cset = evaluation.cset
    false_positives, missed = worst_mistakes(mistakes, size)
    entries: list[dict[str, Any]] = []
    images: dict[int, np.ndarray | None] = {}
    for rank, mistake in [*enumerate(false_positives, 1), *enumerate(missed, 1)]:
        if mistake.image_id not in images:
            try:
                images[mistake.image_id] = read_image_rgb(cset.image_path(mistake.image_id))
            except ImageReadError as e:
                log.warning("gallery: %s; skipped", e)
                images[mistake.image_id] = None
        image = images[mistake.image_id]
        if image is None:
            continue
        name = f"{mistake.kind}_{rank:02d}.jpg"
        ok, encoded = cv2.imencode(".jpg", crop_mistake(image[..., ::-1].copy(), mistake))
        if not ok:
            raise OSError(f"{folder / name}: OpenCV could not encode the crop")
        atomic_write_with(folder / name, lambda f, data=encoded: f.write(data.tobytes()))
        entries.append(
            {
                "file": name,
                "kind": mistake.kind,
                "image": str(cset.image_info(mistake.image_id).get("file_name")),
                "image_id": mistake.image_id,
                "class": mistake.class_name,
                "score": mistake.score,
                "box_xyxy": [round(v, 1) for v in mistake.box],
                "detail": mistake.detail,
            }
        )
    return entries


# --- TensorBoard -------------------------------------------------------------------------------


def write_tensorboard(evaluation: Evaluation, out_dir: Path, log_dir: Path, step: int = 0) -> None:
    """PR curve per class (IoU 0.5; missed boxes enter as positives scored 0) and the grid."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for name, p in class_points(evaluation.evaluator, evaluation.cset).items():
            missed = max(p.gt_boxes - int(p.true_positive.sum()), 0)
            labels = np.concatenate([p.true_positive, np.ones(missed, bool)])
            scores = np.concatenate([p.scores, np.zeros(missed)])
            if labels.size:
                writer.add_pr_curve(
                    f"eval/pr_{name}",
                    torch.from_numpy(labels),
                    torch.from_numpy(scores.astype(np.float32)),
                    step,
                )
        for name, row in evaluation.metrics.per_class.items():
            writer.add_scalar(f"eval/AP_{name}", max(row["AP"], 0.0), step)
        grid = out_dir / "predictions_grid.png"
        if grid.is_file():
            image = cv2.imread(str(grid), cv2.IMREAD_COLOR)
            if image is not None:
                writer.add_image(
                    "eval/predictions", image[..., ::-1].copy(), step, dataformats="HWC"
                )
    finally:
        writer.close()


# --- report.html -------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
th { background: #f3f3f3; } .note { color: #555; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
.gallery figure { margin: 0; font-size: 12px; width: 192px; }
.gallery figcaption { overflow-wrap: anywhere; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
img { max-width: 100%; }
"""


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _inline_image(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="note">({html.escape(alt)}: not written)</p>'
    kind = "png" if path.suffix == ".png" else "jpeg"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/{kind};base64,{data}">'


def _gallery_html(report: Report, kind: str) -> str:
    items = [e for e in report.gallery if e["kind"] == kind]
    if not items:
        return '<p class="note">none</p>'
    figures = []
    for e in items:
        score = "-" if e["score"] is None else f"{e['score']:.3f}"
        caption = f"{e['class']} {score}, {e['detail']}<br>{e['image']}"
        image = _inline_image(report.out_dir / "gallery" / e["file"], e["file"])
        figures.append(
            f"<figure>{image}<figcaption>{html.escape(caption).replace('&lt;br&gt;', '<br>')}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(figures)}</div>'


def report_html(evaluation: Evaluation, report: Report) -> str:
    m = evaluation.metrics
    title = f"{evaluation.model_name} on {evaluation.cset.annotations_path.name}"
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in evaluation.notes)
    out = report.out_dir
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p><b>mAP@[.5:.95] {m.map:.3f}</b> &nbsp; AP50 {m.ap50:.3f} &nbsp; AP75 {m.ap75:.3f}"
        f" &nbsp; AR100 {m.ar100:.3f} &nbsp; ({m.num_images} images, {m.num_detections} "
        f"detections with score &ge; {evaluation.min_score:g})</p>",
        notes,
        "<h2>Score thresholds (IoU 0.5)</h2>",
        f'<p class="note">Used below: {html.escape(report.threshold_rule)}. '
        "<code>detector export CHECKPOINT --score-threshold auto</code> stores the target-precision "
        "threshold (else the max-F1 one) per class; the runtime applies it.</p>",
        _html_table(threshold_rows(report)),
        "<h2>AP and AR per class and box size</h2>",
        _html_table(metrics_rows(evaluation)),
        '<p class="note">small &lt; 32&times;32 px, medium &lt; 96&times;96 px, large above; '
        "- : no box of that size in the set.</p>",
        '<div class="row"><div><h2>Confusion</h2>',
        _inline_image(out / "confusion.png", "confusion matrix"),
        "</div><div><h2>Precision-recall</h2>",
        _inline_image(out / "pr_curve.png", "PR curve"),
        "</div></div>",
        "<h2>Worst false positives (highest score first)</h2>",
        _gallery_html(report, "false_positive"),
        "<h2>Missed boxes (largest first; score: best detection of the class there)</h2>",
        _gallery_html(report, "missed"),
        "<h2>Predictions (red, score &ge; draw threshold) and truth (green)</h2>",
        _inline_image(out / "predictions_grid.png", "predictions grid"),
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def format_report(evaluation: Evaluation, report: Report) -> str:
    """The few lines printed after an evaluation: thresholds, confusion, where the rest is."""
    lines = [thresholds_text(report), "confusion (rows truth, columns prediction):"]
    rows = [["", *report.confusion.labels]]
    for label, counts in zip(report.confusion.labels, report.confusion.matrix, strict=True):
        rows.append([label, *(str(c) for c in counts)])
    lines.append(_table_text(rows))
    lines.append(f"report: {report.out_dir / 'report.html'} (and {', '.join(report.files[1:])})")
    return "\n".join(lines)
