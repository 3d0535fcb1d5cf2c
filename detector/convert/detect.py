"""Guess the label format of an export (a file or a folder) from its files' content.

Each annotation file is *sniffed* (root XML tag, JSON shape, CSV header, YOLO line syntax);
a folder is a candidate for every format some of its files match. Formats whose files hold no
object at all (e.g. one empty LabelImg XML beside a Create ML export) are dropped when another
format has objects. One candidate left: that is the format. None, or several: a
:class:`FormatDetectionError` listing what was found.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .common import ConversionError, FormatDetectionError, walk_files

# What each format looks like, for error messages.
SIGNATURES = {
    "cvat": "CVAT for images 1.1 XML (<annotations> with <image> elements)",
    "voc": "Pascal VOC XML, one file per image (<annotation> with <size>/<object><bndbox>)",
    "labelme3": "LabelMe 3.0 XML, one file per image (<annotation> with <imagesize>/<polygon>)",
    "yolo": "YOLO txt labels ('class cx cy w h' lines) with obj.names / data.yaml / classes.txt",
    "coco": "COCO JSON (object with images, annotations, categories)",
    "labelstudio": "Label Studio JSON export (list of tasks with data and annotations)",
    "labelme": "LabelMe JSON, one file per image (shapes, imagePath)",
    "via": "VGG Image Annotator CSV (filename,file_size,...) or JSON (filename, regions)",
    "createml": "Apple Create ML JSON (list of {image, annotations})",
    "automl": "Google AutoML / Vertex AI CSV (SET,gs://path,label,xmin,ymin,,,xmax,ymax,,)",
}

MAX_SNIFFED_PER_SUFFIX = 40
_SNIFF_SUFFIXES = (".xml", ".json", ".csv", ".txt", ".yaml", ".yml", ".data", ".names")
AUTOML_SETS = {"TRAIN", "VALIDATION", "VALIDATE", "TEST", "UNASSIGNED"}
YOLO_NAME_FILES = {"classes.txt", "obj.names", "obj.data", "data.yaml", "data.yml", "dataset.yaml"}


@dataclass
class Detection:
    format: str
    evidence: list[Path] = field(default_factory=list)

    def describe(self, root: Path) -> str:
        files = [_rel(p, root) for p in self.evidence[:3]]
        more = f" and {len(self.evidence) - 3} more" if len(self.evidence) > 3 else ""
        return f"{self.format} ({', '.join(files)}{more})"


def _rel(path: Path, root: Path) -> str:
    try:
        rel = str(path.relative_to(root))
        return path.name if rel == "." else rel
    except ValueError:
        return str(path)


FORMAT_SUFFIXES = {
    "cvat": (".xml",),
    "voc": (".xml",),
    "labelme3": (".xml",),
    "coco": (".json",),
    "labelstudio": (".json",),
    "labelme": (".json",),
    "createml": (".json",),
    "via": (".csv", ".json"),
    "automl": (".csv",),
    "yolo": (".txt",),
}


def parse_error_message(path: Path, e: BaseException) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    if isinstance(e, ET.ParseError):
        line, col = e.position
        return f"{path}: malformed XML at line {line}, column {col}: {e}"
    if isinstance(e, UnicodeDecodeError):
        return f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
    return f"{path}: cannot read: {e}"


def sniff_file(path: Path, strict: bool = False) -> tuple[str, bool] | None:
    """(format, holds at least one object) for one annotation file, or None if not recognised.

    A file that does not parse is not recognised; with ``strict`` it raises ConversionError
    naming the file and the position of the error instead.
    """
    name = path.name.lower()
    suffix = path.suffix.lower()
    try:
        if suffix == ".xml":
            return _sniff_xml(path)
        if suffix == ".json":
            return _sniff_json(path)
        if suffix == ".csv":
            return _sniff_csv(path)
        if name in YOLO_NAME_FILES or suffix in (".names", ".data") or suffix in (".yaml", ".yml"):
            return _sniff_yolo_meta(path)
        if suffix == ".txt":
            return ("yolo", True) if is_yolo_label_file(path) else None
    except (OSError, UnicodeDecodeError, ValueError, ET.ParseError, RecursionError) as e:
        if strict:
            raise ConversionError(parse_error_message(path, e)) from None
        return None
    return None


def _sniff_xml(path: Path) -> tuple[str, bool] | None:
    for _, elem in ET.iterparse(path, events=("start",)):
        root_tag = elem.tag
        break
    else:
        return None
    if root_tag == "annotations":
        return "cvat", True
    if root_tag != "annotation":
        return None
    root = ET.parse(path).getroot()
    if (
        root.find("imagesize") is not None
        or root.find("object/polygon") is not None
        or root.find("object/segm") is not None
    ):
        return "labelme3", root.find("object") is not None
    if root.find("size") is not None or root.find("object/bndbox") is not None:
        return "voc", root.find("object/bndbox") is not None
    return None


def _sniff_json(path: Path) -> tuple[str, bool] | None:
    if path.stat().st_size == 0:
        return None
    with open(path, encoding="utf-8-sig") as f:
        data = json.load(f)
    if isinstance(data, dict):
        if all(isinstance(data.get(k), list) for k in ("images", "categories")) and isinstance(
            data.get("annotations", []), list
        ):
            return "coco", bool(data.get("annotations"))
        if isinstance(data.get("shapes"), list) and "imagePath" in data:
            return "labelme", bool(data["shapes"])
        meta = data.get("_via_img_metadata", data)
        if (
            isinstance(meta, dict)
            and meta
            and all(
                isinstance(v, dict) and "filename" in v and "regions" in v for v in meta.values()
            )
        ):
            return "via", any(v["regions"] for v in meta.values())
        return None
    if isinstance(data, list) and data and all(isinstance(t, dict) for t in data):
        first = data[0]
        if "data" in first and ("annotations" in first or "predictions" in first):
            return "labelstudio", any(t.get("annotations") for t in data)
        if "image" in first and isinstance(first.get("annotations"), list):
            return "createml", any(t.get("annotations") for t in data)
    return None


def _sniff_csv(path: Path) -> tuple[str, bool] | None:
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline().strip()
    if first.replace(" ", "").lower().startswith("filename,file_size,file_attributes"):
        return "via", True
    cols = first.split(",")
    if len(cols) >= 9:
        has_set = cols[0].strip().upper() in AUTOML_SETS
        path_col = cols[1] if has_set else cols[0]
        if has_set or path_col.startswith(("gs://", "http://", "https://")):
            return "automl", True
    return None


def _sniff_yolo_meta(path: Path) -> tuple[str, bool] | None:
    name = path.name.lower()
    if name in ("classes.txt", "obj.names") or name.endswith(".names"):
        return ("yolo", False)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if name.endswith(".data") and re.search(r"^\s*names\s*=", text, re.M):
        return ("yolo", False)
    if name.endswith((".yaml", ".yml")) and re.search(r"^names\s*:", text, re.M):
        return ("yolo", False)
    return None


_YOLO_LINE = re.compile(r"^\s*\d+(\s+[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?){4,}\s*$")


def is_yolo_label_file(path: Path) -> bool:
    """A .txt whose non-empty lines all look like 'class cx cy w h' (or a YOLO polygon)."""
    if path.name.lower() in YOLO_NAME_FILES or path.stat().st_size > 5_000_000:
        return False
    lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    return bool(lines) and all(_YOLO_LINE.match(ln) for ln in lines)


def scan(src: Path, broken: list[str] | None = None) -> dict[str, tuple[list[Path], bool]]:
    """format -> (files that look like it, whether any of them holds objects). Files of an
    annotation type (.xml/.json/.csv) that do not parse are appended to ``broken``."""
    found: dict[str, tuple[list[Path], bool]] = {}
    if src.is_file():
        hit = sniff_file(src)
        if hit is not None and hit[0] == "yolo":  # data.yaml / obj.data / obj.names: its folder
            return {"yolo": ([src], True)}
        files = [src]
    else:
        files = []
        per_suffix: dict[tuple[Path, str], int] = {}
        for p in walk_files(src, _SNIFF_SUFFIXES, max_depth=4):
            key = (p.parent, p.suffix.lower())
            per_suffix[key] = per_suffix.get(key, 0) + 1
            if per_suffix[key] <= MAX_SNIFFED_PER_SUFFIX:
                files.append(p)
    for path in files:
        try:
            hit = sniff_file(path, strict=path.suffix.lower() in (".xml", ".json", ".csv"))
        except ConversionError as e:
            if broken is not None:
                broken.append(str(e))
            continue
        if hit is None:
            continue
        fmt, has_objects = hit
        paths, any_objects = found.get(fmt, ([], False))
        paths.append(path)
        found[fmt] = (paths, any_objects or has_objects)
    # A YOLO names file alone (no label file) is not a YOLO export; label files alone are.
    if "yolo" in found and not found["yolo"][1]:
        del found["yolo"]
    return found


def detect(src: str | Path) -> Detection:
    """The single format of ``src``, with the files that show it; FormatDetectionError otherwise."""
    src = Path(src)
    if not src.exists():
        raise FormatDetectionError(f"{src}: no such file or folder")
    broken: list[str] = []
    found = scan(src, broken)
    if len(found) > 1:
        with_objects = {k: v for k, v in found.items() if v[1]}
        if with_objects:
            found = with_objects
    root = src if src.is_dir() else src.parent
    if len(found) == 1:
        fmt, (paths, _) = next(iter(found.items()))
        return Detection(fmt, paths)
    if not found and broken:
        raise FormatDetectionError(
            f"{src}: no label format recognised; these files do not parse:\n  "
            + "\n  ".join(broken),
            [],
        )
    if not found:
        known = "\n".join(f"  {k}: {v}" for k, v in SIGNATURES.items())
        raise FormatDetectionError(
            f"{src}: no known label format recognised; pass --from with one of:\n{known}", []
        )
    cands = [Detection(k, v[0]) for k, v in sorted(found.items())]
    listing = "; ".join(c.describe(root) for c in cands)
    raise FormatDetectionError(
        f"{src}: ambiguous, it holds more than one label format: {listing}. Pass --from "
        f"{'|'.join(c.format for c in cands)}, or point at one annotation file",
        [c.format for c in cands],
    )


def detect_format(src: str | Path) -> str:
    """The format name (a key of ``FORMATS``) of the export at ``src``; raises
    :class:`FormatDetectionError` listing the candidates when it is unknown or ambiguous."""
    return detect(src).format


def source_files(src: Path, fmt: str, single: bool, what: str) -> list[Path]:
    """The annotation files of format ``fmt`` at ``src`` (the file itself, or those in the folder).

    With ``single``, exactly one is required (a folder holding two COCO files is an error naming
    both, so the user picks one).
    """
    if src.is_file():
        return [src]
    strict = FORMAT_SUFFIXES.get(fmt, ())
    files = [
        p
        for p in walk_files(src, _SNIFF_SUFFIXES, max_depth=4)
        if (hit := sniff_file(p, strict=p.suffix.lower() in strict)) is not None and hit[0] == fmt
    ]
    if not files:
        raise FormatDetectionError(f"{src}: no {what} file found ({SIGNATURES.get(fmt, fmt)})", [])
    if single and len(files) > 1:
        listing = ", ".join(_rel(p, src) for p in files)
        raise FormatDetectionError(
            f"{src}: holds {len(files)} {what} files ({listing}); pass one of them as the source",
            [fmt],
        )
    return files
