"""COCO JSON: plain COCO, CVAT's "COCO 1.0", Roboflow's ``_annotations.coco.json``.

Re-validated and renumbered: categories get contiguous 1-based ids in the file's order (COCO's
91-id numbering becomes 1..80), images and annotations get fresh 1-based ids. ``iscrowd``,
``area`` and ``segmentation`` are kept. Dropped, with a reason: Roboflow's placeholder category
(no annotation, the ``supercategory`` of every other category, e.g. ``{"id": 0, "name": "z"}``:
``coco_rules.placeholder_category_ids``), images listed but absent on disk, annotations naming
an unknown image or category. Refused: category ids used 0-based against categories numbered
from 1, and boxes that hold [x1, y1, x2, y2] in the [x, y, w, h] field (checked by the
builder). Images are looked up beside the JSON, in ``images/`` beside it or its parent folder,
and in ``images/<split>`` for ``instances_<split>.json`` (or ``--images``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..coco_rules import (
    ZERO_BASED_FIX,
    area_of,
    image_size,
    placeholder_category_ids,
    zero_based_category_ids,
)
from .common import (
    Box,
    ConversionError,
    ImageEntry,
    ImageFinder,
    ReadContext,
    ReadResult,
    Skipped,
    load_json,
    number,
)
from .detect import source_files


def _candidate_roots(json_path: Path) -> list[Path]:
    here, up = json_path.parent, json_path.parent.parent
    split = json_path.stem.removeprefix("instances_")
    return [here, here / "images", up / "images" / split, up / split, up / "images", up]


def _pick_root(json_path: Path, names: list[str], given: Path | None) -> list[Path]:
    """The candidate folder holding the most of the listed images (first one on ties)."""
    if given:
        return [given]
    best, best_hits = None, -1
    for root in _candidate_roots(json_path):
        if not root.is_dir():
            continue
        hits = 0
        for n in names:
            rel = n.replace("\\", "/")
            if (
                rel
                and not rel.startswith("/")
                and ".." not in rel.split("/")
                and (root / rel).is_file()
            ):
                hits += 1
        if hits > best_hits:
            best, best_hits = root, hits
    return [best] if best is not None else []


def _require(rec: Any, keys: tuple[str, ...], path: Path, what: str) -> None:
    if not isinstance(rec, dict):
        raise ConversionError(f"{path}: {what}: expected an object, got {str(rec)[:80]!r}")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ConversionError(f"{path}: {what}: missing {', '.join(missing)}")


def read_coco(ctx: ReadContext) -> ReadResult:
    (path,) = source_files(ctx.src, "coco", single=True, what="COCO JSON")
    data, anns = _load(path)
    cat_name, order, supercat, notes = _read_categories(data["categories"], anns, path)
    for i, im in enumerate(data["images"]):
        _require(im, ("id", "file_name"), path, f"images[{i}]")
        if not isinstance(im["file_name"], str):
            raise ConversionError(f"{path}: images[{i}]: file_name must be a string")
    roots = _pick_root(path, [im["file_name"] for im in data["images"]], ctx.images)
    finder = ImageFinder(roots)
    result = ReadResult(
        images=[],
        categories=order,
        sources=[path],
        image_roots=finder.roots,
        notes=notes,
        supercategories=supercat,
        boxes_are_xywh=True,
    )
    by_id = _read_images(data["images"], path, finder, result)
    lost = _read_annotations(anns, path, by_id, cat_name, result)
    missing = [(i, im) for i, im in enumerate(data["images"]) if by_id[im["id"]] is None]
    for _, im in missing:
        result.skipped.append(
            Skipped(
                str(path),
                f"image id {im['id']} {im['file_name']!r}",
                f"image file not found in {finder.describe()}; its "
                f"{lost.get(im['id'], 0)} boxes skipped",
            )
        )
    if missing:
        result.notes.append(
            f"{len(missing)} of {len(data['images'])} listed images are not on disk "
            f"({sum(lost.values())} boxes on them skipped)"
        )
    crowd = sum(b.iscrowd for e in result.images for b in e.boxes)
    if crowd:
        result.notes.append(
            f"{crowd} iscrowd annotations kept with iscrowd=1 (ignored in training, "
            "'ignore' regions in evaluation)"
        )
    return result


def _load(path: Path) -> tuple[dict[str, Any], list[Any]]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise ConversionError(
            f"{path}: top level must be an object with images/annotations/categories"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ConversionError(f"{path}: missing the '{key}' list; is this a COCO file?")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise ConversionError(f"{path}: 'annotations' must be a list")
    return data, anns


def _read_categories(
    categories: list[Any], anns: list[Any], path: Path
) -> tuple[dict[Any, str], list[str], dict[str, str], list[str]]:
    """id -> name, the names in file order, name -> supercategory, notes. Refuses 0-based ids;
    drops Roboflow's placeholder; merges categories of one name."""
    cat_name: dict[Any, str] = {}
    order: list[str] = []
    supercat: dict[str, str] = {}
    for i, c in enumerate(categories):
        _require(c, ("id", "name"), path, f"categories[{i}]")
        if c["id"] in cat_name:
            raise ConversionError(f"{path}: categories[{i}]: duplicate category id {c['id']}")
        name = str(c["name"])
        cat_name[c["id"]] = name
        if name not in order:
            order.append(name)
        supercat.setdefault(name, str(c.get("supercategory") or ""))
    if zero_based_category_ids(categories, anns):
        raise ConversionError(f"{path}: {ZERO_BASED_FIX}; nothing written")
    notes = []
    dropped = set()
    for cid in placeholder_category_ids(categories, anns):
        name = cat_name.pop(cid)
        order.remove(name)
        dropped.add(name)
        notes.append(
            f"dropped placeholder category {{'id': {cid!r}, 'name': {name!r}}}: no "
            "annotations, only the supercategory of the other categories (Roboflow)"
        )
    for name in order:
        if supercat.get(name) in dropped:
            supercat[name] = ""
    dupes = len(categories) - len(dropped) - len(order)
    if dupes:
        notes.append(f"{dupes} categories share a name with an earlier one; merged by name")
    return cat_name, order, supercat, notes


