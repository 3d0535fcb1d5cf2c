"""Pascal VOC XML, one file per image (LabelImg, CVAT's "Pascal VOC 1.1", the VOC devkit).

Coordinate convention (one rule for every VOC file): VOC boxes are **1-based, inclusive pixel
indices** (the VOC devkit; LabelImg clamps xmin/ymin to >= 1 for that reason). A box covering
pixels ``xmin..xmax`` covers COCO's continuous span ``[xmin - 1, xmax]``, so::

    x = xmin - 1,  y = ymin - 1,  w = xmax - xmin + 1,  h = ymax - ymin + 1

(the same rule as Detectron2's VOC loader). CVAT/Datumaro write its own 0-based float
coordinates into VOC files unchanged, so CVAT VOC boxes come out 1 px larger at the left/top
edge than the same boxes read from CVAT XML or CVAT COCO: inside the 1 px tolerance.

Rotated boxes (roLabelImg ``robndbox``) become their axis-aligned bounding box. Categories:
``labelmap.txt`` (CVAT) when present, else the order of first appearance. Images: ``<filename>``
looked up beside the XML, in ``JPEGImages/`` or ``images/`` of the export (or ``--images``);
``<path>`` (an absolute path on the labeller's machine) is ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import (
    IMAGE_EXTENSIONS,
    Box,
    ConversionError,
    ImageFinder,
    ReadContext,
    ReadResult,
    Skipped,
    load_xml,
    natural_key,
    read_text_lines,
    rotated_rect_box,
    xml_number,
)
from .detect import source_files


def read_labelmap(path: Path) -> list[str]:
    """CVAT's ``labelmap.txt`` (``name:r,g,b:parts:actions``), without ``background``."""
    names = []
    for line in read_text_lines(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split(":", 1)[0].strip()
        if name and name != "background":
            names.append(name)
    return names


def image_roots(ctx: ReadContext) -> list[Path]:
    if ctx.images:
        return [ctx.images]
    root = ctx.root
    return [
        root / "JPEGImages",
        root / "images",
        root,
        root.parent / "JPEGImages",
        root.parent / "images",
    ]


def read_voc(ctx: ReadContext) -> ReadResult:
    files = sorted(
        source_files(ctx.src, "voc", single=False, what="Pascal VOC XML"), key=natural_key
    )
    labelmap = ctx.root / "labelmap.txt"
    categories = read_labelmap(labelmap) if labelmap.is_file() else None
    roots = image_roots(ctx)
    finders: dict[Path, ImageFinder] = {}
    result = ReadResult(
        images=[],
        categories=categories or None,
        sources=list(files),
        image_roots=ImageFinder(roots).roots,
    )
    difficult = rotated = renamed = 0
    for xml_path in files:
        root = load_xml(xml_path)
        if root.tag != "annotation":
            raise ConversionError(
                f"{xml_path}: root element is <{root.tag}>, not VOC's <annotation>"
            )
        filename = (root.findtext("filename") or "").strip()
        record = f"file {filename!r}" if filename else "file (no <filename>)"
        finder = finders.setdefault(
            xml_path.parent, ImageFinder(roots if ctx.images else [xml_path.parent, *roots])
        )
        path = finder.find(filename, xml_path, record) if filename else None
        if path is None:  # LabelImg sometimes drops the extension, or the image was renamed
            for ext in IMAGE_EXTENSIONS:
                path = finder.find(xml_path.stem + ext, xml_path, record)
                if path is not None:
                    renamed += 1
                    break
        declared = None
        size = root.find("size")
        if size is not None and (size.findtext("width") or "").strip():
            w = int(xml_number(size, "width", xml_path, record))
            h = int(xml_number(size, "height", xml_path, record))
            declared = (w, h) if w > 0 and h > 0 else None
        boxes = []
        for i, obj in enumerate(root.iter("object")):
            label = (obj.findtext("name") or "").strip()
            orec = f"object #{i + 1} ({label})"
            where = f"{record}, {orec}"
            bnd, rbnd = obj.find("bndbox"), obj.find("robndbox")
            if bnd is not None:
                xmin, ymin, xmax, ymax = (
                    xml_number(bnd, k, xml_path, where) for k in ("xmin", "ymin", "xmax", "ymax")
                )
                x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax
            elif rbnd is not None:
                cx, cy, w, h, angle = (
                    xml_number(rbnd, k, xml_path, where) for k in ("cx", "cy", "w", "h", "angle")
                )
                x0, y0, x1, y1 = rotated_rect_box(cx, cy, w, h, math.degrees(angle))
                rotated += 1
            else:
                result.skipped.append(Skipped(str(xml_path), where, "object has no <bndbox>"))
                continue
            difficult += (obj.findtext("difficult") or "0").strip() == "1"
            boxes.append(Box(label, x0, y0, x1, y1, orec))
        result.add_image(path, xml_path, record, boxes, declared, looked_in=finder.describe())
    result.notes.append(
        "VOC coordinates read as 1-based inclusive pixels: x = xmin - 1, "
        "y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1"
    )
    if difficult:
        result.notes.append(f"{difficult} boxes flagged difficult kept as ordinary boxes")
    if rotated:
        result.notes.append(
            f"{rotated} rotated boxes (robndbox) replaced by their axis-aligned box"
        )
    if renamed:
        result.notes.append(f"{renamed} images found by the XML file's name, not <filename>")
    return result
