"""ONNX export: batch 1 and N, parity with PyTorch on real images, raw-frame input, fp16, failures."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnx_fixtures as fx
import onnxruntime as ort
import pytest
import torch

from detector import export
from detector.runtime import contract as C

pytestmark = pytest.mark.usefixtures("onnx_one_torch_thread")


@pytest.fixture(scope="module")
def b1_cli(work, shared_datasets, checkpoint) -> tuple[Path, str]:
    """Batch-1 float model exported through the CLI glue (add_arguments + run); test_runtime.py
    uses the same file."""
    out = work / "b1.onnx"
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    args = parser.parse_args(
        [
            str(checkpoint),
            "--out",
            str(out),
            "--images",
            str(fx.val_dir(work, shared_datasets)),
            "--parity-images",
            "4",
        ]
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = export.run(args)
    assert code == 0, stdout.getvalue()
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def b2(work, shared_datasets):
    return fx.exported(work, shared_datasets, "b2", batch=2)


@pytest.fixture(scope="module")
def b2_raw(work, shared_datasets):
    return fx.exported(work, shared_datasets, "b2_raw", batch=2, raw_input=True)


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


# --------------------------------------------------------------------------------------------


def test_batch1_cli_export_passes_parity_on_real_images(b1_cli):
    path, printed = b1_cli
    assert path.is_file()
    assert "parity PASSED" in printed, printed
    images = int(re.search(r"images compared\s+(\d+)", printed).group(1))
    box = float(re.search(r"max box difference\s+([\d.]+) px", printed).group(1))
    score = float(re.search(r"max score difference\s+([\d.]+)", printed).group(1))
    matched = int(re.search(r"(\d+) matched", printed).group(1))
    assert images == 5  # 4 real images + the flat gray frame
    assert matched >= 5, "the parity check must compare real detections"
    assert box <= export.BOX_TOLERANCE and score <= export.SCORE_TOLERANCE


def test_graph_contract_and_metadata(b1_cli, b2, checkpoint):
    model = onnx.load(str(b2[0]))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    meta = {p.key: p.value for p in model.metadata_props}
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

    sess = session(b2[0])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(float)"
    assert inp.shape[:2] == [2, 3] and all(isinstance(d, str) for d in inp.shape[2:])
    outs = {o.name: o for o in sess.get_outputs()}
    assert outs["boxes"].shape == [2, 100, 4] and outs["boxes"].type == "tensor(float)"
    assert outs["scores"].shape == [2, 100]
    assert outs["labels"].shape == [2, 100] and outs["labels"].type == "tensor(int64)"
    assert outs["num_detections"].shape == [2] and outs["num_detections"].type == "tensor(int64)"
    b1_inputs = session(b1_cli[0]).get_inputs()[0]
    assert b1_inputs.shape[:2] == [1, 3]


def test_batch2_parity_and_batch_independence(b1_cli, b2, torch_model, shared_datasets):
    path, report = b2
    assert report.parity.passed and report.parity.images == 5 and report.parity.matched >= 5
    assert report.parity.max_box_diff <= 0.5 and report.parity.max_score_diff <= 1e-3
    # Two different images of one size in one batch: each equals PyTorch and the batch-1 graph.
    a = fx.raccoon_image(shared_datasets, "raccoon-1")
    b = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-101"), (a.shape[1], a.shape[0]))
    out2 = session(path).run(None, {"images": float_batch([a, b])})
    sess1 = session(b1_cli[0])
    ref = torch_detections(torch_model, [a, b])
    assert len(ref[0]["scores"]) > 0 and len(ref[1]["scores"]) > 0
    for i, frame in enumerate((a, b)):
        assert_same(ref[i], onnx_detections(out2, i), f"batch2[{i}]")
        out1 = sess1.run(None, {"images": float_batch([frame])})
        assert_same(onnx_detections(out1, 0), onnx_detections(out2, i), f"batch1 vs batch2[{i}]")


def test_non_multiple_of_32_size(b1_cli, torch_model, shared_datasets):
    frame = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-111"), (457, 301))  # H=301, W=457
    out = session(b1_cli[0]).run(None, {"images": float_batch([frame])})
    (ref,) = torch_detections(torch_model, [frame])
    assert len(ref["scores"]) > 0
    test = onnx_detections(out, 0)
    assert_same(ref, test, "301x457")
    assert np.all(test["boxes"][:, [0, 2]] <= 457) and np.all(test["boxes"][:, [1, 3]] <= 301)
    assert np.all(test["boxes"] >= 0)


def test_flat_gray_image_gives_empty_padded_result(b2):
    gray = np.full((2, 3, 300, 400), 0.5, dtype=np.float32)
    boxes, scores, labels, counts = session(b2[0]).run(None, {"images": gray})
    assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and labels.shape == (2, 100)
    assert counts.tolist() == [0, 0]
    assert not boxes.any() and not scores.any() and not labels.any()


def test_raw_uint8_bgr_variant_equals_float_variant(b2, b2_raw, shared_datasets):
    path, report = b2_raw
    assert report.parity.passed and report.metadata[C.KEY_INPUT_FORMAT] == C.INPUT_RAW
    sess = session(path)
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[0] == 2 and inp.shape[3] == 3
    a = fx.raccoon_image(shared_datasets, "raccoon-1")
    b = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-114"), (a.shape[1], a.shape[0]))
    raw = sess.run(None, {"images": np.stack([a, b])})
    flt = session(b2[0]).run(None, {"images": float_batch([a, b])})
    assert int(raw[3].sum()) > 0
    np.testing.assert_array_equal(raw[3], flt[3])
    np.testing.assert_array_equal(raw[2], flt[2])
    np.testing.assert_allclose(raw[0], flt[0], atol=1e-3)
    np.testing.assert_allclose(raw[1], flt[1], atol=1e-5)


def test_fp16_graph_builds_and_runs_on_cpu(work, shared_datasets, torch_model):
    path, report = fx.exported(work, shared_datasets, "b1_fp16", parity_limit=2, fp16=True)
    assert report.precision == "fp16" and report.parity.passed
    model = onnx.load(str(path))
    dtypes = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    sess = session(path)
    assert sess.get_inputs()[0].type == "tensor(float)"  # same input contract as fp32
    frame = fx.raccoon_image(shared_datasets, "raccoon-10")
    out = sess.run(None, {"images": float_batch([frame])})
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


def test_no_rpn_proposals_does_not_crash(work, torch_model):
    """A frame where the RPN keeps nothing (dark frame, mobilenet RPN score threshold)."""
    import copy

    model = copy.deepcopy(torch_model)
    model.rpn.score_thresh = 1.01  # no proposal survives
    out = work / "no_proposals.onnx"
    export.export_model(model, out, class_names=["raccoon"], parity=False)
    boxes, scores, labels, counts = session(out).run(
        None, {"images": np.random.default_rng(0).random((1, 3, 240, 320), dtype=np.float32)}
    )
    assert counts.tolist() == [0] and boxes.shape == (1, 100, 4) and not boxes.any()


def test_parity_failure_refuses_and_leaves_previous_file(
    work, b1_cli, torch_model, monkeypatch, shared_datasets
):
    onnx_bytes = b1_cli[0].read_bytes()
    monkeypatch.setattr(export, "_trace_to_onnx", lambda wrapper, example, opset: onnx_bytes)
    real_reference = export._torch_reference

    def shifted(model, rgb, device):  # PyTorch "disagrees" by 2 px
        out = real_reference(model, rgb, device)
        for o in out:
            o["boxes"] = o["boxes"] + 2.0
        return out

    monkeypatch.setattr(export, "_torch_reference", shifted)
    out = work / "refused.onnx"
    out.write_bytes(b"previous model")
    frames = [fx.raccoon_image(shared_datasets, "raccoon-1")]
    with pytest.raises(export.ParityError) as info:
        export.export_model(torch_model, out, class_names=["raccoon"], parity_frames=frames)
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
    with pytest.raises(export.ExportError, match="opset 13"):
        export.export_model(torch_model, work / "x.onnx", class_names=["raccoon"], opset=13)
    with pytest.raises(export.ExportError, match="batch"):
        export.export_model(torch_model, work / "x.onnx", class_names=["raccoon"], batch=0)
    with pytest.raises(ValueError, match="overwrite"):
        export.export_onnx(checkpoint, checkpoint)
    assert not (work / "x.onnx").exists()
