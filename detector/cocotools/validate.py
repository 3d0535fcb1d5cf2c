"""Check a COCO detection set against its image folder; list every problem; write a repaired copy.

``validate_coco`` is also the trainer's pre-flight check, so this module must not import torch and
its public names (``validate_coco``, ``ValidationReport``, ``Problem``) keep their signatures.

Errors make the set unusable or wrong for training (missing images, boxes in the wrong frame,
ambiguous ids); warnings deserve a look (boxes past the edge, unused classes); infos are facts
(negatives, crowd boxes). Every message names the record and says what to do.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile
from tqdm import tqdm

from ..coco_rules import (
    annotation_record_problem,
    area_of,
    box_position,
    clip_xywh,
    image_size,
    image_truncation,
    is_int_id,
    looks_xyxy,
    parse_bbox,
    placeholder_category_ids,
    xywh_problem,
    xyxy_pattern,
)
from ..coco_rules import name_key as normalize_name
from ..fileio import MAX_IMAGE_PIXELS, UnsafePathError
from .common import (
    CocoError,
    display_path,
    image_dir_for,
    list_image_files,
    safe_image_path,
)

_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXTENSIONS_OF_FORMAT = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "PNG": {".png"},
    "BMP": {".bmp"},
    "WEBP": {".webp"},
    "TIFF": {".tif", ".tiff"},
    "GIF": {".gif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},  # phone cameras write MPO (JPEG + preview) as .jpg
}


@dataclass
class Problem:
    """One finding; ``kind`` is a stable machine-readable tag, ``message`` says what to do."""

    kind: str
    message: str
    image_id: Any = None
    ann_id: Any = None
    file_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImageProbe:
    """What the file behind one image record looks like."""

    status: str  # ok | bad_record | unsafe | missing | unreadable | too_large
    path: Path | None = None
    size: tuple[int, int] | None = None  # (width, height) as displayed, EXIF rotation applied
    raw_size: tuple[int, int] | None = None  # (width, height) as stored in the file
    orientation: int = 1
    format: str | None = None
    detail: str = ""
    maybe_truncated: bool = False


@dataclass
class ValidationReport:
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    infos: list[Problem] = field(default_factory=list)
    annotations_path: Path | None = None
    images_dir: Path | None = None
    decoded: bool = False
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    images_found: int = 0
    # The parsed JSON and one probe per ``images[]`` entry (same order), for ``fix_coco``.
    data: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    probes: list[ImageProbe] = field(default_factory=list, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """No errors (warnings and infos allowed)."""
        return not self.errors

    def error(self, kind: str, message: str, **record: Any) -> None:
        self.errors.append(Problem(kind, message, **record))

    def warn(self, kind: str, message: str, **record: Any) -> None:
        self.warnings.append(Problem(kind, message, **record))

    def info(self, kind: str, message: str, **record: Any) -> None:
        self.infos.append(Problem(kind, message, **record))

    def kinds(self) -> Counter[str]:
        return Counter(p.kind for p in self.errors + self.warnings + self.infos)

    def summary(self) -> str:
        verdict = "OK" if self.ok else "NOT USABLE as is"
        return (
            f"{len(self.errors)} errors, {len(self.warnings)} warnings, {len(self.infos)} "
            f"infos: {verdict}"
        )

    def format(self, limit: int | None = 10) -> str:
        """Human-readable report; at most ``limit`` lines per kind (None: all)."""
        where = display_path(self.annotations_path) if self.annotations_path else "<data>"
        lines = [f"{where} (images: {display_path(self.images_dir) if self.images_dir else '?'})"]
        if self.data is not None:
            lines.append(
                f"  {self.num_images} images listed ({self.images_found} found"
                f"{', decoded' if self.decoded else ''}), {self.num_annotations} "
                f"annotations, {self.num_categories} categories"
            )
        for title, problems in (
            ("ERRORS", self.errors),
            ("WARNINGS", self.warnings),
            ("INFO", self.infos),
        ):
            lines.append(f"{title} ({len(problems)})")
            by_kind: dict[str, list[Problem]] = defaultdict(list)
            for p in problems:
                by_kind[p.kind].append(p)
            for kind, group in by_kind.items():
                lines.append(f"  [{kind}] x{len(group)}")
                shown = group if limit is None else group[:limit]
                lines.extend(f"    - {p.message}" for p in shown)
                if len(group) > len(shown):
                    lines.append(
                        f"    ... and {len(group) - len(shown)} more {kind} "
                        "(--all shows them, --json writes them)"
                    )
        lines.append(f"summary: {self.summary()}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "annotations": str(self.annotations_path) if self.annotations_path else None,
            "images_dir": str(self.images_dir) if self.images_dir else None,
            "decoded": self.decoded,
            "ok": self.ok,
            "counts": {
                "images": self.num_images,
                "images_found": self.images_found,
                "annotations": self.num_annotations,
                "categories": self.num_categories,
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "infos": len(self.infos),
            },
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
            "infos": [p.to_dict() for p in self.infos],
        }


# --------------------------------------------------------------------------------------------
# image files


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Pillow raises on truncated files only while LOAD_TRUNCATED_IMAGES is False."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def probe_image(path: Path, decode: bool = False) -> ImageProbe:
    """Read an image's header (and with ``decode`` its pixels) without raising."""
    if not path.is_file():
        return ImageProbe("missing", path)
    try:
        with _strict_truncation(), Image.open(path) as im:
            raw = im.size
            fmt = im.format
            try:
                orientation = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
            except Exception:  # a broken EXIF block is not a broken image
                orientation = 1
            if decode:
                im.load()
        cut = image_truncation(path) if decode else None
        if cut:
            return ImageProbe("unreadable", path, detail=cut)
    except Image.DecompressionBombError as e:
        return ImageProbe("too_large", path, detail=str(e))
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt data
        return ImageProbe("unreadable", path, detail=f"{type(e).__name__}: {e}")
    size = (raw[1], raw[0]) if orientation in _TRANSPOSING_ORIENTATIONS else raw
    probe = ImageProbe("ok", path, size, raw, orientation, fmt)
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        probe.status = "too_large"
        probe.detail = f"{size[0]}x{size[1]} is over the {MAX_IMAGE_PIXELS:,} pixel limit"
    elif not decode:
        probe.maybe_truncated = image_truncation(path) is not None
    return probe


