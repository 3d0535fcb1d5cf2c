"""The shared COCO builder: checks the images, clips the boxes, numbers everything, writes.

Nothing is written until every image has been opened and decoded and every box checked, so a
bad export (malformed file, escaping path, truncated image) leaves no output behind. Images go
to a temporary folder inside ``out`` first; ``annotations.json`` is written last, atomically.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..fileio import atomic_write_json, refuse_overwrite
from .common import (
    IMAGE_EXTENSIONS,
    ConversionError,
    ImageEntry,
    ReadContext,
    ReadResult,
    Skipped,
)

ANNOTATIONS_NAME = "annotations.json"
IMAGES_DIR = "images"
PROGRESS_MIN_IMAGES = 50  # show a progress bar from this many images on
MAX_LISTED_NOTES = 10
CLIP_REPORT_PX = 1.0  # clipping by more than this is reported box by box; less is rounding


@dataclass
class ConversionReport:
    """What a conversion produced and everything it left out, with reasons."""

    format: str
    src: Path
    out: Path | None
    images: int = 0
    boxes: int = 0
    categories: list[str] = field(default_factory=list)
    boxes_per_category: dict[str, int] = field(default_factory=dict)
    negatives: int = 0  # images kept with no box
    crowd: int = 0
    clipped: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    detected: bool = False  # the format was auto-detected
    written: bool = False

    def summary(self) -> str:
        where = (
            f" -> {self.out / ANNOTATIONS_NAME}" if self.written and self.out else " (not written)"
        )
        extra = []
        if self.negatives:
            extra.append(f"{self.negatives} without boxes")
        crowd = f" ({self.crowd} iscrowd)" if self.crowd else ""
        neg = f" ({', '.join(extra)})" if extra else ""
        return (
            f"{self.format}: {self.images} images{neg}, {self.boxes} boxes{crowd}, "
            f"{len(self.categories)} categories, {len(self.skipped)} records skipped, "
            f"{self.clipped} boxes clipped{where}"
        )

    def text(self) -> str:
        """The full report: counts, categories, notes and every skipped record with its reason."""
        lines = [f"source: {self.src} ({self.format}{', auto-detected' if self.detected else ''})"]
        cats = ", ".join(f"{n} ({self.boxes_per_category.get(n, 0)})" for n in self.categories)
        lines.append(f"categories: {cats}")
        lines += [f"note: {n}" for n in self.notes]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} records:")
            lines += [f"  {s}" for s in self.skipped]
        lines.append(self.summary())
        return "\n".join(lines)


def _check_decodes(path: Path | None, data: bytes | None, where: str) -> None:
    """Decode the whole image (JPEG at 1/8 scale, which still reads every byte) to catch
    truncated or corrupt files before anything is written."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        raise ConversionError(
            f"{where}: image cannot be decoded (truncated or corrupt?): {e}"
        ) from None


