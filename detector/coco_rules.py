"""The rules of a usable COCO detection set, in one place.

What a valid box, category, file name and image record is, the Roboflow placeholder category,
the layouts that mean an export was misread (xyxy in the xywh field, 0-based category ids,
pixel values in a normalised format) and a truncated image file. The converters
(``detector/convert``), the label tools (``detector/cocotools``), the loader (``data.py``) and
the pre-flight check all apply these functions, so a set converts, validates and trains by the
same rules. Standard library and numpy only: the torch-free runtime may use it too.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

# A box may run this many pixels past the image edge before it is reported (float rounding).
EDGE_TOLERANCE = 0.5
# A box narrower or lower than this (px) after clipping holds no object: dropped.
MIN_BOX_SIZE = 1e-3
# Normalised coordinates (YOLO, AutoML) may overshoot [0, 1] by this much (rounding); more
# means the file holds pixels.
NORMALISED_TOLERANCE = 0.01
# The xyxy-stored-as-xywh pattern: at least this share of boxes run past the edge ...
XYXY_MIN_PAST_SHARE = 0.1
# ... while at least this share has w > x and h > y and would fit inside the image as x2, y2.
XYXY_MIN_PATTERN_SHARE = 0.9

XYWH = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------
# numbers and records


def is_number(value: Any) -> bool:
    """An int or float (not a bool, not a string, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int_id(value: Any) -> bool:
    """COCO ids are integers (pycocotools and the trainer's tensors need them)."""
    return isinstance(value, int) and not isinstance(value, bool)


def image_size(record: dict[str, Any]) -> tuple[int, int] | None:
    """The record's (width, height) when both are positive whole numbers (640 or 640.0)."""
    w, h = record.get("width"), record.get("height")
    if not (is_number(w) and is_number(h)) or not (math.isfinite(w) and math.isfinite(h)):
        return None
    if w <= 0 or h <= 0 or w != int(w) or h != int(h):
        return None
    return int(w), int(h)


def annotation_record_problem(ann: Any) -> str | None:
    """Why an ``annotations[]`` entry names no image or class, else None (bbox checked apart)."""
    if not isinstance(ann, dict):
        return "is not an object"
    missing = [k for k in ("image_id", "category_id") if ann.get(k) is None]
    if missing:
        return f"has no {' and no '.join(missing)} (missing or null)"
    for key in ("image_id", "category_id"):
        if not is_int_id(ann[key]):
            return f"{key} {ann[key]!r} is not an integer"
    return None


def file_name_problem(name: Any) -> str | None:
    """Why an image file name from a label file is unusable, else None."""
    if not isinstance(name, str) or not name.strip():
        return "has no file_name"
    rel = name.replace("\\", "/")
    if os.path.isabs(rel) or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return f"file_name {name!r} is an absolute path"
    if ".." in rel.split("/"):
        return f"file_name {name!r} escapes the image folder (names are relative to it)"
    return None


# --------------------------------------------------------------------------------------------
# boxes


def parse_bbox(bbox: Any) -> XYWH | None:
    """``[x, y, w, h]`` as floats, or None when it is not four numbers (None/str inside)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(is_number(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return x, y, w, h


def xywh_problem(box: XYWH) -> str | None:
    """``'box_nan'`` or ``'box_empty'`` for a box no image can hold, else None."""
    if not all(math.isfinite(v) for v in box):
        return "box_nan"
    if box[2] <= 0 or box[3] <= 0:
        return "box_empty"
    return None


def usable_xywh(bbox: Any) -> XYWH | None:
    """The box when it is four finite numbers with positive width and height, else None."""
    box = parse_bbox(bbox)
    return box if box is not None and xywh_problem(box) is None else None


def box_position(
    box: XYWH, width: float, height: float, tolerance: float = EDGE_TOLERANCE
) -> tuple[str, float]:
    """('inside' | 'past' | 'outside', overshoot in px) of a finite xywh box with w, h > 0."""
    x, y, w, h = box
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "outside", math.inf
    over = max(-x, -y, x + w - width, y + h - height, 0.0)
    return ("past" if over > tolerance else "inside"), over


def clip_xyxy(
    x0: float, y0: float, x1: float, y1: float, width: float, height: float
) -> tuple[float, float, float, float]:
    """The xyxy box clipped to a ``width`` x ``height`` image."""
    return (
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    )


def clip_xywh(box: XYWH, width: float, height: float) -> XYWH:
    x0, y0, x1, y1 = clip_xyxy(box[0], box[1], box[0] + box[2], box[1] + box[3], width, height)
    return x0, y0, x1 - x0, y1 - y0


def training_box(
    bbox: Any, width: float, height: float
) -> tuple[float, float, float, float] | None:
    """The xyxy box the trainer uses (clipped to the image), or None when nothing is left."""
    box = usable_xywh(bbox)
    if box is None:
        return None
    x0, y0, x1, y1 = clip_xyxy(box[0], box[1], box[0] + box[2], box[1] + box[3], width, height)
    if x1 - x0 < MIN_BOX_SIZE or y1 - y0 < MIN_BOX_SIZE:
        return None
    return x0, y0, x1, y1


def xyxy_box_problem(
    x0: float, y0: float, x1: float, y1: float, width: float, height: float
) -> str | None:
    """Why a pixel xyxy box read from a label export cannot be kept, else None."""
    shown = "[" + ", ".join(f"{round(v, 3):g}" for v in (x0, y0, x1, y1)) + "]"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return "box has a non-finite coordinate"
    if x1 < x0 or y1 < y0:
        return f"inverted box {shown} (xyxy: max < min)"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return f"box {shown} (xyxy) is entirely outside the {width}x{height} image"
    cx0, cy0, cx1, cy1 = clip_xyxy(x0, y0, x1, y1, width, height)
    if round(cx1 - cx0, 3) <= 0 or round(cy1 - cy0, 3) <= 0:
        after = " after clipping to the image" if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1) else ""
        return f"box {shown} (xyxy) has zero area{after}"
    return None


def looks_xyxy(box: XYWH, width: float, height: float) -> bool:
    """One xywh box that reads better as [x1, y1, x2, y2]: it runs past the edge, while
    w > x, h > y and (w, h) taken as the far corner lies inside the image."""
    x, y, w, h = box
    past = x + w > width + EDGE_TOLERANCE or y + h > height + EDGE_TOLERANCE
    corner = w > x and h > y and w <= width + EDGE_TOLERANCE and h <= height + EDGE_TOLERANCE
    return past and corner


def xyxy_pattern(boxes: list[tuple[XYWH, float, float]]) -> tuple[int, int] | None:
    """(boxes past the edge, boxes fitting the xyxy pattern) when a set's ``bbox`` field
    holds [x1, y1, x2, y2] instead of COCO's [x, y, width, height]; None otherwise."""
    if not boxes:
        return None
    n = len(boxes)
    past = sum(
        1
        for (x, y, w, h), W, H in boxes
        if x + w > W + EDGE_TOLERANCE or y + h > H + EDGE_TOLERANCE
    )
    pattern = sum(
        1
        for (x, y, w, h), W, H in boxes
        if w > x and h > y and w <= W + EDGE_TOLERANCE and h <= H + EDGE_TOLERANCE
    )
    if past >= 2 and past >= XYXY_MIN_PAST_SHARE * n and pattern >= XYXY_MIN_PATTERN_SHARE * n:
        return past, pattern
    return None


def normalised_problem(values: list[float]) -> str | None:
    """Why coordinates that a format stores as fractions of the image (YOLO, AutoML) are not:
    a value outside [0, 1] beyond rounding means the file holds pixels."""
    bad = [v for v in values if v < -NORMALISED_TOLERANCE or v > 1 + NORMALISED_TOLERANCE]
    if not bad:
        return None
    return (
        f"coordinate {bad[0]:g} is outside [0, 1]: this format stores coordinates as fractions "
        "of the image width/height, these look like pixels. Re-export with normalised "
        "coordinates (or divide x by the image width and y by its height)"
    )


def area_of(ann: dict[str, Any]) -> float | None:
    """The annotation's usable ``area`` (a finite number >= 0), else None."""
    area = ann.get("area")
    return float(area) if is_number(area) and math.isfinite(area) and area >= 0 else None


# --------------------------------------------------------------------------------------------
# categories


def clean_category_name(name: Any) -> str | None:
    """A category name with surrounding whitespace stripped (case kept); None when empty."""
    if name is None or isinstance(name, (dict, list, bool)):
        return None
    text = str(name).strip()
    return text or None


def name_key(name: Any) -> str:
    """Matching key for category names: case-insensitive, whitespace collapsed."""
    return " ".join(str(name).split()).casefold()


def case_duplicates(names: list[str]) -> list[list[str]]:
    """Groups of distinct spellings of one name (``Deer``/``deer``), first-seen order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        group = groups[name_key(name)]
        if name not in group:
            group.append(name)
    return [g for g in groups.values() if len(g) > 1]


def placeholder_category_ids(
    categories: list[Any], annotations: list[Any] | None = None
) -> set[Any]:
    """Roboflow's superclass placeholder: a category with no boxes whose name is the
    ``supercategory`` of every other category (e.g. ``{"id": 0, "name": "z"}`` above "rabbit")."""
    cats = [c for c in categories if isinstance(c, dict) and "id" in c]
    used = {a.get("category_id") for a in annotations or [] if isinstance(a, dict)}
    found = set()
    for cat in cats:
        others = [c for c in cats if c is not cat]
        if (
            cat["id"] not in used
            and others
            and all(c.get("supercategory") == cat.get("name") for c in others)
        ):
            found.add(cat["id"])
    return found


def zero_based_category_ids(categories: list[Any], annotations: list[Any]) -> bool:
    """Boxes use category_id 0 while the categories are numbered from 1: ids copied 0-based
    (YOLO class indices), so every box may carry the class next to its own."""
    cat_ids = {c.get("id") for c in categories if isinstance(c, dict)}
    int_ids = [c for c in cat_ids if is_int_id(c)]
    used = {a.get("category_id") for a in annotations if isinstance(a, dict)}
    return 0 in used and 0 not in cat_ids and bool(int_ids) and min(int_ids) == 1


ZERO_BASED_FIX = (
    "boxes use category_id 0 but the categories are numbered from 1: the ids look 0-based "
    "(YOLO class indices copied as COCO ids), so every other box may carry the class next to "
    "its own too. Re-export the labels, or convert the YOLO labels with tools/convert.py"
)


# --------------------------------------------------------------------------------------------
# image files


def image_truncation(path: str | os.PathLike, tail: int = 4096) -> str | None:
    """Why an image file is cut short, from its last bytes, else None.

    A complete JPEG ends with the EOI marker FFD9 (some writers append a few bytes after it); a
    complete PNG with its IEND chunk. OpenCV decodes a truncated JPEG without an error, filling
    the rest grey, so a reader must check this itself. Other formats: None (not checked here).
    """
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - tail))
        end = f.read()
    if head[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in end:
        return "the JPEG has no end marker: the file is truncated (re-copy or re-export it)"
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in end[-16:]:
        return "the PNG has no IEND chunk: the file is truncated (re-copy or re-export it)"
    return None
