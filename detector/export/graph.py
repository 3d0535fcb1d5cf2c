"""The exported graph: a deploy wrapper around the Faster R-CNN, traced to ONNX, simplified.

The graph is :class:`DeployWrapper` traced by the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``):

* the dynamo exporter (``torch.export``) cannot export torchvision's Faster R-CNN: it stops at
  data-dependent control flow and detection counts that exist only at run time, and torchvision
  ships no dynamo translation for ``nms`` / ``roi_align``. The TorchScript exporter has symbolic
  functions for both and torchvision's own ONNX tests use it.
* torchvision's model exported as is breaks for batch > 1 (pytorch/vision#8937): the RoI heads
  split their proposals per image with sizes frozen at trace time. The wrapper runs the
  transform, backbone, FPN and RPN on the whole batch and the RoI heads once per image.
* every image's detections are padded to K rows (K = the sum of the branches'
  ``detections_per_img``), so the outputs have fixed shapes ``[N, K, ...]`` plus
  ``num_detections[N]``.
* trace-time traps are removed in the exported copy (the eager model is untouched): the resized
  size is the integer rule of ``detector.resize_rule`` in int64 (no float64: TensorRT reads it as
  float32 and a pixel moves); the box coder's ``reshape(box_sum, -1)`` fails in ONNX Runtime
  when the RPN keeps no proposal and its ``if box_sum > 0`` would be frozen; torchvision's
  ``batched_nms`` returns early on empty boxes, which becomes an ONNX ``If`` that TensorRT
  parsers and simplifiers stumble on: the exported copy computes the same thing branch-free;
  the RoI pooler's per-level results go back into RoI order by one Gather instead of a
  ScatterElements per level.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import logging
import os
import sys
import tempfile
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
import torchvision
from torch import nn

from ..model import detection_branches, use_integer_resize
from ..runtime import contract as C
from .errors import ExportError

log = logging.getLogger(__name__)

# onnx-tensorrt's supported-operator list for TensorRT 10 (see the file's header for its source).
TENSORRT_OPERATORS_FILE = Path(__file__).with_name("tensorrt10_operators.txt")


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _cast(v, dtype)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


class Half(nn.Module):
    """Run ``module`` in float16: inputs are cast to half, outputs back to float32."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.half()

    def forward(self, *args: Any) -> Any:
        return _cast(self.module(*_cast(args, torch.float16)), torch.float32)


