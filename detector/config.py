"""The one documented configuration of a run, with every default in this file.

A YAML file in ``configs/`` overrides these defaults; ``key.sub=value`` arguments on the command
line override the YAML. Unknown keys, wrong types, values outside a key's range and choices not
in its list are errors naming the key. ``detector config [CFG] [key=value ...]`` prints the
resolved configuration with the comment of every key, taken from this file.

Each key's comment is the comment block right above it (a key directly below another one, with
no blank line or comment between them, shares that key's comment) plus any comment at the end
of its line. ``tests/test_config.py`` checks that every key has one.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import math
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

# The config format's version, stored as `version` in every saved config (checkpoints, the run
# folder's config.yaml). Bump it when a key is renamed and add the rename to RENAMED_KEYS, so
# that older checkpoints and configs keep loading.
VERSION = 1
# {version that renamed the keys: {old dotted key: new dotted key}}; applied to a config whose
# version is lower (no `version` counts as 0), oldest rename first.
RENAMED_KEYS: dict[int, dict[str, str]] = {}

# The architectures; detector/model.py builds each of them (it checks its table against this).
Arch = Literal[
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v2_fpn",
]
ARCHS: tuple[str, ...] = typing.get_args(Arch)

CLOCK = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: finite, within [low, high] (an open end excludes it)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (
            value < self.high or (not self.high_open and value == self.high)
        )

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


@dataclass(frozen=True)
class Matches:
    """The values a text key allows: a full match of ``pattern``, described as ``what``."""

    pattern: str
    what: str


NonNegativeInt = Annotated[int, Range(0)]
PositiveInt = Annotated[int, Range(1)]
NonNegativeFloat = Annotated[float, Range(0.0)]
PositiveFloat = Annotated[float, Range(0.0, low_open=True)]
Probability = Annotated[float, Range(0.0, 1.0)]
Device = Annotated[str, Matches(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N")]
Clock = Annotated[str, Matches(CLOCK.pattern, "a clock time HH:MM from 00:00 to 23:59")]


@dataclass
class DataConfig:
    """The training and validation sets."""

    # COCO JSON files. Image paths in them are relative to the image folder, which defaults to
    # ``images/`` beside the JSON (what tools/convert.py writes), else the JSON's own folder.
    # Relative paths are relative to the folder the command runs in.
    train_annotations: str = ""
    val_annotations: str = ""
    train_images: str | None = None
    val_images: str | None = None
    # DataLoader worker processes; 0 loads in the training process (simplest to debug).
    num_workers: NonNegativeInt = 2
    # Read every image once before training and stop with the full list of problems.
    preflight: bool = True
    # Keep the decoded training images in RAM (decode once, not every epoch); the size is
    # estimated (width x height x 3 bytes each) and announced, and training refuses to start
    # when it is over `cache_images_max_gb`. For small sets.
    cache_images: bool = False
    cache_images_max_gb: PositiveFloat = 4.0
    # Batch images of similar width/height together (less padding), like torchvision references'
    # GroupedBatchSampler with --aspect-ratio-group-factor; 0 disables, 3 is the references' value.
    # Deterministic per (seed, epoch), so resume stays exact.
    aspect_ratio_groups: NonNegativeInt = 0


@dataclass
class ModelConfig:
    """The detector: architecture, starting weights, what is frozen, inference settings."""

    # A torchvision Faster R-CNN architecture; fasterrcnn_mobilenet_v2_fpn is this project's
    # MobileNetV2-FPN, built the way torchvision builds the MobileNetV3 one.
    arch: Arch = "fasterrcnn_mobilenet_v3_large_fpn"
    # "coco": torchvision's COCO detector weights (torch hub cache); "none": random init;
    # a path: a torchvision state_dict or a checkpoint written by this pipeline.
    weights: str = "coco"
    # Backbone weights used when `weights` is "none": "imagenet" (hub cache), "none", or a path
    # to an ImageNet classification state_dict (weights/mobilenet_v2-b0353104.pth ships with the
    # repository). A relative path is looked up in the current folder, then in the repository.
    weights_backbone: str = "none"
    # Resize range of torchvision's GeneralizedRCNNTransform; null keeps the arch default
    # (800/1333, or 320/640 for the *_320_fpn model).
    min_size: PositiveInt | None = None
    max_size: PositiveInt | None = None
    # Freeze backbone + FPN (FrozenBatchNorm, eval mode, requires_grad False).
    freeze_backbone: bool = True
    # Also freeze the region proposal network: only the RoI heads train. With keep_classes the
    # new classes then use the earlier detector's RPN itself: it runs once for every branch (the
    # added classes cost their RoI heads only) and they are found among the proposals it makes
    # (docs/adding-classes.md, "One RPN or two").
    freeze_rpn: bool = False
    # Detections kept per image and the score below which they are dropped at inference.
    score_threshold: Probability = 0.05
    detections_per_image: PositiveInt = 100
    # Sampled RoIs per image for the box head loss, and anchors per image for the RPN loss
    # (torchvision's defaults; Detectron2 users often lower the first to 128 for small sets).
    box_batch_size_per_image: PositiveInt = 512
    rpn_batch_size_per_image: PositiveInt = 256
    # Proposals per image at inference: kept per FPN level before NMS, and in total after it.
    # Null keeps the arch default (1000/1000; 150/150 for the *_320_fpn model). Every proposal
    # goes through the box head, so at small image sizes this is most of the inference time;
    # 300 costs little recall on sets with a few objects per image. Exported with the model.
    rpn_pre_nms_top_n_test: PositiveInt | None = None
    rpn_post_nms_top_n_test: PositiveInt | None = None
    # Add the training set's classes to the detector in `weights` (a checkpoint written by this
    # pipeline, or coco: its 80 named classes) instead of replacing its classes: best.pt is one
    # model, earlier classes first, whose earlier-class detections are exactly the earlier
    # detector's. Its whole trunk (backbone + FPN) is shared and stays frozen; the new classes get
    # their own RPN + RoI heads, or with freeze_rpn their own RoI heads on the earlier RPN
    # (docs/adding-classes.md).
    keep_classes: bool = False


@dataclass
class AugmentConfig:
    """Training augmentations; all are bounding-box safe, none is applied at evaluation."""

    # Probability of a horizontal flip (0 disables, as for every probability here).
    hflip: Probability = 0.5
    # Random zoom in/out by a factor in [scale_min, scale_max], with probability `scale`.
    scale: Probability = 0.0
    scale_min: PositiveFloat = 0.75
    scale_max: PositiveFloat = 1.25
    # Probability of a random crop that keeps every box inside it.
    crop: Probability = 0.0
    # Probabilities of photometric changes: brightness/contrast, hue/saturation, blur.
    brightness_contrast: Probability = 0.3
    hue_saturation: Probability = 0.0
    blur: Probability = 0.0
    # A box cropped to less than this fraction of its area is dropped.
    min_visibility: Probability = 0.3


@dataclass
class UnfreezeConfig:
    """Optional second phase that trains more of the network (with model.freeze_backbone)."""

    # After the frozen epochs, train this many more epochs with the FPN and the last
    # `backbone_blocks` blocks of the backbone body (0: FPN only; ResNet: layer4, layer3, ...;
    # MobileNet: inverted-residual blocks) trainable at `lr_scale` x the base lr. With
    # train.epochs 0 the phase starts at once: the way to train an FPN that has no pretrained
    # weights on a frozen pretrained body.
    epochs: NonNegativeInt = 0
    backbone_blocks: NonNegativeInt = 1
    lr_scale: PositiveFloat = 0.1


@dataclass
class TrainConfig:
    """The training run: schedule, optimizer, device, time budget, where it is written."""

    # Epochs with the frozen parts frozen (the unfreeze phase comes after them), and images per
    # batch (per process with torchrun). train.epochs + train.unfreeze.epochs must be >= 1.
    epochs: NonNegativeInt = 12
    batch_size: PositiveInt = 4
    # Gradient accumulation: the optimizer steps every `accumulate` batches.
    accumulate: PositiveInt = 1
    # Optimizer, base learning rate, SGD momentum (adamw ignores it) and weight decay.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.01
    momentum: Annotated[float, Range(0.0, 1.0, high_open=True)] = 0.9
    weight_decay: NonNegativeFloat = 1e-4
    # Learning-rate schedule after the warmup: cosine to zero, or steps at `milestones`.
    scheduler: Literal["cosine", "step"] = "cosine"
    # Linear warmup from lr * warmup_factor over this many optimizer steps.
    warmup_iters: NonNegativeInt = 100
    warmup_factor: Annotated[float, Range(0.0, 1.0, low_open=True)] = 0.001
    # step scheduler: multiply lr by `gamma` at these epochs.
    milestones: list[PositiveInt] = field(default_factory=lambda: [8, 11])
    gamma: PositiveFloat = 0.1
    # Clip the global gradient norm (0 disables).
    clip_grad_norm: NonNegativeFloat = 10.0
    # Mixed precision on CUDA, in `amp_dtype`: bfloat16 (no loss scaling; falls back to float16
    # on GPUs without bf16) or float16 (with a GradScaler).
    amp: bool = True
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
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
    cache_views: NonNegativeInt = 2
    cache_max_gb: PositiveFloat = 8.0
    cache_dir: str | None = None
    # Seed of every random number generator (data order, augmentation, initialisation).
    seed: NonNegativeInt = 0
    # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    device: Device = "auto"
    # Stop early when val mAP has not improved for this many evaluations (0 disables).
    patience: NonNegativeInt = 0
    # Time budget: stop cleanly after this many hours, or at this wall-clock time (HH:MM, local
    # time, e.g. "06:00" or 23:30), keeping the best model. Null disables.
    max_hours: PositiveFloat | None = None
    until: Clock | None = None
    # A batch with a non-finite loss is skipped; this many in a row stop the run.
    max_nonfinite_batches: PositiveInt = 5
    # Every N optimizer steps, and at the end of each epoch: a log line (losses, lr, images/s)
    # and TensorBoard scalars (train/loss, train/loss_classifier, ..., train/lr).
    log_every: PositiveInt = 20
    # Where runs are written: <out_dir>/<name>/ ; name defaults to the config file's stem.
    out_dir: str = "runs"
    name: str | None = None
    # The optional second phase (train.unfreeze.*).
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)


@dataclass
class EvalConfig:
    """Validation during training."""

    # Evaluate on the val set every N epochs (and always after the last one).
    every: PositiveInt = 1
    # Images drawn in the predictions-vs-ground-truth grid.
    grid_images: NonNegativeInt = 8
    # Score threshold for the drawn predictions (mAP uses every detection).
    draw_score_threshold: Probability = 0.5


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values, with the format's ``version`` first (what is saved)."""
        return {"version": VERSION, **dataclasses.asdict(self)}

    def hash(self) -> str:
        """Short hash of the resolved config, stored in checkpoints and ONNX metadata."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Reading YAML
# --------------------------------------------------------------------------------------------

_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that 23:30 stays the text "23:30" (YAML 1.1 reads it as the
    base-60 integer 1410) and 1e-3 is a float (YAML 1.1 wants 1.0e-3)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse config YAML safely (no Python objects) with :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------
# Checking values
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: -1, 0.5, null, garbage."""
    if isinstance(value, str) and value and value.strip() == value:
        return value
    return (
        json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
    )


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type, choices and range; ints are accepted as floats."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *rules = typing.get_args(annotation)
        if base is str and not isinstance(value, str):  # e.g. until: 0600, an octal int
            raise ConfigError(f"{key}={_show(value)}: must be {_describe(rules[0])}")
        checked = _coerce(value, base, key)
        for rule in rules:
            if not _allows(rule, checked):
                raise ConfigError(f"{key}={_show(value)}: must be {_describe(rule)}")
        return checked
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices and isinstance(value, str):
            return value
        raise ConfigError(f"{key}={_show(value)}: must be one of {', '.join(choices)}")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, annotation, key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={_show(value)}: expected a list of {_type_name(item_type)}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}={_show(value)}: expected {_type_name(annotation)}")