def _fmt_box(box: Any) -> str:
    try:
        return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"
    except (TypeError, ValueError):
        return repr(box)


# --------------------------------------------------------------------------------------------
# validation


def validate_coco(
    annotations_path: str | Path,
    images_dir: str | Path | None = None,
    decode: bool = False,
    *,
    progress: bool = True,
) -> ValidationReport:
    """Check a COCO file and its images; never raises for bad data (it is all in the report).

    ``images_dir`` defaults to ``images/`` beside the JSON, else the JSON's folder. With ``decode``
    every image is fully decoded (slow; catches truncated files), else only headers are read.
    """
    path = Path(annotations_path)
    report = ValidationReport(
        annotations_path=path, images_dir=image_dir_for(path, images_dir), decoded=decode
    )
    if not path.is_file():
        report.error("file_missing", f"{path}: annotation file not found")
        return report
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        report.error(
            "json_invalid",
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
            f"{e.msg}); re-export the labels",
        )
        return report
    except UnicodeDecodeError as e:
        report.error("json_invalid", f"{path}: not UTF-8 text ({e}); is this a JSON file?")
        return report
    return validate_data(
        data, report.images_dir, decode, annotations_path=path, progress=progress, report=report
    )


def validate_data(
    data: Any,
    images_dir: str | Path,
    decode: bool = False,
    *,
    annotations_path: str | Path | None = None,
    progress: bool = True,
    report: ValidationReport | None = None,
) -> ValidationReport:
    """``validate_coco`` on an already parsed COCO dict."""
    if report is None:
        report = ValidationReport(
            annotations_path=Path(annotations_path) if annotations_path else None,
            images_dir=Path(images_dir).resolve(),
            decoded=decode,
        )
    if not isinstance(data, dict):
        report.error(
            "json_invalid",
            "the top level must be an object with 'images', "
            "'annotations' and 'categories'; is this a COCO file?",
        )
        return report
    lists: dict[str, list[Any]] = {}
    for key in ("images", "annotations", "categories"):
        value = data.get(key)
        if isinstance(value, list):
            lists[key] = value
            continue
        lists[key] = []
        if key == "annotations" and value is None:
            report.warn(
                "missing_key",
                "no 'annotations' list: every image is read as a negative "
                "(no boxes); was the export cut short?",
            )
        elif value is None:
            report.error(
                "missing_key", f"no '{key}' list at the top level; is this a COCO detection file?"
            )
        else:
            report.error("missing_key", f"'{key}' is a {type(value).__name__}, not a list")
    report.data = data
    report.num_images = len(lists["images"])
    report.num_annotations = len(lists["annotations"])
    report.num_categories = len(lists["categories"])

    cat_ids = _check_categories(report, lists["categories"])
    images_by_id = _check_images(report, lists["images"], progress)
    _check_unlisted(report, lists["images"])
    _check_annotations(report, lists["annotations"], images_by_id, cat_ids)
    return report


