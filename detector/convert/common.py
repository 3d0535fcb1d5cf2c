"""Shared pieces of the label converters: records, errors, safe parsing and image lookup.

Every reader turns one export into a :class:`ReadResult`: a list of :class:`ImageEntry` (a
resolved image file plus its boxes in **pixel xyxy**, continuous coordinates with the origin at
the top-left corner of the top-left pixel, i.e. COCO's convention) and the records it had to
drop, each as a :class:`Skipped` (file, record, reason). The builder (``build.py``) does the
rest: image sizes, clipping, category ids, output names and the atomic write.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..coco_rules import normalised_problem
from ..fileio import ImageReadError, UnsafePathError, exif_image_size, resolve_inside

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ConversionError(ValueError):
    """The export cannot be converted; the message names the file and the record. Nothing written."""


class FormatDetectionError(ConversionError):
    """The source matches no known format, or more than one; ``candidates`` lists what matched."""

    def __init__(self, message: str, candidates: list[str] | None = None):
        super().__init__(message)
        self.candidates = candidates or []


@dataclass
class Box:
    """One object, in pixels (xyxy, continuous coordinates, origin at the image's top-left corner)."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    record: str  # where it came from, for the report: "object 3", "line 7", "task 12 result ab"
    iscrowd: int = 0
    area: float | None = None  # kept from COCO inputs (segment area) when the box is not clipped
    segmentation: Any = None  # kept from COCO inputs


@dataclass
class ImageEntry:
    """An image of the export with its boxes. ``path`` is the image file (resolved, inside the
    image folder); ``embedded`` holds the image bytes when the file is absent but the label file
    carries the image (LabelMe ``imageData``)."""

    path: Path
    label_file: Path
    record: str
    boxes: list[Box] = field(default_factory=list)
    declared_size: tuple[int, int] | None = None  # (width, height) the label file states
    embedded: bytes | None = None
    # Box coordinates: pixels, or a "fraction" / "percent" of the image size (YOLO, AutoML,
    # Label Studio), scaled by the builder once it has read the image's size.
    units: str = "px"

    def scale_boxes(self, width: int, height: int) -> None:
        per = {"px": None, "fraction": 1.0, "percent": 100.0}[self.units]
        if per is None:
            return
        for b in self.boxes:
            b.x0, b.x1 = b.x0 * width / per, b.x1 * width / per
            b.y0, b.y1 = b.y0 * height / per, b.y1 * height / per
        self.units = "px"


@dataclass
class Skipped:
    file: str
    record: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.reason}"


@dataclass
class ReadResult:
    images: list[ImageEntry]
    categories: list[str] | None  # the order the export defines; None = order of first appearance
    sources: list[Path]  # the annotation files read (never written to)
    image_roots: list[Path]  # the folders images were looked up in
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    supercategories: dict[str, str] = field(default_factory=dict)
    boxes_are_xywh: bool = False  # the export stores [x, y, w, h] (COCO): check for xyxy

    def add_image(
        self,
        path: Path | None,
        label_file: Path,
        record: str,
        boxes: list[Box],
        declared_size: tuple[int, int] | None = None,
        *,
        looked_in: str = "",
        embedded: bytes | None = None,
        units: str = "px",
    ) -> None:
        """Keep the image with its boxes, or list it as skipped when its file was not found."""
        if path is None:
            self.skipped.append(
                Skipped(
                    str(label_file),
                    record,
                    f"image file not found in {looked_in}; its {len(boxes)} boxes skipped",
                )
            )
            return
        self.images.append(
            ImageEntry(path, label_file, record, boxes, declared_size, embedded, units)
        )


@dataclass
class ReadContext:
    """What a reader gets: the source, the optional image folder and class names, and a cached
    image-size lookup (width, height as displayed, EXIF rotation applied)."""

    src: Path
    images: Path | None = None
    names: list[str] | None = None
    _sizes: dict[Path, tuple[int, int]] = field(default_factory=dict, repr=False)
    include_predictions: bool = False  # Label Studio: read a task's prediction as its labels

    @property
    def root(self) -> Path:
        """The folder holding the export (``src`` itself, or the folder of a source file)."""
        return self.src if self.src.is_dir() else self.src.parent

    def size(self, path: Path, label_file: Path | str, record: str) -> tuple[int, int]:
        if path not in self._sizes:
            try:
                self._sizes[path] = exif_image_size(path)
            except ImageReadError as e:
                raise ConversionError(f"{label_file}: {record}: {e}") from None
        return self._sizes[path]


# --------------------------------------------------------------------------------------------
# Parsing with errors that name the file (and the line where the parser knows it).


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None


def load_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise ConversionError(f"{path}: malformed XML at line {line}, column {col}: {e}") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None


def read_csv_rows(path: Path) -> list[list[str]]:
    """All rows of a CSV file; a malformed file raises with its line number."""
    rows: list[list[str]] = []
    start = 1  # the line the row being read starts on (a quoted field may span lines)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            for row in reader:
                rows.append(row)
                start = reader.line_num + 1
        return rows
    except csv.Error as e:
        raise ConversionError(
            f"{path}: malformed CSV in the row starting at line {start}: {e} (an unclosed "
            "quote or a stray quote character?)"
        ) from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None


