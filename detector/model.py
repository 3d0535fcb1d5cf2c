"""Model stage: build a torchvision Faster R-CNN, load its weights, freeze it, save/load checkpoints.

Weights never come from anywhere but the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or a
file the user names; when a file is missing offline the error says which file and where it goes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import time
import types
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .branches import (
    Branch,
    BranchRecord,
    MultiBranchFasterRCNN,
    NamedLabelsRoIHeads,
    add_branch,
    apply_head_settings,
    checkpoint_fields,
    copy_branch,
    describe,
    from_plain,
    rpn_owner,
    same_rpn,
    share_rpns,
    trunk_difference,
)
from .config import ARCHS, ModelConfig, upgrade_config_dict
from .fileio import atomic_write_with
from .resize_rule import resized_size

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "detector-checkpoint"
CHECKPOINT_VERSION = 1


class WeightsError(RuntimeError):
    """Weights are missing, corrupt, of another architecture, or unsafe to load."""


@dataclass(frozen=True)
class ArchSpec:
    builder: Any  # torchvision builder function, or None for our own
    coco_weights: Any  # torchvision weights enum member, or None
    backbone_weights: Any  # ImageNet weights enum member of the backbone
    backbone_prefix: str  # classification state_dict prefix that maps onto backbone.body


ARCH_SPECS: dict[str, ArchSpec] = {
    "fasterrcnn_resnet50_fpn": ArchSpec(
        tv_frcnn.fasterrcnn_resnet50_fpn,
        tv_frcnn.FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
        torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        "",
    ),
    "fasterrcnn_resnet50_fpn_v2": ArchSpec(
        tv_frcnn.fasterrcnn_resnet50_fpn_v2,
        tv_frcnn.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
        torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        "",
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": ArchSpec(
        tv_frcnn.fasterrcnn_mobilenet_v3_large_fpn,
        tv_frcnn.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
        torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        "features.",
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ArchSpec(
        tv_frcnn.fasterrcnn_mobilenet_v3_large_320_fpn,
        tv_frcnn.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
        torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        "features.",
    ),
    "fasterrcnn_mobilenet_v2_fpn": ArchSpec(
        None,
        None,
        torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
        "features.",
    ),
}

# config.ARCHS is the list of architectures users may name; this table builds each of them.
if tuple(ARCH_SPECS) != ARCHS:
    raise ImportError(
        f"detector.model.ARCH_SPECS ({', '.join(ARCH_SPECS)}) must list exactly "
        f"detector.config.ARCHS ({', '.join(ARCHS)}), in the same order"
    )

# torch.hub names files "<name>-<first hex digits of sha256>.<ext>".
_HUB_HASH = re.compile(r"-([a-f0-9]{6,})\.")


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hub_hash(path: Path) -> None:
    """Refuse a file whose sha256 does not start with the hex digits in its hub-style name."""
    match = _HUB_HASH.search(path.name)
    if match is None:
        return
    expected = match.group(1)
    actual = _sha256(path)
    if not actual.startswith(expected):
        raise WeightsError(
            f"{path}: sha256 {actual[:16]}... does not match the {expected} in its name; the file is "
            "corrupt or not the one torchvision publishes. Delete it and copy the right file again."
        )


def resolve_hub_weights(weights_enum: Any, what: str) -> Path:
    """Find a torchvision weights file in the hub cache, downloading it if the network allows."""
    url = weights_enum.url
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    cache_dir = hub_checkpoint_dir()
    path = cache_dir / filename
    if not path.is_file() and os.environ.get("DETECTOR_OFFLINE", "") not in ("1", "true", "yes"):
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s to %s", url, path)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=None, progress=True)
        except Exception as e:  # no network, proxy, DNS, HTTP error: all end the same way
            log.debug("download failed: %s", e)
    if not path.is_file():
        raise WeightsError(
            f"{what}: weights file {filename} is not in the torch hub cache and cannot be downloaded "
            f"here (offline?).\n  Put the file at: {path}\n  (get it on a connected machine from {url}; "
            f"set TORCH_HOME to use another cache folder), or set the weights to a local file path, "
            f"or to 'none' to start from random weights."
        )
    check_hub_hash(path)
    return path


def _torch_load(path: str | Path) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle payload never executes."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused to load: the file contains Python objects other than tensors and "
            f"plain containers, which could run code when unpickled ({str(e).splitlines()[0]}). "
            "Only load checkpoints written by this pipeline or torchvision state_dicts."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(
            f"{path}: not a readable PyTorch file (truncated or corrupt?): {e}"
        ) from None


# The repository (the folder that holds detector/): relative weight paths are looked up here too,
# so the shipped weights/ files are found from any working folder.
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_weights_path(text: str, what: str) -> Path:
    """A weights file named in the config: absolute, or relative to the current folder, else to
    the repository (``weights/mobilenet_v2-b0353104.pth``); its hub-style hash is checked."""
    path = Path(os.path.expanduser(text))
    candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        tried = ", ".join(str(p) for p in candidates)
        raise WeightsError(
            f"{what}: {text} is not a file (tried {tried}); 'coco', 'imagenet' and 'none' are "
            "the other choices"
        )
    check_hub_hash(found)
    return found


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same state_dict) through the fused eval-mode
    batch_norm kernel instead of a separate multiply and add (~12% of a frozen MobileNetV3-FPN
    backbone forward on CPU; see benchmarks/README.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            momentum=0.0,
            eps=self.eps,
        )


def frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a FrozenBatchNorm2d holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FusedFrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            frozen_batchnorm(child)
    return module


def _mobilenet_v2_fpn(num_classes: int, **kwargs: Any) -> FasterRCNN:
    """MobileNetV2 features + FPN on the two last stages, as torchvision builds MobileNetV3-FPN."""
    features = torchvision.models.mobilenet_v2().features
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    stage_indices.append(len(features) - 1)
    returned = [len(stage_indices) - 2, len(stage_indices) - 1]
    return_layers = {str(stage_indices[k]): str(v) for v, k in enumerate(returned)}
    in_channels = [features[stage_indices[k]].out_channels for k in returned]
    backbone = BackboneWithFPN(
        features, return_layers, in_channels, 256, extra_blocks=LastLevelMaxPool()
    )
    anchor_sizes = ((32, 64, 128, 256, 512),) * 3
    aspect_ratios = ((0.5, 1.0, 2.0),) * 3
    kwargs.setdefault("rpn_score_thresh", 0.05)
    return FasterRCNN(
        backbone,
        num_classes,
        rpn_anchor_generator=AnchorGenerator(anchor_sizes, aspect_ratios),
        **kwargs,
    )


def _proposal_kwargs(
    pre_nms_top_n_test: int | None, post_nms_top_n_test: int | None
) -> dict[str, int]:
    """Builder kwargs for the inference proposal counts; a None keeps the arch default."""
    kwargs = {}
    if pre_nms_top_n_test is not None:
        kwargs["rpn_pre_nms_top_n_test"] = int(pre_nms_top_n_test)
    if post_nms_top_n_test is not None:
        kwargs["rpn_post_nms_top_n_test"] = int(post_nms_top_n_test)
    return kwargs


def _build_arch(
    arch: str, num_classes: int, box_score_thresh: float, detections_per_img: int, **extra: Any
) -> FasterRCNN:
    spec = ARCH_SPECS[arch]
    kwargs = {
        "box_score_thresh": box_score_thresh,
        "box_detections_per_img": detections_per_img,
        **extra,
    }
    if spec.builder is None:
        return _mobilenet_v2_fpn(num_classes, **kwargs)
    return spec.builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def _load_backbone_classifier_weights(model: FasterRCNN, spec: ArchSpec, path: Path) -> None:
    """Load an ImageNet classification state_dict into the detector's backbone body, strictly."""
    state = _torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a classification state_dict (name -> tensor)")
    body = model.backbone.body
    wanted = set(body.state_dict().keys())
    mapped, unexpected = {}, []
    for key, value in state.items():
        if spec.backbone_prefix and not key.startswith(spec.backbone_prefix):
            continue  # the classifier head
        short = key[len(spec.backbone_prefix) :]
        if short in wanted or short.endswith("num_batches_tracked"):
            mapped[short] = value
        elif not spec.backbone_prefix and short.startswith("fc."):
            continue  # ResNet's classifier head
        else:
            unexpected.append(key)
    missing = sorted(k for k in wanted if k not in mapped)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not a backbone file for this architecture: {len(missing)} backbone tensors "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        body.load_state_dict(mapped, strict=False)
    except RuntimeError as e:
        raise WeightsError(f"{path}: backbone tensor shapes do not match: {e}") from None