def _check_categories(report: ValidationReport, categories: list[Any]) -> dict[Any, str]:
    """Category records; returns id -> name of every category with an id."""
    if (
        not categories
        and report.data is not None
        and isinstance(report.data.get("categories"), list)
    ):
        report.error(
            "no_categories", "the 'categories' list is empty; a detector needs at least one class"
        )
    names: dict[Any, str] = {}
    by_name: dict[str, Any] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat:
            report.error(
                "bad_record",
                f"categories[{i}] has no id: {str(cat)[:80]}; give it a "
                "unique integer id (--fix drops it)",
            )
            continue
        cid, name = cat["id"], cat.get("name")
        if not is_int_id(cid):
            report.error(
                "bad_record",
                f"category id {cid!r} is not an integer; COCO category ids are integers",
            )
        if not isinstance(name, str) or not name.strip():
            report.error(
                "bad_record",
                f"category id {cid} has no name; name it (--fix calls it 'category_{cid}')",
            )
            name = f"category_{cid}"
        if cid in names:
            same = normalize_name(names[cid]) == normalize_name(name)
            action = (
                "--fix drops the repeated record"
                if same
                else "--fix renumbers the later one; its boxes cannot be told apart and stay "
                "with the first"
            )
            report.error(
                "duplicate_category_id",
                f"category id {cid} is used twice ({names[cid]!r} and {name!r}); boxes "
                f"with category_id {cid} are ambiguous; give each a unique id ({action})",
            )
            continue
        names[cid] = name
        key = normalize_name(name)
        if key in by_name:
            first = by_name[key]
            report.error(
                "duplicate_category_name",
                f"categories {first} {names[first]!r} and {cid} {name!r} have the same "
                f"name; the trainer refuses duplicate names (--fix merges {cid} into "
                f"{first})",
            )
        else:
            by_name[key] = cid
    return names


def _check_images(
    report: ValidationReport, images: list[Any], progress: bool
) -> dict[Any, ImageProbe]:
    """Image records and files; returns id -> probe of the first record of each id."""
    assert report.images_dir is not None
    image_dir = report.images_dir
    if not image_dir.is_dir():
        report.error("images_dir_missing", f"image folder {image_dir} not found; pass --images DIR")
    by_id: dict[Any, ImageProbe] = {}
    seen_names: dict[str, Any] = {}
    found = 0
    for i, rec in enumerate(
        tqdm(images, desc="images", unit="img", disable=not progress, leave=False)
    ):
        probe = _check_image(report, i, rec, images, by_id, seen_names)
        report.probes.append(probe)
        if isinstance(rec, dict) and "id" in rec:
            by_id.setdefault(rec["id"], probe)
        found += probe.status in ("ok", "too_large", "unreadable")
    report.images_found = found
    if images and found == 0 and image_dir.is_dir():
        report.errors.insert(
            0,
            Problem(
                "wrong_image_dir",
                f"none of the {len(images)} listed images is in {image_dir}; is "
                "that the right image folder? (pass --images DIR)",
            ),
        )
    return by_id


def _check_image(
    report: ValidationReport,
    i: int,
    rec: Any,
    images: list[Any],
    by_id: dict[Any, ImageProbe],
    seen_names: dict[str, Any],
) -> ImageProbe:
    """One image record: its id and file name, then the file behind it."""
    assert report.images_dir is not None
    if not isinstance(rec, dict) or "id" not in rec:
        report.error(
            "bad_record",
            f"images[{i}] has no id: {str(rec)[:80]}; give it a unique integer id (--fix drops it)",
        )
        return ImageProbe("bad_record")
    image_id, name = rec["id"], rec.get("file_name")
    rid: dict[str, Any] = {
        "image_id": image_id,
        "file_name": name if isinstance(name, str) else None,
    }
    label = f"image id {image_id!r} ({name})"
    _check_image_id(report, rec, images, by_id, label, rid)
    if not isinstance(name, str) or not name.strip():
        report.error("bad_record", f"image id {image_id} has no file_name (--fix drops it)", **rid)
        return ImageProbe("bad_record")
    try:
        path = safe_image_path(report.images_dir, name, image_id)
    except UnsafePathError as e:
        report.error(
            "unsafe_path",
            f"{e}. Name images relative to the image folder and "
            "keep them inside it (--fix drops the record)",
            **rid,
        )
        return ImageProbe("unsafe", detail=str(e))
    _report_symlink(report, path, label, rid)
    if str(path) in seen_names:
        report.warn(
            "duplicate_file_name",
            f"{label}: the same file is also listed as image id {seen_names[str(path)]}; "
            "one photo twice can land in both train and val; remove one record",
            **rid,
        )
    else:
        seen_names[str(path)] = image_id
    probe = probe_image(path, report.decoded)
    _report_probe(report, rec, probe, label, rid)
    return probe


def _check_image_id(
    report: ValidationReport,
    rec: dict[str, Any],
    images: list[Any],
    by_id: dict[Any, ImageProbe],
    label: str,
    rid: dict[str, Any],
) -> None:
    image_id = rec["id"]
    if not is_int_id(image_id):
        report.error(
            "bad_image_id",
            f"{label}: the id is not an integer; COCO image ids are integers and the "
            "trainer needs them (--fix renumbers the image and its boxes)",
            **rid,
        )
    if image_id in by_id:
        first = images[_first_index(images, image_id)]
        same = first.get("file_name") == rec.get("file_name")
        report.error(
            "duplicate_image_id",
            f"{label}: id {image_id} is also used by {first.get('file_name')!r}; "
            "boxes with this image_id are ambiguous; give each image a unique id "
            + (
                "(--fix drops the repeated record)"
                if same
                else "(--fix renumbers the later one; it keeps no boxes: re-label it)"
            ),
            **rid,
        )


