"""Apple Create ML object-detection JSON: ``[{"image": name, "annotations": [{"label": ...,
"coordinates": {"x", "y", "width", "height"}}]}]`` with **x, y the box centre**, in pixels.

One JSON for the whole set or one per image (every matching JSON of the folder is read).
Images are looked up beside the JSON (or ``--images``). Categories: order of first appearance.
"""

from __future__ import annotations

from .common import (
    Box,
    ConversionError,
    ImageFinder,
    ReadContext,
    ReadResult,
    Skipped,
    load_json,
    natural_key,
    number,
)
from .detect import source_files


def read_createml(ctx: ReadContext) -> ReadResult:
    files = sorted(
        source_files(ctx.src, "createml", single=False, what="Create ML JSON"), key=natural_key
    )
    roots = [ctx.images] if ctx.images else sorted({f.parent for f in files})
    finder = ImageFinder(roots)
    result = ReadResult(images=[], categories=None, sources=list(files), image_roots=finder.roots)
    for path in files:
        data = load_json(path)
        if not isinstance(data, list):
            raise ConversionError(f"{path}: a Create ML file is a list of {{image, annotations}}")
        local = ImageFinder([ctx.images] if ctx.images else [path.parent])
        for i, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise ConversionError(f"{path}: item #{i}: needs an 'image' file name")
            record = f"item #{i} {item['image']!r}"
            anns = item.get("annotations") or []
            if not isinstance(anns, list):
                raise ConversionError(f"{path}: {record}: 'annotations' must be a list")
            boxes = []
            for j, ann in enumerate(anns):
                coords = ann.get("coordinates") if isinstance(ann, dict) else None
                arec = f"annotation #{j + 1} ({ann.get('label') if isinstance(ann, dict) else ''})"
                where = f"{record}, {arec}"
                if not isinstance(coords, dict):
                    raise ConversionError(f"{path}: {where}: missing 'coordinates'")
                cx, cy, w, h = (
                    number(coords.get(k), path, where, k) for k in ("x", "y", "width", "height")
                )
                label = ann.get("label")
                if not isinstance(label, str) or not label:
                    result.skipped.append(Skipped(str(path), where, "no label"))
                    continue
                boxes.append(Box(label, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, arec))
            img = local.find(item["image"], path, record)
            result.add_image(img, path, record, boxes, looked_in=local.describe())
    return result
