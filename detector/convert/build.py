"""The shared COCO builder: checks the images, clips the boxes, numbers everything, writes.

The rules are ``detector.coco_rules``'s, the ones tools/validate.py and the trainer apply.
Nothing is written until every image has been opened and decoded and every box checked. A
problem of one image (unreadable, truncated) skips that image and lists it (``strict``: refuses
the export); a problem of the export's layout or a malformed file refuses the whole export and
leaves no output behind. Images go
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

from ..coco_rules import (
    case_duplicates,
    clean_category_name,
    clip_xyxy,
    image_truncation,
    name_key,
    xyxy_box_problem,
    xyxy_pattern,
)
from ..fileio import MAX_IMAGE_PIXELS, atomic_write_json, refuse_overwrite
from .common import (
    IMAGE_EXTENSIONS,
    Box,
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
    skipped: list[Skipped] = field(default_factory=list)  # records (boxes, label entries)
    skipped_images: list[Skipped] = field(default_factory=list)  # unreadable/truncated images
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
            f"{len(self.skipped_images)} unusable images skipped, "
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
        if self.skipped_images:
            lines.append(
                f"skipped {len(self.skipped_images)} unusable images (--strict refuses instead):"
            )
            lines += [f"  {s}" for s in self.skipped_images]
        lines.append(self.summary())
        return "\n".join(lines)


def _decode_problem(path: Path | None, data: bytes | None) -> str | None:
    """Why the image cannot be used (truncated or corrupt), else None. Decodes the whole image
    (JPEG at 1/8 scale, which still reads every byte); a truncated file is caught by its missing
    end marker too, since some decoders fill the rest grey without an error."""
    if path is not None:
        cut = image_truncation(path)
        if cut:
            return cut
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
        return f"image cannot be decoded (truncated or corrupt?): {e}"
    return None


def _embedded_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of image bytes carried by a label file (LabelMe ``imageData``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Image.DecompressionBombError as e:
        raise ConversionError(
            f"{where}: the embedded imageData is too large to decode safely ({e}); save the "
            "image as a file beside the label file and remove imageData"
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ConversionError(
            f"{where}: embedded image data is not a readable image ({e})"
        ) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ConversionError(
            f"{where}: the embedded imageData is {width}x{height}, over the "
            f"{MAX_IMAGE_PIXELS:,} pixel limit; save a smaller image beside the label file"
        )
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


def _categories(
    result: ReadResult, names: list[str] | None, merge_case: bool
) -> tuple[list[str], dict[str, str]]:
    """The category names in order, and the name each box label maps to.

    Names are stripped of surrounding whitespace (case kept); an empty name refuses the export;
    two spellings of one name (``Deer``/``deer``) refuse it too, unless ``merge_case`` maps every
    spelling to the first one seen."""
    if names:
        if len(set(names)) != len(names):
            dupes = sorted(n for n, c in Counter(names).items() if c > 1)
            raise ConversionError(f"--names lists {dupes} more than once")
        order = list(names)
    elif result.categories is not None:
        order = list(result.categories)
    else:
        order = [box.label for entry in result.images for box in entry.boxes]
    _refuse_empty_labels(result)
    clean = list(dict.fromkeys(n.strip() for n in order if n.strip()))
    groups = case_duplicates(clean)
    if groups and not merge_case:
        shown = "; ".join(" and ".join(repr(n) for n in g) for g in groups)
        raise ConversionError(
            f"{result.sources[0] if result.sources else ''}: class names differ only in case: "
            f"{shown}. Rename them in the labelling tool, or pass --merge-case to merge each "
            "group into its first spelling; nothing written"
        )
    first = {name_key(n): n for n in reversed(clean)}
    categories = list(dict.fromkeys(first[name_key(n)] for n in clean))
    labels = {box.label for entry in result.images for box in entry.boxes} | set(order)
    rename = {raw: first.get(name_key(raw), raw.strip()) for raw in labels}
    return categories, rename


def _refuse_empty_labels(result: ReadResult) -> None:
    for entry in result.images:
        for box in entry.boxes:
            if clean_category_name(box.label) is None:
                raise ConversionError(
                    f"{entry.label_file}: {entry.record}, {box.record}: the object has an empty "
                    "class name; name it in the labelling tool; nothing written"
                )


def _r(v: float) -> float:
    return round(float(v), 3)


@dataclass
class _Build:
    """What build_coco accumulates while it walks the images."""

    report: ConversionReport
    categories: list[str]
    rename: dict[str, str]
    strict: bool
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    kept: list[ImageEntry] = field(default_factory=list)
    per_category: Counter[str] = field(default_factory=Counter)
    clipped_notes: list[str] = field(default_factory=list)
    clamped: int = 0
    xywh_boxes: list[tuple[tuple[float, float, float, float], float, float]] = field(
        default_factory=list
    )

    @property
    def cat_id(self) -> dict[str, int]:
        return {n: i + 1 for i, n in enumerate(self.categories)}


def build_coco(
    result: ReadResult,
    ctx: ReadContext,
    fmt: str,
    names: list[str] | None = None,
    progress: bool = False,
    *,
    strict: bool = False,
    merge_case: bool = False,
) -> tuple[dict[str, Any], list[ImageEntry], ConversionReport]:
    """Check images and boxes and build the COCO dict; returns it, the kept image entries in
    output order (``file_name`` set in the dict) and the report. Writes nothing.

    A problem of one image (unreadable, truncated) skips it, listed in the report; ``strict``
    refuses the export instead. A problem of the export's layout (sizes in the label file that
    are not the file's, boxes that look like xyxy in COCO's xywh field) always refuses it."""
    report = ConversionReport(format=fmt, src=ctx.src, out=None)
    report.skipped = list(result.skipped)
    report.notes = list(result.notes)
    categories, rename = _categories(result, names, merge_case)
    state = _Build(report, categories, rename, strict)
    entries = _unique_entries(result, report)
    bar = tqdm(
        zip(entries, _output_names([e.path for e in entries]), strict=True),
        total=len(entries),
        unit="img",
        desc=f"checking {fmt} images",
        file=sys.stderr,
        disable=not progress or len(entries) < PROGRESS_MIN_IMAGES,
    )
    for entry, out_name in bar:
        size = _image_size(entry, ctx, state)
        if size is None:
            continue
        entry.scale_boxes(*size)
        state.kept.append(entry)
        state.images.append(
            {
                "id": len(state.images) + 1,
                "file_name": out_name,
                "width": size[0],
                "height": size[1],
                "source_file": str(entry.path),
            }
        )
        _add_boxes(state, entry, len(state.images), *size)
    if result.boxes_are_xywh:
        _refuse_xyxy_layout(state, ctx)
    _add_notes(state)
    _note_unreferenced(result, state.kept, report)
    return _coco_dict(state, result, ctx, fmt), state.kept, report


def _unique_entries(result: ReadResult, report: ConversionReport) -> list[ImageEntry]:
    """One entry per image file: a second record for the same file is skipped, not merged."""
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
    return entries


def _image_size(entry: ImageEntry, ctx: ReadContext, state: _Build) -> tuple[int, int] | None:
    """The image's displayed size, or None when the image is skipped (listed in the report).

    Unreadable and truncated images are skipped (refused with ``strict``); a size in the label
    file that is not the file's refuses the export: its boxes are in another frame."""
    where = f"{entry.label_file}: {entry.record}: {entry.path}"
    problem = None
    if entry.embedded is not None:
        width, height = _embedded_size(entry.embedded, where)
    else:
        try:
            width, height = ctx.size(entry.path, entry.label_file, entry.record)
        except ConversionError as e:
            problem = str(e).removeprefix(f"{entry.label_file}: {entry.record}: ")
    if problem is None:
        problem = _decode_problem(entry.path if entry.embedded is None else None, entry.embedded)
    if problem is not None:
        if state.strict:
            raise ConversionError(f"{where}: {problem} (--strict: nothing written)")
        state.report.skipped_images.append(
            Skipped(
                str(entry.label_file),
                f"{entry.record}: {entry.path.name}",
                f"{problem}; the image and its {len(entry.boxes)} boxes skipped",
            )
        )
        return None
    if entry.declared_size and tuple(entry.declared_size) != (width, height):
        raise ConversionError(_size_mismatch(where, entry.declared_size, (width, height)))
    return width, height


