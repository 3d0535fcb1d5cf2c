"""Fast path for frozen training: FPN features (and frozen-RPN proposals) computed once per image view.

With the backbone + FPN frozen, every epoch recomputes the same features for the same image. Here
they are computed once, for a fixed set of *views* of each image (the original, its horizontal
flip, and ``train.cache_views`` photometric variants), stored as fp16 in RAM or on disk, and each
epoch trains ``model.rpn`` + ``model.roi_heads`` on them. With ``model.freeze_rpn`` the RPN
proposals are cached as well and only the RoI heads run.

What the cache holds is exactly what ``GeneralizedRCNN.forward`` has after its backbone call:
``model.transform`` resized and normalised the image (eval-mode resize, the same size training
uses when ``min_size`` has one value), the boxes were resized the same way, and ``image_sizes``
(needed by the RPN and the RoI heads) are kept per view. The trained model is the same model:
checkpoints, evaluation and export run the full network on images.

Batches: the normal loop pads a batch's images to its largest and runs the backbone on that, so
the RPN's anchors over a smaller image's padding see the backbone's features *of padding*. The
cache pastes each view's maps over the backbone's features of an all-padding image (computed
once, at the largest padded size in the set), which rebuilds that area away from the images;
zeros there would be features no image batch produces, and the RPN learns objectness on them.

Not bit-identical to the image path: features are stored in fp16, and each view was computed
padded alone (to a multiple of 32), which changes feature values within a receptive field of its
border. The random draws are the same (see CachedHeads), so with augmentation off the first-epoch
RPN losses agree to 1% and the total loss to a few percent (tests/test_fast_training.py); the RoI
losses move more, as near-tied proposals reorder.

Under torchrun every process builds (or, with ``train.cache_dir``, reuses) the whole cache: a
RAM cache is held once per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from tqdm import tqdm

from .config import Config
from .data import DetectionDataset, sample_seed
from .fileio import atomic_write_text
from .resize_rule import resized_size

log = logging.getLogger(__name__)


class FeatureCacheError(RuntimeError):
    """The feature cache cannot be built as configured (too large for its limit)."""


@dataclass
class CachePlan:
    """Which views of each image are cached and how an epoch picks one."""

    hflip: float  # probability of the flipped view (when no photometric view is picked)
    photometric: float  # probability of picking one of the photometric views
    variants: int  # photometric views per image
    proposals: bool  # frozen RPN: cache its proposals too, train only the RoI heads

    @property
    def views(self) -> list[str]:
        names = ["original"]
        if self.hflip > 0:
            names.append("hflip")
        names += [f"photometric{k}" for k in range(self.variants)]
        return names


def plan_cache(cfg: Config) -> tuple[CachePlan | None, str]:
    """(plan, "") when ``train.cache_features`` can be honoured, else (None, why not)."""
    if not cfg.train.cache_features:
        return None, "train.cache_features is false"
    reasons = []
    if not cfg.model.freeze_backbone:
        reasons.append(
            "model.freeze_backbone is false (the features change as the backbone trains)"
        )
    aug = cfg.augment
    for name in ("scale", "crop", "blur"):
        if getattr(aug, name) > 0:
            reasons.append(f"augment.{name}={getattr(aug, name)} makes new pixels every epoch")
    photometric = max(aug.brightness_contrast, aug.hue_saturation)
    if photometric > 0 and cfg.train.cache_views == 0:
        reasons.append(
            "photometric augmentation is on but train.cache_views=0 caches no variant of it"
        )
    if reasons:
        return None, "; ".join(reasons)
    variants = cfg.train.cache_views if photometric > 0 else 0
    return CachePlan(aug.hflip, photometric, variants, cfg.model.freeze_rpn), ""


def view_of(plan: CachePlan, seed: int, epoch: int, index: int) -> int:
    """The view image ``index`` shows in ``epoch``: a pure function, so resume stays exact."""
    rng = random.Random(sample_seed(seed, epoch, index))
    if plan.variants and rng.random() < plan.photometric:
        return (2 if plan.hflip > 0 else 1) + rng.randrange(plan.variants)
    return 1 if plan.hflip > 0 and rng.random() < plan.hflip else 0


def _photometric(cfg: Config) -> A.Compose:
    """A photometric variant applies every enabled photometric transform (random strength)."""
    transforms: list[A.BasicTransform] = []
    if cfg.augment.brightness_contrast > 0:
        transforms.append(A.RandomBrightnessContrast(p=1.0))
    if cfg.augment.hue_saturation > 0:
        transforms.append(A.HueSaturationValue(p=1.0))
    return A.Compose(transforms)


def _view_pixels(
    image: np.ndarray,
    boxes: np.ndarray,
    name: str,
    photometric: A.Compose | None,
    seed: int,
    index: int,
    hflip: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 HWC image and xyxy boxes of one view (flip as albumentations' HorizontalFlip)."""
    flip = name == "hflip"
    if name.startswith("photometric"):
        k = int(name[len("photometric") :])
        photometric.set_random_seed(sample_seed(seed, -1 - k, index))
        image = photometric(image=image)["image"]
        flip = hflip > 0 and k % 2 == 1  # odd variants are flipped: both orientations are covered
    if flip:
        width = image.shape[1]
        image = np.ascontiguousarray(image[:, ::-1])
        boxes = boxes.copy()
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    return image, boxes