def read_text_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None


def number(value: Any, file: Path | str, record: str, what: str) -> float:
    """A finite float from a label field, or a ConversionError naming file, record and field."""
    if isinstance(value, bool):
        raise ConversionError(f"{file}: {record}: {what} is {value!r}, not a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"{file}: {record}: {what} is {value!r}, not a number") from None
    if not math.isfinite(out):
        raise ConversionError(f"{file}: {record}: {what} is {value!r}, not a finite number")
    return out


def check_normalised(values: list[float], file: Path | str, record: str) -> None:
    """Refuse pixel values in a format that stores fractions of the image (layout problem)."""
    problem = normalised_problem(values)
    if problem:
        raise ConversionError(f"{file}: {record}: {problem}; nothing written")


def xml_number(elem: ET.Element, tag: str, file: Path, record: str) -> float:
    text = elem.findtext(tag)
    if text is None:
        raise ConversionError(f"{file}: {record}: missing <{tag}>")
    return number(text.strip(), file, record, f"<{tag}>")


def xml_attr_number(elem: ET.Element, name: str, file: Path, record: str) -> float:
    if name not in elem.attrib:
        raise ConversionError(f"{file}: {record}: missing attribute {name!r}")
    return number(elem.attrib[name], file, record, f"attribute {name!r}")


def points_box(xs: Iterable[float], ys: Iterable[float]) -> tuple[float, float, float, float]:
    xs, ys = list(xs), list(ys)
    return min(xs), min(ys), max(xs), max(ys)


def rotated_rect_box(
    cx: float, cy: float, w: float, h: float, degrees: float
) -> tuple[float, float, float, float]:
    """Axis-aligned box around a ``w`` x ``h`` rectangle centred on (cx, cy), rotated."""
    t = math.radians(degrees)
    half_w = (abs(w * math.cos(t)) + abs(h * math.sin(t))) / 2
    half_h = (abs(w * math.sin(t)) + abs(h * math.cos(t))) / 2
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def rotated_ellipse_box(
    cx: float, cy: float, rx: float, ry: float, radians: float
) -> tuple[float, float, float, float]:
    """Axis-aligned box around an ellipse with radii (rx, ry) rotated by ``radians``."""
    c, s = math.cos(radians), math.sin(radians)
    half_w = math.sqrt((rx * c) ** 2 + (ry * s) ** 2)
    half_h = math.sqrt((rx * s) ** 2 + (ry * c) ** 2)
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


# --------------------------------------------------------------------------------------------
# Files and images.


def walk_files(root: Path, suffixes: tuple[str, ...], max_depth: int = 6) -> list[Path]:
    """Files under ``root`` (sorted, hidden folders skipped) whose suffix is in ``suffixes``."""
    out: list[Path] = []
    root = Path(root)
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if len(Path(dirpath).parts) - base_depth >= max_depth:
            dirnames[:] = []
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(suffixes):
                out.append(Path(dirpath) / name)
    return out


def natural_key(path: Path | str) -> list[Any]:
    """Sort key that orders ``img2`` before ``img10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


class ImageFinder:
    """Look up image names taken from label files inside a set of allowed image folders.

    Every lookup goes through :func:`resolve_inside`, so ``../x.jpg`` or ``/etc/x.jpg`` in a label
    file is refused (ConversionError naming the label file and record) instead of read.
    """

    def __init__(self, roots: Iterable[Path]):
        seen: list[Path] = []
        for r in roots:
            r = Path(r)
            if r.is_dir() and r.resolve() not in [s.resolve() for s in seen]:
                seen.append(r)
        self.roots = seen
        self._by_name: dict[str, list[Path]] | None = None

    def find(self, name: str, label_file: Path | str, record: str) -> Path | None:
        """The image ``name`` (relative, may contain sub-folders) in the first root holding it."""
        for root in self.roots:
            try:
                path = resolve_inside(root, name, "image name")
            except UnsafePathError as e:
                raise ConversionError(f"{label_file}: {record}: {e}") from None
            if path.is_file():
                return path
        return None

    def by_basename(self, name: str) -> list[Path]:
        """All images anywhere under the roots whose file name is ``name`` (case-sensitive)."""
        if self._by_name is None:
            self._by_name = {}
            for root in self.roots:
                for p in walk_files(root, IMAGE_EXTENSIONS):
                    self._by_name.setdefault(p.name, []).append(p.resolve())
        return list(dict.fromkeys(self._by_name.get(name, [])))

    def describe(self) -> str:
        return " or ".join(str(r) for r in self.roots) or "(no existing image folder)"

    def all_images(self) -> Iterator[Path]:
        for root in self.roots:
            yield from walk_files(root, IMAGE_EXTENSIONS)


def check_name_is_safe(name: str, label_file: Path | str, record: str) -> None:
    """Refuse an absolute or ``..`` image name even when only its base name will be used."""
    rel = name.replace("\\", "/")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":") or ".." in rel.split("/"):
        raise ConversionError(
            f"{label_file}: {record}: image name {name!r} is an absolute path or escapes the image "
            "folder; refused"
        )