def _coerce_union(value: Any, annotation: Any, key: str) -> Any:
    options = [o for o in typing.get_args(annotation) if o is not type(None)]
    if value is None and len(options) < len(typing.get_args(annotation)):
        return None
    errors = []
    for option in options:
        try:
            return _coerce(value, option, key)
        except ConfigError as e:
            errors.append(e)
    if len(errors) == 1:  # one real type (X | None): its own message, with its range
        raise errors[0] from None
    raise ConfigError(f"{key}={_show(value)}: expected {_type_name(annotation)}")


def _allows(rule: Range | Matches, value: Any) -> bool:
    if isinstance(rule, Range):
        return rule.allows(value)
    return re.fullmatch(rule.pattern, value) is not None


def _describe(rule: Range | Matches) -> str:
    return rule.describe() if isinstance(rule, Range) else rule.what


def allowed_values(annotation: Any) -> str:
    """What a key accepts, in words ("" when its type says it all: bool, free text)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return ", ".join(_describe(rule) for rule in typing.get_args(annotation)[1:])
    if origin is Literal:
        return "one of " + ", ".join(typing.get_args(annotation))
    if origin is list:
        inner = allowed_values(typing.get_args(annotation)[0])
        return f"a list, each {inner}" if inner else ""
    if origin in (typing.Union, types.UnionType):
        inner = [allowed_values(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(i for i in inner if i) + (" or null" if any(inner) else "")
    return ""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _apply(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = _hints(type(obj))
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
        value = load_yaml(raw) if raw.strip() else ""
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
    """Checks across keys; each key's own type, range and choices are checked as it is read."""
    if cfg.train.epochs + cfg.train.unfreeze.epochs < 1:
        raise ConfigError(
            f"train.epochs={cfg.train.epochs}: train.epochs + train.unfreeze.epochs must be >= 1 "
            "(nothing would train)"
        )
    if cfg.augment.scale_min > cfg.augment.scale_max:
        raise ConfigError(
            f"augment.scale_min={cfg.augment.scale_min}: must be <= augment.scale_max "
            f"({cfg.augment.scale_max})"
        )
    model = cfg.model
    if (
        model.min_size is not None
        and model.max_size is not None
        and model.min_size > model.max_size
    ):
        raise ConfigError(
            f"model.min_size={model.min_size}: must be <= model.max_size ({model.max_size})"
        )
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
    """(hours, minutes) of a clock time H:MM or HH:MM, 00:00 to 23:59."""
    match = CLOCK.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"{key}={_show(text)}: must be a clock time HH:MM from 00:00 to 23:59")
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------------------------
# Versions and renamed keys
# --------------------------------------------------------------------------------------------


