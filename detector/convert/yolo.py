"""YOLO txt labels: darknet (``obj.data``/``obj.names``, CVAT "YOLO 1.1"), Ultralytics
(``data.yaml`` + ``images/``/``labels/``) and plain folders with ``classes.txt``.

A label file holds ``class cx cy w h`` lines, normalised to the image size (an Ultralytics
polygon line ``class x1 y1 x2 y2 ...`` becomes its bounding box). Boxes are scaled with the real
image size read from the file (EXIF rotation applied).

Pairing: ``.../labels/<sub>/name.txt`` goes with ``.../images/<sub>/name.*`` (Ultralytics), and a
label file beside its image goes with it (darknet); failing that, a unique file stem. Images
without a label file are kept as negatives (reported); label files without an image are
skipped (reported with their box count).

Class names, first found: ``--names``, ``data.yaml`` ``names`` (list or ``{id: name}``), the
``names`` file of ``obj.data``, ``obj.names``, ``classes.txt``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .common import (
    IMAGE_EXTENSIONS,
    Box,
    ConversionError,
    ImageFinder,
    ReadContext,
    ReadResult,
    Skipped,
    check_normalised,
    natural_key,
    number,
    read_text_lines,
    walk_files,
)

NAME_FILES = {"classes.txt", "obj.names", "obj.data", "labels.txt"}
YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")


def _names_from_yaml(path: Path) -> dict[int, str] | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        raise ConversionError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(data, dict) or "names" not in data:
        return None
    names = data["names"]
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        try:
            return {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise ConversionError(f"{path}: 'names' keys must be class ids (0, 1, ...)") from None
    raise ConversionError(f"{path}: 'names' must be a list or a mapping of class id to name")


def _names_from_lines(path: Path) -> dict[int, str]:
    return {i: n for i, n in enumerate(ln.strip() for ln in read_text_lines(path) if ln.strip())}


def _darknet_data(path: Path) -> dict[str, str]:
    out = {}
    for line in read_text_lines(path):
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _local(root: Path, declared: str) -> Path | None:
    """A file named in obj.data / data.yaml, looked up inside ``root`` only: as written, then
    without its first folder (CVAT writes ``data/obj.names``), then by base name."""
    rel = declared.replace("\\", "/")
    candidates = [rel, rel.split("/", 1)[1] if "/" in rel else rel, rel.rsplit("/", 1)[-1]]
    for cand in candidates:
        if not cand or cand.startswith("/") or ".." in cand.split("/"):
            continue
        p = root / cand
        if p.is_file():
            return p
    return None


def find_class_names(ctx: ReadContext) -> tuple[dict[int, str], str, list[Path]]:
    """(class id -> name, where they came from, meta files read)."""
    root = ctx.root
    if ctx.names:
        return dict(enumerate(ctx.names)), "--names", []
    yamls = (
        [ctx.src]
        if ctx.src.is_file() and ctx.src.suffix in (".yaml", ".yml")
        else [root / n for n in YAML_NAMES if (root / n).is_file()]
    )
    for y in yamls:
        names = _names_from_yaml(y)
        if names is not None:
            return names, y.name, [y]
    data_file = ctx.src if ctx.src.is_file() and ctx.src.suffix == ".data" else root / "obj.data"
    if data_file.is_file():
        declared = _darknet_data(data_file).get("names")
        names_file = _local(root, declared) if declared else None
        if names_file:
            return (
                _names_from_lines(names_file),
                f"{data_file.name} -> {names_file.name}",
                [data_file, names_file],
            )
    for cand in (root / "obj.names", root / "classes.txt", root / "labels" / "classes.txt"):
        if cand.is_file():
            return _names_from_lines(cand), cand.name, [cand]
    raise ConversionError(
        f"{ctx.src}: no YOLO class names found (data.yaml, obj.data/obj.names, classes.txt); "
        "pass --names a,b,c or --names-file FILE"
    )


def _image_lists(root: Path) -> set[Path]:
    """txt files that list image paths (darknet train.txt, data.yaml train: list.txt)."""
    out = set()
    data_file = root / "obj.data"
    if data_file.is_file():
        for key in ("train", "valid", "val", "test"):
            value = _darknet_data(data_file).get(key)
            if value and (p := _local(root, value)):
                out.add(p.resolve())
    return out


def _key(path: Path, root: Path, anchor: str) -> str:
    """Path relative to ``root`` without suffix, from just after its last ``anchor`` folder."""
    try:
        parts = path.relative_to(root).with_suffix("").parts
    except ValueError:
        parts = (path.stem,)
    if anchor in parts[:-1]:
        idx = len(parts) - 1 - parts[::-1].index(anchor)
        parts = parts[idx + 1 :]
    return "/".join(parts)


def _is_image_list(path: Path) -> bool:
    for line in read_text_lines(path):
        if line.strip():
            return line.strip().lower().endswith(IMAGE_EXTENSIONS)
    return False


def _parse_label_file(path: Path, names: dict[int, str], result: ReadResult) -> list[Box]:
    """The boxes of one label file, in fractions of the image (the builder scales them)."""
    boxes = []
    for lineno, line in enumerate(read_text_lines(path), start=1):
        tokens = line.split()
        if not tokens:
            continue
        record = f"line {lineno}"
        if len(tokens) != 5 and (len(tokens) < 7 or len(tokens) % 2 == 0):
            raise ConversionError(
                f"{path}: {record}: expected 'class cx cy w h' (5 values) or a polygon "
                f"'class x1 y1 x2 y2 x3 y3 ...', got {len(tokens)} values: {line.strip()[:80]!r}"
            )
        cls_f = number(tokens[0], path, record, "class id")
        if not cls_f.is_integer() or cls_f < 0:
            raise ConversionError(
                f"{path}: {record}: class id {tokens[0]!r} is not a non-negative integer"
            )
        cls = int(cls_f)
        values = [number(t, path, record, "coordinate") for t in tokens[1:]]
        if cls not in names:
            result.skipped.append(
                Skipped(
                    str(path),
                    record,
                    f"unknown class id {cls} (class names: {len(names)}, "
                    f"ids {min(names, default=0)}-{max(names, default=-1)})",
                )
            )
            continue
        check_normalised(values, path, record)
        if len(tokens) == 5:
            cx, cy, w, h = values
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = values[0::2], values[1::2]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        boxes.append(Box(names[cls], x0, y0, x1, y1, record))  # fractions: scaled by build
    return boxes


def _pair_labels(
    images_by_key: dict[str, Path],
    label_files: list[Path],
    root: Path,
    image_root: Path,
    result: ReadResult,
) -> dict[Path, Path]:
    """image -> its label file; label files without an image are listed as skipped."""
    labels_by_key = {_key(p, root, "labels"): p for p in label_files}
    pairs: dict[Path, Path] = {}  # image -> label file
    for key, lab in labels_by_key.items():
        if key in images_by_key:
            pairs[images_by_key[key]] = lab
    # Fallback: unique stems (labels and images in unrelated folders, e.g. with --images).
    unpaired_labels = [p for k, p in labels_by_key.items() if k not in images_by_key]
    if unpaired_labels:
        free_images = [p for p in images_by_key.values() if p not in pairs]
        stem_count: dict[str, int] = {}
        for p in free_images:
            stem_count[p.stem] = stem_count.get(p.stem, 0) + 1
        by_stem = {p.stem: p for p in free_images if stem_count[p.stem] == 1}
        for lab in list(unpaired_labels):
            img = by_stem.get(lab.stem)
            if img is not None and sum(q.stem == lab.stem for q in unpaired_labels) == 1:
                pairs[img] = lab
                unpaired_labels.remove(lab)
    for lab in sorted(unpaired_labels, key=natural_key):
        lines = sum(1 for ln in read_text_lines(lab) if ln.strip())
        result.skipped.append(
            Skipped(str(lab), f"{lines} boxes", f"label file has no image (looked in {image_root})")
        )
    return pairs


def read_yolo(ctx: ReadContext) -> ReadResult:
    root = ctx.root
    if root.name == "labels" and (root.parent / "images").is_dir():  # pointed at labels/
        ctx = ReadContext(root.parent, ctx.images, ctx.names, ctx._sizes)
        root = ctx.root
    names, names_from, meta = find_class_names(ctx)
    skip_lists = _image_lists(root)
    label_files = []
    for p in walk_files(root, (".txt",)):
        if p.name.lower() in NAME_FILES or p.resolve() in skip_lists or _is_image_list(p):
            continue
        label_files.append(p)
    image_root = ctx.images or root
    finder = ImageFinder([image_root])
    images = sorted(finder.all_images(), key=natural_key)
    result = ReadResult(
        images=[],
        categories=[names[k] for k in sorted(names)],
        sources=[*meta, *label_files],
        image_roots=finder.roots,
    )
    result.notes.append(f"class names from {names_from}")
    if not label_files:
        raise ConversionError(f"{ctx.src}: no YOLO label files (*.txt) found")

    images_by_key: dict[str, Path] = {}
    for img in images:
        key = _key(img, image_root, "images")
        if key in images_by_key:
            result.skipped.append(
                Skipped(
                    str(img),
                    "image",
                    f"same name as {images_by_key[key]} "
                    "apart from the extension; only the first is used",
                )
            )
            continue
        images_by_key[key] = img
    pairs = _pair_labels(images_by_key, label_files, root, image_root, result)
    negatives = []
    for img in images_by_key.values():
        lab = pairs.get(img)
        if lab is None:
            negatives.append(img.name)
            result.add_image(img, img, "image without label file (negative)", [])
            continue
        boxes = _parse_label_file(lab, names, result)
        result.add_image(img, lab, f"label file {lab.name}", boxes, units="fraction")
    if negatives:
        shown = ", ".join(negatives[:10]) + (" ..." if len(negatives) > 10 else "")
        result.notes.append(
            f"{len(negatives)} images have no label file and are kept as "
            f"negatives (no boxes): {shown}"
        )
    empty = sum(1 for e in result.images if not e.boxes and e.label_file != e.path)
    if empty:
        result.notes.append(f"{empty} label files are empty (images kept as negatives)")
    return result