def _read_images(
    images: list[dict[str, Any]], path: Path, finder: ImageFinder, result: ReadResult
) -> dict[Any, ImageEntry | None]:
    """image id -> its entry (added to ``result``), or None when the file is not on disk."""
    by_id: dict[Any, ImageEntry | None] = {}
    for i, im in enumerate(images):
        record = f"image id {im['id']} {im['file_name']!r}"
        if im["id"] in by_id:
            raise ConversionError(f"{path}: images[{i}]: duplicate image id {im['id']}")
        img_path = finder.find(im["file_name"], path, record)
        entry = ImageEntry(img_path, path, record, [], image_size(im)) if img_path else None
        by_id[im["id"]] = entry
        if entry is not None:
            result.images.append(entry)
    return by_id


def _read_annotations(
    anns: list[Any],
    path: Path,
    by_id: dict[Any, ImageEntry | None],
    cat_name: dict[Any, str],
    result: ReadResult,
) -> dict[Any, int]:
    """Boxes onto their entries; returns image id -> boxes lost with a missing image file."""
    lost: dict[Any, int] = {}
    for i, a in enumerate(anns):
        _require(a, ("image_id", "category_id", "bbox"), path, f"annotations[{i}]")
        record = f"annotation id {a.get('id', f'#{i}')}"
        bbox = a["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ConversionError(
                f"{path}: {record}: bbox must be [x, y, width, height], got {str(bbox)[:80]}"
            )
        x, y, w, h = (number(v, path, record, "bbox value") for v in bbox)
        if a["image_id"] not in by_id:
            result.skipped.append(Skipped(str(path), record, f"unknown image id {a['image_id']!r}"))
            continue
        if a["category_id"] not in cat_name:
            result.skipped.append(
                Skipped(str(path), record, f"unknown category id {a['category_id']!r}")
            )
            continue
        entry = by_id[a["image_id"]]
        if entry is None:
            lost[a["image_id"]] = lost.get(a["image_id"], 0) + 1
            continue
        entry.boxes.append(
            Box(
                cat_name[a["category_id"]],
                x,
                y,
                x + w,
                y + h,
                record,
                iscrowd=int(bool(a.get("iscrowd", 0))),
                area=area_of(a),
                segmentation=a.get("segmentation"),
            )
        )
    return lost