def replace_predictor(model: FasterRCNN, num_classes: int) -> None:
    """A fresh box predictor for ``num_classes`` (background included)."""
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = tv_frcnn.FastRCNNPredictor(in_features, num_classes)


def is_pipeline_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def _num_classes_in(state: dict[str, torch.Tensor], path: Path) -> int:
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise WeightsError(f"{path}: not a Faster R-CNN state_dict (no {key})")
    return int(state[key].shape[0])


@dataclass
class BuildInfo:
    """What build_model did, for the log and the checkpoint."""

    weights_source: str
    predictor_replaced: bool
    start_checkpoint_classes: list[str] | None = None


def build_model(
    cfg: ModelConfig, class_names: list[str]
) -> tuple[FasterRCNN | MultiBranchFasterRCNN, BuildInfo]:
    """Build ``cfg.arch`` for ``class_names`` (background is added), load weights, freeze.

    The backbone uses FrozenBatchNorm2d whenever it starts from trained weights or is frozen,
    as torchvision does for fine-tuning (batches of a few images give useless BN statistics).
    """
    if cfg.arch not in ARCH_SPECS:
        raise WeightsError(
            f"model.arch: unknown architecture {cfg.arch!r}; one of {', '.join(ARCH_SPECS)}"
        )
    if cfg.keep_classes:
        return build_keep_classes_model(cfg, class_names)
    weights = cfg.weights.strip()
    if weights.lower() == "coco":
        model, info = _from_coco_weights(cfg, len(class_names) + 1)
    elif weights.lower() == "none":
        model, info = _from_backbone_weights(cfg, len(class_names) + 1)
    else:
        model, info = _from_weights_file(cfg, weights, class_names)
    _apply_size_and_freezing(model, cfg)
    log.info(
        "model %s, %d classes + background, weights %s%s",
        cfg.arch,
        len(class_names),
        info.weights_source,
        ", new box predictor" if info.predictor_replaced else "",
    )
    return model, info