def _size_mismatch(where: str, declared: tuple[int, int], actual: tuple[int, int]) -> str:
    (dw, dh), (w, h) = declared, actual
    if (dw, dh) == (h, w):
        return (
            f"{where}: the label file says {dw}x{dh}, but the image is displayed as {w}x{h}: "
            "its EXIF orientation turns it by 90 degrees and the labelling tool ignored that, "
            "so the boxes are in the raw, unrotated frame and would land in the wrong place. "
            "Fix: drop the orientation tag so the file is read as it was labelled "
            "(exiftool -Orientation=1 -n FILE), or re-label in a tool that applies EXIF; "
            "nothing written"
        )
    return (
        f"{where}: the label file says {dw}x{dh}, but the image file is {w}x{h}: the boxes were "
        "drawn on another version of the image (resized or replaced after labelling). Fix: put "
        "back the file that was labelled, or re-export the labels for this file; nothing written"
    )


def _add_boxes(state: _Build, entry: ImageEntry, image_id: int, width: int, height: int) -> None:
    """Check, clip and number the boxes of one kept image."""
    seen_boxes: dict[tuple, str] = {}
    kept = 0
    for box in entry.boxes:
        reason = _box_skip_reason(state, box, width, height)
        bbox = None
        if reason is None:
            bbox = _clipped_bbox(state, entry, box, width, height)
            dup_key = (state.rename[box.label], *bbox)
            if dup_key in seen_boxes:
                reason = f"exact duplicate of {seen_boxes[dup_key]} (same label and box)"
            seen_boxes[dup_key] = seen_boxes.get(dup_key, box.record)
        if reason is not None:
            state.report.skipped.append(
                Skipped(str(entry.label_file), f"{entry.record}, {box.record}", reason)
            )
            continue
        assert bbox is not None
        _append_annotation(state, box, image_id, bbox)
        kept += 1
    state.report.negatives += kept == 0