@dataclass
class CachedView:
    """One view's cached state: what GeneralizedRCNN.forward holds after the backbone."""

    image_size: tuple[int, int]  # resized (h, w), before padding: ImageList.image_sizes
    padded_size: tuple[int, int]  # (h, w) padded to the size divisor, alone
    target: dict[str, torch.Tensor]  # boxes resized like the image, labels, image_id
    features: dict[str, torch.Tensor] | None = None  # level -> [C, h, w] fp16 (None: on disk)
    proposals: torch.Tensor | None = None  # frozen RPN's training-mode proposals, [N, 4] fp32
    path: Path | None = None  # disk cache file


@dataclass
class FeatureCache(torch.utils.data.Dataset):
    """Dataset of cached views; an epoch picks one view per image (see ``view_of``)."""

    views: list[list[CachedView]]  # image index -> its views
    plan: CachePlan
    seed: int
    bytes: int = 0
    epoch: int = 0
    groups: list[int] | None = None
    where: str = "RAM"
    # level -> [C, h, w]: the backbone's features of an all-padding image of the largest padded
    # size in the set; a batch's maps are pasted over a crop of it (see stack_features)
    padding: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> tuple[CachedView, dict[str, torch.Tensor]]:
        view = self.views[index][view_of(self.plan, self.seed, self.epoch, index)]
        if view.features is None:
            stored = torch.load(view.path, map_location="cpu", weights_only=True)
            view = CachedView(
                view.image_size,
                view.padded_size,
                view.target,
                stored["features"],
                stored.get("proposals"),
                view.path,
            )
        return view, view.target


