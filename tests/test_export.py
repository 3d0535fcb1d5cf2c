"""ONNX export: batch 1 and N, raw and float input, fp16, static and dynamic size, parity with
PyTorch on real images (ties included), a TensorRT-parsable graph, multi-branch models,
per-class thresholds, the integer resize rule, failures."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnx_fixtures as fx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
from two_branch_model import TwoBranchStandIn

from detector import cli, export
from detector.export import graph, parity, writing
from detector.model import detection_branches
from detector.resize_rule import resized_size
from detector.runtime import Detector, InputError
from detector.runtime import contract as C
from detector.runtime.detector import ModelInfo, check_frame_size

pytestmark = pytest.mark.usefixtures("onnx_one_torch_thread")

STATIC_SIZE = (400, 300)  # W x H of the static export


@pytest.fixture(scope="module")
def b1_cli(work, shared_datasets, checkpoint) -> tuple[Path, str]:
    """Batch-1 model exported through `detector export` with its defaults (raw uint8 input, any
    size, simplified); test_runtime.py uses the same file."""
    out = work / "b1.onnx"
    argv = ["export", str(checkpoint), "--out", str(out), "--parity-images", "4"]
    argv += ["--images", str(fx.val_dir(work, shared_datasets))]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(argv)
    assert code == 0, stdout.getvalue()
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def b2(work, shared_datasets):
    return fx.exported(work, shared_datasets, "b2", batch=2)


@pytest.fixture(scope="module")
def b2_float(work, shared_datasets):
    return fx.exported(work, shared_datasets, "b2_float", batch=2, raw_input=False)


@pytest.fixture(scope="module")
def fp16(work, shared_datasets):
    return fx.exported(work, shared_datasets, "b1_fp16", parity_limit=2, fp16=True)


@pytest.fixture(scope="module")
def static(work, shared_datasets):
    return fx.exported(work, shared_datasets, "b2_static", batch=2, input_size=STATIC_SIZE)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def float_batch(frames: list[np.ndarray]) -> np.ndarray:
    return (
        np.ascontiguousarray(np.stack(frames)[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
        / 255.0
    )


def torch_detections(model, frames: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    with torch.inference_mode():
        out = model([fx.to_tensor(f) for f in frames])
    return [{k: o[k].numpy() for k in ("boxes", "scores", "labels")} for o in out]


def onnx_detections(outputs: list[np.ndarray], i: int) -> dict[str, np.ndarray]:
    boxes, scores, labels, counts = outputs
    n = int(counts[i])
    return {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}


def assert_same(ref: dict, test: dict, where: str = "image") -> export.ParityReport:
    report = export.ParityReport(images=1, provider="CPU")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where=where
    )
    assert report.passed, report.format()
    return report


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# --------------------------------------------------------------------------------------------


def test_batch1_cli_export_passes_parity_on_real_images(b1_cli):
    path, printed = b1_cli
    assert path.is_file()
    assert "parity PASSED" in printed, printed
    images = int(re.search(r"images compared\s+(\d+)", printed).group(1))
    box = float(re.search(r"max box difference\s+([\d.]+) px", printed).group(1))
    score = float(re.search(r"max score difference\s+([\d.]+)", printed).group(1))
    matched = int(re.search(r"(\d+) matched", printed).group(1))
    nodes, traced = map(int, re.search(r"(\d+) nodes \((\d+) as traced\)", printed).groups())
    assert images == 5  # 4 real images + the flat gray frame
    assert matched >= 5, "the parity check must compare real detections"
    assert box <= export.BOX_TOLERANCE and score <= export.SCORE_TOLERANCE
    assert nodes < traced, "onnxsim's simplification is kept when its outputs are identical"


def test_graph_contract_and_metadata(b1_cli, b2, b2_float, checkpoint):
    model = onnx.load(str(b2_float[0]))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    meta = metadata(b2_float[0])
    assert meta[C.KEY_FORMAT] == C.FORMAT_TAG
    assert meta[C.KEY_CONTRACT] == str(C.CONTRACT_VERSION)
    assert json.loads(meta[C.KEY_CLASS_NAMES]) == ["raccoon"]
    assert json.loads(meta[C.KEY_CATEGORY_IDS]) == [1]
    assert meta[C.KEY_INPUT_FORMAT] == C.INPUT_FLOAT
    assert meta[C.KEY_BATCH] == "2"
    assert float(meta[C.KEY_SCORE_THRESHOLD]) == pytest.approx(0.05)
    assert meta[C.KEY_ARCH] == fx.ARCH
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert meta[C.KEY_CONFIG_HASH] == ckpt["config_hash"]
    assert meta[C.KEY_VERSION] and meta[C.KEY_PRECISION] == "fp32"
    assert "dynamo=False" in meta[C.KEY_EXPORTER]
    assert meta[C.KEY_INPUT_SIZE] == C.INPUT_SIZE_DYNAMIC
    assert C.KEY_CLASS_SCORE_THRESHOLDS not in meta
    # TensorRT profiles from the model's min_size 320 / max_size 640, in onnxruntime's format
    assert meta[C.KEY_TRT_PROFILE_MIN] == "images:2x3x160x160"
    assert meta[C.KEY_TRT_PROFILE_OPT] == "images:2x3x320x640"
    assert meta[C.KEY_TRT_PROFILE_MAX] == "images:2x3x1920x1920"

    sess = session(b2_float[0])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(float)"
    assert inp.shape[:2] == [2, 3] and all(isinstance(d, str) for d in inp.shape[2:])
    outs = {o.name: o for o in sess.get_outputs()}
    assert outs["boxes"].shape == [2, 100, 4] and outs["boxes"].type == "tensor(float)"
    assert outs["scores"].shape == [2, 100]
    assert outs["labels"].shape == [2, 100] and outs["labels"].type == "tensor(int64)"
    assert outs["num_detections"].shape == [2] and outs["num_detections"].type == "tensor(int64)"
    # raw uint8 BGR frames are the default input
    for path, batch in ((b1_cli[0], 1), (b2[0], 2)):
        raw = session(path).get_inputs()[0]
        assert raw.type == "tensor(uint8)" and raw.shape[0] == batch and raw.shape[3] == 3
        assert metadata(path)[C.KEY_INPUT_FORMAT] == C.INPUT_RAW
        assert metadata(path)[C.KEY_TRT_PROFILE_MAX] == f"images:{batch}x1920x1920x3"


def test_batch2_parity_and_batch_independence(b1_cli, b2, torch_model, shared_datasets):
    path, report = b2
    assert report.parity.passed and report.parity.images == 5 and report.parity.matched >= 5
    assert report.parity.max_box_diff <= 0.5 and report.parity.max_score_diff <= 1e-3
    # Two different images of one size in one batch: each equals PyTorch and the batch-1 graph.
    a = fx.raccoon_image(shared_datasets, "raccoon-1")
    b = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-101"), (a.shape[1], a.shape[0]))
    out2 = session(path).run(None, {"images": np.stack([a, b])})
    sess1 = session(b1_cli[0])
    ref = torch_detections(torch_model, [a, b])
    assert len(ref[0]["scores"]) > 0 and len(ref[1]["scores"]) > 0
    for i, frame in enumerate((a, b)):
        assert_same(ref[i], onnx_detections(out2, i), f"batch2[{i}]")
        out1 = sess1.run(None, {"images": frame[None]})
        assert_same(onnx_detections(out1, 0), onnx_detections(out2, i), f"batch1 vs batch2[{i}]")


def test_non_multiple_of_32_size(b1_cli, torch_model, shared_datasets):
    frame = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-111"), (457, 301))  # H=301, W=457
    out = session(b1_cli[0]).run(None, {"images": frame[None]})
    (ref,) = torch_detections(torch_model, [frame])
    assert len(ref["scores"]) > 0
    test = onnx_detections(out, 0)
    assert_same(ref, test, "301x457")
    assert np.all(test["boxes"][:, [0, 2]] <= 457) and np.all(test["boxes"][:, [1, 3]] <= 301)
    assert np.all(test["boxes"] >= 0)


def test_flat_gray_image_gives_empty_padded_result(b2):
    gray = np.full((2, 300, 400, 3), 128, dtype=np.uint8)
    boxes, scores, labels, counts = session(b2[0]).run(None, {"images": gray})
    assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and labels.shape == (2, 100)
    assert counts.tolist() == [0, 0]
    assert not boxes.any() and not scores.any() and not labels.any()


def test_raw_uint8_bgr_variant_equals_float_variant(b2, b2_float, shared_datasets):
    path, report = b2_float
    assert report.parity.passed and report.metadata[C.KEY_INPUT_FORMAT] == C.INPUT_FLOAT
    a = fx.raccoon_image(shared_datasets, "raccoon-1")
    b = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-114"), (a.shape[1], a.shape[0]))
    raw = session(b2[0]).run(None, {"images": np.stack([a, b])})
    flt = session(path).run(None, {"images": float_batch([a, b])})
    assert int(raw[3].sum()) > 0
    np.testing.assert_array_equal(raw[3], flt[3])
    np.testing.assert_array_equal(raw[2], flt[2])
    np.testing.assert_allclose(raw[0], flt[0], atol=1e-3)
    np.testing.assert_allclose(raw[1], flt[1], atol=1e-5)


def test_fp16_graph_builds_and_runs_on_cpu(fp16, torch_model, shared_datasets):
    path, report = fp16
    assert report.precision == "fp16" and report.parity.passed
    model = onnx.load(str(path))
    dtypes = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    sess = session(path)
    assert sess.get_inputs()[0].type == "tensor(uint8)"  # same input contract as fp32
    frame = fx.raccoon_image(shared_datasets, "raccoon-10")
    out = sess.run(None, {"images": frame[None]})
    assert out[0].dtype == np.float32 and out[0].shape == (1, 100, 4)
    (ref,) = torch_detections(torch_model, [frame])
    assert (ref["scores"] >= 0.5).any()
    report = export.ParityReport(
        images=1,
        provider="CPU",
        min_iou=export.FP16_MIN_IOU,
        score_tolerance=export.FP16_SCORE_TOLERANCE,
        required_score=export.FP16_REQUIRED_SCORE,
    )
    export.compare_detections(
        ref, onnx_detections(out, 0), report, score_threshold=0.05, max_detections=100, where="fp16"
    )
    assert report.passed and report.matched >= 1, report.format()
    assert report.worst_iou >= export.FP16_MIN_IOU


def test_fp16_check_says_when_nothing_reaches_its_score():
    report = export.ParityReport(images=1, provider="x", required_score=0.5)
    weak = [{"scores": np.array([0.3, 0.1], np.float32)}, {"scores": np.zeros(0, np.float32)}]
    parity._fp16_required_score(weak, report)
    assert report.required_score == 0.25
    assert "no PyTorch detection reaches 0.5 (best 0.300)" in report.format()
    report = export.ParityReport(images=1, provider="x", required_score=0.5)
    parity._fp16_required_score([{"scores": np.array([0.9], np.float32)}], report)
    assert report.required_score == 0.5 and not report.notes


def test_static_export_folds_shapes_and_refuses_other_sizes(static, torch_model, shared_datasets):
    path, report = static
    assert report.parity.passed and report.parity.matched >= 5, report.parity.format()
    w, h = STATIC_SIZE
    model = onnx.load(str(path))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, h, w, 3]
    assert metadata(path)[C.KEY_INPUT_SIZE] == f"{w}x{h}"
    assert not set(C.TRT_PROFILE_KEYS) & set(metadata(path))
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:  # the resize and every TopK K are constants of the graph
        if node.op_type == "Resize":
            assert all(i in constants for i in node.input[1:] if i), node.name
        if node.op_type == "TopK":
            assert node.input[1] in constants, node.name
    frame = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-1"), STATIC_SIZE)
    det = Detector(path, providers=["cpu"], threads=1)
    assert det.info.input_size == STATIC_SIZE
    result = det.predict(frame)
    assert_same(torch_detections(torch_model, [frame])[0], result.__dict__, "static")
    with pytest.raises(InputError, match=r"size 640x480, but the model was exported for 400x300"):
        det.predict(np.zeros((480, 640, 3), np.uint8))


def test_runtime_refuses_a_frame_that_resizes_to_nothing():
    info = ModelInfo(["a"], None, C.INPUT_RAW, 1, 100, 0.05, "fp32", 1, min_size=64, max_size=128)
    assert resized_size(16, 8000, 64, 128) == (0, 128)
    with pytest.raises(InputError, match=r"8000x16 would be resized to 128x0"):
        check_frame_size(np.zeros((16, 8000, 3), np.uint8), info)
    check_frame_size(np.zeros((64, 8000, 3), np.uint8), info)  # 1 x 128: small but not empty


@pytest.mark.slow
def test_every_variant_is_tensorrt_parsable(b1_cli, b2, b2_float, fp16, static):
    """No float64 anywhere, subgraphs included; only operators of onnx-tensorrt's TensorRT 10
    list; no If; static output shapes; onnxruntime's symbolic shape inference succeeds."""
    supported = export.tensorrt_operators()
    assert {"Conv", "NonMaxSuppression", "RoiAlign", "TopK", "NonZero"} <= supported
    assert "If" in supported and "Unique" not in supported  # the list read is the real one
    for path in (b1_cli[0], b2[0], b2_float[0], fp16[0], static[0]):
        model = onnx.load(str(path))
        assert export.tensorrt_problems(model) == [], path.name
        ops = {n.op_type for g in graph.graphs(model.graph) for n in g.node}
        assert ops <= supported and "If" not in ops, (path.name, ops - supported)
        batch = int(metadata(path)[C.KEY_BATCH])
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        for out in (model.graph.output, inferred.graph.output):
            shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in out}
            assert shapes == {
                "boxes": [batch, 100, 4],
                "scores": [batch, 100],
                "labels": [batch, 100],
                "num_detections": [batch],
            }, path.name


