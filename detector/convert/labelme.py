"""LabelMe: the JSON of the labelme tool (one file per image) and the LabelMe 3.0 XML.

JSON shapes: ``rectangle`` (two corners, any order), ``polygon`` (its bounding box), ``circle``
(centre and a point on the rim), ``mask`` (its two corners). ``line``, ``linestrip``, ``point``,
``points`` are not regions and are skipped with a reason. ``imagePath`` is relative to the JSON
file; the embedded ``imageData`` is ignored when the image file exists, and used (written to the
output) only when it does not.

LabelMe 3.0 XML (as written by CVAT/Datumaro): ``<object>`` with a ``<polygon>`` of ``<pt>``
(a box is a 4-point polygon with ``<type>bounding_box</type>``) or a ``<segm>`` mask with its
``<box>``; ``<deleted>1</deleted>`` objects are skipped.

Categories: order of first appearance (neither format lists its labels).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from pathlib import Path

from ..fileio import UnsafePathError, resolve_inside
from .common import (
    Box,
    ConversionError,
    ImageFinder,
    ReadContext,
    ReadResult,
    Skipped,
    load_json,
    load_xml,
    natural_key,
    number,
    points_box,
    xml_number,
)
from .detect import source_files

NOT_REGIONS = {"line", "linestrip", "point", "points"}


def _json_image(
    ctx: ReadContext, json_path: Path, image_path: str, record: str, finder: ImageFinder
) -> tuple[Path, bool]:
    """(image path inside the image folder, whether it exists). Refuses escaping paths."""
    root = ctx.images or ctx.root
    rel_dir = os.path.relpath(json_path.parent, root) if not ctx.images else "."
    rel = image_path.replace("\\", "/")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise ConversionError(
            f"{json_path}: {record}: imagePath {image_path!r} is an absolute path;"
            " label files must name images relative to themselves"
        )
    joined = os.path.normpath(os.path.join(rel_dir, rel)).replace("\\", "/")
    try:
        path = resolve_inside(root, joined, "imagePath")
    except UnsafePathError as e:
        raise ConversionError(f"{json_path}: {record}: {e}") from None
    if path.is_file():
        return path, True
    if ctx.images:  # images moved to their own folder: match the base name there
        hits = finder.by_basename(rel.rsplit("/", 1)[-1])
        if len(hits) == 1:
            return hits[0], True
    return path, False


def read_labelme(ctx: ReadContext) -> ReadResult:
    files = sorted(
        source_files(ctx.src, "labelme", single=False, what="LabelMe JSON"), key=natural_key
    )
    finder = ImageFinder([ctx.images or ctx.root])
    result = ReadResult(images=[], categories=None, sources=list(files), image_roots=finder.roots)
    for json_path in files:
        data = load_json(json_path)
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            raise ConversionError(f"{json_path}: not a LabelMe file (no 'shapes' list)")
        image_name = data.get("imagePath")
        record = f"imagePath {image_name!r}"
        if not isinstance(image_name, str) or not image_name.strip():
            raise ConversionError(f"{json_path}: {record}: missing imagePath")
        path, exists = _json_image(ctx, json_path, image_name, record, finder)
        embedded = None
        if not exists:
            if not data.get("imageData"):
                result.skipped.append(
                    Skipped(
                        str(json_path),
                        record,
                        f"image file {path} not found and no imageData; its "
                        f"{len(data['shapes'])} shapes skipped",
                    )
                )
                continue
            try:
                embedded = base64.b64decode(data["imageData"], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise ConversionError(
                    f"{json_path}: {record}: imageData is not valid base64"
                ) from None
        declared = None
        if isinstance(data.get("imageWidth"), int) and isinstance(data.get("imageHeight"), int):
            declared = (data["imageWidth"], data["imageHeight"])
        boxes = []
        for i, shape in enumerate(data["shapes"]):
            if not isinstance(shape, dict):
                raise ConversionError(f"{json_path}: shapes[{i}]: expected an object")
            label = str(shape.get("label", ""))
            kind = shape.get("shape_type") or "polygon"
            srec = f"shape #{i + 1} {kind} ({label})"
            where = f"{record}, {srec}"
            if kind in NOT_REGIONS:
                result.skipped.append(
                    Skipped(str(json_path), where, f"a {kind} is not a region; no box")
                )
                continue
            pts = shape.get("points")
            if (
                not isinstance(pts, list)
                or not pts
                or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pts)
            ):
                raise ConversionError(f"{json_path}: {where}: 'points' must be a list of [x, y]")
            xs = [number(p[0], json_path, where, "point x") for p in pts]
            ys = [number(p[1], json_path, where, "point y") for p in pts]
            if kind == "circle":
                if len(pts) != 2:
                    raise ConversionError(f"{json_path}: {where}: a circle needs 2 points")
                r = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
                box = (xs[0] - r, ys[0] - r, xs[0] + r, ys[0] + r)
            elif kind in ("rectangle", "polygon", "mask"):
                if kind in ("rectangle", "mask") and len(pts) != 2:
                    raise ConversionError(f"{json_path}: {where}: a {kind} needs 2 points")
                box = points_box(xs, ys)
            else:
                result.skipped.append(
                    Skipped(str(json_path), where, f"unknown shape_type {kind!r}")
                )
                continue
            boxes.append(Box(label, *box, srec))
        result.add_image(path, json_path, record, boxes, declared, embedded=embedded)
    return result


def read_labelme3(ctx: ReadContext) -> ReadResult:
    files = sorted(
        source_files(ctx.src, "labelme3", single=False, what="LabelMe 3.0 XML"), key=natural_key
    )
    roots = [ctx.images] if ctx.images else [ctx.root, ctx.root / "Images", ctx.root / "images"]
    result = ReadResult(
        images=[], categories=None, sources=list(files), image_roots=ImageFinder(roots).roots
    )
    for xml_path in files:
        root = load_xml(xml_path)
        if root.tag != "annotation":
            raise ConversionError(f"{xml_path}: root element is <{root.tag}>, not <annotation>")
        filename = (root.findtext("filename") or "").strip()
        folder = (root.findtext("folder") or "").strip()
        record = f"file {filename!r}"
        if not filename:
            raise ConversionError(f"{xml_path}: no <filename>")
        here = [xml_path.parent] if not ctx.images else []
        finder = ImageFinder([*here, *roots])
        path = finder.find(filename, xml_path, record)
        if path is None and folder:
            path = finder.find(f"{folder}/{filename}", xml_path, record)
        declared = None
        size = root.find("imagesize")
        if size is not None and (size.findtext("ncols") or "").strip():
            declared = (
                int(xml_number(size, "ncols", xml_path, record)),
                int(xml_number(size, "nrows", xml_path, record)),
            )
        boxes = []
        for i, obj in enumerate(root.iter("object")):
            label = (obj.findtext("name") or "").strip()
            orec = f"object #{i + 1} ({label})"
            where = f"{record}, {orec}"
            if (obj.findtext("deleted") or "0").strip() == "1":
                result.skipped.append(Skipped(str(xml_path), where, "object marked deleted"))
                continue
            poly, segm_box = obj.find("polygon"), obj.find("segm/box")
            if poly is not None and poly.findall("pt"):
                pts = poly.findall("pt")
                xs = [xml_number(p, "x", xml_path, where) for p in pts]
                ys = [xml_number(p, "y", xml_path, where) for p in pts]
                box = points_box(xs, ys)
            elif segm_box is not None:
                box = tuple(
                    xml_number(segm_box, k, xml_path, where)
                    for k in ("xmin", "ymin", "xmax", "ymax")
                )
            else:
                result.skipped.append(Skipped(str(xml_path), where, "object has no polygon or box"))
                continue
            boxes.append(Box(label, *box, orec))
        result.add_image(path, xml_path, record, boxes, declared, looked_in=finder.describe())
    return result
