"""Data stage: a COCO-format set as (image tensor, target) pairs for torchvision detectors.

The box and record rules are ``detector.coco_rules``'s. Boxes are converted from COCO xywh to
xyxy, clamped to the image and dropped when empty (with a logged count); a missing ``area`` is
filled from the box (logged); images without boxes are kept as negatives; iscrowd boxes are left out of
training (COCOeval still uses them as "ignore" regions at evaluation).
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from pycocotools.coco import COCO

from .coco_rules import (
    annotation_record_problem,
    area_of,
    image_size,
    image_truncation,
    is_int_id,
    parse_bbox,
    training_box,
)
from .cocotools.common import CocoError, default_image_dir, load_coco_json
from .config import AugmentConfig, DataConfig
from .fileio import ImageReadError, read_image_rgb, resolve_inside

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The COCO file or its images are unusable; the message names the file and the record."""


@dataclass
class CocoSet:
    """A parsed COCO file: pycocotools index plus the class mapping the model uses."""

    annotations_path: Path
    image_dir: Path
    coco: COCO
    image_ids: list[int]
    class_names: list[str]
    category_ids: list[int]  # COCO category id of model label i + 1
    dropped_boxes: int = 0
    crowd_boxes: int = 0
    boxes: dict[int, np.ndarray] = field(default_factory=dict)  # image id -> [N,4] xyxy
    labels: dict[int, np.ndarray] = field(default_factory=dict)  # image id -> [N] model labels

    @property
    def label_of_category(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.category_ids)}

    def image_info(self, image_id: int) -> dict[str, Any]:
        return self.coco.imgs[image_id]

    def image_path(self, image_id: int) -> Path:
        info = self.coco.imgs[image_id]
        return resolve_inside(
            self.image_dir, str(info["file_name"]), f"image id {image_id} file_name"
        )


def load_coco(
    annotations: str | Path,
    image_dir: str | Path | None = None,
    class_names: list[str] | None = None,
) -> CocoSet:
    """Parse and check a COCO file; ``class_names`` forces the class order (e.g. val = train)."""
    path = Path(annotations)
    try:
        raw = load_coco_json(path)
    except CocoError as e:
        raise DatasetError(str(e)) from None
    _check_records(raw, path)
    _fill_missing_areas(raw, path)
    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()

    categories = raw["categories"]
    if class_names is None:
        names = [str(c["name"]) for c in categories]
        ids = [int(c["id"]) for c in categories]
    else:
        by_name = _match_class_names(class_names, categories, path)
        missing = [n for n in class_names if n not in by_name]
        if len(missing) == len(class_names):
            raise DatasetError(
                f"{path}: none of the model's classes {class_names} is in this file "
                f"(it has {sorted(str(c['name']) for c in categories)}); evaluate on a set with "
                "the same class names"
            )
        if missing:
            log.warning("%s: no category %s: their AP is not measured on this set", path, missing)
        # A class absent from the file gets an id no annotation uses, so its detections count
        # for nothing instead of being credited to another class.
        unused = min([0, *(int(c["id"]) for c in categories)]) - 1
        names, ids = list(class_names), []
        for name in class_names:
            ids.append(by_name.get(name, unused))
            unused -= name not in by_name
    if not names:
        raise DatasetError(f"{path}: no categories; a detector needs at least one class")
    if len(set(names)) != len(names):
        raise DatasetError(
            f"{path}: duplicate category names {names}; merge them first (tools/merge.py)"
        )

    image_dir = Path(image_dir) if image_dir else default_image_dir(path)
    if not image_dir.is_dir():
        raise DatasetError(f"{path}: image folder {image_dir} not found (set data.*_images)")
    cset = CocoSet(path, image_dir, coco, sorted(coco.imgs), names, ids)
    _collect_boxes(cset)
    return cset