def _report_symlink(report: ValidationReport, path: Path, label: str, rid: dict[str, Any]) -> None:
    """An image that is a symlink out of the image folder (tools/convert.py --link makes them):
    read through, never written through; a moved source breaks it."""
    assert report.images_dir is not None
    if not path.is_symlink():
        return
    target = path.resolve()
    root = report.images_dir.resolve()
    if target != root and root not in target.parents:
        report.info(
            "symlink_outside",
            f"{label}: a symlink to {target}, outside the image folder; it breaks if that "
            "file moves (convert without --link to copy the images)",
            **rid,
        )


def _first_index(images: list[Any], image_id: Any) -> int:
    return next(i for i, r in enumerate(images) if isinstance(r, dict) and r.get("id") == image_id)


def _report_probe(
    report: ValidationReport,
    rec: dict[str, Any],
    probe: ImageProbe,
    label: str,
    rid: dict[str, Any],
) -> None:
    where = display_path(report.images_dir) if report.images_dir else "the image folder"
    if probe.status == "missing":
        report.error(
            "missing_image",
            f"{label}: listed but not found in {where}; restore the file "
            "or remove the record (--fix drops it and its boxes)",
            **rid,
        )
        return
    if probe.status == "unreadable":
        report.error(
            "unreadable_image",
            f"{label}: cannot be read ({probe.detail}); re-export or "
            "re-download it (--fix drops it and its boxes)",
            **rid,
        )
        return
    if probe.status == "too_large":
        report.error(
            "image_too_large",
            f"{label}: {probe.detail or 'too large'}; downscale it and its boxes (--fix drops it)",
            **rid,
        )
        return
    stored = _report_size(report, rec, probe, label, rid)
    if probe.orientation not in (1, 0) and (stored is None or stored == probe.size):
        report.info(
            "exif_orientation",
            f"{label}: displayed with EXIF orientation {probe.orientation}; if boxes look "
            "rotated or mirrored in tools/show.py, the labelling tool ignored EXIF",
            **rid,
        )
    if probe.maybe_truncated:
        report.warn(
            "maybe_truncated",
            f"{label}: the file has no end marker, it may be truncated; "
            "run with --decode to check it",
            **rid,
        )
    suffix = Path(str(rec.get("file_name"))).suffix.lower()
    allowed = _EXTENSIONS_OF_FORMAT.get(probe.format or "")
    if allowed is not None and suffix not in allowed:
        report.info(
            "wrong_extension",
            f"{label}: the file is {probe.format} despite its "
            f"'{suffix}' name (readable, but confusing)",
            **rid,
        )


def _report_size(
    report: ValidationReport,
    rec: dict[str, Any],
    probe: ImageProbe,
    label: str,
    rid: dict[str, Any],
) -> tuple[int, int] | None:
    """The record's width/height against the file's displayed size; returns the stored size."""
    assert probe.size is not None and probe.raw_size is not None
    width, height = probe.size
    stored = image_size(rec)
    if stored is None:
        report.error(
            "bad_image_size",
            f"{label}: width/height missing or not positive whole numbers "
            f"({rec.get('width')!r} x {rec.get('height')!r}); the file is {width}x{height} "
            "(--fix sets it)",
            **rid,
        )
    elif stored != probe.size:
        if probe.orientation in _TRANSPOSING_ORIENTATIONS and stored == probe.raw_size:
            report.error(
                "size_mismatch",
                f"{label}: the JSON stores the raw, un-rotated size {stored[0]}x{stored[1]}, but "
                f"EXIF orientation {probe.orientation} turns it by 90 degrees: it is displayed and "
                f"trained as {width}x{height}. Boxes drawn on the un-rotated image are in the wrong "
                f"frame: check with tools/show.py --ids {rec.get('id')} (--fix sets the displayed "
                "size but does not rotate boxes)",
                **rid,
            )
        else:
            report.error(
                "size_mismatch",
                f"{label}: the JSON says {stored[0]}x{stored[1]} but the file is {width}x{height}"
                f"{' as displayed (EXIF rotation applied)' if probe.orientation != 1 else ''}; "
                "boxes may belong to another copy of the image (--fix sets the size from the file; "
                "check the boxes with tools/show.py)",
                **rid,
            )
    return stored


