"""CVAT for images 1.1 XML (``annotations.xml``).

Shapes: ``box`` (with its ``rotation`` turned into the axis-aligned box around it), ``polygon``
and ``ellipse`` and ``mask`` (their bounding box). ``polyline``, ``points``, ``tag``,
``skeleton``, ``cuboid`` are not regions and are skipped with a reason, as are ``track``
elements (CVAT for *video*). Categories: the label list in ``<meta>``, in its order. Images are
looked up by ``name`` in ``images/`` beside the XML, then beside the XML itself.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import (
    Box,
    ConversionError,
    ImageFinder,
    ReadContext,
    ReadResult,
    Skipped,
    load_xml,
    number,
    points_box,
    rotated_ellipse_box,
    rotated_rect_box,
    xml_attr_number,
)
from .detect import source_files

NOT_REGIONS = {"polyline", "points", "tag", "skeleton", "cuboid"}


def _parse_points(text: str, file: Path, record: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for pair in (text or "").split(";"):
        parts = pair.split(",")
        if len(parts) != 2:
            raise ConversionError(f"{file}: {record}: malformed points {text[:80]!r}")
        xs.append(number(parts[0], file, record, "point x"))
        ys.append(number(parts[1], file, record, "point y"))
    return xs, ys


def read_cvat(ctx: ReadContext) -> ReadResult:
    (xml_path,) = source_files(ctx.src, "cvat", single=True, what="CVAT XML")
    root = load_xml(xml_path)
    if root.tag != "annotations":
        raise ConversionError(f"{xml_path}: root element is <{root.tag}>, not CVAT's <annotations>")
    labels = [
        (lab.findtext("name") or "").strip()
        for lab in root.iterfind("meta//labels/label")
        if not (lab.findtext("parent") or "").strip()
    ]
    roots = [ctx.images] if ctx.images else [xml_path.parent / "images", xml_path.parent]
    finder = ImageFinder(roots)
    result = ReadResult(
        images=[],
        categories=[n for n in labels if n] or None,
        sources=[xml_path],
        image_roots=finder.roots,
    )
    for track in root.iter("track"):
        result.skipped.append(
            Skipped(
                str(xml_path),
                f"track id {track.get('id')} ({track.get('label')})",
                "tracks are CVAT for video; export the task as 'CVAT for images 1.1'",
            )
        )
    rotated = 0
    for image in root.iter("image"):
        name = image.get("name")
        record = f"image id {image.get('id')} {name!r}"
        if not name:
            raise ConversionError(f"{xml_path}: {record}: <image> has no name")
        declared = (
            int(xml_attr_number(image, "width", xml_path, record)),
            int(xml_attr_number(image, "height", xml_path, record)),
        )
        boxes: list[Box] = []
        for i, shape in enumerate(image):
            srec = f"{shape.tag} #{i + 1} ({shape.get('label', '')})"
            found = _shape_box(shape, xml_path, f"{record}, {srec}")
            if isinstance(found, str):
                result.skipped.append(Skipped(str(xml_path), f"{record}, {srec}", found))
                continue
            (x0, y0, x1, y1), turned = found
            rotated += turned
            boxes.append(Box(shape.get("label", ""), x0, y0, x1, y1, srec))
        path = finder.find(name, xml_path, record)
        result.add_image(path, xml_path, record, boxes, declared, looked_in=finder.describe())
    if rotated:
        result.notes.append(
            f"{rotated} rotated boxes/ellipses replaced by their axis-aligned bounding box"
        )
    return result


def _shape_box(
    shape: ET.Element, xml_path: Path, where: str
) -> tuple[tuple[float, float, float, float], bool] | str:
    """(the shape's axis-aligned box, whether it was rotated), or why it has no box."""
    if shape.tag in NOT_REGIONS:
        return f"a {shape.tag} is not a region; no box"
    rot = number(shape.get("rotation", 0) or 0, xml_path, where, "rotation")
    turned = bool(rot % 360)
    if shape.tag == "box":
        x0, y0, x1, y1 = (
            xml_attr_number(shape, k, xml_path, where) for k in ("xtl", "ytl", "xbr", "ybr")
        )
        if turned:
            return rotated_rect_box((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, rot), True
        return (x0, y0, x1, y1), False
    if shape.tag == "polygon":
        return points_box(*_parse_points(shape.get("points", ""), xml_path, where)), False
    if shape.tag == "ellipse":
        cx, cy, rx, ry = (
            xml_attr_number(shape, k, xml_path, where) for k in ("cx", "cy", "rx", "ry")
        )
        return rotated_ellipse_box(cx, cy, rx, ry, math.radians(rot)), turned
    if shape.tag == "mask":
        left, top, w, h = (
            xml_attr_number(shape, k, xml_path, where) for k in ("left", "top", "width", "height")
        )
        return (left, top, left + w, top + h), False
    return f"unknown shape <{shape.tag}>"
