"""Pre-flight check: read every image once before the night starts and list every problem.

A corrupt image found at 3 a.m. costs the night; found at 6 p.m. it costs a minute.

The rules are those of ``tools/validate.py`` (:func:`detector.cocotools.validate.validate_coco`
with every image fully decoded), so the tool and the trainer never disagree. What the trainer
does with each finding:

* errors stop the run, all of them in one message that names the file, the record and what to
  do; except single boxes the loader drops safely (zero or negative size, NaN, entirely outside
  the image), which are counted and logged;
* boxes that look like ``[x1, y1, x2, y2]`` stored in COCO's ``[x, y, width, height]`` field stop
  the run too, with the ``tools/validate.py --fix OUT --xyxy`` command that converts them;
* a training set without a usable box, and a val set without one (no boxes, or only iscrowd
  boxes, which COCO evaluation ignores), stop the run: the night would learn or measure nothing;
* other warnings (boxes past the edge, which are clipped; files in the image folder that no
  record lists; classes without boxes) are logged, as are images that lost every box, the
  counts of images without boxes (trained as negatives), of iscrowd boxes (left out of
  training) and of images that are symlinks out of the image folder.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .coco_rules import ZERO_BASED_FIX, image_size, training_box, zero_based_category_ids
from .cocotools.validate import Problem, ValidationReport, validate_coco
from .config import DataConfig
from .data import CocoSet, DatasetError

log = logging.getLogger(__name__)

# Errors about one box that the loader handles by dropping the box: counted and logged.
SKIPPED_BOX_KINDS = {
    "box_empty": "zero or negative width/height",
    "box_nan": "NaN or infinite values",
    "box_outside": "entirely outside the image",
}
# Warnings that stop the run: training on them would waste the night.
STOPPING_WARNINGS = {"bbox_looks_xyxy"}
# Errors about an image record or its file ("N of M images are unusable").
IMAGE_KINDS = {
    "missing_image",
    "unreadable_image",
    "image_too_large",
    "size_mismatch",
    "bad_image_size",
    "unsafe_path",
    "bad_image_id",
    "duplicate_image_id",
    "wrong_image_dir",
}
SHOWN_PER_SET = 200  # lines of the message; tools/validate.py --all lists everything


def preflight(*sets: CocoSet | None, progress: bool = True) -> None:
    """Raise DatasetError listing every problem of the given (loaded) sets; log the rest.

    The first set is the training set, the second (if any) the val set."""
    items = [
        (s.annotations_path, s.image_dir, role)
        for s, role in zip(sets, ("train", "val"), strict=False)
        if s is not None
    ]
    _run(items, progress)


def preflight_data(cfg: DataConfig, progress: bool = True) -> None:
    """The same check on the files a data config names, for sets that do not even load.

    Raises DatasetError with the full list when the files have errors; returns otherwise.
    """
    items: list[tuple[Path, Path | None, str]] = []
    if cfg.train_annotations:
        train_images = Path(cfg.train_images) if cfg.train_images else None
        items.append((Path(cfg.train_annotations), train_images, "train"))
    if cfg.val_annotations:
        val_images = Path(cfg.val_images) if cfg.val_images else None
        items.append((Path(cfg.val_annotations), val_images, "val"))
    _run(items, progress, announce=False)  # the caller re-raises the loader's error


def _run(items: list[tuple[Path, Path | None, str]], progress: bool, announce: bool = True) -> None:
    sections: list[str] = []
    total_problems = bad_images = checked = 0
    for json_path, image_dir, role in items:
        report = validate_coco(json_path, image_dir, decode=True, progress=progress)
        problems = _stopping_problems(report)
        if not problems:  # boxes are only counted on a set whose records can be read
            problems = _box_problems(report, role)
        _log_findings(report)
        checked += report.num_images
        if not problems:
            continue
        total_problems += len(problems)
        bad_images += len({_image_key(p) for p in report.errors if p.kind in IMAGE_KINDS})
        shown = problems[:SHOWN_PER_SET]
        more = len(problems) - len(shown)
        sections.append(
            f"{json_path} (images in {report.images_dir}): {len(problems)} problems\n    "
            + "\n    ".join(shown)
            + (
                f"\n    ... and {more} more: python tools/validate.py {json_path} --decode --all"
                if more
                else ""
            )
            + f"\n  Repair: python tools/validate.py {json_path} --decode --fix "
            f"{_fixed_name(json_path)} writes a repaired copy and lists every change; "
            "then train on that copy."
        )
    if sections:
        images = f"{bad_images} of {checked} images are unusable, " if checked else ""
        raise DatasetError(
            f"pre-flight check failed: {images}{total_problems} problem"
            f"{'s' if total_problems != 1 else ''} in all (nothing was trained):\n  "
            + "\n  ".join(sections)
            + "\nFix them and start again, or set data.preflight=false to skip this check "
            "(the first unusable image then stops the run in the middle of the night)."
        )
    if announce:
        log.info("pre-flight: %d images read, all usable", checked)


def _stopping_problems(report: ValidationReport) -> list[str]:
    lines = [f"[{p.kind}] {p.message}" for p in report.errors if p.kind not in SKIPPED_BOX_KINDS]
    path = report.annotations_path
    for p in report.warnings:
        if p.kind == "bbox_looks_xyxy":
            lines.append(
                f"[{p.kind}] {p.message}. Convert them with: python tools/validate.py "
                f"{path} --fix {_fixed_name(path, 'xywh')} --xyxy"
            )
        elif p.kind in STOPPING_WARNINGS:
            lines.append(f"[{p.kind}] {p.message}")
    data = report.data if isinstance(report.data, dict) else {}
    categories = data.get("categories") if isinstance(data.get("categories"), list) else []
    annotations = data.get("annotations") if isinstance(data.get("annotations"), list) else []
    if zero_based_category_ids(categories, annotations):
        lines.append(f"[zero_based_category_ids] {ZERO_BASED_FIX}")
    return lines


@dataclass
class BoxCounts:
    """Boxes the trainer keeps (non-crowd, inside the image), crowd boxes, and the images
    whose every box is dropped."""

    usable: int = 0
    crowd: int = 0
    emptied: list[str] = field(default_factory=list)


def count_boxes(data: dict[str, Any]) -> BoxCounts:
    """Count a readable set's boxes by the loader's rules (``coco_rules.training_box``)."""
    images = [r for r in data["images"] if isinstance(r, dict) and "id" in r]
    sizes = {r["id"]: image_size(r) for r in images}
    names = {r["id"]: r.get("file_name") for r in images}
    per_image: dict[Any, list[bool]] = defaultdict(list)
    counts = BoxCounts()
    for ann in data.get("annotations") or []:
        size = sizes.get(ann["image_id"])
        if size is None:
            continue
        if ann.get("iscrowd"):
            counts.crowd += 1
            continue
        kept = training_box(ann["bbox"], *size) is not None
        counts.usable += kept
        per_image[ann["image_id"]].append(kept)
    counts.emptied = [str(names[i]) for i, kept in per_image.items() if not any(kept)]
    return counts


def _box_problems(report: ValidationReport, role: str) -> list[str]:
    """A training set with nothing to learn from, a val set with nothing to measure."""
    if not isinstance(report.data, dict):
        return []
    counts = count_boxes(report.data)
    name = report.annotations_path
    if counts.emptied:
        log.warning(
            "pre-flight %s: %d images lost every box (zero size, NaN or outside the image) and "
            "are %s as negatives: %s",
            name,
            len(counts.emptied),
            "trained" if role == "train" else "evaluated",
            ", ".join(counts.emptied[:5]) + (" ..." if len(counts.emptied) > 5 else ""),
        )
    if role == "train" and counts.usable == 0:
        return [
            f"[no_usable_boxes] the training set has no usable box ({counts.crowd} iscrowd, "
            "every other box dropped or none at all): there is nothing to learn from; label the "
            f"images, or check the boxes with python tools/validate.py {name}"
        ]
    if role == "val" and counts.usable == 0:
        what = (
            f"only {counts.crowd} iscrowd boxes, which COCO evaluation ignores (mAP -1)"
            if counts.crowd
            else "no usable box"
        )
        return [
            f"[val_without_boxes] the val set has {what}: no checkpoint could ever be "
            "measured, so best.pt would mean nothing; point data.val_annotations at a "
            "labelled set (or leave it empty to train without evaluation)"
        ]
    return []


def _image_key(problem: Problem) -> Any:
    return (
        problem.image_id if problem.image_id is not None else (problem.file_name or problem.message)
    )


def _fixed_name(path: Path | None, tag: str = "fixed") -> str:
    path = Path(path or "annotations.json")
    return str(path.with_name(f"{path.stem}.{tag}.json"))


def _log_findings(report: ValidationReport) -> None:
    """Log what does not stop the run: dropped boxes, warnings, negatives and crowd boxes."""
    name = report.annotations_path.name if report.annotations_path else "<data>"
    skipped = [p for p in report.errors if p.kind in SKIPPED_BOX_KINDS]
    if skipped:
        counts = Counter(p.kind for p in skipped)
        what = ", ".join(f"{n} {SKIPPED_BOX_KINDS[k]}" for k, n in counts.items())
        log.warning(
            "pre-flight %s: %d boxes are skipped in training (%s), e.g. %s",
            name,
            len(skipped),
            what,
            skipped[0].message,
        )
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in report.warnings:
        if p.kind not in STOPPING_WARNINGS:
            by_kind[p.kind].append(p)
    for kind, group in by_kind.items():
        examples = "; ".join(p.message for p in group[:3])
        more = f" (and {len(group) - 3} more)" if len(group) > 3 else ""
        log.warning("pre-flight %s: [%s] x%d: %s%s", name, kind, len(group), examples, more)
    infos = Counter(p.kind for p in report.infos)
    if infos.get("negative"):
        log.info(
            "pre-flight %s: %d images without boxes, trained as negatives (background only)",
            name,
            infos["negative"],
        )
    for p in report.infos:
        if p.kind == "crowd_boxes":
            log.info("pre-flight %s: %s", name, p.message)
    for kind in ("exif_orientation", "wrong_extension", "symlink_outside"):
        if infos.get(kind):
            example = next(p.message for p in report.infos if p.kind == kind)
            log.info("pre-flight %s: [%s] x%d, e.g. %s", name, kind, infos[kind], example)