def _sibling_listed(report: ValidationReport) -> tuple[set[str], list[str]]:
    """Files listed by other COCO files in the same folder sharing the image folder (splits)."""
    listed: set[str] = set()
    names: list[str] = []
    path = report.annotations_path
    if path is None or report.images_dir is None:
        return listed, names
    for other in sorted(path.resolve().parent.glob("*.json")):
        if other == path.resolve() or other.stat().st_size > 200_000_000:
            continue
        try:
            with open(other, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            continue
        before = len(listed)
        for rec in data["images"]:
            if isinstance(rec, dict) and isinstance(rec.get("file_name"), str):
                with contextlib.suppress(UnsafePathError):
                    listed.add(str(safe_image_path(report.images_dir, rec["file_name"])))
        if len(listed) > before:
            names.append(other.name)
    return listed, names


def _check_unlisted(report: ValidationReport, images: list[Any]) -> None:
    if report.images_dir is None or not report.images_dir.is_dir():
        return
    listed = {str(p.path) for p in report.probes if p.path is not None}
    unlisted = [p for p in list_image_files(report.images_dir) if str(p) not in listed]
    if not unlisted:
        return
    sibling, sibling_names = _sibling_listed(report)
    by_sibling = [p for p in unlisted if str(p) in sibling]
    if by_sibling:
        report.info(
            "listed_by_sibling",
            f"{len(by_sibling)} files of the image folder are listed by "
            f"{', '.join(sibling_names)} beside this file (splits sharing the folder)",
        )
    for p in unlisted:
        if str(p) in sibling:
            continue
        rel = p.relative_to(report.images_dir).as_posix()
        report.warn(
            "unlisted_image",
            f"{rel}: in the image folder but not listed; label it or move it out (it is not used)",
            file_name=rel,
        )


@dataclass
class _AnnotationTally:
    """What the annotation checks count on the way, for the set-level findings."""

    records: dict[Any, dict[str, Any]]  # image id -> first image record
    cat_names: dict[Any, str]
    images_by_id: dict[Any, ImageProbe]
    boxes_per_image: Counter[Any] = field(default_factory=Counter)
    boxes_per_cat: Counter[Any] = field(default_factory=Counter)
    seen_ids: set[Any] = field(default_factory=set)
    crowd: int = 0
    frame_boxes: list[tuple[tuple[float, float, float, float], int, int]] = field(
        default_factory=list
    )


def _check_annotations(
    report: ValidationReport,
    annotations: list[Any],
    images_by_id: dict[Any, ImageProbe],
    cat_names: dict[Any, str],
) -> None:
    images = report.data.get("images", []) if report.data else []
    records: dict[Any, dict[str, Any]] = {}
    for rec in images if isinstance(images, list) else []:
        if isinstance(rec, dict) and "id" in rec:
            records.setdefault(rec["id"], rec)
    tally = _AnnotationTally(records, cat_names, images_by_id)
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            report.error(
                "bad_record", f"annotations[{i}] is not an object: {str(ann)[:80]} (--fix drops it)"
            )
            continue
        _check_annotation(report, i, ann, tally)
    _check_xyxy(report, tally.frame_boxes)
    if tally.crowd:
        report.info(
            "crowd_boxes",
            f"{tally.crowd} iscrowd boxes: left out of training, used as "
            "'ignore' regions by COCO evaluation",
        )
    _report_empty_categories(report, annotations, tally)
    _report_negatives(report, tally)


def _check_annotation(
    report: ValidationReport, i: int, ann: dict[str, Any], tally: _AnnotationTally
) -> None:
    """One annotation: its ids, its image and category, then its box."""
    ann_id, image_id = ann.get("id"), ann.get("image_id")
    rec = tally.records.get(image_id)
    name = rec.get("file_name") if rec else None
    rid = {
        "image_id": image_id,
        "ann_id": ann_id,
        "file_name": name if isinstance(name, str) else None,
    }
    label = f"annotation {ann_id} (image {image_id!r}{', ' + str(name) if name else ''})"
    problem = annotation_record_problem(ann)
    if problem:
        report.error("bad_record", f"{label}: {problem} (--fix drops the box)", **rid)
        return
    if "id" not in ann:
        report.error(
            "bad_record",
            f"annotations[{i}] (image {image_id}) has no id (--fix gives it one)",
            **rid,
        )
    elif ann_id in tally.seen_ids:
        report.error(
            "duplicate_ann_id",
            f"{label}: annotation id {ann_id} is used more than "
            "once; give each box a unique id (--fix renumbers)",
            **rid,
        )
    tally.seen_ids.add(ann_id)
    if rec is None:
        report.error(
            "unknown_image_id",
            f"{label}: image_id {image_id!r} is not in 'images' (--fix drops the box)",
            **rid,
        )
        return
    tally.boxes_per_image[image_id] += 1
    cid = ann.get("category_id")
    if cid not in tally.cat_names:
        known = ", ".join(str(c) for c in list(tally.cat_names)[:20])
        report.error(
            "unknown_category",
            f"{label}: category_id {cid!r} is not in 'categories' (known: {known}); correct the "
            "id or add the category (--fix drops the box)",
            **rid,
        )
    else:
        tally.boxes_per_cat[cid] += 1
    tally.crowd += bool(ann.get("iscrowd"))
    _check_box(report, ann, label, rid, _frame_of(tally.images_by_id.get(image_id), rec), tally)


def _check_box(
    report: ValidationReport,
    ann: dict[str, Any],
    label: str,
    rid: dict[str, Any],
    frame: tuple[int, int] | None,
    tally: _AnnotationTally,
) -> None:
    """The bbox: four finite numbers, positive size, inside the image (``coco_rules``)."""
    box = parse_bbox(ann.get("bbox"))
    if box is None:
        report.error(
            "bad_bbox",
            f"{label}: bbox {ann.get('bbox')!r} is not four numbers "
            "[x, y, width, height] (--fix drops it)",
            **rid,
        )
        return
    box_problem = xywh_problem(box)
    if box_problem is not None:
        what = (
            "has NaN/infinite values"
            if box_problem == "box_nan"
            else "has zero or negative width/height"
        )
        report.error(box_problem, f"{label}: bbox {_fmt_box(box)} {what} (--fix drops it)", **rid)
        return
    if area_of(ann) is None:
        report.warn(
            "missing_area",
            f"{label}: no usable 'area' (COCO evaluation needs it: the trainer fills it "
            "from the box, --fix writes width*height)",
            **rid,
        )
    if frame is None:
        return
    width, height = frame
    tally.frame_boxes.append((box, width, height))
    where, over = box_position(box, width, height)
    if where == "outside":
        report.error(
            "box_outside",
            f"{label}: bbox {_fmt_box(box)} lies entirely outside "
            f"the {width}x{height} image (--fix drops it)",
            **rid,
        )
    elif where == "past" and looks_xyxy(box, width, height):
        report.warn(
            "box_looks_xyxy",
            f"{label}: bbox {_fmt_box(box)} runs {over:.1f} px past the edge of the "
            f"{width}x{height} image, but read as [x1, y1, x2, y2] it lies inside it: it "
            "was probably stored as corners, not [x, y, width, height]. Correct this box "
            "in the labels (--fix would clip it to a wrong box)",
            **rid,
        )
    elif where == "past":
        report.warn(
            "box_past_edge",
            f"{label}: bbox {_fmt_box(box)} runs {over:.1f} px past "
            f"the edge of the {width}x{height} image (--fix clips it)",
            **rid,
        )


def _report_empty_categories(
    report: ValidationReport, annotations: list[Any], tally: _AnnotationTally
) -> None:
    placeholders = placeholder_category_ids(
        (report.data or {}).get("categories") or [], annotations
    )
    for cid, cname in tally.cat_names.items():
        if tally.boxes_per_cat[cid]:
            continue
        if cid in placeholders:
            report.warn(
                "empty_category",
                f"category {cid} {cname!r} has no boxes and is the "
                "supercategory of all the others: Roboflow's placeholder; "
                "drop it (--fix does)",
            )
        else:
            report.warn(
                "empty_category",
                f"category {cid} {cname!r} has no boxes: the model gets "
                "a class it never sees; drop it unless another set adds "
                "boxes",
            )


def _report_negatives(report: ValidationReport, tally: _AnnotationTally) -> None:
    for image_id, rec in tally.records.items():
        if tally.boxes_per_image[image_id]:
            continue
        probe = tally.images_by_id.get(image_id)
        if probe is not None and probe.status != "ok":
            continue
        report.info(
            "negative",
            f"image id {image_id} ({rec.get('file_name')}) has no boxes: "
            "trained as a negative (background only); label it if it "
            "shows objects",
            image_id=image_id,
            file_name=rec.get("file_name"),
        )


def _frame_of(probe: ImageProbe | None, rec: dict[str, Any]) -> tuple[int, int] | None:
    """The size boxes are checked against: the file's displayed size, else the JSON's."""
    if probe is not None and probe.size is not None:
        return probe.size
    return image_size(rec)


def _check_xyxy(
    report: ValidationReport, boxes: list[tuple[tuple[float, float, float, float], int, int]]
) -> None:
    """Boxes stored as [x1, y1, x2, y2]: x + w runs past the edge for many, while w > x, h > y
    and (w, h) read as a corner falls inside the image for nearly all of them."""
    found = xyxy_pattern(boxes)
    if found is None:
        return
    past, pattern = found
    n = len(boxes)
    report.warn(
        "bbox_looks_xyxy",
        f"{past} of {n} boxes run past the image edge, and {pattern} of {n} have "
        "w > x and h > y with (w, h) inside the image: 'bbox' probably holds "
        "[x1, y1, x2, y2] instead of COCO's [x, y, width, height]. Re-convert the "
        "labels, or --fix --xyxy converts them (plain --fix would clip them wrongly)",
    )


# --------------------------------------------------------------------------------------------
# repair


@dataclass
class FixResult:
    data: dict[str, Any]
    changes: list[str]
    dropped_images: int = 0
    dropped_annotations: int = 0


def fix_coco(report: ValidationReport, *, xyxy: bool = False) -> FixResult:
    """A repaired copy of the validated data; ``changes`` lists every change made.

    Drops image records that are unsafe, missing, unreadable or too large (and their boxes);
    sets width/height from the file; keeps the first of repeated ids and renumbers the others;
    merges categories of the same name; drops Roboflow's placeholder category; drops boxes that
    are malformed, NaN, empty, entirely outside the image or of an unknown image/category; clips
    boxes past the edge; fills a missing ``area``. With ``xyxy`` every bbox is first read as
    [x1, y1, x2, y2] and converted. The input is not modified.
    """
    if report.data is None or not isinstance(report.data, dict):
        raise CocoError(
            "cannot repair: the file is not a readable COCO JSON object "
            f"({report.errors[0].message if report.errors else 'no data'})"
        )
    src = report.data
    if not isinstance(src.get("images"), list) or not isinstance(src.get("categories"), list):
        raise CocoError("cannot repair: the file has no 'images' or 'categories' list")
    data = copy.deepcopy(src)
    changes: list[str] = []
    categories, cat_remap = _fix_categories(data, src, changes)
    images, sizes, dropped_images, image_remap = _fix_images(data, report, changes)
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict) and not is_int_id(ann.get("image_id")):
            ann["image_id"] = image_remap.get(ann.get("image_id"), ann.get("image_id"))
    annotations, dropped_anns = _fix_annotations(
        data, sizes, {c["id"] for c in categories}, cat_remap, xyxy, changes
    )
    data["categories"], data["images"], data["annotations"] = categories, images, annotations
    return FixResult(data, changes, dropped_images, dropped_anns)


