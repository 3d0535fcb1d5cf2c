"""Split a COCO set into train/val(/test): stratified by class, group-aware, deterministic.

Images are first joined into groups that must stay on one side: the copies of one source photo
(Roboflow names them ``<stem>_jpg.rf.<hash>.jpg``) and files with identical content. Each group is
put in a stratum: the rarest class it shows (classes ranked by how many images show them), or
"negative" when it has no boxes. Within each stratum the groups are shuffled with the seed and
dealt to the split furthest below its share; rounding leftovers carry over to the next stratum, so
small strata do not all fall to train.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..fileio import UnsafePathError, atomic_write_json
from .common import (
    CocoError,
    check_output,
    default_image_dir,
    file_sha1,
    image_dir_for,
    load_coco_json,
    require_unique_ids,
    safe_image_path,
    source_key,
)

NEGATIVE = "negative"


@dataclass
class SplitResult:
    splits: dict[str, dict[str, Any]]  # split name -> COCO dict
    num_groups: int
    multi_image_groups: int  # groups with more than one image (copies of one photo)
    paths: dict[str, Path] = field(default_factory=dict)  # written files
    dropped_annotations: int = 0  # annotations of unknown image ids (not in any split)
    missing_images: int | None = None  # listed images not in the image folder (None: not checked)
    ungrouped_images: int = 0  # --group-by found no sequence for them (each stays alone)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def image_groups(
    images: list[dict[str, Any]],
    image_dir: Path | None = None,
    hash_content: bool = True,
    progress: bool = False,
    sequence_keys: list[str | None] | None = None,
) -> list[list[int]]:
    """Indices of ``images`` joined into groups that must not be split.

    Same group: same source photo by name (Roboflow ``.rf.`` copies), when ``image_dir`` is
    given and ``hash_content``, byte-identical files, and the same ``sequence_keys`` entry (one
    video or trail-camera burst; None joins nothing). Groups come out sorted by first index.
    """
    uf = _UnionFind(len(images))
    first_of: dict[tuple[str, str], int] = {}

    def join(key: tuple[str, str], i: int) -> None:
        if key in first_of:
            uf.union(first_of[key], i)
        else:
            first_of[key] = i

    for i, rec in enumerate(images):
        join(("name", source_key(str(rec.get("file_name", "")))), i)
    for i, key in enumerate(sequence_keys or []):
        if key is not None:
            join(("sequence", key), i)
    if image_dir is not None and hash_content:
        for i, rec in enumerate(
            tqdm(images, desc="hashing", unit="img", disable=not progress, leave=False)
        ):
            try:
                path = safe_image_path(image_dir, rec.get("file_name"), rec.get("id"))
            except UnsafePathError:
                continue
            if path.is_file():
                join(("sha1", file_sha1(path)), i)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(images)):
        groups[uf.find(i)].append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def split_coco(
    data: dict[str, Any],
    val: float,
    test: float = 0.0,
    seed: int = 0,
    image_dir: Path | None = None,
    hash_content: bool = True,
    progress: bool = False,
    group_by: GroupBy | None = None,
) -> SplitResult:
    """Split a parsed COCO dict; see the module docstring. ``image_dir`` enables content hashing;
    ``group_by`` keeps the frames of one sequence on one side."""
    fractions = _fractions(val, test)
    images: list[dict[str, Any]] = data["images"]
    annotations: list[dict[str, Any]] = data.get("annotations") or []
    cat_ids = {c["id"] for c in data["categories"]}
    index_of = {rec["id"]: i for i, rec in enumerate(images)}
    classes_of: list[set[Any]] = [set() for _ in images]
    dropped = 0
    for ann in annotations:
        i = index_of.get(ann.get("image_id"))
        if i is None:
            dropped += 1
        elif ann.get("category_id") in cat_ids:
            classes_of[i].add(ann["category_id"])
    images_per_class = Counter(c for classes in classes_of for c in classes)

    keys, ungrouped = sequence_keys(images, group_by, image_dir) if group_by else (None, 0)
    groups = image_groups(images, image_dir, hash_content, progress, keys)
    strata: dict[Any, list[list[int]]] = defaultdict(list)
    for group in groups:
        classes = set().union(*(classes_of[i] for i in group))
        key = min(classes, key=lambda c: (images_per_class[c], str(c))) if classes else NEGATIVE
        strata[key].append(group)

    rng = random.Random(seed)
    order = sorted(
        (k for k in strata if k != NEGATIVE), key=lambda c: (images_per_class[c], str(c))
    )
    if NEGATIVE in strata:
        order.append(NEGATIVE)
    carry = dict.fromkeys(fractions, 0.0)
    side_of: list[str] = [""] * len(images)
    for key in order:
        stratum = strata[key]
        rng.shuffle(stratum)
        n = sum(len(g) for g in stratum)
        want = {s: f * n + carry[s] for s, f in fractions.items()}
        got = dict.fromkeys(fractions, 0)
        for group in stratum:
            # furthest below its share; ties broken by the seeded generator
            side = max(fractions, key=lambda s: (round(want[s] - got[s], 9), rng.random()))
            got[side] += len(group)
            for i in group:
                side_of[i] = side
        carry = {s: want[s] - got[s] for s in fractions}

    splits: dict[str, dict[str, Any]] = {}
    for side in fractions:
        ids = {images[i]["id"] for i in range(len(images)) if side_of[i] == side}
        part = {k: v for k, v in data.items() if k not in ("images", "annotations")}
        part["images"] = [rec for rec in images if rec["id"] in ids]
        part["annotations"] = [a for a in annotations if a.get("image_id") in ids]
        splits[side] = part
    multi = sum(1 for g in groups if len(g) > 1)
    missing = None
    if image_dir is not None:
        missing = sum(1 for rec in images if not _exists(image_dir, rec))
    return SplitResult(
        splits,
        len(groups),
        multi,
        dropped_annotations=dropped,
        missing_images=missing,
        ungrouped_images=ungrouped,
    )


@dataclass
class GroupBy:
    """How frames of one sequence are recognised (``tools/split.py --group-by``).

    kind "name": ``pattern`` (a regex searched in the file name; its first group, else the whole
    match, names the sequence); "field": the COCO image field ``field`` (e.g. ``video_id``);
    "exif-time": EXIF capture times no more than ``gap_seconds`` apart, per camera and folder.
    """

    kind: str
    pattern: str | None = None
    field: str | None = None
    gap_seconds: float = 60.0


GROUP_KINDS = ("name", "field", "exif-time")


def sequence_keys(
    images: list[dict[str, Any]], group_by: GroupBy, image_dir: Path | None
) -> tuple[list[str | None], int]:
    """One sequence key per image (None: no sequence found) and how many have none."""
    if group_by.kind == "name":
        keys = _name_keys(images, group_by.pattern)
    elif group_by.kind == "field":
        if not group_by.field:
            raise CocoError("--group-by field needs --field NAME (a key of the image records)")
        keys = [
            None if rec.get(group_by.field) in (None, "") else str(rec[group_by.field])
            for rec in images
        ]
    elif group_by.kind == "exif-time":
        if image_dir is None:
            raise CocoError("--group-by exif-time reads the images: give --images FOLDER")
        keys = _exif_time_keys(images, image_dir, group_by.gap_seconds)
    else:
        raise CocoError(f"--group-by {group_by.kind!r}: one of {', '.join(GROUP_KINDS)}")
    return keys, sum(k is None for k in keys)


def _name_keys(images: list[dict[str, Any]], pattern: str | None) -> list[str | None]:
    if not pattern:
        raise CocoError(
            r"--group-by name needs --pattern REGEX, e.g. '^(.+)_frame\d+' (group 1 names "
            "the sequence)"
        )
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise CocoError(f"--pattern {pattern!r}: not a regular expression ({e})") from None
    keys: list[str | None] = []
    for rec in images:
        match = regex.search(str(rec.get("file_name", "")).replace("\\", "/"))
        keys.append(None if match is None else (match.group(1) if regex.groups else match[0]))
    return keys


def _capture_time(path: Path) -> tuple[float, str] | None:
    """(EXIF DateTimeOriginal as seconds, camera make + model), or None without one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            exif = im.getexif()
    except (UnidentifiedImageError, OSError):
        return None
    text = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)  # DateTimeOriginal, DateTime
    try:
        stamp = datetime.strptime(str(text).strip(), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    camera = f"{exif.get(0x010F, '')} {exif.get(0x0110, '')}".strip()
    return stamp.timestamp(), camera


def _exif_time_keys(
    images: list[dict[str, Any]], image_dir: Path, gap_seconds: float
) -> list[str | None]:
    """Per camera and folder, frames sorted by capture time; a gap over ``gap_seconds`` starts
    a new sequence."""
    stamped: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for i, rec in enumerate(images):
        try:
            path = safe_image_path(image_dir, rec.get("file_name"), rec.get("id"))
        except UnsafePathError:
            continue
        found = _capture_time(path) if path.is_file() else None
        if found is not None:
            folder = str(Path(str(rec.get("file_name", ""))).parent)
            stamped[(found[1], folder)].append((found[0], i))
    keys: list[str | None] = [None] * len(images)
    for (camera, folder), frames in stamped.items():
        sequence, previous = 0, None
        for stamp, i in sorted(frames):
            if previous is not None and stamp - previous > gap_seconds:
                sequence += 1
            keys[i], previous = f"{camera}|{folder}|{sequence}", stamp
    return keys


def parse_gap(text: str) -> float:
    """``60``, ``60s``, ``2m``, ``1h`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if match is None:
        raise CocoError(f"--gap {text!r}: a duration like 60s, 2m or 1h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def _exists(image_dir: Path, rec: dict[str, Any]) -> bool:
    try:
        return safe_image_path(image_dir, rec.get("file_name"), rec.get("id")).is_file()
    except UnsafePathError:
        return False


def _fractions(val: float, test: float) -> dict[str, float]:
    if not 0 < val < 1:
        raise CocoError(f"--val {val}: must be between 0 and 1 (a share of the images)")
    if not 0 <= test < 1:
        raise CocoError(f"--test {test}: must be between 0 and 1")
    if val + test >= 1:
        raise CocoError(f"--val {val} + --test {test} leave nothing to train on")
    out = {"train": 1 - val - test, "val": val}
    if test > 0:
        out["test"] = test
    return out


def split_file(
    annotations: str | Path,
    val: float,
    test: float = 0.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    hash_content: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    group_by: GroupBy | None = None,
) -> SplitResult:
    """Split a COCO file into ``train.json``, ``val.json`` (``test.json``) in ``out_dir``
    (default: beside the input, so file names stay relative to the same image folder).
    Existing split files are replaced only with ``overwrite``; the input never."""
    annotations = Path(annotations)
    data = load_coco_json(annotations)
    require_unique_ids(data, annotations)
    out = Path(out_dir) if out_dir is not None else annotations.resolve().parent
    fractions = _fractions(val, test)
    paths = {side: out / f"{side}.json" for side in fractions}
    for path in paths.values():
        check_output(path, annotations, overwrite=overwrite)
    image_dir = image_dir_for(annotations, images_dir)
    result = split_coco(
        data,
        val,
        test,
        seed,
        image_dir if image_dir.is_dir() else None,
        hash_content,
        progress,
        group_by,
    )
    for side, path in paths.items():
        atomic_write_json(path, result.splits[side])
    result.paths = paths
    return result


def split_table(result: SplitResult) -> str:
    """Per split and class: images / boxes, plus totals and negatives."""
    sides = list(result.splits)
    any_split = next(iter(result.splits.values()))
    cats = [(c["id"], str(c.get("name", c["id"]))) for c in any_split["categories"]]
    stats: dict[str, tuple[Counter[Any], Counter[Any], int]] = {}
    for side, part in result.splits.items():
        boxes = Counter(a.get("category_id") for a in part["annotations"])
        per_image: dict[Any, set[Any]] = defaultdict(set)
        for a in part["annotations"]:
            per_image[a.get("image_id")].add(a.get("category_id"))
        images = Counter(c for classes in per_image.values() for c in classes)
        negatives = sum(1 for rec in part["images"] if rec["id"] not in per_image)
        stats[side] = (images, boxes, negatives)
    width = max([len(n) for _, n in cats] + [10])
    head = f"{'class':<{width}}" + "".join(f"{s + ' img/box':>18}" for s in sides)
    lines = [head, "-" * len(head)]
    for cid, name in cats:
        cells = "".join(f"{f'{stats[s][0][cid]}/{stats[s][1][cid]}':>18}" for s in sides)
        lines.append(f"{name:<{width}}{cells}")
    lines.append("-" * len(head))
    lines.append(f"{'negatives':<{width}}" + "".join(f"{stats[s][2]:>18}" for s in sides))
    totals = [
        f"{len(result.splits[s]['images'])}/{len(result.splits[s]['annotations'])}" for s in sides
    ]
    lines.append(f"{'TOTAL':<{width}}" + "".join(f"{t:>18}" for t in totals))
    return "\n".join(lines)


def images_note(
    annotations: str | Path, result: SplitResult, images_dir: str | Path | None
) -> str | None:
    """A hint when the written files would not find their images by the default rule."""
    if not result.paths:
        return None
    image_dir = image_dir_for(annotations, images_dir)
    target = default_image_dir(next(iter(result.paths.values())))
    if target != image_dir:
        return (
            f"note: file names are relative to {image_dir}; pass --images {image_dir} "
            "(or set data.*_images) when you use the split files"
        )
    return None
