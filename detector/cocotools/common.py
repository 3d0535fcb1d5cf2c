"""Helpers shared by the COCO tools: loading, the default image folder, names, groups, outputs.

The rules of a valid box, category and record are in ``detector.coco_rules``.

Nothing here imports torch: the trainer's pre-flight check and the label tools both use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..coco_rules import name_key as normalize_name  # noqa: F401  (the tools' name matching)
from ..fileio import UnsafePathError, refuse_overwrite, resolve_inside

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

# Roboflow names every exported (and augmented) copy `<stem>_<ext>.rf.<hash>.<ext>`.
_ROBOFLOW_NAME = re.compile(
    r"^(?P<stem>.+)_(?:jpe?g|png|bmp|webp|tiff?|gif)\.rf\.[0-9a-z]+\.[a-z0-9]+$", re.IGNORECASE
)


class CocoError(ValueError):
    """A COCO file cannot be used by a tool; the message names the file and what to do."""


def default_image_dir(annotations: str | Path) -> Path:
    """``images/`` beside the JSON when it exists (tools/convert.py layout), else the JSON's folder.

    The same rule as ``detector.data.default_image_dir``, without importing torch.
    """
    parent = Path(annotations).resolve().parent
    return parent / "images" if (parent / "images").is_dir() else parent


def image_dir_for(annotations: str | Path, images_dir: str | Path | None) -> Path:
    return Path(images_dir).resolve() if images_dir else default_image_dir(annotations)


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO detection file; raise CocoError naming the file for anything unusable.

    A missing ``annotations`` list is read as empty; ``images`` and ``categories`` are required.
    """
    path = Path(path)
    if not path.is_file():
        raise CocoError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except UnicodeDecodeError as e:
        raise CocoError(f"{path}: not UTF-8 text ({e}); is this a JSON file?") from None
    if not isinstance(data, dict):
        raise CocoError(
            f"{path}: the top level must be an object with images/annotations/categories"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoError(
                f"{path}: no '{key}' list; is this a COCO detection file? "
                "(tools/validate.py tells more)"
            )
    if data.get("annotations") is None:
        data["annotations"] = []
    if not isinstance(data["annotations"], list):
        raise CocoError(f"{path}: 'annotations' is not a list")
    return data


def require_unique_ids(data: dict[str, Any], path: str | Path) -> None:
    """Raise CocoError when images or categories repeat an id (ambiguous references)."""
    for key in ("images", "categories"):
        counts = Counter(r.get("id") for r in data[key] if isinstance(r, dict))
        dup = sorted((str(i) for i, n in counts.items() if n > 1))
        bad = sum(1 for r in data[key] if not isinstance(r, dict) or "id" not in r)
        if dup or bad:
            what = f"duplicate {key[:-1]} ids {dup[:10]}" if dup else f"{bad} {key} without an id"
            raise CocoError(f"{path}: {what}; repair it first with tools/validate.py --fix")


def check_output(output: str | Path, *inputs: str | Path, overwrite: bool = False) -> None:
    """Refuse to write over one of the inputs, ever, and over any other existing file unless
    ``overwrite`` (raises CocoError naming the file and the flag)."""
    try:
        refuse_overwrite(output, *inputs)
    except ValueError as e:
        raise CocoError(str(e)) from None
    path = Path(output)
    if path.is_symlink():
        raise CocoError(
            f"{output}: is a symlink; refusing to write through it, choose another path"
        )
    if path.exists() and not overwrite:
        raise CocoError(f"{output}: already exists; pass --overwrite to replace it")


def roboflow_stem(file_name: str) -> str | None:
    """``'abc_jpg.rf.0123.jpg'`` -> ``'abc'`` (the source photo of a Roboflow copy), else None."""
    match = _ROBOFLOW_NAME.match(Path(str(file_name).replace("\\", "/")).name)
    return match.group("stem") if match else None


def source_key(file_name: str) -> str:
    """Key shared by all copies of one source photo: Roboflow stem, else the file name itself."""
    rel = str(file_name).replace("\\", "/")
    stem = roboflow_stem(rel)
    if stem is None:
        return rel
    parent = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    return f"{parent}{stem}"


def file_sha1(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), hidden files and folders skipped."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(p)
    return sorted(found)


def safe_image_path(image_dir: Path, file_name: Any, image_id: Any = None) -> Path:
    """``resolve_inside`` for an image record; raises UnsafePathError for ../ or absolute names."""
    if not isinstance(file_name, str):
        raise UnsafePathError(f"image id {image_id}: file_name {file_name!r} is not a string")
    return resolve_inside(image_dir, file_name, f"image id {image_id} file_name")


def display_path(path: str | Path) -> str:
    """A path relative to the working folder when it is below it (shorter messages)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