def _head_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "box_batch_size_per_image": cfg.box_batch_size_per_image,
        "rpn_batch_size_per_image": cfg.rpn_batch_size_per_image,
        **_proposal_kwargs(cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test),
    }


def _arch_for_state(cfg: ModelConfig, state: dict[str, torch.Tensor], path: Path) -> FasterRCNN:
    """``cfg.arch`` shaped for ``state`` (its class count), with the state loaded strictly."""
    model = _build_arch(
        cfg.arch,
        _num_classes_in(state, path),
        cfg.score_threshold,
        cfg.detections_per_image,
        **_head_kwargs(cfg),
    )
    frozen_batchnorm(model.backbone)
    _load_strict(model, state, path)
    return model


def _from_coco_weights(cfg: ModelConfig, num_classes: int) -> tuple[FasterRCNN, BuildInfo]:
    spec = ARCH_SPECS[cfg.arch]
    if spec.coco_weights is None:
        raise WeightsError(
            f"model.weights: no COCO detector weights exist for {cfg.arch}; use "
            "weights: none with weights_backbone: imagenet, or a checkpoint path"
        )
    path = resolve_hub_weights(spec.coco_weights, f"model.weights=coco ({cfg.arch})")
    model = _arch_for_state(cfg, _torch_load(path), path)
    replace_predictor(model, num_classes)
    return model, BuildInfo(f"coco:{path}", True)


def _from_backbone_weights(cfg: ModelConfig, num_classes: int) -> tuple[FasterRCNN, BuildInfo]:
    """A new detector: random, or with a backbone from ImageNet or a classifier file."""
    spec = ARCH_SPECS[cfg.arch]
    backbone_weights = cfg.weights_backbone.strip()
    model = _build_arch(
        cfg.arch, num_classes, cfg.score_threshold, cfg.detections_per_image, **_head_kwargs(cfg)
    )
    if cfg.weights_backbone.lower() != "none" or cfg.freeze_backbone:
        frozen_batchnorm(model.backbone)
    source = "random"
    if backbone_weights.lower() == "imagenet":
        path = resolve_hub_weights(
            spec.backbone_weights, f"model.weights_backbone=imagenet ({cfg.arch})"
        )
        _load_backbone_classifier_weights(model, spec, path)
        source = f"imagenet:{path}"
    elif backbone_weights.lower() != "none":
        path = resolve_weights_path(backbone_weights, "model.weights_backbone")
        _load_backbone_classifier_weights(model, spec, path)
        source = f"backbone:{path}"
    return model, BuildInfo(source, False)