def decode_traceable(
    self: Any, rel_codes: torch.Tensor, boxes: Sequence[torch.Tensor]
) -> torch.Tensor:
    """BoxCoder.decode without ``reshape(box_sum, -1)`` and ``if box_sum > 0``.

    Both are fine in eager mode; traced, the branch is frozen and ONNX Runtime cannot reshape an
    empty tensor to ``(0, -1)``, which crashes on a frame where the RPN keeps no proposal.
    """
    concat_boxes = torch.cat(list(boxes), dim=0)
    width = rel_codes.shape[-1]
    pred = self.decode_single(rel_codes.reshape(-1, width), concat_boxes)
    return pred.reshape(-1, width // 4, 4)


def batched_nms_branch_free(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """torchvision's coordinate-trick ``batched_nms`` without its ``if boxes.numel() == 0``.

    The max coordinate of no boxes is taken as 0 (a zero is appended; boxes are clipped to the
    image, so it never changes the max of real ones), and NMS of no boxes keeps nothing.
    """
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


def filter_proposals_opaque_counts(
    self: Any,
    proposals: torch.Tensor,
    objectness: torch.Tensor,
    image_shapes: list[tuple[int, int]],
    num_anchors_per_level: list[Any],
) -> Any:
    """RegionProposalNetwork.filter_proposals with each level's anchor count computed as a sum.

    Traced, the counts are products of feature-map sides; onnxruntime's symbolic shape inference
    (which ONNX Runtime runs when TensorRT takes only part of a graph) cannot prove a product of
    such expressions non-negative and crashes on the Slice that splits the levels. The sum of
    that many ones is the same number, and a new symbol to the inference.
    """
    if torch.jit.is_tracing():
        num_anchors_per_level = [
            torch.ones(n, dtype=torch.int64).sum() for n in num_anchors_per_level
        ]
    return type(self).filter_proposals(
        self, proposals, objectness, image_shapes, num_anchors_per_level
    )


def clip_boxes_without_reshape(boxes: torch.Tensor, size: tuple[Any, Any]) -> torch.Tensor:
    """torchvision's ``clip_boxes_to_image`` (traced branch) without its final
    ``reshape(boxes.shape)``: onnxsim folds that shape to ``[0, 2, -1]``-style targets, which
    ONNX Runtime cannot apply to an empty tensor (a frame where the RPN keeps no proposal)."""
    height, width = size
    zero = torch.tensor(0, dtype=boxes.dtype, device=boxes.device)
    x = torch.min(torch.max(boxes[..., 0::2], zero), torch.tensor(width).to(boxes))
    y = torch.min(torch.max(boxes[..., 1::2], zero), torch.tensor(height).to(boxes))
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def merge_levels_by_gather(levels: torch.Tensor, per_level: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's ``_onnx_merge_levels`` (the RoIs' pooled features, back in RoI order) as one
    Gather: its ScatterElements of every level's ``[n, 256, 7, 7]`` block run element by element
    in ONNX Runtime (~5% of an R50-FPN frame on the CPU). Only the inverse of the level order,
    one int64 per RoI, is scattered here. The same values, moved, not computed."""
    order = torch.cat([torch.where(levels == level)[0] for level in range(len(per_level))])
    positions = torch.arange(order.shape[0], dtype=order.dtype, device=order.device)
    inverse = torch.zeros_like(order).scatter(0, order, positions)
    return torch.cat(per_level).index_select(0, inverse)


@contextlib.contextmanager
def traceable_box_ops() -> Iterator[None]:
    """While tracing: torchvision's RPN and RoI heads call ``box_ops.batched_nms`` and
    ``box_ops.clip_boxes_to_image`` through the module, and its RoI pooler
    ``poolers._onnx_merge_levels``, so they get the versions above (restored afterwards)."""
    boxes_module, poolers = torchvision.ops.boxes, torchvision.ops.poolers
    originals = boxes_module.batched_nms, boxes_module.clip_boxes_to_image
    original_merge = poolers._onnx_merge_levels
    boxes_module.batched_nms = batched_nms_branch_free
    boxes_module.clip_boxes_to_image = clip_boxes_without_reshape
    poolers._onnx_merge_levels = merge_levels_by_gather
    try:
        yield
    finally:
        boxes_module.batched_nms, boxes_module.clip_boxes_to_image = originals
        poolers._onnx_merge_levels = original_merge


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of ``tensor`` followed by zeros: exactly ``rows`` rows."""
    zeros = tensor.new_zeros((rows, *tensor.shape[1:]))
    return torch.cat([tensor, zeros])[:rows]


class DeployWrapper(nn.Module):
    """Faster R-CNN with a fixed batch of stacked images in and fixed-shape tensors out.

    ``forward(images)`` takes ``float32 [N, 3, H, W]`` RGB 0..1, or with ``raw_input``
    ``uint8 [N, H, W, 3]`` BGR, and returns ``boxes [N, K, 4]`` (x1, y1, x2, y2 in input pixels),
    ``scores [N, K]``, ``labels int64 [N, K]`` and ``num_detections int64 [N]``; rows past
    ``num_detections[i]`` are zeros. Resizing, normalisation and box rescaling are the model's own
    (GeneralizedRCNNTransform), so the results are those of ``model(list_of_images)``. Every
    branch of :func:`detector.model.detection_branches` runs on the shared features; the rows of
    all branches are sorted by score, padding last.
    """

    def __init__(self, model: nn.Module, batch: int, raw_input: bool = False, fp16: bool = False):
        super().__init__()
        if batch < 1:
            raise ExportError(f"batch must be >= 1, got {batch}")
        model = use_integer_resize(copy.deepcopy(model).eval())
        branches = detection_branches(model)
        if fp16:
            # The heavy convolutions and the box heads in half precision; anchors, box decoding,
            # NMS and RoIAlign stay in float32, where half would cost whole pixels at 1333 px.
            model.backbone = Half(model.backbone)
        rpns = {id(rpn): rpn for rpn, _, _ in branches}
        for rpn in rpns.values():
            rpn.box_coder.decode = types.MethodType(decode_traceable, rpn.box_coder)
            rpn.filter_proposals = types.MethodType(filter_proposals_opaque_counts, rpn)
            if fp16:
                rpn.head = Half(rpn.head)
        for _, heads, _ in branches:
            heads.box_coder.decode = types.MethodType(decode_traceable, heads.box_coder)
            if fp16:
                heads.box_head = Half(heads.box_head)
        self.model = model
        self.branches = branches
        self.batch = batch
        self.raw_input = raw_input
        self.branch_detections = [int(heads.detections_per_img) for _, heads, _ in branches]
        self.detections = sum(self.branch_detections)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if self.raw_input:
            images = images.permute(0, 3, 1, 2).flip(1).to(torch.float32) / 255.0
        frames = [images[i] for i in range(self.batch)]
        original_sizes = [(f.shape[-2], f.shape[-1]) for f in frames]
        image_list, _ = m.transform(frames)
        features = m.backbone(image_list.tensors)
        proposals_of: dict[int, list[torch.Tensor]] = {}
        per_image: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(self.batch)]
        for (rpn, heads, offset), k in zip(self.branches, self.branch_detections, strict=True):
            if id(rpn) not in proposals_of:  # branches sharing an RPN share its proposals
                proposals_of[id(rpn)] = rpn(image_list, features)[0]
            proposals = proposals_of[id(rpn)]
            for i in range(self.batch):
                # The RoI heads see one image at a time: torchvision splits a batch's proposals
                # with sizes that the tracer would freeze (pytorch/vision#8937).
                feats = OrderedDict((name, f[i : i + 1]) for name, f in features.items())
                size = image_list.image_sizes[i]
                dets, _ = heads(feats, [proposals[i]], [size])
                det = m.transform.postprocess(dets, [size], [original_sizes[i]])[0]
                count = torch.ones_like(det["labels"]).sum()
                labels = det["labels"] + offset
                rows = (_pad_rows(det["boxes"], k), _pad_rows(det["scores"], k))
                per_image[i].append((*rows, _pad_rows(labels, k), count))
        outputs = [self._merge_branches(rows) for rows in per_image]
        return tuple(torch.stack(column) for column in zip(*outputs, strict=True))

    def _merge_branches(self, rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """One image's rows of every branch -> K rows sorted by score, padding last."""
        if len(rows) == 1:
            return rows[0]
        boxes = torch.cat([r[0] for r in rows])
        scores = torch.cat([r[1] for r in rows])
        labels = torch.cat([r[2] for r in rows])
        valid = torch.cat(
            [torch.arange(k) < r[3] for r, k in zip(rows, self.branch_detections, strict=True)]
        )
        # Padding sorts last whatever the scores (a constant K: TensorRT wants an initializer).
        order = torch.topk(torch.where(valid, scores, scores.new_full((), -1.0)), self.detections)
        index = order.indices
        count = sum(r[3] for r in rows)
        return boxes[index], scores[index], labels[index], count


class ProposalProbe(nn.Module):
    """For the parity check only: one image and proposals in, the RoI heads' detections from
    those proposals and the RPN's own proposals with their objectness out.

    ``forward(images [1, ...], proposals float32 [P, 4])`` (proposals in the resized image's
    pixels, as the RPN gives them) returns ``(rpn_boxes [P', 4], rpn_scores [P'], boxes [D, 4],
    scores [D], labels [D])``. Feeding PyTorch's proposals to both sides separates the heads (which
    must then agree exactly) from the RPN's choice among tied objectness scores.
    """

    def __init__(self, model: nn.Module, raw_input: bool):
        super().__init__()
        self.wrapper = DeployWrapper(model, 1, raw_input=raw_input)

    def forward(self, images: torch.Tensor, proposals: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        m = self.wrapper.model
        if self.wrapper.raw_input:
            images = images.permute(0, 3, 1, 2).flip(1).to(torch.float32) / 255.0
        original_size = [(images.shape[-2], images.shape[-1])]
        image_list, _ = m.transform([images[0]])
        features = m.backbone(image_list.tensors)
        levels = list(features.values())
        objectness, deltas = m.rpn.head(levels)
        anchors = m.rpn.anchor_generator(image_list, levels)
        counts = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        rpn_boxes = m.rpn.box_coder.decode(deltas, anchors).view(1, -1, 4)
        rpn_boxes, rpn_scores = m.rpn.filter_proposals(
            rpn_boxes, objectness, image_list.image_sizes, counts
        )
        dets, _ = m.roi_heads(features, [proposals], image_list.image_sizes)
        det = m.transform.postprocess(dets, image_list.image_sizes, original_size)[0]
        return rpn_boxes[0], rpn_scores[0], det["boxes"], det["scores"], det["labels"]


def trace_probe(model: nn.Module, raw_input: bool, opset: int, example: torch.Tensor) -> bytes:
    """The :class:`ProposalProbe` of ``model`` as ONNX (any image size, any proposal count)."""
    probe = ProposalProbe(model, raw_input).eval()
    with torch.inference_mode():
        proposals = probe(example, torch.zeros(0, 4, device=example.device))[0]
    axes = {1: "height", 2: "width"} if raw_input else {2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), traceable_box_ops():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            probe,
            (example, proposals.clone()),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[C.INPUT_NAME, "proposals"],
            output_names=["rpn_boxes", "rpn_scores", "boxes", "scores", "labels"],
            dynamic_axes={C.INPUT_NAME: axes, "proposals": {0: "proposals"}},
        )
    return buffer.getvalue()


def trace_to_onnx(
    wrapper: nn.Module, example: torch.Tensor, opset: int, dynamic_size: bool = True
) -> bytes:
    """``torch.onnx.export`` of the wrapper on ``example``; height and width stay dynamic unless
    ``dynamic_size`` is False (then every shape is that of the example)."""
    dynamic = None
    if dynamic_size:
        axes = {1: "height", 2: "width"} if wrapper.raw_input else {2: "height", 3: "width"}
        dynamic = {C.INPUT_NAME: axes}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), traceable_box_ops():
        # TracerWarnings about constants are expected (sizes, anchors, scales); parity checks
        # that what was frozen is right for other images and sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[C.INPUT_NAME],
            output_names=list(C.OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def declare_output_shapes(proto: onnx.ModelProto, batch: int, detections: int) -> None:
    """Write the fixed output shapes into the graph (the tracer leaves K symbolic: it comes
    from slicing a concatenation whose length is only known at run time)."""
    shapes = {
        "boxes": [batch, detections, 4],
        "scores": [batch, detections],
        "labels": [batch, detections],
        "num_detections": [batch],
    }
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for value in shapes[output.name]:
            dims.add().dim_value = value


@contextlib.contextmanager
def _console_to_debug_log(what: str) -> Iterator[None]:
    """Send what C++ code prints on file descriptors 1 and 2 to the debug log.

    onnxsim prints a "failed to run ... skip" line for every node whose value depends on the
    frame (anchors, NMS sizes): expected for this graph, and hundreds of lines on the console
    (on stdout, or on stderr for a static graph). Its failures are exceptions, logged by the
    caller.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as captured:
        for fd in saved:
            os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            libc.fflush(None)  # C stdio buffers what it prints when the fd is not a terminal
            for fd, copy_of_fd in saved.items():
                os.dup2(copy_of_fd, fd)
                os.close(copy_of_fd)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
    if lines:
        log.debug("%s printed %d lines, e.g. %s", what, len(lines), lines[0][:200])


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxsim's simplification (constant folding, shape folding, dead nodes), or None if it
    fails (logged): the unsimplified graph is then kept."""
    import onnxsim

    try:
        with _console_to_debug_log("onnxsim"):
            simplified, ok = onnxsim.simplify(proto)
    except Exception as e:  # onnxsim raises plain RuntimeErrors from its C++ core
        log.warning(
            "onnxsim could not simplify the graph (%s: %s); keeping it as traced",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        return None
    if not ok:
        log.warning("onnxsim's check of the simplified graph failed; keeping it as traced")
        return None
    return simplified


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If / Loop bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attribute.g)
            for sub in attribute.graphs:
                yield from graphs(sub)


def node_count(proto: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in graphs(proto.graph))


def tensorrt_operators() -> set[str]:
    """The operators onnx-tensorrt lists as supported (``Y``) for TensorRT 10."""
    lines = TENSORRT_OPERATORS_FILE.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def tensorrt_problems(proto: onnx.ModelProto) -> list[str]:
    """What would stop TensorRT 10's ONNX parser, subgraphs included: operators outside
    onnx-tensorrt's supported list, and float64 tensors (TensorRT reads them as float32)."""
    supported = tensorrt_operators()
    problems = []
    for graph in graphs(proto.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
                problems.append(f"operator {node.domain or 'ai.onnx'}.{node.op_type} ({node.name})")
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    if attribute.t.data_type == onnx.TensorProto.DOUBLE:
                        problems.append(f"float64 constant in {node.op_type} ({node.name})")
                elif attribute.name == "to" and attribute.i == onnx.TensorProto.DOUBLE:
                    problems.append(f"cast to float64 in {node.name}")
        for tensor in graph.initializer:
            if tensor.data_type == onnx.TensorProto.DOUBLE:
                problems.append(f"float64 initializer {tensor.name}")
    inferred = onnx.shape_inference.infer_shapes(proto)
    for graph in graphs(inferred.graph):
        for value in [*graph.value_info, *graph.input, *graph.output]:
            if value.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
                problems.append(f"float64 tensor {value.name}")
    return problems