def _embedded_size(data: bytes, where: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise ConversionError(
            f"{where}: embedded image data is not a readable image ({e})"
        ) from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _output_names(paths: list[Path]) -> list[str]:
    """Flat, unique file names for the output ``images/`` folder.

    Names are taken relative to the deepest folder common to all images, with sub-folders folded
    into the name (``train/a.jpg`` -> ``train__a.jpg``). Should two images still end up with the
    same name (compared case-insensitively, for case-insensitive file systems), each of them gets
    a short hash of its full relative path before the extension, so names can never collide.
    """
    if not paths:
        return []
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    rels = [p.relative_to(common).as_posix() for p in paths]
    flat = [r.replace("/", "__") for r in rels]
    counts = Counter(n.casefold() for n in flat)
    out = []
    for rel, name in zip(rels, flat, strict=True):
        if counts[name.casefold()] > 1:
            stem, dot, ext = name.rpartition(".")
            digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
            name = f"{stem}.{digest}.{ext}" if dot else f"{name}.{digest}"
        out.append(name)
    if len({n.casefold() for n in out}) != len(out):  # cannot happen short of a hash collision
        raise ConversionError("two images map to the same output file name; rename one of them")
    return out


def _categories(result: ReadResult, names: list[str] | None) -> list[str]:
    if names:
        if len(set(names)) != len(names):
            dupes = sorted(n for n, c in Counter(names).items() if c > 1)
            raise ConversionError(f"--names lists {dupes} more than once")
        return list(names)
    if result.categories is not None:
        return list(dict.fromkeys(result.categories))
    seen: dict[str, None] = {}
    for entry in result.images:
        for box in entry.boxes:
            seen.setdefault(box.label, None)
    return list(seen)


def _r(v: float) -> float:
    return round(float(v), 3)


def build_coco(
    result: ReadResult,
    ctx: ReadContext,
    fmt: str,
    names: list[str] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[ImageEntry], ConversionReport]:
    """Check images and boxes and build the COCO dict; returns it, the kept image entries in
    output order (``file_name`` set in the dict) and the report. Writes nothing."""
    report = ConversionReport(format=fmt, src=ctx.src, out=None)
    report.skipped = list(result.skipped)
    report.notes = list(result.notes)
    categories = _categories(result, names)
    cat_id = {n: i + 1 for i, n in enumerate(categories)}
    per_cat: Counter[str] = Counter()

    # One entry per image file: a second record for the same file is skipped, not merged.
    entries: list[ImageEntry] = []
    first_record: dict[Path, ImageEntry] = {}
    for entry in result.images:
        key = entry.path.resolve() if entry.embedded is None else entry.path
        if key in first_record:
            first = first_record[key]
            report.skipped.append(
                Skipped(
                    str(entry.label_file),
                    entry.record,
                    f"same image file as {first.record} in {first.label_file}; this record and its "
                    f"{len(entry.boxes)} boxes skipped",
                )
            )
            continue
        first_record[key] = entry
        entries.append(entry)

    images_json: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    size_notes: list[str] = []
    clamped = 0
    clipped_notes: list[str] = []
    out_names = _output_names([e.path for e in entries])
    bar = tqdm(
        zip(entries, out_names, strict=True),
        total=len(entries),
        unit="img",
        desc=f"checking {fmt} images",
        file=sys.stderr,
        disable=not progress or len(entries) < PROGRESS_MIN_IMAGES,
    )
    for image_id, (entry, out_name) in enumerate(bar, start=1):
        where = f"{entry.label_file}: {entry.record}: {entry.path}"
        if entry.embedded is not None:
            width, height = _embedded_size(entry.embedded, where)
        else:
            width, height = ctx.size(entry.path, entry.label_file, entry.record)
        _check_decodes(entry.path if entry.embedded is None else None, entry.embedded, where)
        if entry.declared_size and tuple(entry.declared_size) != (width, height):
            size_notes.append(
                f"{entry.path.name}: {entry.label_file.name} says {entry.declared_size[0]}x"
                f"{entry.declared_size[1]}, the image file is {width}x{height} (file size used)"
            )
        images_json.append(
            {
                "id": image_id,
                "file_name": out_name,
                "width": width,
                "height": height,
                "source_file": str(entry.path),
            }
        )
        seen_boxes: dict[tuple, str] = {}
        kept = 0
        for box in entry.boxes:

            def skip(reason: str, box=box, entry=entry) -> None:
                report.skipped.append(
                    Skipped(str(entry.label_file), f"{entry.record}, {box.record}", reason)
                )

            if box.label not in cat_id:
                skip(f"unknown label {box.label!r} (categories: {', '.join(categories) or 'none'})")
                continue
            x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                skip("box has a non-finite coordinate")
                continue
            if x1 < x0 or y1 < y0:
                skip(f"inverted box {[_r(x0), _r(y0), _r(x1), _r(y1)]} (xyxy: max < min)")
                continue
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                skip(
                    f"box {[_r(x0), _r(y0), _r(x1), _r(y1)]} (xyxy) is entirely outside the "
                    f"{width}x{height} image"
                )
                continue
            cx0, cy0 = max(x0, 0.0), max(y0, 0.0)
            cx1, cy1 = min(x1, float(width)), min(y1, float(height))
            w, h = _r(cx1 - cx0), _r(cy1 - cy0)
            if w <= 0 or h <= 0:
                skip(
                    f"box {[_r(x0), _r(y0), _r(x1), _r(y1)]} (xyxy) has zero area"
                    + (
                        " after clipping to the image"
                        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
                        else ""
                    )
                )
                continue
            was_clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
            bbox = [_r(cx0), _r(cy0), w, h]
            dup_key = (box.label, *bbox)
            if dup_key in seen_boxes:
                skip(f"exact duplicate of {seen_boxes[dup_key]} (same label and box)")
                continue
            seen_boxes[dup_key] = box.record
            if was_clipped:
                overshoot = max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1)
                if overshoot > CLIP_REPORT_PX:
                    report.clipped += 1
                    clipped_notes.append(f"{entry.path.name} {box.record} (by {overshoot:.1f} px)")
                else:
                    clamped += 1
            area = (
                box.area if (box.area is not None and box.area > 0 and not was_clipped) else w * h
            )
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_id[box.label],
                "bbox": bbox,
                "area": _r(area),
                "iscrowd": int(bool(box.iscrowd)),
                "segmentation": box.segmentation if box.segmentation is not None else [],
            }
            annotations.append(ann)
            per_cat[box.label] += 1
            report.crowd += ann["iscrowd"]
            kept += 1
        report.negatives += kept == 0

    if size_notes:
        report.notes.append(
            f"{len(size_notes)} images have a size in the label file that differs "
            f"from the file: "
            + "; ".join(size_notes[:MAX_LISTED_NOTES])
            + (" ..." if len(size_notes) > MAX_LISTED_NOTES else "")
        )
    if clipped_notes:
        report.notes.append(
            f"{len(clipped_notes)} boxes partly outside their image were clipped: "
            + "; ".join(clipped_notes[:MAX_LISTED_NOTES])
            + (" ..." if len(clipped_notes) > MAX_LISTED_NOTES else "")
        )
    if clamped:
        report.notes.append(
            f"{clamped} boxes overshot the image border by at most "
            f"{CLIP_REPORT_PX} px (rounding) and were clamped to it"
        )
    embedded = sum(e.embedded is not None for e in entries)
    if embedded:
        report.notes.append(
            f"{embedded} images were missing on disk and taken from the label "
            "file's embedded image data"
        )
    _note_unreferenced(result, entries, report)

    report.images = len(images_json)
    report.boxes = len(annotations)
    report.categories = categories
    report.boxes_per_category = {n: per_cat.get(n, 0) for n in categories}
    coco = {
        "info": {
            "description": f"converted from a {fmt} export by tools/convert.py",
            "source_format": fmt,
            "source": str(ctx.src.resolve()),
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": "1.0",
        },
        "licenses": [],
        "images": images_json,
        "annotations": annotations,
        "categories": [
            {"id": cat_id[n], "name": n, "supercategory": result.supercategories.get(n, "")}
            for n in categories
        ],
    }
    return coco, entries, report


