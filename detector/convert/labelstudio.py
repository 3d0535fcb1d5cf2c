"""Label Studio JSON export (the full "JSON" export: a list of tasks).

Per task, one annotation is used: the ``ground_truth`` one if any, else the last one not
cancelled (the others are reported as skipped). A task with only ``predictions`` (model
pre-annotations nobody reviewed) is skipped, unless ``include_predictions`` reads its last
prediction as its labels. ``rectanglelabels`` results are boxes in
**percent** of the image (x, y = top-left corner); they are scaled with the real image size.
A non-zero ``rotation`` (degrees, clockwise about the top-left corner) is replaced by the
axis-aligned bounding box of the rotated rectangle (counted in the report). ``polygonlabels``
become their bounding box; other result types (keypoints, brushes, text) are skipped.

Images: ``data.image`` is a Label Studio URL (``/data/upload/3/e1c994fe-name.jpg``,
``/data/local-files/?d=sub/name.jpg``, http...). Its file name is looked up in the image folder
(``--images``, default: the folder of the JSON); uploads carry an 8-hex-digit prefix and a dash
that the file on disk does not have, so when the prefixed name is absent the prefix is stripped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from .common import (
    Box,
    ConversionError,
    ImageFinder,
    ReadContext,
    ReadResult,
    Skipped,
    load_json,
    number,
    points_box,
)
from .detect import source_files

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def _image_url(task: dict[str, Any]) -> str | None:
    data = task.get("data")
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("image"), str):
        return data["image"]
    for value in data.values():
        if isinstance(value, str) and value.lower().split("?")[0].endswith(
            (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
        ):
            return value
    return None


def _candidate_names(url: str) -> list[str]:
    """Relative names to try for a Label Studio image URL, best first."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    if "d" in query:  # local files storage: ?d=<path relative to the storage root>
        rel = unquote(query["d"][0]).replace("\\", "/")
        names = [rel] if not rel.startswith("/") else []
        return [*names, rel.rsplit("/", 1)[-1]]
    base = unquote(parsed.path.replace("\\", "/").rsplit("/", 1)[-1])
    names = [base]
    if UPLOAD_PREFIX.match(base):
        names.append(UPLOAD_PREFIX.sub("", base, count=1))
    return names