class CachedHeads(nn.Module):
    """The part of GeneralizedRCNN.forward after the backbone, on cached views; returns the losses.

    Shares ``rpn`` and ``roi_heads`` with the model (a DDP wrapper around it syncs their
    gradients). Loss keys and order are the model's.
    """

    def __init__(self, model: nn.Module, padding: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads
        self.padding = (
            padding  # FeatureCache.padding; a plain attribute, so DDP never broadcasts it
        )
        # In training mode GeneralizedRCNNTransform draws one number per image to pick the size
        # (torch_choice); drawing it here too keeps the RNG stream (anchor/RoI sampling) aligned.
        self.resize_draws = not getattr(model.transform, "_skip_resize", False)

    def forward(
        self, views: list[CachedView], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        device = next(self.roi_heads.parameters()).device
        if self.resize_draws:
            for _ in views:
                torch.empty(1).uniform_(0.0, 1.0)
        if self.padding is not None and next(iter(self.padding.values())).device != device:
            self.padding = {k: v.to(device).float() for k, v in self.padding.items()}  # once
        features = stack_features(views, device, self.padding)
        image_sizes = [v.image_size for v in views]
        if views[0].proposals is not None:
            proposals = [v.proposals.to(device, non_blocking=True) for v in views]
            proposal_losses: dict[str, torch.Tensor] = {}
        else:
            height = max(v.padded_size[0] for v in views)
            width = max(v.padded_size[1] for v in views)
            # The anchor generator reads only the padded batch shape of ImageList.tensors.
            images = ImageList(
                torch.empty((len(views), 0, height, width), device=device), image_sizes
            )
            proposals, proposal_losses = self.rpn(images, features, targets)
        _, detector_losses = self.roi_heads(features, proposals, image_sizes, targets)
        return {**detector_losses, **proposal_losses}


def stack_features(
    views: list[CachedView], device: torch.device, padding: dict[str, torch.Tensor] | None = None
) -> OrderedDict[str, torch.Tensor]:
    """Per level, the views' fp16 maps padded to the largest and stacked, as fp32.

    The padding is ``padding`` (the backbone's features of an all-padding image, cropped), what
    the backbone gives the normal loop's padded batch away from the images; zeros without it.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in views[0].features:
        maps = [v.features[name] for v in views]
        height, width = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
        shape = (len(maps), maps[0].shape[0], height, width)
        if padding is None:
            batch = torch.zeros(shape, device=device)
        else:
            batch = (
                padding[name][:, :height, :width].to(device, torch.float32).expand(shape).clone()
            )
        for i, m in enumerate(maps):
            batch[i, :, : m.shape[1], : m.shape[2]] = m.to(device, non_blocking=True)
        out[name] = batch
    return out


def _resized_shape(model: nn.Module, height: int, width: int) -> tuple[int, int, int, int]:
    """(h, w, padded h, padded w) after model.transform, without running it (for the estimate)."""
    transform = model.transform
    h, w = resized_size(height, width, int(transform.min_size[-1]), int(transform.max_size))
    divisor = transform.size_divisible
    return h, w, math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor


def _cache_key(
    model: nn.Module,
    dataset: DetectionDataset,
    plan: CachePlan,
    cfg: Config,
    amp_dtype: torch.dtype | None = None,
) -> str:
    """Content key of a disk cache: weights that make the features, resize, views, image files,
    and the autocast dtype they were computed in."""
    digest = hashlib.sha256()
    modules = [model.backbone] + ([model.rpn] if plan.proposals else [])
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(
                tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
    t = model.transform
    for image_id in dataset.cset.image_ids:
        stat = dataset.cset.image_path(image_id).stat()
        digest.update(f"{image_id}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    settings = {
        "min": list(t.min_size),
        "max": t.max_size,
        "mean": list(t.image_mean),
        "std": list(t.image_std),
        "plan": plan.__dict__,
        "augment": cfg.augment.__dict__,
        "seed": cfg.train.seed,
        "boxes": {str(k): v.tolist() for k, v in dataset.cset.boxes.items()},
    }
    if amp_dtype is not None:  # (float32 caches keep the keys they had before this setting existed)
        settings["autocast"] = str(amp_dtype)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def build_feature_cache(
    model: nn.Module,
    dataset: DetectionDataset,
    cfg: Config,
    plan: CachePlan,
    device: torch.device,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> FeatureCache:
    """Announce the size, refuse past ``train.cache_max_gb``, then compute every view once.

    Runs in eval mode inside ``torch.random.fork_rng``: building never moves the global RNG, so
    a resumed run (which rebuilds the cache) draws exactly what an uninterrupted one would. The
    backbone runs under autocast when ``amp_dtype`` is bfloat16, as the normal loop's would; not
    in float16, whose overflows would be cached as inf.
    """
    was_training = model.training
    model.eval()
    if plan.proposals:
        model.rpn.training = True  # training-mode proposal counts, as set_train_mode gives the loop
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            return _build(
                model,
                dataset,
                cfg,
                plan,
                device,
                progress,
                amp_dtype if amp_dtype == torch.bfloat16 else None,
            )
    finally:
        model.train(was_training)


@dataclass
class _ViewInputs:
    """What computing one cached view needs, besides the image index and the view name."""

    model: nn.Module
    dataset: DetectionDataset
    cfg: Config
    plan: CachePlan
    device: torch.device
    amp_dtype: torch.dtype | None
    photometric: A.Compose | None
    levels: list[str] | None  # the RoI heads' feature levels, when proposals are cached


def _build(
    model,
    dataset: DetectionDataset,
    cfg: Config,
    plan: CachePlan,
    device: torch.device,
    progress: bool,
    amp_dtype: torch.dtype | None,
) -> FeatureCache:
    photometric = _photometric(cfg) if plan.variants else None
    levels = list(model.roi_heads.box_roi_pool.featmap_names) if plan.proposals else None
    inputs = _ViewInputs(model, dataset, cfg, plan, device, amp_dtype, photometric, levels)
    where = f"disk ({cfg.train.cache_dir})" if cfg.train.cache_dir else "RAM"
    first = _compute_view(inputs, 0, plan.views[0])
    _check_cache_size(_estimated_bytes(model, dataset, plan, first), dataset, cfg, plan, where)

    folder = None
    if cfg.train.cache_dir:
        folder = Path(cfg.train.cache_dir) / _cache_key(model, dataset, plan, cfg, amp_dtype)
        if (folder / "manifest.json").is_file():
            log.info("feature cache: reusing %s", folder)
            views, stored_bytes = _read_manifest(folder)
            return _feature_cache(inputs, views, stored_bytes, where)
        folder.mkdir(parents=True, exist_ok=True)

    views, stored_bytes = _compute_views(inputs, first, folder, progress)
    if folder is not None:
        meta = {"bytes": stored_bytes, "views": [[_to_meta(v) for v in row] for row in views]}
        atomic_write_text(folder / "manifest.json", json.dumps(meta))
    log.info("feature cache: %.2f GB stored in %s", stored_bytes / 1e9, where)
    return _feature_cache(inputs, views, stored_bytes, where)


def _feature_cache(
    inputs: _ViewInputs, views: list[list[CachedView]], stored_bytes: int, where: str
) -> FeatureCache:
    return FeatureCache(
        views,
        inputs.plan,
        inputs.cfg.train.seed,
        stored_bytes,
        where=where,
        padding=_padding_features(
            inputs.model, views, inputs.device, inputs.amp_dtype, inputs.levels
        ),
    )


def _view_tensors(
    inputs: _ViewInputs, index: int, view: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The view's pixels as a float CHW tensor in [0, 1] and its target, at the image's size."""
    cset = inputs.dataset.cset
    image_id = cset.image_ids[index]
    pixels, boxes = _view_pixels(
        inputs.dataset.load_image(image_id),
        cset.boxes[image_id],
        view,
        inputs.photometric,
        inputs.cfg.train.seed,
        index,
        inputs.plan.hflip,
    )
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)
    target = {
        "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
        "labels": torch.from_numpy(cset.labels[image_id].copy()),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
    }
    return tensor, target


def _compute_view(inputs: _ViewInputs, index: int, view: str) -> CachedView:
    model, device, amp_dtype = inputs.model, inputs.device, inputs.amp_dtype
    tensor, target = _view_tensors(inputs, index, view)
    images, targets = model.transform(
        [tensor.to(device)], [{k: v.to(device) for k, v in target.items()}]
    )
    with torch.autocast(
        device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
    ):
        features = model.backbone(images.tensors)
    proposals = None
    if inputs.plan.proposals:
        # The RPN in float32 even under amp: cached proposals are used every epoch.
        features = OrderedDict((k, v.float()) for k, v in features.items())
        proposals = model.rpn(images, features, targets)[0][0].float().cpu()
        # Keep only what RoIAlign reads.
        features = OrderedDict((k, v) for k, v in features.items() if k in inputs.levels)
    stored = {}
    for key, value in features.items():
        stored[key] = _for_storage(value[0])
        if device.type == "cuda" and not inputs.cfg.train.cache_dir:
            stored[key] = stored[key].pin_memory()  # asynchronous copies to the GPU each batch
    resized = {
        "boxes": targets[0]["boxes"].float().cpu(),
        "labels": targets[0]["labels"].cpu(),
        "image_id": target["image_id"],
    }
    return CachedView(
        tuple(images.image_sizes[0]),
        tuple(images.tensors.shape[-2:]),
        resized,
        stored,
        proposals,
    )


def _estimated_bytes(
    model: nn.Module, dataset: DetectionDataset, plan: CachePlan, first: CachedView
) -> int:
    """The cache's size, from the first view's level shapes and every image's resized size."""
    cset = dataset.cset
    per_pixel = [
        (f.shape[0], first.padded_size[0] / f.shape[1], f.element_size())
        for f in first.features.values()
    ]
    proposal_bytes = first.proposals.numel() * 4 if first.proposals is not None else 0
    total = 0
    for image_id in cset.image_ids:
        info = cset.image_info(image_id)
        _, _, ph, pw = _resized_shape(model, int(info["height"]), int(info["width"]))
        one = sum(c * math.ceil(ph / s) * math.ceil(pw / s) * size for c, s, size in per_pixel)
        total += (one + proposal_bytes) * len(plan.views)
    return total


def _check_cache_size(
    total: float, dataset: DetectionDataset, cfg: Config, plan: CachePlan, where: str
) -> None:
    """Announce the cache's size; refuse one past ``train.cache_max_gb``."""
    n_images, names = len(dataset.cset.image_ids), plan.views
    what = (
        "features + proposals (frozen RPN: only the RoI heads train)"
        if plan.proposals
        else "FPN features"
    )
    log.info(
        "feature cache: %d images x %d views (%s) of %s, ~%.2f GB fp16 in %s (limit train.cache_max_gb=%g)",
        n_images,
        len(names),
        ", ".join(names),
        what,
        total / 1e9,
        where,
        cfg.train.cache_max_gb,
    )
    if total > cfg.train.cache_max_gb * 1e9:
        raise FeatureCacheError(
            f"the feature cache needs ~{total / 1e9:.2f} GB ({n_images} images x {len(names)} views) "
            f"but train.cache_max_gb={cfg.train.cache_max_gb:g}: raise train.cache_max_gb, lower "
            "train.cache_views or model.min_size, or set train.cache_features=false"
        )


def _read_manifest(folder: Path) -> tuple[list[list[CachedView]], int]:
    meta = json.loads((folder / "manifest.json").read_text())
    views = [[_from_meta(folder, m) for m in image] for image in meta["views"]]
    return views, meta["bytes"]


def _save_view(view: CachedView, path: Path) -> None:
    """Write the view's tensors to ``path`` and drop them from memory."""
    view.path = path
    # Temp file + rename: torchrun processes building the same cache never see half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"features": view.features, "proposals": view.proposals}, tmp)
    os.replace(tmp, path)
    view.features = view.proposals = None


def _compute_views(
    inputs: _ViewInputs, first: CachedView, folder: Path | None, progress: bool
) -> tuple[list[list[CachedView]], int]:
    """Every view of every image (``first`` is view 0 of image 0), and the bytes they hold."""
    n_images, names = len(inputs.dataset.cset.image_ids), inputs.plan.views
    views: list[list[CachedView]] = []
    stored_bytes = 0
    bar = tqdm(
        total=n_images * len(names), desc="feature cache", disable=not progress, dynamic_ncols=True
    )
    for index in range(n_images):
        row = []
        for v, name in enumerate(names):
            view = first if (index, v) == (0, 0) else _compute_view(inputs, index, name)
            stored_bytes += sum(f.numel() * f.element_size() for f in view.features.values())
            if folder is not None:
                _save_view(view, folder / f"{index}_{v}.pt")
            row.append(view)
            bar.update(1)
        views.append(row)
    bar.close()
    return views, stored_bytes


def _padding_features(
    model: nn.Module,
    views: list[list[CachedView]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    levels: list[str] | None,
) -> dict[str, torch.Tensor]:
    """The backbone's features of an all-padding image as large as the largest padded view.

    GeneralizedRCNNTransform pads after normalising, with zeros, so the image is zeros. Any
    batch's padded shape fits inside it: stack_features crops its top-left corner.
    """
    height = max(v.padded_size[0] for row in views for v in row)
    width = max(v.padded_size[1] for row in views for v in row)
    with torch.autocast(
        device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
    ):
        features = model.backbone(torch.zeros((1, 3, height, width), device=device))
    return {
        key: _for_storage(value[0])
        for key, value in features.items()
        if levels is None or key in levels
    }


def _for_storage(feature: torch.Tensor) -> torch.Tensor:
    """A [C, h, w] map as stored: fp16 CHW on the CPU, float32 where fp16 would overflow."""
    half = feature.to(torch.float16).contiguous()  # (channels_last on CUDA: back to CHW)
    return (half if torch.isfinite(half).all() else feature.float()).cpu()


def _to_meta(view: CachedView) -> dict[str, Any]:
    return {
        "image_size": list(view.image_size),
        "padded_size": list(view.padded_size),
        "boxes": view.target["boxes"].tolist(),
        "labels": view.target["labels"].tolist(),
        "image_id": int(view.target["image_id"]),
        "file": view.path.name,
    }


def _from_meta(folder: Path, meta: dict[str, Any]) -> CachedView:
    target = {
        "boxes": torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(meta["labels"], dtype=torch.int64),
        "image_id": torch.tensor(meta["image_id"], dtype=torch.int64),
    }
    return CachedView(
        tuple(meta["image_size"]), tuple(meta["padded_size"]), target, path=folder / meta["file"]
    )