def _next_id(records: list[Any]) -> Iterator[int]:
    ints = [
        r["id"]
        for r in records
        if isinstance(r, dict)
        and isinstance(r.get("id"), int)
        and not isinstance(r.get("id"), bool)
    ]
    start = max(ints, default=0) + 1
    while True:
        yield start
        start += 1


def _fix_categories(
    data: dict[str, Any], src: dict[str, Any], changes: list[str]
) -> tuple[list[dict[str, Any]], dict[Any, Any]]:
    placeholders = placeholder_category_ids(src["categories"], src.get("annotations") or [])
    new_ids = _next_id(data["categories"])
    kept: list[dict[str, Any]] = []
    by_id: dict[Any, dict[str, Any]] = {}
    by_name: dict[str, dict[str, Any]] = {}
    remap: dict[Any, Any] = {}
    used = Counter(
        a.get("category_id") for a in data.get("annotations") or [] if isinstance(a, dict)
    )
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            changes.append(f"dropped categories[{i}]: no id")
            continue
        if cat["id"] in placeholders:
            changes.append(
                f"dropped category {cat['id']} {cat.get('name')!r}: Roboflow's "
                "placeholder superclass, no boxes"
            )
            continue
        if not isinstance(cat.get("name"), str) or not cat["name"].strip():
            cat["name"] = f"category_{cat['id']}"
            changes.append(f"category {cat['id']}: no name, named {cat['name']!r}")
        key = normalize_name(cat["name"])
        if cat["id"] in by_id:
            first = by_id[cat["id"]]
            if normalize_name(first["name"]) == key:
                changes.append(f"dropped repeated category record {cat['id']} {cat['name']!r}")
                continue
            old, cat["id"] = cat["id"], next(new_ids)
            changes.append(
                f"category {cat['name']!r}: id {old} was also {first['name']!r}; "
                f"renumbered to {cat['id']} (boxes with category_id {old} stay "
                f"{first['name']!r}: re-label this class)"
            )
        if key in by_name:
            first = by_name[key]
            remap[cat["id"]] = first["id"]
            changes.append(
                f"merged category {cat['id']} {cat['name']!r} into {first['id']} "
                f"{first['name']!r} ({used[cat['id']]} boxes moved)"
            )
            continue
        by_id[cat["id"]] = cat
        by_name[key] = cat
        kept.append(cat)
    return kept, remap