def upgrade_config_dict(values: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """``values`` (a saved or written config) in this version's keys and ``version``.

    Keys renamed since the config's version (no ``version``: 0) are moved to their new names;
    a config from a newer detector, or one that sets both a key and its new name, is refused.
    """
    values = copy.deepcopy(values)
    version = values.pop("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"{where}: version={_show(version)}: must be an integer >= 0")
    if version > VERSION:
        raise ConfigError(
            f"{where}: config version {version} is newer than this detector's ({VERSION}); "
            "update detector to read it"
        )
    for renamed_in in sorted(v for v in RENAMED_KEYS if v > version):
        for old, new in RENAMED_KEYS[renamed_in].items():
            _move_key(values, old, new, f"{where} (version {version})")
    return {"version": VERSION, **values}


def _move_key(values: dict[str, Any], old: str, new: str, where: str) -> None:
    *old_parents, old_name = old.split(".")
    node = values
    for part in old_parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or old_name not in node:
        return
    value = node.pop(old_name)
    *new_parents, new_name = new.split(".")
    target = values
    for part in new_parents:
        target = target.setdefault(part, {}) if isinstance(target, dict) else None
    if not isinstance(target, dict):
        return  # not a mapping where the new key goes: reading the config says so
    if new_name in target:
        raise ConfigError(f"{where}: '{old}' was renamed '{new}' and both are set; keep '{new}'")
    target[new_name] = value


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Defaults <- ``values`` (any version, see RENAMED_KEYS) <- overrides, validated."""
    if not isinstance(values or {}, dict):
        raise ConfigError("the top level must be a mapping (data:, model:, train: ...)")
    version = (values or {}).get("version")
    values = upgrade_config_dict(values or {})
    del values["version"]
    cfg = Config()
    try:
        _apply(cfg, values, "")
    except ConfigError as e:
        if version is None or version == VERSION:
            raise
        raise ConfigError(
            f"{e}; the config is version {version}, this detector reads {VERSION}"
        ) from None
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
            values = load_yaml(path.read_text(encoding="utf-8")) or {}
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


# --------------------------------------------------------------------------------------------
# Printing: `detector config`
# --------------------------------------------------------------------------------------------


def sections() -> dict[str, type]:
    """Dotted prefix ("", "data", "train.unfreeze", ...) -> the dataclass that holds its keys."""
    found = {"": Config}
    pending = [("", Config)]
    while pending:
        prefix, cls = pending.pop()
        for name, hint in _hints(cls).items():
            if dataclasses.is_dataclass(hint):
                dotted = f"{prefix}.{name}" if prefix else name
                found[dotted] = hint
                pending.append((dotted, hint))
    return found


@functools.cache
def key_comments() -> dict[str, str]:
    """Dotted key -> its comment in this file (see the module docstring for the rule)."""
    source = inspect.getsource(sys.modules[__name__])
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    by_class: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            by_class[node.name] = _field_comments(node, lines, comments)
    result = {}
    for prefix, cls in sections().items():
        hints = _hints(cls)
        for name, text in by_class.get(cls.__name__, {}).items():
            if not text and dataclasses.is_dataclass(hints[name]):
                text = inspect.getdoc(hints[name]) or ""  # a section: its class docstring
            result[f"{prefix}.{name}" if prefix else name] = text
    return result


def _field_comments(
    node: ast.ClassDef, lines: list[str], comments: dict[int, str]
) -> dict[str, str]:
    found, shared, previous_end = {}, "", -1
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        if above:
            shared = " ".join(above)
        elif line != previous_end:  # a blank line or other code above: no shared comment
            shared = ""
        trailing = (
            comments.get(stmt.lineno)
            if not lines[stmt.lineno - 1].strip().startswith("#")
            else None
        )
        found[stmt.target.id] = " ".join(t for t in (shared, trailing) if t)
        previous_end = stmt.end_lineno or stmt.lineno
    return found


def format_config(cfg: Config, header: str = "") -> str:
    """The config as YAML that loads back to it, each key with its comment above it."""
    comments = key_comments()
    out = [f"# {line}" for line in header.splitlines()]
    out.append("# The config format's version (detector/config.py VERSION).")
    out.append(f"version: {VERSION}")
    out.extend(_format_section(cfg, "", comments))
    return "\n".join(out) + "\n"


def _format_section(obj: Any, prefix: str, comments: dict[str, str]) -> list[str]:
    indent = "  " * (prefix.count(".") + 1 if prefix else 0)
    out, previous = [], ""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        comment = comments.get(key, "")
        if comment != previous:  # keys that share a comment (a group) get it once, above them
            wrapped = textwrap.wrap(comment, width=max(40, 98 - len(indent)))
            out.extend(f"{indent}# {line}" for line in wrapped)
        previous = comment
        if dataclasses.is_dataclass(value):
            out.append(f"{indent}{f.name}:")
            out.extend(_format_section(value, key, comments))
        else:
            allowed = allowed_values(hints[f.name])
            out.append(
                f"{indent}{f.name}: {_yaml_scalar(value)}" + (f"  # {allowed}" if allowed else "")
            )
    return out


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...")
