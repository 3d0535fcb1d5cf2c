"""VGG Image Annotator (VIA 1.x/2.x): the region CSV export and the JSON export/project.

Regions: ``rect`` (x, y, width, height), ``polygon`` (its bounding box), ``circle``, ``ellipse``
(with its ``theta`` rotation) become boxes; ``polyline`` and ``point`` are not regions and are
skipped with a reason. Coordinates are image pixels. The label is the region attribute value
(``{"labels": "bird"}``; with several attributes, the one named label/labels/class/name/type);
a checkbox attribute (``{"bird": true}``) counts when exactly one box is ticked.

Images are looked up by ``filename`` beside the CSV/JSON (or ``--images``). Categories: order of
first appearance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    read_csv_rows,
    rotated_ellipse_box,
)
from .detect import source_files

CSV_HEADER = [
    "filename",
    "file_size",
    "file_attributes",
    "region_count",
    "region_id",
    "region_shape_attributes",
    "region_attributes",
]
LABEL_KEYS = ("label", "labels", "class", "name", "type", "category")


def _label(attrs: Any) -> str | None:
    if not isinstance(attrs, dict) or not attrs:
        return None

    def one(value: Any) -> str | None:
        if (
            isinstance(value, str | int | float)
            and not isinstance(value, bool)
            and str(value).strip()
        ):
            return str(value).strip()
        if isinstance(value, dict):
            ticked = [k for k, v in value.items() if v is True or v == "true"]
            return ticked[0] if len(ticked) == 1 else None
        return None

    if len(attrs) == 1:
        return one(next(iter(attrs.values())))
    for key in LABEL_KEYS:
        if key in attrs and (value := one(attrs[key])) is not None:
            return value
    return None


def _shape_box(shape: dict[str, Any], file: Path, where: str) -> tuple[float, ...] | str:
    """The box of a VIA region, or the reason it is not one."""
    kind = shape.get("name")

    def num(key: str) -> float:
        return number(shape.get(key), file, where, key)

    if kind == "rect":
        x, y, w, h = num("x"), num("y"), num("width"), num("height")
        return x, y, x + w, y + h
    if kind == "polygon":
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys) or not xs:
            raise ConversionError(
                f"{file}: {where}: polygon needs all_points_x/all_points_y lists of the same length"
            )
        return points_box(
            [number(v, file, where, "x") for v in xs], [number(v, file, where, "y") for v in ys]
        )
    if kind == "circle":
        cx, cy, r = num("cx"), num("cy"), num("r")
        return cx - r, cy - r, cx + r, cy + r
    if kind == "ellipse":
        theta = number(shape.get("theta", 0) or 0, file, where, "theta")
        return rotated_ellipse_box(num("cx"), num("cy"), num("rx"), num("ry"), theta)
    if kind in ("polyline", "point"):
        return f"a {kind} is not a region; no box"
    return f"unknown region shape {kind!r}"


def _regions_from_csv(path: Path) -> list[tuple[str, str, list[tuple[str, Any, Any]]]]:
    rows = read_csv_rows(path)
    if not rows or [c.strip() for c in rows[0]][:7] != CSV_HEADER:
        raise ConversionError(f"{path}: line 1: expected the VIA header {','.join(CSV_HEADER)}")
    images: dict[str, list[tuple[str, Any, Any]]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 7:
            raise ConversionError(f"{path}: line {lineno}: expected 7 columns, got {len(row)}")
        filename = row[0]
        regions = images.setdefault(filename, [])
        try:
            shape, attrs = json.loads(row[5] or "{}"), json.loads(row[6] or "{}")
        except json.JSONDecodeError as e:
            raise ConversionError(
                f"{path}: line {lineno}: malformed JSON in a region column: {e.msg}"
            ) from None
        if int(number(row[3] or 0, path, f"line {lineno}", "region_count")) == 0 and not shape:
            continue  # an image without regions
        regions.append((f"line {lineno} (region_id {row[4]})", shape, attrs))
    return [(name, f"filename {name!r}", regs) for name, regs in images.items()]


def _regions_from_json(path: Path) -> list[tuple[str, str, list[tuple[str, Any, Any]]]]:
    data = load_json(path)
    meta = data.get("_via_img_metadata", data) if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        raise ConversionError(f"{path}: not a VIA JSON (an object of images with regions)")
    out = []
    for key, item in meta.items():
        if not isinstance(item, dict) or "filename" not in item:
            raise ConversionError(f"{path}: entry {key!r}: missing 'filename'")
        regions = item.get("regions") or []
        if isinstance(regions, dict):  # VIA 1.x: {"0": {...}, "1": {...}}
            regions = list(regions.values())
        regs = []
        for i, reg in enumerate(regions):
            if not isinstance(reg, dict):
                raise ConversionError(f"{path}: entry {key!r}: region #{i} is not an object")
            regs.append(
                (
                    f"region #{i}",
                    reg.get("shape_attributes") or {},
                    reg.get("region_attributes") or {},
                )
            )
        out.append((str(item["filename"]), f"entry {key!r}", regs))
    return out


def read_via(ctx: ReadContext) -> ReadResult:
    (path,) = source_files(ctx.src, "via", single=True, what="VIA CSV/JSON")
    images = _regions_from_csv(path) if path.suffix.lower() == ".csv" else _regions_from_json(path)
    finder = ImageFinder([ctx.images or path.parent])
    result = ReadResult(images=[], categories=None, sources=[path], image_roots=finder.roots)
    for filename, record, regions in images:
        boxes = []
        for rrec, shape, attrs in regions:
            where = f"{record}, {rrec}"
            if not isinstance(shape, dict):
                raise ConversionError(f"{path}: {where}: shape attributes must be an object")
            box = _shape_box(shape, path, where)
            if isinstance(box, str):
                result.skipped.append(Skipped(str(path), where, box))
                continue
            label = _label(attrs)
            if label is None:
                result.skipped.append(
                    Skipped(str(path), where, f"no single label in region attributes {attrs!r}")
                )
                continue
            boxes.append(Box(label, *box, rrec))
        img = finder.find(filename, path, record)
        result.add_image(img, path, record, boxes, looked_in=finder.describe())
    return result
