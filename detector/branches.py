"""One detector, several heads on one frozen trunk: new classes without changing the earlier ones.

``MultiBranchFasterRCNN`` holds a torchvision Faster R-CNN's trunk (``transform`` + ``backbone``:
body and FPN) once and one *branch* (an RPN + RoI heads) per set of classes. Branch 1 is the
earlier detector's heads, untouched; every later branch was trained, on the same frozen trunk, for
classes the earlier ones do not have. At inference the trunk runs once, then every branch on its
features, and the detections are concatenated: each branch keeps its own ``detections_per_img``
(the cap on the merged output is their sum), so a new branch can never displace an earlier
branch's detection, and an earlier class's boxes, scores and labels are exactly what the earlier
detector gives (bit-identical on CPU in PyTorch). A single softmax over old + new classes would
not keep that: the new rows would change every earlier score.

A branch may use an earlier branch's RPN instead of its own (``BranchRecord.rpn_from``: trained
with ``model.freeze_rpn``): that RPN then runs once and both branches' RoI heads take its
proposals, which makes the added classes cost their RoI heads only.

Labels: the earlier branches' classes first, in their order, then each later branch's; branch
``b``'s labels 1..C_b are the model's ``label_offset_b + 1 .. label_offset_b + C_b``.

For the rest of the pipeline the model behaves like a torchvision ``FasterRCNN``: ``transform``
and ``backbone`` are the trunk, ``rpn`` and ``roi_heads`` the trainable (last) branch, so the
frozen-RPN option, the feature cache and the training loop work unchanged; in training mode only
that branch runs and returns losses, in eval mode every branch runs.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork


@dataclass
class BranchRecord:
    """What a checkpoint says about one branch: its classes, where it came from, its settings."""

    class_names: list[str]
    category_ids: list[int] | None
    source: str  # the checkpoint (or "coco") the branch's weights came from
    trained: bool = False  # trained on the shared trunk (False: a detector's own heads)
    started_from: str = ""  # a trained branch: whose heads it started from
    settings: dict[str, Any] = field(default_factory=dict)  # see head_settings
    # COCO's predictor has rows for its N/A category ids: the labels its rows stand for (kept
    # labels only); None: rows 1..C are the branch's labels 1..C.
    predictor_labels: list[int] | None = None
    # The earlier branch (0-based) whose RPN this branch uses (model.keep_classes with
    # model.freeze_rpn): one RPN pass gives the proposals of both; None: the branch's own RPN.
    rpn_from: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Branch(nn.Module):
    """An RPN and its RoI heads: one set of classes."""

    def __init__(self, rpn: RegionProposalNetwork, roi_heads: RoIHeads):
        super().__init__()
        self.rpn = rpn
        self.roi_heads = roi_heads


class NamedLabelsRoIHeads(RoIHeads):
    """RoI heads whose predictor has rows for unnamed labels (COCO's N/A ids): detections of those
    are dropped after torchvision's own post-processing, the others renumbered 1..C. The kept
    rows' boxes and scores are torchvision's, bit for bit (the softmax still covers every row)."""

    @classmethod
    def from_heads(cls, heads: RoIHeads, predictor_labels: list[int]) -> NamedLabelsRoIHeads:
        named = cls.__new__(cls)
        named.__dict__.update(heads.__dict__)  # same submodules and settings, this forward
        named._buffers = OrderedDict(heads._buffers)
        named._non_persistent_buffers_set = set(heads._non_persistent_buffers_set)
        table = torch.zeros(heads.box_predictor.cls_score.out_features, dtype=torch.int64)
        table[torch.tensor(predictor_labels)] = torch.arange(1, len(predictor_labels) + 1)
        named.register_buffer("label_of_row", table, persistent=False)
        return named

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        boxes, scores, labels = super().postprocess_detections(
            class_logits, box_regression, proposals, image_shapes
        )
        out_boxes, out_scores, out_labels = [], [], []
        for b, s, row in zip(boxes, scores, labels, strict=True):
            label = self.label_of_row.to(row.device)[row]
            keep = label > 0
            out_boxes.append(b[keep])
            out_scores.append(s[keep])
            out_labels.append(label[keep])
        return out_boxes, out_scores, out_labels


def rpn_inference_settings(rpn: RegionProposalNetwork) -> dict[str, Any]:
    """What decides an RPN's proposals besides its weights."""
    return {
        "rpn_pre_nms_top_n": dict(rpn._pre_nms_top_n),
        "rpn_post_nms_top_n": dict(rpn._post_nms_top_n),
        "rpn_nms_thresh": float(rpn.nms_thresh),
        "rpn_score_thresh": float(rpn.score_thresh),
    }


def head_settings(rpn: RegionProposalNetwork, roi_heads: RoIHeads) -> dict[str, Any]:
    """The inference and sampling settings of one branch (they are not in its state_dict)."""
    return {
        **rpn_inference_settings(rpn),
        "rpn_batch_size_per_image": int(rpn.fg_bg_sampler.batch_size_per_image),
        "box_score_thresh": float(roi_heads.score_thresh),
        "box_nms_thresh": float(roi_heads.nms_thresh),
        "box_detections_per_img": int(roi_heads.detections_per_img),
        "box_batch_size_per_image": int(roi_heads.fg_bg_sampler.batch_size_per_image),
    }


def apply_head_settings(
    rpn: RegionProposalNetwork, roi_heads: RoIHeads, settings: dict[str, Any]
) -> None:
    if "rpn_pre_nms_top_n" in settings:
        rpn._pre_nms_top_n = dict(settings["rpn_pre_nms_top_n"])
        rpn._post_nms_top_n = dict(settings["rpn_post_nms_top_n"])
        rpn.nms_thresh = float(settings["rpn_nms_thresh"])
        rpn.score_thresh = float(settings["rpn_score_thresh"])
        rpn.fg_bg_sampler.batch_size_per_image = int(settings["rpn_batch_size_per_image"])
        roi_heads.score_thresh = float(settings["box_score_thresh"])
        roi_heads.nms_thresh = float(settings["box_nms_thresh"])
        roi_heads.detections_per_img = int(settings["box_detections_per_img"])
        roi_heads.fg_bg_sampler.batch_size_per_image = int(settings["box_batch_size_per_image"])


def transform_settings(transform: nn.Module) -> dict[str, Any]:
    """What the trunk's GeneralizedRCNNTransform does to an image (part of the shared trunk)."""
    return {
        "min_size": [int(s) for s in transform.min_size],
        "max_size": int(transform.max_size),
        "image_mean": [float(v) for v in transform.image_mean],
        "image_std": [float(v) for v in transform.image_std],
        "size_divisible": int(transform.size_divisible),
        "fixed_size": list(transform.fixed_size) if transform.fixed_size else None,
    }


class MultiBranchFasterRCNN(nn.Module):
    """A shared trunk and one branch per class set; see the module docstring."""

    def __init__(
        self,
        transform: nn.Module,
        backbone: nn.Module,
        branches: list[Branch],
        records: list[BranchRecord],
    ):
        super().__init__()
        if len(branches) != len(records) or not branches:
            raise ValueError("one BranchRecord per branch, at least one branch")
        for k, record in enumerate(records):
            j = record.rpn_from
            if j is not None and not (0 <= j < k and branches[k].rpn is branches[j].rpn):
                raise ValueError(f"branch {k + 1}: rpn_from={j} but it does not hold that RPN")
        self.transform = transform
        self.backbone = backbone
        self.branches = nn.ModuleList(branches)
        self.records = list(records)

    # The trainable (last) branch, where torchvision's FasterRCNN has its only one.
    @property
    def rpn(self) -> RegionProposalNetwork:
        return self.branches[-1].rpn

    @property
    def roi_heads(self) -> RoIHeads:
        return self.branches[-1].roi_heads

    @property
    def class_names(self) -> list[str]:
        return [name for record in self.records for name in record.class_names]

    def label_offsets(self) -> list[int]:
        offsets, total = [], 0
        for record in self.records:
            offsets.append(total)
            total += len(record.class_names)
        return offsets

    def detection_branches(self) -> list[tuple[RegionProposalNetwork, RoIHeads, int]]:
        """(rpn, roi_heads, label_offset) per branch (detector.model.detection_branches)."""
        return [
            (b.rpn, b.roi_heads, offset)
            for b, offset in zip(self.branches, self.label_offsets(), strict=True)
        ]

    def train(self, mode: bool = True) -> MultiBranchFasterRCNN:
        """Earlier branches stay in eval mode: they never train. An earlier RPN that the last
        branch uses still works in training mode for it (training-mode proposal counts), frozen
        as it is."""
        super().train(mode)
        for branch in self.branches[:-1]:
            branch.eval()
        self.rpn.training = mode
        return self

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        if self.training:
            proposals, proposal_losses = self.rpn(images, features, targets)
            _, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
            return {**detector_losses, **proposal_losses}
        per_branch, proposals_of = [], {}
        for branch, offset in zip(self.branches, self.label_offsets(), strict=True):
            if id(branch.rpn) not in proposals_of:  # a shared RPN runs once
                proposals_of[id(branch.rpn)] = branch.rpn(images, features)[0]
            proposals = proposals_of[id(branch.rpn)]
            detections, _ = branch.roi_heads(features, proposals, images.image_sizes)
            for d in detections:
                d["labels"] = d["labels"] + offset
            per_branch.append(detections)
        merged = [merge_detections(list(parts)) for parts in zip(*per_branch, strict=True)]
        return self.transform.postprocess(merged, images.image_sizes, original_sizes)


def merge_detections(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One image's detections of every branch, by score (a stable sort: ties keep branch order)."""
    boxes = torch.cat([p["boxes"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    order = torch.sort(scores, descending=True, stable=True).indices
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


def from_plain(model: nn.Module, record: BranchRecord) -> MultiBranchFasterRCNN:
    """A one-branch model around a torchvision FasterRCNN (its modules, not copies)."""
    if not record.settings:
        record.settings = head_settings(model.rpn, model.roi_heads)
    return MultiBranchFasterRCNN(
        model.transform, model.backbone, [Branch(model.rpn, model.roi_heads)], [record]
    )


def add_branch(
    earlier: MultiBranchFasterRCNN, branch: Branch, record: BranchRecord
) -> MultiBranchFasterRCNN:
    """``earlier`` with ``branch`` appended as the trainable one; every earlier part frozen."""
    for p in earlier.parameters():
        p.requires_grad_(False)
    model = MultiBranchFasterRCNN(
        earlier.transform,
        earlier.backbone,
        [*earlier.branches, branch],
        [*earlier.records, record],
    )
    return model.eval()


def share_rpns(branches: list[Branch], records: list[BranchRecord]) -> None:
    """Give each branch with ``rpn_from`` that earlier branch's RPN module (a rebuilt model)."""
    for branch, record in zip(branches, records, strict=True):
        if record.rpn_from is not None:
            branch.rpn = branches[record.rpn_from].rpn


def rpn_owner(model: MultiBranchFasterRCNN, k: int) -> int:
    """The branch whose own RPN branch ``k`` runs (``k`` itself unless it shares one)."""
    j = model.records[k].rpn_from
    return k if j is None else j


def same_rpn(a: RegionProposalNetwork, b: RegionProposalNetwork) -> bool:
    """Whether two RPNs give the same proposals: the same inference settings and bit-identical
    tensors."""
    if rpn_inference_settings(a) != rpn_inference_settings(b):
        return False
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape and torch.equal(state_a[k], state_b[k])
        for k in state_a
    )


def copy_branch(branch: Branch) -> Branch:
    """An independent, trainable copy of a branch's RPN and RoI heads (weights and settings)."""
    heads = copy.deepcopy(branch.roi_heads)
    if isinstance(heads, NamedLabelsRoIHeads):  # a COCO branch's copy predicts its own classes
        plain = RoIHeads.__new__(RoIHeads)
        plain.__dict__.update(heads.__dict__)
        plain._buffers = OrderedDict(
            (k, v) for k, v in heads._buffers.items() if k != "label_of_row"
        )
        heads = plain
    copied = Branch(copy.deepcopy(branch.rpn), heads)
    for p in copied.parameters():
        p.requires_grad_(True)
    return copied


def checkpoint_fields(
    model: nn.Module, trained_category_ids: list[int] | None = None
) -> dict[str, Any]:
    """What a checkpoint of a multi-branch model adds: every class, every branch, the trunk's
    resize (``trained_category_ids``: the training set's ids of the last branch's classes).
    A plain model adds nothing."""
    if not isinstance(model, MultiBranchFasterRCNN):
        return {}
    for record, branch in zip(model.records, model.branches, strict=True):
        record.settings = head_settings(branch.rpn, branch.roi_heads)
    if model.records[-1].category_ids is None and trained_category_ids is not None:
        model.records[-1].category_ids = [int(i) for i in trained_category_ids]
    ids = [r.category_ids for r in model.records]
    return {
        "class_names": model.class_names,
        "category_ids": [i for r in ids for i in r] if all(ids) else None,
        "branches": [r.as_dict() for r in model.records],
        "transform": transform_settings(model.transform),
    }


def describe(model: nn.Module) -> str:
    """Which classes come from where, for the log and the run summary ("" for a plain model)."""
    if not isinstance(model, MultiBranchFasterRCNN):
        return ""
    lines = ["classes by branch (one frozen trunk; every branch but the last frozen):"]
    for k, record in enumerate(model.records, start=1):
        if record.trained:
            start = f" from the heads of {record.started_from}" if record.started_from else ""
            how = f"trained on the shared trunk{start}; weights from {record.source}"
        else:
            how = f"the heads of {record.source}, unchanged"
        if record.rpn_from is not None:
            how += f"; proposals from branch {record.rpn_from + 1}'s RPN"
        lines.append(f"  branch {k}: {', '.join(record.class_names)} ({how})")
    return "\n".join(lines)


def trunk_difference(a: MultiBranchFasterRCNN, b: MultiBranchFasterRCNN) -> str | None:
    """The first way two models' trunks differ (resize settings, then backbone + FPN tensors in
    state_dict order), or None when they are bit-identical."""
    settings_a, settings_b = transform_settings(a.transform), transform_settings(b.transform)
    for key, value in settings_a.items():
        if settings_b[key] != value:
            return f"transform {key}: {value} vs {settings_b[key]}"
    state_a, state_b = a.backbone.state_dict(), b.backbone.state_dict()
    for key, tensor in state_a.items():
        other = state_b.get(key)
        if other is None:
            return f"tensor backbone.{key} is missing from the second model"
        if other.dtype != tensor.dtype or other.shape != tensor.shape:
            return f"tensor backbone.{key}: {tensor.dtype} {list(tensor.shape)} vs {other.dtype} {list(other.shape)}"
        if not torch.equal(other, tensor):
            return f"tensor backbone.{key} differs (max abs difference {float((other.float() - tensor.float()).abs().max()):.3g})"
    extra = [k for k in state_b if k not in state_a]
    return f"tensor backbone.{extra[0]} is missing from the first model" if extra else None
