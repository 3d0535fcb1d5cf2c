"""A hand-built two-branch stand-in for a multi-branch model: two Faster R-CNN heads (RPN + RoI
heads, deep copies of one trained model's) sharing its backbone, with detection_branches().

Only for tests of the export's multi-branch contract: branch b's labels 1..C_b are model labels
label_offset + 1..; the model's detections of all branches are sorted by score.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class TwoBranchStandIn(nn.Module):
    def __init__(self, model: nn.Module, second_detections: int = 50):
        super().__init__()
        self.transform = model.transform
        self.backbone = model.backbone
        self.rpn, self.roi_heads = model.rpn, model.roi_heads
        self.rpn2 = copy.deepcopy(model.rpn)
        self.roi_heads2 = copy.deepcopy(model.roi_heads)
        self.roi_heads2.detections_per_img = second_detections
        # A second branch that differs from the first: its class logits favour other boxes.
        with torch.no_grad():
            self.roi_heads2.box_predictor.cls_score.bias[1] += 0.5

    def detection_branches(self) -> list[tuple[nn.Module, nn.Module, int]]:
        classes = int(self.roi_heads.box_predictor.cls_score.out_features) - 1
        return [(self.rpn, self.roi_heads, 0), (self.rpn2, self.roi_heads2, classes)]

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, _ = self.transform(images)
        features = self.backbone(image_list.tensors)
        merged: list[list[dict[str, torch.Tensor]]] = [[] for _ in images]
        for rpn, heads, offset in self.detection_branches():
            proposals, _ = rpn(image_list, features)
            dets, _ = heads(features, proposals, image_list.image_sizes)
            dets = self.transform.postprocess(dets, image_list.image_sizes, original_sizes)
            for i, det in enumerate(dets):
                merged[i].append({**det, "labels": det["labels"] + offset})
        out = []
        for parts in merged:
            scores = torch.cat([p["scores"] for p in parts])
            order = torch.argsort(scores, descending=True, stable=True)
            out.append({k: torch.cat([p[k] for p in parts])[order] for k in parts[0]})
        return out