def test_traced_box_ops_are_branch_free_and_equal():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([1, 1, 1, 2])
    from torchvision.ops import boxes as box_ops

    expected = box_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert graph.batched_nms_branch_free(boxes, scores, idxs, 0.5).tolist() == expected.tolist()
    empty = graph.batched_nms_branch_free(boxes[:0], scores[:0], idxs[:0], 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with graph.traceable_box_ops():
        assert box_ops.batched_nms is graph.batched_nms_branch_free
    assert box_ops.batched_nms is not graph.batched_nms_branch_free
    clipped = graph.clip_boxes_without_reshape(boxes[:, None].repeat(1, 2, 1) - 5, (8, 55))
    expected = box_ops.clip_boxes_to_image(boxes[:, None].repeat(1, 2, 1) - 5, (8, 55))
    assert torch.equal(clipped, expected)


def test_roi_levels_merge_by_one_gather_with_torchvision_values(b1_cli, static):
    from torchvision.ops import poolers

    generator = torch.Generator().manual_seed(0)
    for rois in (0, 1, 37):
        levels = torch.randint(0, 4, (rois,), generator=generator)
        per_level = [torch.randn(int((levels == k).sum()), 3, 2, 2) for k in range(4)]
        expected = poolers._onnx_merge_levels(levels, per_level)
        assert torch.equal(graph.merge_levels_by_gather(levels, per_level), expected)
    with graph.traceable_box_ops():
        assert poolers._onnx_merge_levels is graph.merge_levels_by_gather
    assert poolers._onnx_merge_levels is not graph.merge_levels_by_gather
    for path in (b1_cli[0], static[0]):  # what is scattered is one int64 per RoI, not features
        model = SymbolicShapeInference.infer_shapes(onnx.load(str(path)), auto_merge=True)
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
        scattered = [n.input[2] for n in model.graph.node if n.op_type == "ScatterElements"]
        assert scattered and all(ranks[name] == 1 for name in scattered), path.name


def test_no_rpn_proposals_does_not_crash(work, torch_model):
    """A frame where the RPN keeps nothing (dark frame, mobilenet RPN score threshold)."""
    model = copy.deepcopy(torch_model)
    model.rpn.score_thresh = 1.01  # no proposal survives
    out = work / "no_proposals.onnx"
    export.export_model(model, out, class_names=["raccoon"], parity=False)
    frame = np.random.default_rng(0).integers(0, 255, (1, 240, 320, 3), dtype=np.uint8)
    boxes, scores, labels, counts = session(out).run(None, {"images": frame})
    assert counts.tolist() == [0] and boxes.shape == (1, 100, 4) and not boxes.any()


def test_two_branch_model_exports_with_sorted_rows_and_offsets(work, torch_model, shared_datasets):
    model = TwoBranchStandIn(copy.deepcopy(torch_model), second_detections=50).eval()
    branches = detection_branches(model)
    assert [offset for _, _, offset in branches] == [0, 1]
    assert detection_branches(torch_model) == [(torch_model.rpn, torch_model.roi_heads, 0)]
    frames = [fx.raccoon_image(shared_datasets, n) for n in ("raccoon-1", "raccoon-110")]
    out = work / "two_branch.onnx"
    report = export.export_model(
        model, out, class_names=["raccoon", "raccoon-again"], batch=2, parity_frames=frames
    )
    assert report.parity.passed and report.parity.matched >= 10, report.parity.format()
    assert report.metadata[C.KEY_DETECTIONS] == "150"
    boxes, scores, labels, counts = session(out).run(None, {"images": np.stack([frames[0]] * 2)})
    assert boxes.shape == (2, 150, 4) and scores.shape == (2, 150)
    n = int(counts[0])
    assert {1, 2} <= set(labels[0, :n].tolist())  # both branches, the second with offset 1
    assert np.all(np.diff(scores[0, :n]) <= 0), "rows sorted by score"
    assert not scores[0, n:].any() and not labels[0, n:].any(), "padding after the detections"
    # A genuinely different second branch (its boxes moved by its regression bias) still fails,
    # tie handling or not.
    with torch.no_grad():
        model.roi_heads2.box_predictor.bbox_pred.bias[4:6] += 0.2
    changed = parity.run_parity(
        model, out.read_bytes(), frames, ["a", "b"], batch=2, raw_input=True, fp16=False
    )
    assert not changed.passed, changed.format()
    assert all("label 2 " in f for f in changed.failures), changed.failures


def test_per_class_thresholds(work, torch_model, tmp_path, checkpoint):
    names = ["cat", "dog"]
    file = tmp_path / "thresholds.json"
    per_class = {
        "cat": {"max_f1_threshold": 0.4, "max_f1": 0.8, "target_precision_threshold": 0.6},
        "dog": {"max_f1_threshold": 0.3, "max_f1": 0.7, "target_precision_threshold": None},
    }
    file.write_text(json.dumps({"target_precision": 0.9, "per_class": per_class}))
    assert export.class_thresholds("auto", file, tmp_path / "best.pt", names) == [0.6, 0.3]
    assert export.class_thresholds("auto", None, tmp_path / "best.pt", names) == [0.6, 0.3]
    assert export.class_thresholds("0.45", None, tmp_path / "best.pt", names) == [0.45, 0.45]
    assert export.class_thresholds(None, None, tmp_path / "best.pt", names) is None
    with pytest.raises(export.ExportError, match="no thresholds for class 'bird'"):
        export.class_thresholds("auto", file, tmp_path / "best.pt", ["cat", "bird"])
    with pytest.raises(export.ExportError, match="detector evaluate"):
        export.class_thresholds("auto", None, tmp_path / "sub" / "best.pt", names)
    with pytest.raises(export.ExportError, match="'auto' or a number"):
        export.class_thresholds("high", None, tmp_path / "best.pt", names)
    out = tmp_path / "thresholds.onnx"
    argv = ["export", str(checkpoint), "--out", str(out), "--no-parity", "--no-simplify"]
    assert cli.main([*argv, "--score-threshold", "0.35"]) == 0
    assert json.loads(metadata(out)[C.KEY_CLASS_SCORE_THRESHOLDS]) == [0.35]


def test_parity_accepts_swaps_among_tied_scores_only():
    ref = {
        "boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 30, 30]], np.float32),
        "scores": np.array([0.3, 0.3, 0.9], np.float32),
        "labels": np.array([1, 1, 1]),
    }
    test = {  # the tied pair came out at other places (other proposals among equal scores)
        "boxes": np.array([[100, 0, 110, 10], [0, 100, 10, 110], [0, 0, 30, 30]], np.float32),
        "scores": np.array([0.300001, 0.300001, 0.9], np.float32),
        "labels": np.array([1, 1, 1]),
    }
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert report.passed and report.tie_swaps == 2 and report.matched == 1
    assert "tie swaps              2" in report.format()
    # The same displacement without a tie is a failure.
    ref["scores"] = np.array([0.3, 0.4, 0.9], np.float32)
    test["scores"] = np.array([0.3, 0.4, 0.9], np.float32)
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert not report.passed and report.tie_swaps == 0


def _tie_groups(kept_tied: int, tied_score: float) -> dict[str, np.ndarray]:
    """One strong detection of label 1, then ``kept_tied`` label-2 boxes at ``tied_score``."""
    boxes = [[0, 0, 30, 30]] + [[40 * k, 100, 40 * k + 30, 130] for k in range(kept_tied)]
    return {
        "boxes": np.array(boxes, np.float32),
        "scores": np.array([0.9] + [tied_score] * kept_tied, np.float32),
        "labels": np.array([1] + [2] * kept_tied),
    }


def test_parity_accepts_nms_keeping_another_number_of_tied_scores_only():
    """NMS among equal scores (a barely trained branch on a flat frame) keeps a different number
    of them in each runtime: tolerated when the score is tied on both sides; an extra detection
    whose score the other side does not have fails, tied or not."""
    ref, test = _tie_groups(5, 0.1279), _tie_groups(3, 0.1279)
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert report.passed and report.tie_count_differences == 2, report.format()
    assert "tie count differences  2" in report.format()
    # The extra ones at a score the other side never gives: a real difference.
    test = _tie_groups(3, 0.2)
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert not report.passed and report.tie_count_differences == 0
    # An extra detection that is not tied on its side fails too.
    ref = _tie_groups(1, 0.1279)
    ref = {k: np.concatenate([v, _tie_groups(1, 0.5)[k][1:]]) for k, v in ref.items()}
    test = _tie_groups(1, 0.1279)
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert not report.passed and report.tie_count_differences == 0


def test_parity_failure_refuses_and_leaves_previous_file(
    work, b1_cli, torch_model, monkeypatch, shared_datasets
):
    onnx_bytes = b1_cli[0].read_bytes()
    monkeypatch.setattr(writing, "trace_to_onnx", lambda *args, **kwargs: onnx_bytes)
    real_reference = parity._torch_reference

    def shifted(model, rgb, device):  # PyTorch "disagrees" by 2 px
        out = real_reference(model, rgb, device)
        for o in out:
            o["boxes"] = o["boxes"] + 2.0
        return out

    monkeypatch.setattr(parity, "_torch_reference", shifted)
    out = work / "refused.onnx"
    out.write_bytes(b"previous model")
    frames = [fx.raccoon_image(shared_datasets, "raccoon-1")]
    with pytest.raises(export.ParityError) as info:
        export.export_model(
            torch_model, out, class_names=["raccoon"], parity_frames=frames, simplify_graph=False
        )
    message = str(info.value)
    assert "was not written" in message and "max box difference" in message
    assert info.value.report.max_box_diff == pytest.approx(2.0, abs=0.05)
    assert not info.value.report.passed
    assert out.read_bytes() == b"previous model"
    assert not [p for p in work.iterdir() if p.name.startswith(".refused.onnx")]


def test_match_detections_tolerates_only_threshold_edge():
    ref = {
        "boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32),
        "scores": np.array([0.9, 0.0505], np.float32),
        "labels": np.array([1, 1]),
    }
    test = {
        "boxes": np.array([[0.2, 0, 10, 10.1]], np.float32),
        "scores": np.array([0.9004], np.float32),
        "labels": np.array([1]),
    }
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert report.passed and report.matched == 1 and report.tolerated == 1
    assert report.max_box_diff == pytest.approx(0.2, abs=1e-5)
    assert report.max_score_diff == pytest.approx(4e-4, abs=1e-5)
    # a confident detection missing on one side fails; so does a wrong label
    ref["scores"][1] = 0.7
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert not report.passed and "PyTorch only" in report.failures[0]
    test["labels"][0] = 2
    report = export.ParityReport(images=1, provider="x")
    export.compare_detections(
        ref, test, report, score_threshold=0.05, max_detections=100, where="a"
    )
    assert report.matched == 0 and len(report.failures) == 3


def test_export_refuses_bad_options(work, torch_model, checkpoint):
    x = work / "x.onnx"
    with pytest.raises(export.ExportError, match="opset 13"):
        export.export_model(torch_model, x, class_names=["raccoon"], opset=13)
    with pytest.raises(export.ExportError, match="batch"):
        export.export_model(torch_model, x, class_names=["raccoon"], batch=0)
    with pytest.raises(export.ExportError, match="takes no TensorRT profile"):
        export.export_model(
            torch_model,
            x,
            class_names=["raccoon"],
            input_size=(640, 480),
            profiles=((320, 320), (640, 480), (1280, 720)),
        )
    with pytest.raises(export.ExportError, match="min <= opt <= max"):
        export.export_model(
            torch_model, x, class_names=["raccoon"], profiles=((640, 640), (320, 320), (1280, 720))
        )
    with pytest.raises(ValueError, match="overwrite"):
        export.export_onnx(checkpoint, checkpoint)
    assert not x.exists()
    assert cli.main(["export", str(checkpoint), "--out", str(x), "--profile-min", "32x32"]) == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", str(checkpoint), "--input-size", "1920"])


def test_cli_help_and_parser_stay_torch_free():
    code = (
        "import sys; from detector import cli; cli.build_parser().parse_args(['export', 'x.pt']); "
        "bad = [m for m in ('torch', 'torchvision', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_parity_recognises_rpn_ties_with_fixed_proposals(work, torch_model, shared_datasets):
    """Every anchor with the same objectness (a barely trained RPN): PyTorch and ONNX Runtime
    keep different proposals, the detections differ by tens of pixels; with PyTorch's proposals
    fed to both sides they agree, and the export says why it passed."""
    model = copy.deepcopy(torch_model)
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.zero_()
    frames = [fx.raccoon_image(shared_datasets, n) for n in ("raccoon-1", "raccoon-110")]
    out = work / "rpn_ties.onnx"
    report = export.export_model(
        model, out, class_names=["raccoon"], parity_frames=frames, simplify_graph=False
    )
    assert report.parity.passed and report.parity.rpn_tie_images >= 1, report.parity.format()
    assert "RPN ties" in report.parity.format()
    # Without the fixed-proposal comparison the same graph fails: the ties are real.
    plain = parity.run_parity(
        model, out.read_bytes(), frames, ["a", "b"], batch=1, raw_input=True, fp16=False
    )
    assert not plain.passed and plain.rpn_tie_images == 0


def test_what_onnxsim_prints_goes_to_the_debug_log_not_the_console(capfd, caplog):
    """onnxsim prints a line per frame-dependent node it cannot fold (hundreds on a detector)."""
    import ctypes
    import logging
    import os

    from detector.export.graph import _console_to_debug_log

    libc = ctypes.CDLL(None)
    with caplog.at_level(logging.DEBUG, logger="detector"), _console_to_debug_log("onnxsim"):
        os.write(1, b'WARNING: failed to run "Concat" op, skip...\n')
        os.write(2, b'WARNING: failed to run "Cast" op, skip...\n')  # a static graph's lines
        libc.printf(b'WARNING: failed to run "Reshape" op, skip...\n')  # C stdio: buffered
    libc.fflush(None)  # what C stdio still held would reach the console now
    out, err = capfd.readouterr()
    assert "failed to run" not in out + err
    assert any("onnxsim printed 3 lines" in r.getMessage() for r in caplog.records)
    print("the console works again")
    assert "works again" in capfd.readouterr().out