def _box_skip_reason(state: _Build, box: Box, width: int, height: int) -> str | None:
    label = state.rename.get(box.label, box.label)
    if label not in state.cat_id:
        known = ", ".join(state.categories) or "none"
        return f"unknown label {box.label!r} (categories: {known})"
    if all(math.isfinite(v) for v in (box.x0, box.y0, box.x1, box.y1)):
        state.xywh_boxes.append(
            ((box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0), float(width), float(height))
        )
    return xyxy_box_problem(box.x0, box.y0, box.x1, box.y1, width, height)


def _clipped_bbox(
    state: _Build, entry: ImageEntry, box: Box, width: int, height: int
) -> list[float]:
    """COCO [x, y, w, h] of the box clipped to the image; large clips are listed."""
    x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
    cx0, cy0, cx1, cy1 = clip_xyxy(x0, y0, x1, y1, width, height)
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        overshoot = max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1)
        if overshoot > CLIP_REPORT_PX:
            state.report.clipped += 1
            state.clipped_notes.append(f"{entry.path.name} {box.record} (by {overshoot:.1f} px)")
        else:
            state.clamped += 1
        box.area = None  # a segment area no longer matches the clipped box
    return [_r(cx0), _r(cy0), _r(cx1 - cx0), _r(cy1 - cy0)]


def _append_annotation(state: _Build, box: Box, image_id: int, bbox: list[float]) -> None:
    label = state.rename[box.label]
    area = box.area if (box.area is not None and box.area > 0) else bbox[2] * bbox[3]
    ann = {
        "id": len(state.annotations) + 1,
        "image_id": image_id,
        "category_id": state.cat_id[label],
        "bbox": bbox,
        "area": _r(area),
        "iscrowd": int(bool(box.iscrowd)),
        "segmentation": box.segmentation if box.segmentation is not None else [],
    }
    state.annotations.append(ann)
    state.per_category[label] += 1
    state.report.crowd += ann["iscrowd"]


def _refuse_xyxy_layout(state: _Build, ctx: ReadContext) -> None:
    """A COCO export whose ``bbox`` field holds [x1, y1, x2, y2]: clipping would be wrong."""
    found = xyxy_pattern(state.xywh_boxes)
    if found is None:
        return
    past, pattern = found
    n = len(state.xywh_boxes)
    raise ConversionError(
        f"{ctx.src}: {past} of {n} boxes run past the image edge and {pattern} of {n} have "
        "w > x and h > y with (w, h) inside the image: 'bbox' holds [x1, y1, x2, y2], not "
        "COCO's [x, y, width, height]. Fix: re-export as COCO, or convert the file with "
        "python tools/validate.py FILE --fix FIXED.json --xyxy and convert FIXED.json; "
        "nothing written"
    )


def _listed(items: list[str]) -> str:
    return "; ".join(items[:MAX_LISTED_NOTES]) + (" ..." if len(items) > MAX_LISTED_NOTES else "")


def _add_notes(state: _Build) -> None:
    report = state.report
    if state.clipped_notes:
        report.notes.append(
            f"{len(state.clipped_notes)} boxes partly outside their image were clipped: "
            + _listed(state.clipped_notes)
        )
    if state.clamped:
        report.notes.append(
            f"{state.clamped} boxes overshot the image border by at most "
            f"{CLIP_REPORT_PX} px (rounding) and were clamped to it"
        )
    embedded = sum(e.embedded is not None for e in state.kept)
    if embedded:
        report.notes.append(
            f"{embedded} images were missing on disk and taken from the label "
            "file's embedded image data"
        )
    renamed = sorted({f"{raw!r} -> {new!r}" for raw, new in state.rename.items() if raw != new})
    if renamed:
        report.notes.append("class names normalised: " + _listed(renamed))


def _coco_dict(state: _Build, result: ReadResult, ctx: ReadContext, fmt: str) -> dict[str, Any]:
    report = state.report
    report.images = len(state.images)
    report.boxes = len(state.annotations)
    report.categories = state.categories
    report.boxes_per_category = {n: state.per_category.get(n, 0) for n in state.categories}
    cat_id = state.cat_id
    return {
        "info": {
            "description": f"converted from a {fmt} export by tools/convert.py",
            "source_format": fmt,
            "source": str(ctx.src.resolve()),
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": "1.0",
        },
        "licenses": [],
        "images": state.images,
        "annotations": state.annotations,
        "categories": [
            {
                "id": cat_id[n],
                "name": n,
                "supercategory": result.supercategories.get(n, ""),
            }
            for n in state.categories
        ],
    }


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