def _state_and_classes(
    obj: Any, path: Path, arch: str
) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The state_dict in a loaded file and, for a detector checkpoint, its class names."""
    if is_pipeline_checkpoint(obj):
        _check_complete(obj, path)
        if obj["arch"] != arch:
            raise WeightsError(
                f"{path}: checkpoint is a {obj['arch']} but model.arch is {arch}; set "
                f"model.arch={obj['arch']}"
            )
        return obj["model"], list(obj["class_names"])
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise WeightsError(f"{path}: neither a state_dict nor a checkpoint written by detector")


def _from_weights_file(
    cfg: ModelConfig, weights: str, class_names: list[str]
) -> tuple[FasterRCNN, BuildInfo]:
    """An earlier checkpoint or state_dict; its predictor is kept when the classes are the same."""
    path = resolve_weights_path(weights, "model.weights")
    state, previous_classes = _state_and_classes(_torch_load(path), path, cfg.arch)
    model = _arch_for_state(cfg, state, path)
    same_classes = previous_classes == list(class_names)
    if not same_classes:
        replace_predictor(model, len(class_names) + 1)
    return model, BuildInfo(f"file:{path}", not same_classes, previous_classes)


def _apply_size_and_freezing(model: FasterRCNN, cfg: ModelConfig) -> None:
    if cfg.min_size is not None:
        model.transform.min_size = (cfg.min_size,)
    if cfg.max_size is not None:
        model.transform.max_size = cfg.max_size
    use_integer_resize(model)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    if cfg.freeze_rpn:
        for p in model.rpn.parameters():
            p.requires_grad_(False)


def _resize_integer(
    self: GeneralizedRCNNTransform, image: torch.Tensor, target: dict[str, Any] | None = None
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """GeneralizedRCNNTransform.resize with the size from :func:`resized_size` (exact integers).

    Traced (ONNX export), the size is computed from the image's shape in int64 graph ops.
    """
    if self.fixed_size is not None or (self.training and self._skip_resize):
        return GeneralizedRCNNTransform.resize(self, image, target)
    min_size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
    if torch.jit.is_tracing():
        from torch.onnx import operators

        shape = operators.shape_as_tensor(image)
        h, w = shape[-2:-1], shape[-1:]  # 1-D: the exporter demotes 0-d integer tensors
        new_h, new_w = resized_size(h, w, int(min_size), int(self.max_size))
        size: list[Any] = [new_h[0], new_w[0]]
    else:
        h, w = image.shape[-2:]
        size = list(resized_size(int(h), int(w), int(min_size), int(self.max_size)))
    resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if target is None:
        return resized, target
    target["boxes"] = resize_boxes(target["boxes"], image.shape[-2:], resized.shape[-2:])
    if "masks" in target:
        masks = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        target["masks"] = masks
    return resized, target


def use_integer_resize(model: FasterRCNN) -> FasterRCNN:
    """Make the model resize with the exact integer rule of ``detector.resize_rule``, the one its
    ONNX export and the runtime use (torchvision's float64 size differs by a pixel for some sizes).
    """
    model.transform.resize = types.MethodType(_resize_integer, model.transform)
    return model


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: weights do not fit the architecture: {str(e)[:600]}") from None


def freeze_backbone(model: FasterRCNN) -> None:
    """Backbone body + FPN: no gradients. Its BatchNorms are FrozenBatchNorm2d already."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)


def backbone_blocks(model: FasterRCNN) -> list[nn.Module]:
    """The body's top-level blocks that hold parameters, input side first."""
    return [m for m in model.backbone.body.children() if any(True for _ in m.parameters())]


def unfreeze_last_blocks(model: FasterRCNN, count: int) -> list[nn.Parameter]:
    """Make the last ``count`` body blocks and the FPN trainable; return the new parameters."""
    params: list[nn.Parameter] = []
    blocks = backbone_blocks(model)[-count:] if count > 0 else []
    modules = [*blocks, model.backbone.fpn]
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad:
                p.requires_grad_(True)
                params.append(p)
    return params


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: serialise to memory, then temp file + fsync + rename.

    A crash or a full disk mid-write leaves the previous file at ``path`` untouched.
    """
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        atomic_write_with(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as e:
        raise OSError(
            e.errno,
            f"could not write checkpoint {path} ({e.strerror}); the previous file there, "
            "if any, is intact",
        ) from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by this pipeline (weights_only: no code runs)."""
    obj = _torch_load(path)
    if not is_pipeline_checkpoint(obj):
        raise WeightsError(f"{path}: not a checkpoint written by detector (no format tag)")
    if obj.get("version", 0) > CHECKPOINT_VERSION:
        raise WeightsError(
            f"{path}: checkpoint version {obj['version']} is newer than this detector"
        )
    _check_complete(obj, path)
    if isinstance(obj.get("config"), dict):  # its keys as this version names them
        obj["config"] = upgrade_config_dict(obj["config"], f"{path}: saved config")
    return obj


def _check_complete(checkpoint: dict[str, Any], path: str | Path) -> None:
    missing = [key for key in ("model", "arch", "class_names") if key not in checkpoint]
    if missing:
        raise WeightsError(
            f"{path}: incomplete checkpoint, no {', '.join(missing)} (it has the detector format "
            "tag but was not written by detector train); use a best.pt or last.pt of a run"
        )


def model_from_checkpoint(checkpoint: dict[str, Any]) -> FasterRCNN | MultiBranchFasterRCNN:
    """Rebuild the exact model a checkpoint holds, in eval mode on the CPU."""
    if checkpoint.get("branches"):
        return _multi_branch_from_checkpoint(checkpoint)
    model_cfg = checkpoint.get("config", {}).get("model", {})
    model = _build_arch(
        checkpoint["arch"],
        len(checkpoint["class_names"]) + 1,
        float(model_cfg.get("score_threshold", 0.05)),
        int(model_cfg.get("detections_per_image", 100)),
        **_proposal_kwargs(
            model_cfg.get("rpn_pre_nms_top_n_test"), model_cfg.get("rpn_post_nms_top_n_test")
        ),
    )
    frozen_batchnorm(model.backbone)
    _load_strict(model, checkpoint["model"], Path(checkpoint.get("path", "checkpoint")))
    if model_cfg.get("min_size") is not None:
        model.transform.min_size = (int(model_cfg["min_size"]),)
    if model_cfg.get("max_size") is not None:
        model.transform.max_size = int(model_cfg["max_size"])
    use_integer_resize(model)
    return model.eval()


def load_model(path: str | Path) -> tuple[FasterRCNN | MultiBranchFasterRCNN, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a checkpoint file written by this pipeline."""
    checkpoint = load_checkpoint(path)
    checkpoint["path"] = str(path)
    return model_from_checkpoint(checkpoint), checkpoint


# --------------------------------------------------------------------------------------------
# Several branches on one trunk (model.keep_classes, detector merge): see detector/branches.py
# --------------------------------------------------------------------------------------------


def detection_branches(model: nn.Module) -> list[tuple[nn.Module, nn.Module, int]]:
    """``[(rpn, roi_heads, label_offset), ...]``: the detection heads that share the backbone.

    A plain Faster R-CNN has one, ``(model.rpn, model.roi_heads, 0)``. A model with several
    (each branch's labels 1..C_b are model labels label_offset + 1..label_offset + C_b) says so
    with a ``detection_branches()`` method returning that list (MultiBranchFasterRCNN).
    """
    branches = getattr(model, "detection_branches", None)
    if callable(branches):
        return list(branches())
    return [(model.rpn, model.roi_heads, 0)]


def coco_named_classes() -> tuple[list[str], list[int]]:
    """The 80 named COCO classes of torchvision's category list (no background, no N/A slots)
    and their labels in torchvision's COCO predictor (= COCO category ids)."""
    categories = tv_frcnn.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    pairs = [(name, i) for i, name in enumerate(categories) if i > 0 and name != "N/A"]
    return [name for name, _ in pairs], [i for _, i in pairs]


def _coco_detector(cfg: ModelConfig) -> MultiBranchFasterRCNN:
    """torchvision's COCO detector as it ships (its own head settings), named classes only."""
    spec = ARCH_SPECS[cfg.arch]
    if spec.coco_weights is None:
        raise WeightsError(
            f"model.weights: no COCO detector weights exist for {cfg.arch}; model.keep_classes "
            "needs the earlier detector: a checkpoint written by detector, or coco"
        )
    path = resolve_hub_weights(spec.coco_weights, f"model.weights=coco ({cfg.arch})")
    state = _torch_load(path)
    model = _build_arch(cfg.arch, _num_classes_in(state, path), 0.05, 100)
    frozen_batchnorm(model.backbone)
    _load_strict(model, state, path)
    names, labels = coco_named_classes()
    model.roi_heads = NamedLabelsRoIHeads.from_heads(model.roi_heads, labels)
    if cfg.min_size is not None:
        model.transform.min_size = (cfg.min_size,)
    if cfg.max_size is not None:
        model.transform.max_size = cfg.max_size
    return from_plain(model, BranchRecord(names, labels, f"coco:{path}", predictor_labels=labels))


def earlier_detector(cfg: ModelConfig) -> MultiBranchFasterRCNN:
    """The detector ``model.keep_classes`` adds to, as a (frozen, eval-mode) multi-branch model."""
    weights = cfg.weights.strip()
    if weights.lower() == "coco":
        return _coco_detector(cfg)
    if weights.lower() == "none":
        raise WeightsError(
            "model.keep_classes: model.weights is none; set it to the earlier detector "
            "(a checkpoint written by detector, or coco)"
        )
    path = resolve_weights_path(weights, "model.weights")
    obj = _torch_load(path)
    if not is_pipeline_checkpoint(obj):
        raise WeightsError(
            f"{path}: model.keep_classes needs a checkpoint written by detector (it names the "
            "earlier classes) or model.weights=coco; this file is a bare state_dict"
        )
    if obj["arch"] != cfg.arch:
        raise WeightsError(
            f"{path}: checkpoint is a {obj['arch']} but model.arch is {cfg.arch}; set "
            f"model.arch={obj['arch']}"
        )
    obj["path"] = str(path)
    return as_multi_branch(model_from_checkpoint(obj), obj, f"file:{path}")


def as_multi_branch(
    model: FasterRCNN | MultiBranchFasterRCNN, checkpoint: dict[str, Any], source: str
) -> MultiBranchFasterRCNN:
    """A checkpoint's model with one branch per class set; trained branches now come from it."""
    if isinstance(model, MultiBranchFasterRCNN):
        for record in model.records:
            if record.trained:
                record.source = source
        return model
    ids = checkpoint.get("category_ids")
    record = BranchRecord(
        list(checkpoint["class_names"]), [int(i) for i in ids] if ids else None, source
    )
    return from_plain(model, record)


def _check_trunk_resize(cfg: ModelConfig, transform: nn.Module, source: str) -> None:
    """keep_classes shares the earlier trunk, its resize included: the config may not change it."""
    for key, wanted, have in (
        ("min_size", cfg.min_size, transform.min_size[-1]),
        ("max_size", cfg.max_size, transform.max_size),
    ):
        if wanted is not None and int(wanted) != int(have):
            raise WeightsError(
                f"model.{key}={wanted}, but the earlier detector ({source}) resizes with "
                f"{key} {have}; model.keep_classes shares its trunk, resize included: set "
                f"model.{key}={have} or null"
            )


def build_keep_classes_model(
    cfg: ModelConfig, class_names: list[str]
) -> tuple[MultiBranchFasterRCNN, BuildInfo]:
    """The earlier detector, frozen, plus a new trainable branch for ``class_names``.

    The new branch starts as a copy of the earlier detector's last RPN + RoI heads with a fresh
    box predictor: exactly the start of a replace-the-predictor run, so the new classes train as
    they would there, from heads that already know this trunk's features.
    """
    earlier = earlier_detector(cfg)
    source = earlier.records[-1].source
    taken = [name for name in class_names if name in earlier.class_names]
    if taken:
        raise WeightsError(
            f"model.keep_classes: {taken} are already classes of the earlier detector "
            f"({cfg.weights}); keep_classes adds new classes only: remove them from the training "
            "set (the earlier detector keeps detecting them unchanged) or train without it"
        )
    _check_trunk_resize(cfg, earlier.transform, cfg.weights)
    branch = copy_branch(earlier.branches[-1])
    in_features = branch.roi_heads.box_predictor.cls_score.in_features
    branch.roi_heads.box_predictor = tv_frcnn.FastRCNNPredictor(in_features, len(class_names) + 1)
    record = BranchRecord(list(class_names), None, "this run", trained=True, started_from=source)
    if cfg.freeze_rpn:  # a frozen copy would propose what the earlier RPN does: use that one
        record.rpn_from = rpn_owner(earlier, len(earlier.branches) - 1)
        branch.rpn = earlier.branches[record.rpn_from].rpn
        _check_shared_rpn_settings(branch.rpn, cfg)
    _apply_new_branch_settings(branch, cfg, own_rpn=not cfg.freeze_rpn)
    model = add_branch(earlier, branch, record)
    info = BuildInfo(source, True, earlier.class_names)
    log.info(
        "model %s, keep_classes: %d earlier classes kept + %d new\n%s",
        cfg.arch,
        len(earlier.class_names),
        len(class_names),
        describe(model),
    )
    return model, info


def _check_shared_rpn_settings(rpn: nn.Module, cfg: ModelConfig) -> None:
    """With a shared RPN the earlier detector's proposal counts are the new branch's too."""
    for key, value, have in (
        ("rpn_pre_nms_top_n_test", cfg.rpn_pre_nms_top_n_test, rpn._pre_nms_top_n["testing"]),
        ("rpn_post_nms_top_n_test", cfg.rpn_post_nms_top_n_test, rpn._post_nms_top_n["testing"]),
    ):
        if value is not None and int(value) != int(have):
            raise WeightsError(
                f"model.{key}={value}, but with model.keep_classes and model.freeze_rpn the new "
                f"classes use the earlier detector's RPN, which keeps {have}: set "
                f"model.{key}={have} or null (or model.freeze_rpn=false for an RPN of their own)"
            )


def _apply_new_branch_settings(branch: Branch, cfg: ModelConfig, own_rpn: bool) -> None:
    """The run's head settings on the new branch; proposal counts left null keep the copied.
    A shared RPN (``own_rpn`` False) is the earlier branch's and keeps its settings."""
    heads, rpn = branch.roi_heads, branch.rpn
    heads.score_thresh = float(cfg.score_threshold)
    heads.detections_per_img = int(cfg.detections_per_image)
    heads.fg_bg_sampler.batch_size_per_image = int(cfg.box_batch_size_per_image)
    if not own_rpn:
        return
    rpn.fg_bg_sampler.batch_size_per_image = int(cfg.rpn_batch_size_per_image)
    if cfg.rpn_pre_nms_top_n_test is not None:
        rpn._pre_nms_top_n["testing"] = int(cfg.rpn_pre_nms_top_n_test)
    if cfg.rpn_post_nms_top_n_test is not None:
        rpn._post_nms_top_n["testing"] = int(cfg.rpn_post_nms_top_n_test)


def _multi_branch_from_checkpoint(checkpoint: dict[str, Any]) -> MultiBranchFasterRCNN:
    """Each branch built as its arch builds it, with its recorded settings; one trunk."""
    records = [BranchRecord(**r) for r in checkpoint["branches"]]
    trunk, branches = None, []
    for record in records:
        labels = record.predictor_labels
        rows = max(labels) + 1 if labels else len(record.class_names) + 1
        plain = _build_arch(checkpoint["arch"], rows, 0.05, 100)
        apply_head_settings(plain.rpn, plain.roi_heads, record.settings)
        heads = NamedLabelsRoIHeads.from_heads(plain.roi_heads, labels) if labels else None
        branches.append(Branch(plain.rpn, heads or plain.roi_heads))
        trunk = trunk or plain
    _check_shared_rpns(records, checkpoint["model"], Path(checkpoint.get("path", "checkpoint")))
    share_rpns(branches, records)
    frozen_batchnorm(trunk.backbone)
    model = MultiBranchFasterRCNN(trunk.transform, trunk.backbone, branches, records)
    _load_strict(model, checkpoint["model"], Path(checkpoint.get("path", "checkpoint")))
    resize = checkpoint["transform"]
    model.transform.min_size = tuple(int(s) for s in resize["min_size"])
    model.transform.max_size = int(resize["max_size"])
    return model.eval()


def _check_shared_rpns(records: list[BranchRecord], state: dict[str, Any], path: Path) -> None:
    """A branch that uses an earlier branch's RPN must name an earlier branch, and the file must
    hold that RPN's tensors under both names, equal (strict loading would let the later win)."""
    for k, record in enumerate(records):
        j = record.rpn_from
        if j is None:
            continue
        if not 0 <= j < k:
            raise WeightsError(
                f"{path}: branch {k + 1} says it uses the RPN of branch {j + 1}, which is not an "
                "earlier branch: the file is damaged or was edited; use the checkpoint the run wrote"
            )
        mine, theirs = f"branches.{k}.rpn.", f"branches.{j}.rpn."
        for key in [key for key in state if key.startswith(mine)]:
            other = state.get(theirs + key[len(mine) :])
            if other is None or not torch.equal(other, state[key]):
                raise WeightsError(
                    f"{path}: branch {k + 1} uses the RPN of branch {j + 1}, but tensor {key} "
                    "differs from that RPN's: the file is damaged or was edited"
                )


def _merged_branches(
    base: MultiBranchFasterRCNN, new: MultiBranchFasterRCNN
) -> tuple[list[Branch], list[BranchRecord]]:
    """``base``'s branches then ``new``'s; a new branch whose RPN is bit-identical to an earlier
    branch's (trained with model.freeze_rpn) uses that one, so it runs once."""
    branches, records = list(base.branches), list(base.records)
    for branch, record in zip(new.branches, new.records, strict=True):
        record.trained = True  # its heads learnt on this very trunk
        if record.rpn_from is not None:  # shared within new: now counted after base's branches
            owner = record.rpn_from + len(base.branches)
        else:
            same = [k for k, b in enumerate(branches) if same_rpn(b.rpn, branch.rpn)]
            owner = same[0] if same else None
        if owner is not None:
            owner = records[owner].rpn_from if records[owner].rpn_from is not None else owner
            branch = Branch(branches[owner].rpn, branch.roi_heads)
        record.rpn_from = owner
        branches.append(branch)
        records.append(record)
    return branches, records


def merge_checkpoints(base_path: str | Path, new_path: str | Path) -> dict[str, Any]:
    """One checkpoint with every branch of ``base_path`` then every branch of ``new_path``.

    For a model trained separately from the base with its trunk frozen (replace-the-predictor):
    refused unless both trunks (resize settings, backbone + FPN tensors) are bit-identical, which
    is what keeps each model's detections exactly as they were in the merged one.
    """
    models = []
    for path in (base_path, new_path):
        checkpoint = load_checkpoint(path)
        checkpoint["path"] = str(path)
        models.append(
            (
                as_multi_branch(model_from_checkpoint(checkpoint), checkpoint, f"file:{path}"),
                checkpoint,
            )
        )
    (base, base_ckpt), (new, new_ckpt) = models
    if base_ckpt["arch"] != new_ckpt["arch"]:
        raise WeightsError(
            f"{new_path}: a {new_ckpt['arch']}, but {base_path} is a {base_ckpt['arch']}: only "
            "models on one trunk can be merged"
        )
    difference = trunk_difference(base, new)
    if difference is not None:
        raise WeightsError(
            f"{new_path}: its trunk is not {base_path}'s ({difference}); merge needs bit-identical "
            f"trunks: train the new classes from {base_path} with model.keep_classes: true (or "
            "with model.freeze_backbone: true and no unfreeze phase), then merge"
        )
    taken = [name for name in new.class_names if name in base.class_names]
    if taken:
        raise WeightsError(
            f"{new_path}: classes {taken} are also classes of {base_path}; a merged model needs "
            "distinct class names"
        )
    branches, records = _merged_branches(base, new)
    merged = MultiBranchFasterRCNN(base.transform, base.backbone, branches, records)
    return {
        "model": {k: v.detach().cpu() for k, v in merged.state_dict().items()},
        "arch": base_ckpt["arch"],
        "config": new_ckpt.get("config", {}),
        "config_hash": new_ckpt.get("config_hash"),
        "state": new_ckpt.get("state", {}),
        "merged_from": [str(base_path), str(new_path)],
        "saved_at": time.time(),
        **checkpoint_fields(merged),
    }