def _note_unreferenced(
    result: ReadResult, entries: list[ImageEntry], report: ConversionReport
) -> None:
    """Count image files lying beside the converted ones that no converted record names."""
    used = {e.path.resolve() for e in entries if e.embedded is None}
    folders = {p.parent for p in used}
    unused = sorted(
        p
        for d in folders
        for p in d.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.resolve() not in used and p.is_file()
    )
    if unused:
        names = ", ".join(p.name for p in unused[:5]) + (" ..." if len(unused) > 5 else "")
        report.notes.append(
            f"{len(unused)} image files beside the converted ones are named by no "
            f"converted record (not in the output): {names}"
        )


def check_output(out: Path, ctx: ReadContext, result: ReadResult, overwrite: bool) -> None:
    """Refuse outputs that would overwrite the export or a previous conversion."""
    out_r = out.resolve()
    target = out / ANNOTATIONS_NAME
    try:
        refuse_overwrite(target, *result.sources)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    protected = [ctx.root.resolve(), *(r.resolve() for r in result.image_roots)]
    if ctx.images:
        protected.append(ctx.images.resolve())
    for folder in protected:
        if out_r == folder or folder in out_r.parents:
            raise ConversionError(
                f"{out}: the output folder is (inside) the source folder {folder}; converters "
                "never write into their input, choose an output folder elsewhere"
            )
        if (out_r / IMAGES_DIR) == folder or (out_r / IMAGES_DIR) in folder.parents:
            raise ConversionError(
                f"{out}: {out / IMAGES_DIR} would replace the source images in {folder}; choose "
                "another output folder"
            )
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    existing = [p for p in (target, out / IMAGES_DIR) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise ConversionError(
            f"{out}: already holds {', '.join(p.name for p in existing)}; pass --overwrite "
            "(overwrite=True) to replace them, or choose an empty folder"
        )


def write_output(
    out: Path, coco: dict[str, Any], entries: list[ImageEntry], link: bool, progress: bool = False
) -> None:
    """Copy (or symlink) the images into a temporary folder, swap it in, then write the JSON.

    If anything fails, the previous ``images/`` and ``annotations.json`` (if any) are left as they
    were and no temporary folder remains.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{IMAGES_DIR}.", suffix=".tmp", dir=out))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the output is meant to be shared
        items = list(zip(entries, coco["images"], strict=True))
        bar = tqdm(
            items,
            unit="img",
            desc="linking images" if link else "copying images",
            file=sys.stderr,
            disable=not progress or len(items) < PROGRESS_MIN_IMAGES,
        )
        for entry, info in bar:
            dest = staging / info["file_name"]
            if entry.embedded is not None:
                dest.write_bytes(entry.embedded)
            elif link:
                os.symlink(entry.path.resolve(), dest)
            else:
                shutil.copy2(entry.path, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    images_dir = out / IMAGES_DIR
    old: Path | None = None
    try:
        if images_dir.exists() or images_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{IMAGES_DIR}.old.", dir=out))
            os.replace(images_dir, old / IMAGES_DIR)
        os.replace(staging, images_dir)
        atomic_write_json(out / ANNOTATIONS_NAME, coco)
        os.chmod(out / ANNOTATIONS_NAME, 0o644)  # atomic_write_json's temp file is 0600
    except BaseException:
        if not staging.exists() and images_dir.is_dir():  # the new images were swapped in
            shutil.rmtree(images_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and (old / IMAGES_DIR).exists():
            os.replace(old / IMAGES_DIR, images_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
