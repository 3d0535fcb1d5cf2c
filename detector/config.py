"""The one documented configuration of a run, with every default in this file.

A YAML file in ``configs/`` overrides these defaults; ``key.sub=value`` arguments on the command
line override the YAML. Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class DataConfig:
    # COCO JSON files. Image paths in them are relative to the image folder, which defaults to
    # ``images/`` beside the JSON (what tools/convert.py writes), else the JSON's own folder.
    train_annotations: str = ""
    val_annotations: str = ""
    train_images: str | None = None
    val_images: str | None = None
    # DataLoader worker processes; 0 loads in the training process (simplest to debug).
    num_workers: int = 2
    # Read every image once before training and stop with the full list of problems.
    preflight: bool = True
    # Keep the decoded training images in RAM (decode once, not every epoch); the size is
    # estimated (width x height x 3 bytes each) and announced, and training refuses to start
    # when it is over `cache_images_max_gb`. For small sets.
    cache_images: bool = False
    cache_images_max_gb: float = 4.0
    # Batch images of similar width/height together (less padding), like torchvision references'
    # GroupedBatchSampler with --aspect-ratio-group-factor; 0 disables, 3 is the references' value.
    # Deterministic per (seed, epoch), so resume stays exact.
    aspect_ratio_groups: int = 0


@dataclass
class ModelConfig:
    # fasterrcnn_resnet50_fpn | fasterrcnn_resnet50_fpn_v2 | fasterrcnn_mobilenet_v3_large_fpn |
    # fasterrcnn_mobilenet_v3_large_320_fpn | fasterrcnn_mobilenet_v2_fpn
    arch: str = "fasterrcnn_mobilenet_v3_large_fpn"
    # "coco": torchvision's COCO detector weights (torch hub cache); "none": random init;
    # a path: a torchvision state_dict or a checkpoint written by this pipeline.
    weights: str = "coco"
    # Backbone weights used when `weights` is "none": "imagenet" (hub cache), "none", or a path.
    weights_backbone: str = "none"
    # Resize range of torchvision's GeneralizedRCNNTransform; null keeps the arch default
    # (800/1333, or 320/640 for the *_320_fpn model).
    min_size: int | None = None
    max_size: int | None = None
    # Freeze backbone + FPN (FrozenBatchNorm, eval mode, requires_grad False).
    freeze_backbone: bool = True
    # Also freeze the region proposal network: only the RoI heads train.
    freeze_rpn: bool = False
    # Detections kept per image and the score below which they are dropped at inference.
    score_threshold: float = 0.05
    detections_per_image: int = 100
    # Sampled RoIs per image for the box head loss, and anchors per image for the RPN loss
    # (torchvision's defaults; Detectron2 users often lower the first to 128 for small sets).
    box_batch_size_per_image: int = 512
    rpn_batch_size_per_image: int = 256
    # Proposals per image at inference: kept per FPN level before NMS, and in total after it.
    # Null keeps the arch default (1000/1000; 150/150 for the *_320_fpn model). Every proposal
    # goes through the box head, so at small image sizes this is most of the inference time;
    # 300 costs little recall on sets with a few objects per image. Exported with the model.
    rpn_pre_nms_top_n_test: int | None = None
    rpn_post_nms_top_n_test: int | None = None
    # Add the training set's classes to the detector in `weights` (a checkpoint written by this
    # pipeline, or coco: its 80 named classes) instead of replacing its classes: best.pt is one
    # model, earlier classes first, whose earlier-class detections are exactly the earlier
    # detector's. Its whole trunk (backbone + FPN) is shared and stays frozen; the new classes get
    # their own RPN + RoI heads (docs/adding-classes.md).
    keep_classes: bool = False


@dataclass
class AugmentConfig:
    # Probabilities (0 disables). All are bounding-box safe; none are applied at evaluation.
    hflip: float = 0.5
    # Random zoom in/out by a factor in [scale_min, scale_max], with probability `scale`.
    scale: float = 0.0
    scale_min: float = 0.75
    scale_max: float = 1.25
    # Random crop that keeps every box inside it.
    crop: float = 0.0
    brightness_contrast: float = 0.3
    hue_saturation: float = 0.0
    blur: float = 0.0
    # A box cropped to less than this fraction of its area is dropped.
    min_visibility: float = 0.3


@dataclass
class UnfreezeConfig:
    # Optional second phase: after the frozen epochs, train this many more epochs with the FPN
    # and the last `backbone_blocks` blocks of the backbone body (0: FPN only; ResNet: layer4,
    # layer3, ...; MobileNet: inverted-residual blocks) trainable at `lr_scale` x the base lr.
    epochs: int = 0
    backbone_blocks: int = 1
    lr_scale: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 4
    # Gradient accumulation: the optimizer steps every `accumulate` batches.
    accumulate: int = 1
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | step
    # Linear warmup from lr * warmup_factor over this many optimizer steps.
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    # step scheduler: multiply lr by `gamma` at these epochs.
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    # Clip the global gradient norm (0 disables).
    clip_grad_norm: float = 10.0
    # Mixed precision on CUDA, in `amp_dtype`: bfloat16 (no loss scaling; falls back to float16
    # on GPUs without bf16) or float16 (with a GradScaler).
    amp: bool = True
    amp_dtype: str = "bfloat16"
    # Mixed precision on CPU too (bfloat16 autocast, when `amp` is on). Worth it on CPUs with
    # AVX512-BF16 or AMX, where the trainable heads' convs and matmuls run about 2x faster; other
    # CPUs emulate bf16 and get slower, so it is off by default and ignored (with a warning) there.
    amp_cpu: bool = False
    # CUDA only: backbone in channels_last memory format, and cudnn.benchmark (turn it off when
    # the images have many different sizes and aspect_ratio_groups is 0: every new size re-tunes).
    channels_last: bool = True
    cudnn_benchmark: bool = True
    # Fast path for frozen training (model.freeze_backbone): compute the FPN features of each
    # image view once and train the RPN + RoI heads on them every epoch (with model.freeze_rpn,
    # the proposals too, and only the RoI heads train). Views: the original, its horizontal flip
    # (when augment.hflip > 0) and `cache_views` photometric variants (when augment.brightness_contrast
    # or hue_saturation > 0; one is used with probability max of the two). Augmentations the views
    # cannot represent (scale, crop, blur) make the run fall back to the normal loop, with a log
    # line saying why; so does the unfreeze phase. The size (fp16) is announced before building,
    # and the run refuses to start when it exceeds `cache_max_gb`. `cache_dir`: null keeps the
    # cache in RAM, a folder keeps it on disk (reused by runs with the same weights, images and
    # settings).
    cache_features: bool = False
    cache_views: int = 2
    cache_max_gb: float = 8.0
    cache_dir: str | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Stop early when val mAP has not improved for this many evaluations (0 disables).
    patience: int = 0
    # Time budget: stop cleanly after this many hours, or at this wall-clock time ("06:00"),
    # keeping the best model. Null disables.
    max_hours: float | None = None
    until: str | None = None
    # A batch with a non-finite loss is skipped; this many in a row stop the run.
    max_nonfinite_batches: int = 5
    # Every N optimizer steps, and at the end of each epoch: a log line (losses, lr, images/s)
    # and TensorBoard scalars (train/loss, train/loss_classifier, ..., train/lr).
    log_every: int = 20
    # Where runs are written: <out_dir>/<name>/ ; name defaults to the config file's stem.
    out_dir: str = "runs"
    name: str | None = None
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)


@dataclass
class EvalConfig:
    # Evaluate on the val set every N epochs (and always after the last one).
    every: int = 1
    # Images drawn in the predictions-vs-ground-truth grid.
    grid_images: int = 8
    # Score threshold for the drawn predictions (mAP uses every detection).
    draw_score_threshold: float = 0.5


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short hash of the resolved config, stored in checkpoints and ONNX metadata."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


ARCHS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v2_fpn",
)


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_type)}, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string
    elif annotation is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _apply(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown key '{key}' (valid keys here: {close})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _parse_override(text: str) -> dict[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value, e.g. train.epochs=20")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    nested: dict[str, Any] = {}
    parts = dotted.strip().split(".")
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    checks = [
        (cfg.model.arch in ARCHS, "model.arch", f"one of {', '.join(ARCHS)}"),
        (cfg.train.optimizer in ("sgd", "adamw"), "train.optimizer", "sgd or adamw"),
        (cfg.train.scheduler in ("cosine", "step"), "train.scheduler", "cosine or step"),
        (cfg.train.epochs >= 0, "train.epochs", ">= 0"),
        (cfg.train.batch_size >= 1, "train.batch_size", ">= 1"),
        (cfg.train.accumulate >= 1, "train.accumulate", ">= 1"),
        (cfg.train.lr > 0, "train.lr", "> 0"),
        (cfg.train.max_hours is None or cfg.train.max_hours > 0, "train.max_hours", "> 0"),
        (cfg.train.max_nonfinite_batches >= 1, "train.max_nonfinite_batches", ">= 1"),
        (cfg.train.unfreeze.epochs >= 0, "train.unfreeze.epochs", ">= 0"),
        (cfg.train.unfreeze.backbone_blocks >= 0, "train.unfreeze.backbone_blocks", ">= 0"),
        (
            0 < cfg.augment.scale_min <= cfg.augment.scale_max,
            "augment.scale_min",
            "0 < scale_min <= scale_max",
        ),
        (0.0 <= cfg.augment.min_visibility <= 1.0, "augment.min_visibility", "in [0, 1]"),
        (cfg.eval.every >= 1, "eval.every", ">= 1"),
        (cfg.data.num_workers >= 0, "data.num_workers", ">= 0"),
        (cfg.data.cache_images_max_gb > 0, "data.cache_images_max_gb", "> 0"),
        (cfg.data.aspect_ratio_groups >= 0, "data.aspect_ratio_groups", ">= 0"),
        (cfg.train.amp_dtype in ("bfloat16", "float16"), "train.amp_dtype", "bfloat16 or float16"),
        (cfg.train.cache_views >= 0, "train.cache_views", ">= 0"),
        (cfg.train.cache_max_gb > 0, "train.cache_max_gb", "> 0"),
        (cfg.model.box_batch_size_per_image >= 1, "model.box_batch_size_per_image", ">= 1"),
        (cfg.model.rpn_batch_size_per_image >= 1, "model.rpn_batch_size_per_image", ">= 1"),
    ]
    for name in ("rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"):
        n = getattr(cfg.model, name)
        checks.append((n is None or n >= 1, f"model.{name}", "null or >= 1"))
    for name in ("hflip", "scale", "crop", "brightness_contrast", "hue_saturation", "blur"):
        p = getattr(cfg.augment, name)
        checks.append((0.0 <= p <= 1.0, f"augment.{name}", "a probability in [0, 1]"))
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {expected}")
    if cfg.train.until is not None:
        parse_clock(cfg.train.until, "train.until")
    if cfg.model.keep_classes:
        _validate_keep_classes(cfg)


def _validate_keep_classes(cfg: Config) -> None:
    """model.keep_classes shares the earlier detector's trunk: nothing may train any of it."""
    why = "with model.keep_classes (the earlier detector's backbone + FPN are shared and frozen)"
    if not cfg.model.freeze_backbone:
        raise ConfigError(f"model.freeze_backbone: must be true {why}")
    if cfg.train.unfreeze.epochs > 0:
        raise ConfigError(f"train.unfreeze.epochs: must be 0 {why}")
    if cfg.model.weights.strip().lower() == "none":
        raise ConfigError(
            "model.weights: must name the earlier detector with model.keep_classes (a checkpoint "
            "written by detector, or coco)"
        )


def parse_clock(text: str, key: str = "train.until") -> tuple[int, int]:
    try:
        hours, minutes = (int(p) for p in text.split(":"))
        if not (0 <= hours < 24 and 0 <= minutes < 60):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{key}: expected a clock time like 06:00, got {text!r}") from None
    return hours, minutes


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    cfg = Config()
    _apply(cfg, values or {}, "")
    for text in overrides or []:
        _apply(cfg, _parse_override(text), "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key.sub=value`` overrides, validated."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping (data:, model:, train: ...)"
            )
    try:
        cfg = config_from_dict(values, overrides)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
    if cfg.train.name is None and path is not None:
        cfg.train.name = Path(path).stem
    return cfg
