"""Merge several COCO sets into one self-contained set.

Categories are matched by name (case-insensitive, whitespace collapsed) and renumbered 1..K in
order of first appearance; image and annotation ids are renumbered. Every source gets a folder in
the merged image folder (``<source name>/<its file_name>``), filled with hard links (or copies), so
file names cannot collide and the merged JSON finds its images by the default rule (``images/``
beside it). Listed-but-missing images are left out (and counted); Roboflow's placeholder category
is dropped.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..coco_rules import placeholder_category_ids
from ..fileio import UnsafePathError, atomic_write_json
from .common import (
    CocoError,
    check_output,
    default_image_dir,
    file_sha1,
    image_dir_for,
    load_coco_json,
    normalize_name,
    require_unique_ids,
    safe_image_path,
)

# Folder names that say nothing about a set; a source is named after the first other ancestor.
_GENERIC_DIRS = {
    "annotations",
    "annotation",
    "images",
    "image",
    "labels",
    "label",
    "json",
    "coco",
    "train",
    "val",
    "valid",
    "validation",
    "test",
    "data",
    "dataset",
    "export",
}


@dataclass
class MergeSource:
    annotations: Path
    images_dir: Path | None = None  # default: images/ beside the JSON, else its folder
    name: str | None = None  # its folder in the merged image folder (default: from the path)


@dataclass
class MergeResult:
    data: dict[str, Any]
    files: list[tuple[Path, str]]  # (source image, merged file_name)
    names: list[str]  # source names, in order
    category_maps: dict[str, dict[Any, int]]  # source name -> its category id -> merged id
    images: dict[str, int] = field(default_factory=dict)  # source name -> images merged
    boxes: dict[str, int] = field(default_factory=dict)  # source name -> boxes merged
    missing_images: dict[str, int] = field(default_factory=dict)  # listed, not on disk: left out
    dropped_boxes: dict[str, int] = field(default_factory=dict)  # of missing images / unknown ids
    dropped_categories: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{n}: {self.images[n]} images, {self.boxes[n]} boxes" for n in self.names]
        return (
            f"merged {len(self.names)} sets into {len(self.data['images'])} images, "
            f"{len(self.data['annotations'])} boxes, {len(self.data['categories'])} "
            f"categories ({'; '.join(parts)})"
        )


def source_name(annotations: Path) -> str:
    """A short folder name for a source: its first non-generic ancestor folder, else the stem."""
    for parent in Path(annotations).resolve().parents:
        if parent.name and parent.name.lower() not in _GENERIC_DIRS:
            return _slug(parent.name)
    return _slug(Path(annotations).stem)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "set"
    return slug


def _unique_names(sources: Sequence[MergeSource]) -> list[str]:
    names: list[str] = []
    for src in sources:
        base = _slug(src.name) if src.name else source_name(src.annotations)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def merge_coco(
    sources: Sequence[MergeSource], drop_empty: bool = False, progress: bool = False
) -> MergeResult:
    """Merge the sources in memory (nothing is written; image files are only checked to exist).

    ``drop_empty`` also drops categories that have no boxes in any source.
    """
    if not sources:
        raise CocoError("nothing to merge: give at least one COCO file")
    names = _unique_names(sources)
    loaded = []
    for src in sources:
        data = load_coco_json(src.annotations)
        require_unique_ids(data, src.annotations)
        loaded.append((src, data, image_dir_for(src.annotations, src.images_dir)))
    categories, category_maps, dropped_categories = _merge_categories(
        names, [data for _, data, _ in loaded], drop_empty
    )
    out: dict[str, Any] = {
        "info": {
            "description": "merged by tools/merge.py from "
            + ", ".join(str(src.annotations) for src in sources),
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "licenses": [],
        "categories": categories,
        "images": [],
        "annotations": [],
    }
    result = MergeResult(out, [], names, category_maps)
    for name, (src, data, image_dir) in zip(names, loaded, strict=True):
        image_map = _add_images(result, name, src, data, image_dir, progress)
        dropped = kept = 0
        cmap = category_maps[name]
        for ann in data["annotations"]:
            image_id = image_map.get(ann.get("image_id"))
            category_id = cmap.get(ann.get("category_id"))
            if image_id is None or category_id is None:
                dropped += 1
                continue
            out["annotations"].append(
                {
                    **ann,
                    "id": len(out["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                }
            )
            kept += 1
        result.boxes[name] = kept
        result.dropped_boxes[name] = dropped
    result.dropped_categories = dropped_categories
    return result


def _merge_categories(
    names: list[str], datas: list[dict[str, Any]], drop_empty: bool
) -> tuple[list[dict[str, Any]], dict[str, dict[Any, int]], list[str]]:
    """Categories matched by name (``coco_rules.name_key``), in order of first appearance:
    (merged categories, per source old id -> new id, dropped categories)."""
    merged_cats: dict[str, dict[str, Any]] = {}
    key_of: dict[str, dict[Any, str]] = {}
    dropped_categories: list[str] = []
    box_count: Counter[str] = Counter()
    for name, data in zip(names, datas, strict=True):
        placeholders = placeholder_category_ids(data["categories"], data["annotations"])
        key_of[name] = {}
        for cat in data["categories"]:
            if cat["id"] in placeholders:
                dropped_categories.append(f"{name}: {cat.get('name')!r} (Roboflow placeholder)")
                continue
            if not isinstance(cat.get("name"), str) or not cat["name"].strip():
                raise CocoError(
                    f"{name}: category {cat['id']} has no name; merge matches "
                    "categories by name (tools/validate.py --fix names it)"
                )
            key = normalize_name(cat["name"])
            key_of[name][cat["id"]] = key
            merged_cats.setdefault(
                key,
                {
                    "name": " ".join(cat["name"].split()),
                    "supercategory": cat.get("supercategory", ""),
                },
            )
        for ann in data["annotations"]:
            key = key_of[name].get(ann.get("category_id"))
            if key is not None:
                box_count[key] += 1
    if drop_empty:
        for key in [k for k in merged_cats if not box_count[k]]:
            dropped_categories.append(f"{merged_cats.pop(key)['name']!r} (no boxes in any set)")
    id_of_key = {key: i for i, key in enumerate(merged_cats, start=1)}
    categories = [{"id": id_of_key[k], **rec} for k, rec in merged_cats.items()]
    category_maps = {
        name: {cid: id_of_key[k] for cid, k in keys.items() if k in id_of_key}
        for name, keys in key_of.items()
    }
    return categories, category_maps, dropped_categories


def _add_images(
    result: MergeResult,
    name: str,
    src: MergeSource,
    data: dict[str, Any],
    image_dir: Path,
    progress: bool,
) -> dict[Any, int]:
    """One source's licenses and present images into the merged set; old id -> new id."""
    out = result.data
    license_map = {}
    for lic in data.get("licenses") or []:
        if isinstance(lic, dict) and "id" in lic:
            license_map[lic["id"]] = len(out["licenses"]) + 1
            out["licenses"].append({**lic, "id": license_map[lic["id"]]})
    image_map: dict[Any, int] = {}
    missing = 0
    for rec in tqdm(
        data["images"], desc=f"merge {name}", unit="img", disable=not progress, leave=False
    ):
        try:
            path = safe_image_path(image_dir, rec.get("file_name"), rec.get("id"))
        except UnsafePathError as e:
            raise CocoError(
                f"{src.annotations}: {e} (tools/validate.py --fix drops such records)"
            ) from None
        if not path.is_file():
            missing += 1
            continue
        rel = rec["file_name"].replace("\\", "/")
        new = {**rec, "id": len(out["images"]) + 1, "file_name": f"{name}/{rel}"}
        if "license" in rec:
            if rec["license"] in license_map:
                new["license"] = license_map[rec["license"]]
            else:
                del new["license"]
        image_map[rec["id"]] = new["id"]
        out["images"].append(new)
        result.files.append((path, new["file_name"]))
    result.images[name] = len(image_map)
    result.missing_images[name] = missing
    return image_map