def _fix_images(
    data: dict[str, Any], report: ValidationReport, changes: list[str]
) -> tuple[list[dict[str, Any]], dict[Any, tuple[int, int]], int, dict[Any, int]]:
    new_ids = _next_id(data["images"])
    remap: dict[Any, int] = {}  # non-integer image id -> its new id
    kept: list[dict[str, Any]] = []
    sizes: dict[Any, tuple[int, int]] = {}
    names: dict[Any, Any] = {}
    dropped = 0
    reasons = {
        "bad_record": "no id or file_name",
        "unsafe": "file_name escapes the image folder",
        "missing": "file not found",
        "unreadable": "file cannot be read",
        "too_large": "image too large",
    }
    for i, rec in enumerate(data["images"]):
        probe = report.probes[i] if i < len(report.probes) else ImageProbe("bad_record")
        label = (
            f"image id {rec.get('id')} ({rec.get('file_name')})"
            if isinstance(rec, dict)
            else f"images[{i}]"
        )
        if probe.status != "ok":
            changes.append(f"dropped {label}: {reasons.get(probe.status, probe.status)}")
            dropped += 1
            continue
        assert probe.size is not None
        if image_size(rec) != probe.size:
            changes.append(
                f"{label}: width x height {rec.get('width')} x {rec.get('height')} -> "
                f"{probe.size[0]} x {probe.size[1]} (from the file)"
            )
            rec["width"], rec["height"] = probe.size
        if not is_int_id(rec["id"]):
            old, rec["id"] = rec["id"], next(new_ids)
            remap.setdefault(old, rec["id"])
            changes.append(f"{label}: id {old!r} is not an integer; renumbered to {rec['id']}")
        if rec["id"] in sizes:
            if names[rec["id"]] == rec.get("file_name"):
                changes.append(f"dropped repeated record of {label}")
                dropped += 1
                continue
            old, rec["id"] = rec["id"], next(new_ids)
            changes.append(
                f"{label}: id {old} was also {names[old]!r}; renumbered to "
                f"{rec['id']}; its boxes cannot be told apart and stay with "
                f"{names[old]!r}: re-label it"
            )
        sizes[rec["id"]] = probe.size
        names[rec["id"]] = rec.get("file_name")
        kept.append(rec)
    return kept, sizes, dropped, remap