def _match_class_names(
    class_names: list[str], categories: list[dict[str, Any]], path: Path
) -> dict[str, int]:
    """Model class name -> category id of this file; a name differing only in case or
    surrounding whitespace matches (logged), as label tools disagree on both."""
    by_name = {str(c["name"]): int(c["id"]) for c in categories}
    by_key: dict[str, list[str]] = {}
    for name in by_name:
        by_key.setdefault(name.strip().casefold(), []).append(name)
    matched = {}
    for name in class_names:
        if name in by_name:
            matched[name] = by_name[name]
            continue
        spellings = by_key.get(name.strip().casefold(), [])
        if len(spellings) == 1:
            log.info(
                "%s: model class %r matched to category %r (case and surrounding whitespace "
                "ignored)",
                path,
                name,
                spellings[0],
            )
            matched[name] = by_name[spellings[0]]
        elif spellings:
            raise DatasetError(
                f"{path}: model class {name!r} matches several categories {spellings} when case "
                "and whitespace are ignored; merge them (tools/merge.py) or rename one"
            )
    return matched


def _check_records(raw: dict[str, Any], path: Path) -> None:
    """The first record pycocotools or the loader cannot index, as a DatasetError naming it.

    The pre-flight check (tools/validate.py's rules) then lists every such record at once."""
    for key in ("images", "annotations", "categories"):
        seen: set[Any] = set()
        for record in raw[key]:
            if not isinstance(record, dict) or "id" not in record:
                raise DatasetError(f"{path}: a record in '{key}' has no id: {str(record)[:120]}")
            if record["id"] in seen:
                raise DatasetError(
                    f"{path}: duplicate {key[:-1]} id {record['id']}; renumber with "
                    "tools/validate.py --fix"
                )
            seen.add(record["id"])
    fix = f"; run python tools/validate.py {path} --fix FIXED.json"
    for record in raw["images"]:  # (unsafe file names are refused when the image is read)
        problem = None
        if not is_int_id(record["id"]):
            problem = "the id is not an integer (COCO image ids are integers)"
        elif image_size(record) is None:
            problem = "has no valid width/height (positive whole numbers)"
        if problem:
            raise DatasetError(f"{path}: image id {record['id']!r}: {problem}{fix}")
    for ann in raw["annotations"]:
        problem = annotation_record_problem(ann)
        if problem is None and parse_bbox(ann.get("bbox")) is None:
            problem = f"bbox {ann.get('bbox')!r} is not four numbers [x, y, width, height]"
        if problem:
            raise DatasetError(f"{path}: annotation id {ann['id']!r}: {problem}{fix}")


def _fill_missing_areas(raw: dict[str, Any], path: Path) -> None:
    """COCO evaluation reads ``area``; a set without it gets width * height of the box."""
    filled = 0
    for ann in raw["annotations"]:
        if area_of(ann) is None:
            box = parse_bbox(ann["bbox"])
            assert box is not None  # _check_records
            ann["area"] = max(box[2], 0.0) * max(box[3], 0.0)
            filled += 1
    if filled:
        log.info(
            "%s: %d annotations have no usable 'area'; filled with width * height of the box "
            "(tools/validate.py --fix writes it into the file)",
            path,
            filled,
        )


def _collect_boxes(cset: CocoSet) -> None:
    """Per-image xyxy boxes and model labels, clamped; empty boxes dropped and counted."""
    label_of = cset.label_of_category
    known = {int(c["id"]) for c in cset.coco.dataset["categories"]}
    for image_id in cset.image_ids:
        info = cset.coco.imgs[image_id]
        width, height = image_size(info) or (0, 0)  # _check_records made sure
        boxes, labels = [], []
        for ann in cset.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                cset.crowd_boxes += 1
                continue
            category = int(ann["category_id"])
            if category not in known:
                raise DatasetError(
                    f"{cset.annotations_path}: annotation id {ann['id']} has category_id {category} "
                    f"which is not in 'categories' (ids {sorted(known)})"
                )
            if category not in label_of:
                continue  # a class not trained on (val set with extra classes)
            box = training_box(ann["bbox"], width, height)
            if box is None:
                cset.dropped_boxes += 1
                log.debug("annotation %s: empty after clamping to the image, dropped", ann["id"])
                continue
            boxes.append(box)
            labels.append(label_of[category])
        cset.boxes[image_id] = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        cset.labels[image_id] = np.asarray(labels, dtype=np.int64)
    if cset.dropped_boxes:
        log.warning(
            "%s: dropped %d boxes of zero area after clamping to the image",
            cset.annotations_path,
            cset.dropped_boxes,
        )


