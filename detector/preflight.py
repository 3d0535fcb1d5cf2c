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
* other warnings (boxes past the edge, which are clipped; files in the image folder that no
  record lists; classes without boxes) are logged, as are the counts of images without boxes
  (trained as negatives) and of iscrowd boxes (left out of training).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

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
    "symlink_outside",
    "duplicate_image_id",
    "wrong_image_dir",
}
SHOWN_PER_SET = 200  # lines of the message; tools/validate.py --all lists everything


def preflight(*sets: CocoSet | None, progress: bool = True) -> None:
    """Raise DatasetError listing every problem of the given (loaded) sets; log the rest."""
    _run([(s.annotations_path, s.image_dir) for s in sets if s is not None], progress)


def preflight_data(cfg: DataConfig, progress: bool = True) -> None:
    """The same check on the files a data config names, for sets that do not even load.

    Raises DatasetError with the full list when the files have errors; returns otherwise.
    """
    items: list[tuple[Path, Path | None]] = []
    if cfg.train_annotations:
        items.append(
            (Path(cfg.train_annotations), Path(cfg.train_images) if cfg.train_images else None)
        )
    if cfg.val_annotations:
        items.append((Path(cfg.val_annotations), Path(cfg.val_images) if cfg.val_images else None))
    _run(items, progress, announce=False)  # the caller re-raises the loader's error


def _run(items: list[tuple[Path, Path | None]], progress: bool, announce: bool = True) -> None:
    sections: list[str] = []
    total_problems = bad_images = checked = 0
    for json_path, image_dir in items:
        report = validate_coco(json_path, image_dir, decode=True, progress=progress)
        problems = _stopping_problems(report)
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
    hint = _zero_based_hint(report.data)
    if hint:
        lines.append(hint)
    return lines


def _zero_based_hint(data: Any) -> str | None:
    """Annotations use category_id 0 while the categories are numbered from 1: an off-by-one."""
    if not isinstance(data, dict):
        return None
    categories = data.get("categories") if isinstance(data.get("categories"), list) else []
    annotations = data.get("annotations") if isinstance(data.get("annotations"), list) else []
    cat_ids = {c.get("id") for c in categories if isinstance(c, dict)}
    int_ids = [c for c in cat_ids if isinstance(c, int) and not isinstance(c, bool)]
    used = {a.get("category_id") for a in annotations if isinstance(a, dict)}
    if 0 in used and 0 not in cat_ids and int_ids and min(int_ids) == 1:
        return (
            "[zero_based_category_ids] boxes use category_id 0 but the categories are "
            "numbered from 1: the ids look 0-based (YOLO class indices copied as COCO ids), "
            "so every other box may carry the class next to its own too. Re-convert the "
            "labels with tools/convert.py instead of renumbering by hand"
        )
    return None


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
    for kind in ("exif_orientation", "wrong_extension"):
        if infos.get(kind):
            example = next(p.message for p in report.infos if p.kind == kind)
            log.info("pre-flight %s: [%s] x%d, e.g. %s", name, kind, infos[kind], example)
