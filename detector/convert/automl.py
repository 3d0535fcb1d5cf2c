"""Google AutoML Vision / Vertex AI object-detection CSV.

One box per row: ``[SET,]path,label,`` then either two vertices ``xmin,ymin,,,xmax,ymax,,`` or
four ``x1,y1,x2,y2,x3,y3,x4,y4`` (their bounding box), **normalised 0-1**, scaled with the real
image size. ``SET`` is TRAIN/VALIDATION/TEST/UNASSIGNED (counted in the report, not kept). A
row with a path and no label/box is an image without objects.

``gs://bucket/...`` (and http) paths name a bucket that is not here: the image is matched by its
file name in the image folder (``--images``; default ``images/`` beside the CSV, then the CSV's
folder, sub-folders included). Images are read by content, so a PNG named ``.jpg`` works.
"""

from __future__ import annotations

from collections import Counter

from .common import (
    Box,
    ConversionError,
    ImageFinder,
    ReadContext,
    ReadResult,
    check_name_is_safe,
    check_normalised,
    number,
    read_csv_rows,
)
from .detect import AUTOML_SETS, source_files

REMOTE = ("gs://", "http://", "https://")


def read_automl(ctx: ReadContext) -> ReadResult:
    (path,) = source_files(ctx.src, "automl", single=True, what="AutoML CSV")
    rows = read_csv_rows(path)
    finder = ImageFinder([ctx.images] if ctx.images else [path.parent / "images", path.parent])
    result = ReadResult(images=[], categories=None, sources=[path], image_roots=finder.roots)
    groups: dict[str, tuple[str, list[Box]]] = {}  # path in the CSV -> (first record, boxes)
    sets: Counter[str] = Counter()
    for lineno, row in enumerate(rows, start=1):
        if not row or not any(c.strip() for c in row):
            continue
        record = f"line {lineno}"
        cells = [c.strip() for c in row]
        split = cells[0].upper() if cells[0].upper() in AUTOML_SETS else None
        rest = cells[1:] if split else cells
        if not rest or not rest[0]:
            raise ConversionError(f"{path}: {record}: no image path")
        sets[split or "(none)"] += 1
        image, label = rest[0], rest[1] if len(rest) > 1 else ""
        coords = rest[2:]
        _, boxes = groups.setdefault(image, (record, []))
        if not label and not any(coords):
            continue  # image listed without objects
        if len(coords) != 8:
            raise ConversionError(
                f"{path}: {record}: expected 8 coordinate columns after the label "
                f"(xmin,ymin,,,xmax,ymax,, or 4 vertices), got {len(coords)}"
            )
        if not label:
            raise ConversionError(f"{path}: {record}: box without a label")
        filled = [bool(c) for c in coords]
        if filled == [True, True, False, False, True, True, False, False]:
            xs = [number(coords[0], path, record, "xmin"), number(coords[4], path, record, "xmax")]
            ys = [number(coords[1], path, record, "ymin"), number(coords[5], path, record, "ymax")]
        elif all(filled):
            values = [number(c, path, record, "vertex coordinate") for c in coords]
            xs, ys = values[0::2], values[1::2]
        else:
            raise ConversionError(
                f"{path}: {record}: coordinates must be 'xmin,ymin,,,xmax,ymax,,' "
                f"or 4 full vertices, got {','.join(coords)!r}"
            )
        check_normalised(xs + ys, path, record)
        boxes.append(Box(label, min(xs), min(ys), max(xs), max(ys), record))

    matched_remote = 0
    for image, (record, boxes) in groups.items():
        record = f"{record} {image!r}"
        remote = image.startswith(REMOTE)
        name = image.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] if remote else image
        if not remote:
            check_name_is_safe(image, path, record)
        img = finder.find(name, path, record)
        if img is None:
            hits = finder.by_basename(name.replace("\\", "/").rsplit("/", 1)[-1])
            img = hits[0] if len(hits) == 1 else None
        matched_remote += remote and img is not None
        result.add_image(img, path, record, boxes, looked_in=finder.describe(), units="fraction")
    if matched_remote:
        result.notes.append(
            f"{matched_remote} gs:// or http paths matched by file name in {finder.describe()}"
        )
    result.notes.append("rows per set: " + ", ".join(f"{k} {v}" for k, v in sorted(sets.items())))
    return result