def build_augmentation(cfg: AugmentConfig) -> A.Compose | None:
    """A bbox-safe albumentations pipeline from the config; None when all are off."""
    transforms: list[A.BasicTransform] = []
    if cfg.crop > 0:
        transforms.append(A.BBoxSafeRandomCrop(erosion_rate=0.0, p=cfg.crop))
    if cfg.scale > 0:
        transforms.append(A.Affine(scale=(cfg.scale_min, cfg.scale_max), p=cfg.scale))
    if cfg.hflip > 0:
        transforms.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.brightness_contrast > 0:
        transforms.append(A.RandomBrightnessContrast(p=cfg.brightness_contrast))
    if cfg.hue_saturation > 0:
        transforms.append(A.HueSaturationValue(p=cfg.hue_saturation))
    if cfg.blur > 0:
        transforms.append(A.Blur(blur_limit=(3, 5), p=cfg.blur))
    if not transforms:
        return None
    return A.Compose(
        transforms,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["labels"],
            min_visibility=cfg.min_visibility,
            clip=True,
        ),
    )


class DetectionDataset(torch.utils.data.Dataset):
    """(CHW float image in [0, 1], target) pairs; augmentation seeded per (seed, epoch, index).

    Per-sample seeding makes a run reproducible whatever the number of workers, and lets a
    resumed run see exactly the images an uninterrupted one would have seen.
    """

    def __init__(self, cset: CocoSet, augment: A.Compose | None = None, seed: int = 0):
        self.cset = cset
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.groups: list[int] | None = None  # aspect-ratio group per index (epoch_batches)
        self.images: dict[int, np.ndarray] | None = None  # decoded images kept in RAM (preload)

    def preload(self, max_gb: float) -> None:
        """Decode every image once and keep it in RAM (workers share it copy-on-write)."""
        infos = [self.cset.image_info(i) for i in self.cset.image_ids]
        need = sum(int(i["width"]) * int(i["height"]) * 3 for i in infos) / 1e9
        log.info(
            "data.cache_images: %d decoded images, ~%.2f GB in RAM (limit data.cache_images_max_gb=%g)",
            len(infos),
            need,
            max_gb,
        )
        if need > max_gb:
            raise DatasetError(
                f"data.cache_images: the {len(infos)} decoded images need ~{need:.2f} GB, over "
                f"data.cache_images_max_gb={max_gb:g}; raise it or set data.cache_images=false"
            )
        self.images = {image_id: self.load_image(image_id) for image_id in self.cset.image_ids}

    def __len__(self) -> int:
        return len(self.cset.image_ids)

    def load_image(self, image_id: int) -> np.ndarray:
        if self.images is not None and image_id in self.images:
            return self.images[image_id].copy()
        path = self.cset.image_path(image_id)
        image = read_image_rgb(path)
        truncated = image_truncation(path)  # OpenCV fills a cut-off JPEG grey without a word
        if truncated:
            raise ImageReadError(f"{path} (image id {image_id}): {truncated}")
        info = self.cset.image_info(image_id)
        height, width = image.shape[:2]
        if (width, height) != (int(info["width"]), int(info["height"])):
            hint = (
                " The file's EXIF orientation rotates it: the labels were made on the raw, "
                "unrotated pixels or the stored size is stale."
                if (height, width) == (int(info["width"]), int(info["height"]))
                else ""
            )
            raise ImageReadError(
                f"{path}: image is {width}x{height} but {self.cset.annotations_path.name} says "
                f"{info['width']}x{info['height']} (image id {image_id}).{hint} Check the boxes, "
                "then run tools/validate.py --fix to correct the sizes."
            )
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.cset.image_ids[index]
        image = self.load_image(image_id)
        boxes = self.cset.boxes[image_id]
        labels = self.cset.labels[image_id]
        if self.augment is not None:
            self.augment.set_random_seed(sample_seed(self.seed, self.epoch, index))
            out = self.augment(image=image, bboxes=boxes, labels=labels)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }
        return tensor, target


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**32)


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def epoch_batches(
    num_images: int, batch_size: int, seed: int, epoch: int, groups: list[int] | None = None
) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch): resumable.

    With ``groups`` (aspect-ratio group per index) a batch takes images of one group, as
    torchvision's GroupedBatchSampler does: walking the shuffled order, a group's batch is
    emitted when full; the leftovers of all groups end the epoch, mixed, so each image is
    still seen exactly once and there are still ceil(num_images / batch_size) batches.
    """
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(num_images, generator=generator).tolist()
    if groups is None:
        return [order[i : i + batch_size] for i in range(0, num_images, batch_size)]
    batches, buckets = [], defaultdict(list)
    for index in order:
        bucket = buckets[groups[index]]
        bucket.append(index)
        if len(bucket) == batch_size:
            batches.append(bucket.copy())
            bucket.clear()
    rest = [i for bucket in buckets.values() for i in bucket]
    return batches + [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]


def aspect_ratio_groups(cset: CocoSet, factor: int) -> list[int]:
    """Group of each image by width/height, in torchvision references' bins (2 ** linspace(-1, 1, 2k+1))."""
    bins = (2 ** np.linspace(-1, 1, 2 * factor + 1)).tolist() if factor > 0 else [1.0]
    ratios = [
        float(cset.image_info(i)["width"]) / float(cset.image_info(i)["height"])
        for i in cset.image_ids
    ]
    return [int(np.digitize(r, bins)) for r in ratios]


