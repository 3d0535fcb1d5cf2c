"""Numbers of a COCO set: boxes and images per class, box sizes, image sizes, negatives.

Box sizes use the box area (width * height) with COCO's thresholds: small < 32^2, medium < 96^2,
large otherwise. (COCOeval uses the annotation's ``area`` field, which for polygon labels is the
mask area, so its buckets can differ a little.) The log-scale histogram bins the box side
sqrt(width * height) in powers of two.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..coco_rules import image_size, usable_xywh
from ..fileio import UnsafePathError, atomic_write_with
from .common import safe_image_path

SMALL_MAX_AREA = 32**2
MEDIUM_MAX_AREA = 96**2
# Edges of the box-side histogram (px): 0-2, 2-4, ... 1024-2048, 2048+.
SIDE_BIN_EDGES = [0.0] + [2.0**k for k in range(1, 12)] + [math.inf]


@dataclass
class ClassStats:
    id: Any
    name: str
    boxes: int = 0  # all annotations of the class, iscrowd included
    crowd: int = 0  # of which iscrowd
    images: int = 0  # images with at least one box of the class
    small: int = 0
    medium: int = 0
    large: int = 0


@dataclass
class CocoStats:
    num_images: int
    num_annotations: int
    num_categories: int
    classes: list[ClassStats]
    negatives: int  # images with no annotation at all
    crowd: int
    invalid_boxes: int  # malformed, NaN/inf, or zero/negative width or height
    unknown_category_boxes: int
    unknown_image_boxes: int
    size_buckets: dict[str, int]  # small / medium / large over valid boxes
    side_histogram: list[tuple[float, float, int]]  # (from px, to px, boxes) of sqrt(w*h)
    box_sides: list[float] = field(repr=False, default_factory=list)
    box_rel_areas: list[float] = field(repr=False, default_factory=list)  # box area / image area
    image_sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    max_boxes_per_image: int = 0
    images_on_disk: int | None = None  # listed images found in the image folder, when checked

    @property
    def boxes_per_image(self) -> float:
        return self.num_annotations / self.num_images if self.num_images else 0.0


def coco_stats(data: dict[str, Any], images_dir: Path | None = None) -> CocoStats:
    """Count everything from a parsed COCO dict; ``images_dir`` also counts the files present."""
    categories = [c for c in data.get("categories", []) if isinstance(c, dict) and "id" in c]
    classes = {c["id"]: ClassStats(c["id"], str(c.get("name", c["id"]))) for c in categories}
    images = [r for r in data.get("images", []) if isinstance(r, dict) and "id" in r]
    size_of = {r["id"]: image_size(r) for r in images}
    annotations = [a for a in data.get("annotations") or [] if isinstance(a, dict)]
    per_image: Counter[Any] = Counter()
    classes_in_image: dict[Any, set[Any]] = defaultdict(set)
    buckets = {"small": 0, "medium": 0, "large": 0}
    sides: list[float] = []
    rel_areas: list[float] = []
    crowd = invalid = unknown_cat = unknown_img = 0
    for ann in annotations:
        image_id = ann.get("image_id")
        if image_id not in size_of:
            unknown_img += 1
            continue
        per_image[image_id] += 1
        cls = classes.get(ann.get("category_id"))
        is_crowd = bool(ann.get("iscrowd"))
        crowd += is_crowd
        if cls is None:
            unknown_cat += 1
        else:
            cls.boxes += 1
            cls.crowd += is_crowd
            classes_in_image[image_id].add(cls.id)
        box = usable_xywh(ann.get("bbox"))
        if box is None:
            invalid += 1
            continue
        area = box[2] * box[3]
        bucket = (
            "small" if area < SMALL_MAX_AREA else "medium" if area < MEDIUM_MAX_AREA else "large"
        )
        buckets[bucket] += 1
        if cls is not None:
            setattr(cls, bucket, getattr(cls, bucket) + 1)
        sides.append(math.sqrt(area))
        size = size_of[image_id]
        if size is not None:
            rel_areas.append(area / (size[0] * size[1]))
    for ids in classes_in_image.values():
        for cid in ids:
            classes[cid].images += 1
    histogram = [
        (lo, hi, sum(1 for s in sides if lo <= s < hi))
        for lo, hi in zip(SIDE_BIN_EDGES[:-1], SIDE_BIN_EDGES[1:], strict=True)
    ]
    image_sizes = Counter(size for size in size_of.values() if size is not None)
    return CocoStats(
        num_images=len(images),
        num_annotations=len(annotations),
        num_categories=len(categories),
        classes=list(classes.values()),
        negatives=sum(1 for r in images if not per_image[r["id"]]),
        crowd=crowd,
        invalid_boxes=invalid,
        unknown_category_boxes=unknown_cat,
        unknown_image_boxes=unknown_img,
        size_buckets=buckets,
        side_histogram=histogram,
        box_sides=sides,
        box_rel_areas=rel_areas,
        image_sizes=image_sizes,
        max_boxes_per_image=max(per_image.values(), default=0),
        images_on_disk=_images_on_disk(images, images_dir),
    )


def _images_on_disk(images: list[dict[str, Any]], images_dir: Path | None) -> int | None:
    if images_dir is None:
        return None
    on_disk = 0
    for rec in images:
        with contextlib.suppress(UnsafePathError):
            on_disk += safe_image_path(images_dir, rec.get("file_name"), rec["id"]).is_file()
    return on_disk


def format_stats(stats: CocoStats, top_sizes: int = 8) -> str:
    width = max([len(c.name) for c in stats.classes] + [8])
    head = (
        f"{'class':<{width}} {'id':>5} {'boxes':>7} {'crowd':>6} {'images':>7} {'small':>6} "
        f"{'medium':>7} {'large':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in sorted(stats.classes, key=lambda c: (-c.boxes, c.name)):
        lines.append(
            f"{c.name:<{width}} {c.id!s:>5} {c.boxes:>7} {c.crowd:>6} {c.images:>7} "
            f"{c.small:>6} {c.medium:>7} {c.large:>6}"
        )
    lines.append("-" * len(head))
    on_disk = (
        f" ({stats.images_on_disk} found in the image folder)"
        if stats.images_on_disk is not None
        else ""
    )
    lines.append(
        f"images: {stats.num_images}{on_disk}, negatives (no boxes): {stats.negatives}, "
        f"boxes per image: {stats.boxes_per_image:.2f} mean, "
        f"{stats.max_boxes_per_image} max"
    )
    b = stats.size_buckets
    lines.append(
        f"box sizes (area w*h): small <32^2: {b['small']}, medium <96^2: {b['medium']}, "
        f"large: {b['large']}"
    )
    hist = ", ".join(
        f"{lo:g}-{hi:g}: {n}" if hi != math.inf else f"{lo:g}+: {n}"
        for lo, hi, n in stats.side_histogram
        if n
    )
    lines.append(f"box side sqrt(w*h) px: {hist or 'no boxes'}")
    sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in stats.image_sizes.most_common(top_sizes))
    more = len(stats.image_sizes) - top_sizes
    lines.append(
        f"image sizes ({len(stats.image_sizes)} distinct): {sizes}"
        + (f", ... {more} more" if more > 0 else "")
    )
    empty = [c.name for c in stats.classes if not c.boxes]
    if empty:
        lines.append(f"classes with no boxes: {', '.join(empty)}")
    extra = []
    if stats.invalid_boxes:
        extra.append(f"{stats.invalid_boxes} invalid boxes (not counted in sizes)")
    if stats.unknown_category_boxes:
        extra.append(f"{stats.unknown_category_boxes} boxes of unknown categories")
    if stats.unknown_image_boxes:
        extra.append(f"{stats.unknown_image_boxes} boxes of unknown images (not counted)")
    if extra:
        lines.append("problems: " + "; ".join(extra) + " (tools/validate.py tells more)")
    lines.append(
        f"summary: {stats.num_images} images, {stats.num_annotations} boxes "
        f"({stats.crowd} crowd), {stats.num_categories} classes, {stats.negatives} "
        "negatives"
    )
    return "\n".join(lines)


def stats_dict(stats: CocoStats) -> dict[str, Any]:
    """JSON-friendly form."""
    return {
        "images": stats.num_images,
        "annotations": stats.num_annotations,
        "categories": stats.num_categories,
        "negatives": stats.negatives,
        "crowd": stats.crowd,
        "invalid_boxes": stats.invalid_boxes,
        "unknown_category_boxes": stats.unknown_category_boxes,
        "unknown_image_boxes": stats.unknown_image_boxes,
        "size_buckets": stats.size_buckets,
        "images_on_disk": stats.images_on_disk,
        "max_boxes_per_image": stats.max_boxes_per_image,
        "classes": [vars(c) for c in stats.classes],
        "side_histogram": [
            {"from": lo, "to": None if hi == math.inf else hi, "boxes": n}
            for lo, hi, n in stats.side_histogram
        ],
        "image_sizes": [
            {"width": w, "height": h, "images": n} for (w, h), n in stats.image_sizes.most_common()
        ],
    }


def plot_stats(stats: CocoStats, path: str | Path, title: str = "") -> None:
    """A 2x2 PNG: boxes per class, box-side histogram (log scale), image sizes, size buckets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(stats.classes, key=lambda c: -c.boxes)
    shown = ordered[:40]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0][0]
    ys = range(len(shown))
    ax.barh(list(ys), [c.boxes for c in shown], color="tab:blue", label="boxes")
    ax.barh(list(ys), [c.images for c in shown], color="tab:orange", alpha=0.7, label="images")
    ax.set_yticks(list(ys), [c.name for c in shown], fontsize=7 if len(shown) > 20 else 9)
    ax.invert_yaxis()
    ax.set_title(
        "boxes and images per class"
        + (f" (top {len(shown)} of {len(ordered)})" if len(ordered) > len(shown) else "")
    )
    ax.legend()

    ax = axes[0][1]
    if stats.box_sides:
        top = max(stats.box_sides)
        edges = [e for e in SIDE_BIN_EDGES[1:-1] if e <= top * 2] or [2.0]
        bins = [1.0] + edges
        ax.hist([max(s, 1.0) for s in stats.box_sides], bins=bins, color="tab:green")
        ax.set_xscale("log", base=2)
        for edge, name in ((32, "small|medium"), (96, "medium|large")):
            ax.axvline(edge, color="gray", linestyle="--", linewidth=1)
            ax.text(edge, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=8, color="gray")
    ax.set_xlabel("box side sqrt(w*h), px (log scale)")
    ax.set_ylabel("boxes")
    ax.set_title("box size")

    ax = axes[1][0]
    if stats.image_sizes:
        sizes = list(stats.image_sizes.items())
        ax.scatter(
            [w for (w, _), _ in sizes],
            [h for (_, h), _ in sizes],
            s=[10 + 8 * n for _, n in sizes],
            alpha=0.5,
            color="tab:purple",
        )
    ax.set_xlabel("width px")
    ax.set_ylabel("height px")
    ax.set_title(f"image sizes ({stats.num_images} images, {stats.negatives} negatives)")

    ax = axes[1][1]
    names = ["small", "medium", "large"]
    ax.bar(
        names, [stats.size_buckets[n] for n in names], color=["tab:red", "tab:olive", "tab:cyan"]
    )
    for i, n in enumerate(names):
        ax.text(i, stats.size_buckets[n], str(stats.size_buckets[n]), ha="center", va="bottom")
    ax.set_title("COCO size buckets (box area: <32^2, <96^2, larger)")
    fig.suptitle(title or "dataset statistics")
    fig.tight_layout()
    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