def _pick_annotation(task: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    live = [a for a in anns if not a.get("was_cancelled")]
    if not live:
        return None, anns
    chosen = next((a for a in live if a.get("ground_truth")), live[-1])
    return chosen, [a for a in anns if a is not chosen]


def _pick_prediction(task: dict[str, Any]) -> dict[str, Any] | None:
    """The last prediction of a task (pre-annotations imported from a model), if any."""
    preds = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    return preds[-1] if preds else None


@dataclass
class _Counts:
    rotated: int = 0
    stripped: int = 0
    size_mismatch: int = 0
    from_predictions: int = 0


def read_labelstudio(ctx: ReadContext) -> ReadResult:
    (path,) = source_files(ctx.src, "labelstudio", single=True, what="Label Studio JSON")
    tasks = load_json(path)
    if not isinstance(tasks, list):
        raise ConversionError(f"{path}: a Label Studio JSON export is a list of tasks")
    finder = ImageFinder([ctx.images or path.parent])
    result = ReadResult(images=[], categories=None, sources=[path], image_roots=finder.roots)
    counts = _Counts()
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ConversionError(f"{path}: task #{i}: expected an object, got {str(task)[:80]!r}")
        record = f"task id {task.get('id', f'#{i}')}"
        url = _image_url(task)
        if url is None:
            raise ConversionError(f"{path}: {record}: no image URL in 'data'")
        img_path, name = _find_image(url, finder, path, record, counts)
        picked = _labels_of(task, ctx, path, record, result, counts)
        if picked is None:
            continue
        ann, arec = picked
        results = ann.get("result") or []
        if img_path is None:
            result.skipped.append(
                Skipped(
                    str(path),
                    arec,
                    f"image {name!r} (from {url!r}) not found in "
                    f"{finder.describe()}; its {len(results)} results skipped",
                )
            )
            continue
        boxes = _task_boxes(results, ctx, img_path, path, arec, result, counts)
        result.add_image(img_path, path, arec, boxes)
    _add_notes(result, counts)
    return result


def _find_image(
    url: str, finder: ImageFinder, path: Path, record: str, counts: _Counts
) -> tuple[Path | None, str]:
    """The image file a task's URL names (upload prefix stripped if need be), and its name."""
    names = _candidate_names(url)
    for j, name in enumerate(names):
        if name in ("", ".", ".."):
            raise ConversionError(f"{path}: {record}: image URL {url!r} names no file")
        img_path = finder.find(name, path, record)
        if img_path is not None:
            counts.stripped += j > 0 and UPLOAD_PREFIX.match(names[0]) is not None
            return img_path, name
    hits = finder.by_basename(names[-1])  # maybe in a sub-folder of the image folder
    return (hits[0] if len(hits) == 1 else None), names[-1]


def _labels_of(
    task: dict[str, Any],
    ctx: ReadContext,
    path: Path,
    record: str,
    result: ReadResult,
    counts: _Counts,
) -> tuple[dict[str, Any], str] | None:
    """The annotation (or, with include_predictions, prediction) whose results are the labels."""
    ann, others = _pick_annotation(task)
    for other in others:
        result.skipped.append(
            Skipped(
                str(path),
                f"{record}, annotation id {other.get('id')}",
                "cancelled annotation"
                if other.get("was_cancelled")
                else "another annotation of the same task is used (ground truth or latest)",
            )
        )
    if ann is not None:
        return ann, f"{record}, annotation id {ann.get('id')}"
    prediction = _pick_prediction(task) if ctx.include_predictions else None
    if prediction is not None:
        counts.from_predictions += 1
        return prediction, f"{record}, prediction id {prediction.get('id')}"
    result.skipped.append(
        Skipped(
            str(path),
            record,
            "task has no (non-cancelled) annotation; predictions are not labels"
            + ("" if ctx.include_predictions else " (--include-predictions reads them)"),
        )
    )
    return None


def _task_boxes(
    results: list[Any],
    ctx: ReadContext,
    img_path: Path,
    path: Path,
    arec: str,
    result: ReadResult,
    counts: _Counts,
) -> list[Box]:
    boxes: list[Box] = []
    size: tuple[int, int] | None = None
    for k, res in enumerate(results):
        if not isinstance(res, dict) or not isinstance(res.get("value"), dict):
            raise ConversionError(f"{path}: {arec}: result #{k} has no 'value' object")
        rrec = f"result {res.get('id', f'#{k}')}"
        where = f"{arec}, {rrec}"
        reason = _not_a_box(res, path, where)
        if reason:
            result.skipped.append(Skipped(str(path), where, reason))
            continue
        if size is None:
            size = _pixel_size(ctx, img_path, path, arec)
            stated = (res.get("original_width"), res.get("original_height"))
            counts.size_mismatch += all(stated) and stated != size
        boxes.append(_result_box(res, size, path, where, rrec, counts))
    return boxes


def _not_a_box(res: dict[str, Any], path: Path, where: str) -> str | None:
    value, rtype = res["value"], res.get("type")
    labels = value.get("rectanglelabels") or value.get("polygonlabels") or value.get("labels")
    if rtype not in ("rectanglelabels", "polygonlabels", "rectangle", "polygon"):
        return f"result type {rtype!r} is not a box"
    if not labels or not isinstance(labels, list) or len(labels) != 1:
        return f"needs exactly one label, has {labels!r}"
    if number(res.get("image_rotation", 0) or 0, path, where, "image_rotation") % 360:
        return "image_rotation is not 0 (the image was rotated in Label Studio); not supported"
    return None


def _pixel_size(ctx: ReadContext, img_path: Path, path: Path, arec: str) -> tuple[int, int]:
    try:
        return ctx.size(img_path, path, arec)
    except ConversionError:
        # Unreadable: the builder skips this image and says why; the boxes stay in percent.
        return 100, 100


def _result_box(
    res: dict[str, Any], size: tuple[int, int], path: Path, where: str, rrec: str, counts: _Counts
) -> Box:
    """A rectangle or polygon result in percent of the image as a pixel box."""
    value, (width, height) = res["value"], size
    label = str((value.get("rectanglelabels") or value.get("polygonlabels") or value["labels"])[0])
    if res["type"].startswith("polygon"):
        pts = value.get("points")
        if not isinstance(pts, list) or not pts:
            raise ConversionError(f"{path}: {where}: polygon has no points")
        xs = [number(p[0], path, where, "point x") * width / 100 for p in pts]
        ys = [number(p[1], path, where, "point y") * height / 100 for p in pts]
        return Box(label, *points_box(xs, ys), rrec)
    x, y, w, h = (number(value.get(k), path, where, k) for k in ("x", "y", "width", "height"))
    x, y, w, h = x * width / 100, y * height / 100, w * width / 100, h * height / 100
    rot = number(value.get("rotation", 0) or 0, path, where, "rotation")
    if not rot % 360:
        return Box(label, x, y, x + w, y + h, rrec)
    counts.rotated += 1
    corners = [_rotate(dx, dy, rot) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    xs = [x + cx for cx, _ in corners]
    ys = [y + cy for _, cy in corners]
    return Box(label, min(xs), min(ys), max(xs), max(ys), rrec)


def _add_notes(result: ReadResult, counts: _Counts) -> None:
    if counts.from_predictions:
        result.notes.append(
            f"{counts.from_predictions} tasks without an annotation took their boxes from their "
            "prediction (--include-predictions): check them before training on them"
        )
    if counts.stripped:
        result.notes.append(
            f"{counts.stripped} image names matched after stripping Label Studio's "
            "8-hex-digit upload prefix"
        )
    if counts.rotated:
        result.notes.append(
            f"{counts.rotated} rotated rectangles replaced by their axis-aligned bounding box"
        )
    if counts.size_mismatch:
        result.notes.append(
            f"{counts.size_mismatch} tasks state an original_width/height different from "
            "the image file; percent coordinates scaled with the file's size"
        )


def _rotate(dx: float, dy: float, degrees: float) -> tuple[float, float]:
    t = math.radians(degrees)
    return dx * math.cos(t) - dy * math.sin(t), dx * math.sin(t) + dy * math.cos(t)
