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


def read_labelstudio(ctx: ReadContext) -> ReadResult:
    (path,) = source_files(ctx.src, "labelstudio", single=True, what="Label Studio JSON")
    tasks = load_json(path)
    if not isinstance(tasks, list):
        raise ConversionError(f"{path}: a Label Studio JSON export is a list of tasks")
    finder = ImageFinder([ctx.images or path.parent])
    result = ReadResult(images=[], categories=None, sources=[path], image_roots=finder.roots)
    rotated = stripped = size_mismatch = from_predictions = 0
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ConversionError(f"{path}: task #{i}: expected an object, got {str(task)[:80]!r}")
        record = f"task id {task.get('id', f'#{i}')}"
        url = _image_url(task)
        if url is None:
            raise ConversionError(f"{path}: {record}: no image URL in 'data'")
        names = _candidate_names(url)
        img_path = None
        for j, name in enumerate(names):
            if name in ("", ".", ".."):
                raise ConversionError(f"{path}: {record}: image URL {url!r} names no file")
            img_path = finder.find(name, path, record)
            if img_path is not None:
                stripped += j > 0 and UPLOAD_PREFIX.match(names[0]) is not None
                break
        if img_path is None:  # maybe in a sub-folder of the image folder
            hits = finder.by_basename(names[-1])
            if len(hits) == 1:
                img_path = hits[0]
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
        arec = f"{record}, annotation id {ann.get('id')}" if ann else ""
        if ann is None and ctx.include_predictions:
            ann = _pick_prediction(task)
            arec = f"{record}, prediction id {ann.get('id')}" if ann else ""
            from_predictions += ann is not None
        if ann is None:
            result.skipped.append(
                Skipped(
                    str(path),
                    record,
                    "task has no (non-cancelled) annotation; predictions are not labels"
                    + ("" if ctx.include_predictions else " (--include-predictions reads them)"),
                )
            )
            continue
        results = ann.get("result") or []
        if img_path is None:
            result.skipped.append(
                Skipped(
                    str(path),
                    arec,
                    f"image {names[-1]!r} (from {url!r}) not found in "
                    f"{finder.describe()}; its {len(results)} results skipped",
                )
            )
            continue
        boxes: list[Box] = []
        width = height = None
        for k, res in enumerate(results):
            if not isinstance(res, dict) or not isinstance(res.get("value"), dict):
                raise ConversionError(f"{path}: {arec}: result #{k} has no 'value' object")
            rrec = f"result {res.get('id', f'#{k}')}"
            where = f"{arec}, {rrec}"
            value, rtype = res["value"], res.get("type")
            labels = (
                value.get("rectanglelabels") or value.get("polygonlabels") or value.get("labels")
            )
            if rtype not in ("rectanglelabels", "polygonlabels", "rectangle", "polygon"):
                result.skipped.append(
                    Skipped(str(path), where, f"result type {rtype!r} is not a box")
                )
                continue
            if not labels or not isinstance(labels, list) or len(labels) != 1:
                result.skipped.append(
                    Skipped(str(path), where, f"needs exactly one label, has {labels!r}")
                )
                continue
            if number(res.get("image_rotation", 0) or 0, path, where, "image_rotation") % 360:
                result.skipped.append(
                    Skipped(
                        str(path),
                        where,
                        "image_rotation is not 0 (the image "
                        "was rotated in Label Studio); not supported",
                    )
                )
                continue
            if width is None:
                try:
                    width, height = ctx.size(img_path, path, arec)
                except ConversionError:  # unreadable: the builder skips the image and says why
                    width = height = 1
                ow, oh = res.get("original_width"), res.get("original_height")
                if ow and oh and (ow, oh) != (width, height):
                    size_mismatch += 1
            if rtype.startswith("polygon"):
                pts = value.get("points")
                if not isinstance(pts, list) or not pts:
                    raise ConversionError(f"{path}: {where}: polygon has no points")
                xs = [number(p[0], path, where, "point x") for p in pts]
                ys = [number(p[1], path, where, "point y") for p in pts]
                x0, y0, x1, y1 = points_box(xs, ys)
                boxes.append(
                    Box(
                        str(labels[0]),
                        x0 * width / 100,
                        y0 * height / 100,
                        x1 * width / 100,
                        y1 * height / 100,
                        rrec,
                    )
                )
                continue
            x, y, w, h = (
                number(value.get(key), path, where, key) for key in ("x", "y", "width", "height")
            )
            x, y, w, h = x * width / 100, y * height / 100, w * width / 100, h * height / 100
            rot = number(value.get("rotation", 0) or 0, path, where, "rotation")
            if rot % 360:
                rotated += 1
                corners = [_rotate(dx, dy, rot) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
                xs = [x + cx for cx, _ in corners]
                ys = [y + cy for _, cy in corners]
                boxes.append(Box(str(labels[0]), min(xs), min(ys), max(xs), max(ys), rrec))
            else:
                boxes.append(Box(str(labels[0]), x, y, x + w, y + h, rrec))
        result.add_image(img_path, path, arec, boxes)
    if from_predictions:
        result.notes.append(
            f"{from_predictions} tasks without an annotation took their boxes from their "
            "prediction (--include-predictions): check them before training on them"
        )
    if stripped:
        result.notes.append(
            f"{stripped} image names matched after stripping Label Studio's "
            "8-hex-digit upload prefix"
        )
    if rotated:
        result.notes.append(
            f"{rotated} rotated rectangles replaced by their axis-aligned bounding box"
        )
    if size_mismatch:
        result.notes.append(
            f"{size_mismatch} tasks state an original_width/height different from "
            "the image file; percent coordinates scaled with the file's size"
        )
    return result


def _rotate(dx: float, dy: float, degrees: float) -> tuple[float, float]:
    t = math.radians(degrees)
    return dx * math.cos(t) - dy * math.sin(t), dx * math.sin(t) + dy * math.cos(t)