def make_loader(
    dataset: DetectionDataset, batches: list[list[int]] | None, batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """A DataLoader over explicit batches (training) or in order (evaluation)."""
    common: dict[str, Any] = {
        "num_workers": num_workers,
        "collate_fn": collate,
        "pin_memory": torch.cuda.is_available(),
    }
    if num_workers > 0:
        common["persistent_workers"] = False  # workers must see the new epoch number
        common["worker_init_fn"] = _leave_stop_signals_to_the_main_process
    if batches is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)


def _leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM. Ctrl-C in a terminal, systemd and SLURM signal
    the whole process group: a worker that died of it would make the main process raise
    "DataLoader worker exited unexpectedly" instead of finishing the batch and saving a checkpoint.
    The main process shuts its workers down itself, and they exit if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def describe(cset: CocoSet) -> str:
    num_boxes = sum(len(b) for b in cset.boxes.values())
    negatives = sum(1 for b in cset.boxes.values() if len(b) == 0)
    return (
        f"{cset.annotations_path}: {len(cset.image_ids)} images ({negatives} without boxes), "
        f"{num_boxes} boxes, {len(cset.class_names)} classes, {cset.crowd_boxes} iscrowd boxes "
        "left out of training"
    )


def data_sets(cfg: DataConfig) -> tuple[CocoSet, CocoSet | None]:
    """Train and (optional) val sets; val takes the train class order."""
    if not cfg.train_annotations:
        raise DatasetError("data.train_annotations: not set; point it at a COCO JSON file")
    train = load_coco(cfg.train_annotations, cfg.train_images)
    val = None
    if cfg.val_annotations:
        val = load_coco(cfg.val_annotations, cfg.val_images, class_names=train.class_names)
    return train, val