def _same_content(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        return a.stat().st_size == b.stat().st_size and file_sha1(a) == file_sha1(b)
    except OSError:
        return False


@dataclass
class WriteStats:
    images_dir: Path
    linked: int = 0  # hard links created
    copied: int = 0  # copies created (--copy, or where a hard link is impossible)
    existing: int = 0  # already there with the same content (a re-run)


def write_merged(
    result: MergeResult,
    out_json: str | Path,
    images_out: str | Path | None = None,
    copy: bool = False,
    inputs: Sequence[MergeSource] = (),
    progress: bool = True,
    overwrite: bool = False,
) -> WriteStats:
    """Fill the merged image folder with hard links (or copies) and write the JSON last, atomically.

    Hard links keep the merged set valid even if a source folder is later moved or deleted. Where
    a hard link is impossible (another file system, no permission) the image is copied. Refuses to
    overwrite an input JSON, an existing ``out_json`` without ``overwrite``, to write into a
    source image folder, or to replace an existing image with other content.
    """
    out_json = Path(out_json)
    images_dir = Path(images_out) if images_out else out_json.resolve().parent / "images"
    for src in inputs:
        check_output(out_json, src.annotations, overwrite=overwrite)
        source_dir = image_dir_for(src.annotations, src.images_dir)
        target = images_dir.resolve()
        if target == source_dir or source_dir in target.parents:
            raise CocoError(
                f"{images_dir}: inside the image folder of {src.annotations}; refusing "
                "to write into an input folder (choose another --images-out)"
            )
    stats = WriteStats(images_dir)
    for source, file_name in tqdm(
        result.files, desc="copy" if copy else "link", unit="img", disable=not progress, leave=False
    ):
        dest = images_dir / file_name
        if dest.exists() or dest.is_symlink():
            if _same_content(dest, source):
                stats.existing += 1
                continue
            raise CocoError(
                f"{dest}: exists and is not {source}; refusing to overwrite it "
                "(choose an empty --images-out)"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not copy:
            try:
                os.link(source.resolve(), dest)  # the file itself, not a symlink to it
                stats.linked += 1
                continue
            except OSError:
                pass  # another file system or no permission: copy instead
        shutil.copy2(source, dest)
        stats.copied += 1
    atomic_write_json(out_json, result.data)
    return stats


def images_note(out_json: str | Path, images_dir: Path) -> str | None:
    if default_image_dir(out_json) != images_dir.resolve():
        return (
            f"note: images are in {images_dir}; pass --images {images_dir} (or set "
            "data.*_images) when you use the merged file"
        )
    return None