def _fix_annotations(
    data: dict[str, Any],
    sizes: dict[Any, tuple[int, int]],
    cat_ids: set[Any],
    cat_remap: dict[Any, Any],
    xyxy: bool,
    changes: list[str],
) -> tuple[list[dict[str, Any]], int]:
    anns = data.get("annotations")
    anns = anns if isinstance(anns, list) else []
    new_ids = _next_id(anns)
    kept: list[dict[str, Any]] = []
    seen: set[Any] = set()
    dropped = 0
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            changes.append(f"dropped annotations[{i}]: not an object")
            dropped += 1
            continue
        label = f"annotation {ann.get('id')} (image {ann.get('image_id')})"
        size = sizes.get(ann.get("image_id"))
        cid = cat_remap.get(ann.get("category_id"), ann.get("category_id"))
        if size is None:
            reason = "its image is not in the fixed set"
        elif cid not in cat_ids:
            reason = f"unknown category_id {ann.get('category_id')!r}"
        else:
            reason = _fix_box(ann, size, xyxy, label, changes)
        if reason is not None:
            changes.append(f"dropped {label}: {reason}")
            dropped += 1
            continue
        ann["category_id"] = cid
        if area_of(ann) is None:
            box = parse_bbox(ann["bbox"])
            assert box is not None  # _fix_box kept it
            ann["area"] = box[2] * box[3]
            changes.append(f"{label}: area set to {ann['area']:g} (width*height)")
        if "id" not in ann or ann["id"] in seen:
            old, ann["id"] = ann.get("id"), next(new_ids)
            changes.append(
                f"{label}: id {old!r} {'missing' if old is None else 'repeated'}; "
                f"renumbered to {ann['id']}"
            )
        seen.add(ann["id"])
        kept.append(ann)
    return kept, dropped


def _fix_box(
    ann: dict[str, Any], size: tuple[int, int], xyxy: bool, label: str, changes: list[str]
) -> str | None:
    """Repair ``ann["bbox"]`` in place (xyxy conversion, clipping); why it is dropped, or None."""
    box = parse_bbox(ann.get("bbox"))
    if box is None:
        return f"malformed bbox {ann.get('bbox')!r}"
    if xywh_problem(box) == "box_nan":
        return f"NaN/infinite bbox {_fmt_box(box)}"
    if xyxy:
        x1, y1, x2, y2 = box
        converted = (min(x1, x2), min(y1, y2), abs(x2 - x1), abs(y2 - y1))
        changes.append(
            f"{label}: bbox {_fmt_box(box)} read as x1,y1,x2,y2 -> {_fmt_box(converted)}"
        )
        box = converted
        ann["bbox"] = list(box)
        ann["area"] = box[2] * box[3]
    if xywh_problem(box) == "box_empty":
        return f"zero or negative width/height {_fmt_box(box)}"
    where, _ = box_position(box, *size)
    if where == "outside":
        return f"bbox {_fmt_box(box)} entirely outside the {size[0]}x{size[1]} image"
    if where == "past":
        clipped = clip_xywh(box, *size)
        changes.append(f"{label}: bbox {_fmt_box(box)} clipped to {_fmt_box(clipped)}")
        ann["bbox"] = [round(v, 2) for v in clipped]
        box = parse_bbox(ann["bbox"])
        if box is None or xywh_problem(box) is not None:
            return "nothing left after clipping"
        if area_of(ann) is not None:
            ann["area"] = min(float(ann["area"]), box[2] * box[3])
    return None
