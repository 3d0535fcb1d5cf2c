"""Deploy runtime (numpy + OpenCV + onnxruntime), `detector predict` and `detector benchmark`."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnx_fixtures as fx
import pytest
import torch
from onnx import TensorProto, helper

from detector import benchmark, predict
from detector.export import BOX_TOLERANCE, SCORE_TOLERANCE, ParityReport, compare_detections
from detector.runtime import (
    Detections,
    Detector,
    InputError,
    ModelError,
    ProviderError,
    cuda_devices,
)
from detector.runtime import contract as C

pytestmark = pytest.mark.usefixtures("onnx_one_torch_thread")


@pytest.fixture(scope="module")
def b1(work, shared_datasets) -> Path:
    return fx.exported(work, shared_datasets, "b1")[0]


@pytest.fixture(scope="module")
def b2(work, shared_datasets) -> Path:
    return fx.exported(work, shared_datasets, "b2", batch=2)[0]


@pytest.fixture(scope="module")
def det1(b1) -> Detector:
    return Detector(b1, providers=["cpu"], threads=1)


@pytest.fixture(scope="module")
def det2(b2) -> Detector:
    return Detector(b2, providers=["cpu"], threads=1)


def reference(model, frame: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        (out,) = model([fx.to_tensor(frame)])
    return {k: out[k].numpy() for k in ("boxes", "scores", "labels")}


def assert_same(ref: dict, det: Detections, where: str) -> None:
    report = ParityReport(images=1, provider="CPU")
    test = {"boxes": det.boxes, "scores": det.scores, "labels": det.labels}
    compare_detections(ref, test, report, score_threshold=0.05, max_detections=100, where=where)
    assert report.passed, report.format()
    assert report.max_box_diff <= BOX_TOLERANCE and report.max_score_diff <= SCORE_TOLERANCE


def write_onnx(path: Path, metadata: dict[str, str] | None = None) -> Path:
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "h", "w"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, "h", "w"])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["out"])], "g", [inp], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = (
        8  # what the exporter writes; onnx 1.23's default is newer than onnxruntime's
    )
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------------


def test_import_runtime_does_not_import_torch():
    code = (
        "import sys, detector.runtime, detector.predict, detector.benchmark, detector.cli; "
        "detector.cli.build_parser(); "
        "bad = [m for m in ('torch', 'torchvision', 'PIL', 'tqdm', 'yaml') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_cpu_provider_chosen_and_logged(b1, caplog):
    with caplog.at_level(logging.INFO, logger="detector.runtime"):
        det = Detector(b1, threads=1)  # default order: TensorRT, CUDA, CPU
    assert det.provider == "CPUExecutionProvider"
    lines = [r.getMessage() for r in caplog.records if "onnxruntime provider" in r.getMessage()]
    assert lines and lines[-1].startswith("onnxruntime provider: CPUExecutionProvider")
    if cuda_devices()[0] == 0:
        assert "TensorrtExecutionProvider" in det.skipped_providers
        assert "CUDAExecutionProvider" in lines[-1]


def test_explicit_gpu_provider_without_gpu_is_refused(b1):
    if cuda_devices()[0] > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ProviderError, match="none of the requested execution providers"):
        Detector(b1, providers=["cuda"])


def test_provider_plan_with_a_gpu_sets_tensorrt_cache_options(monkeypatch, tmp_path):
    from detector.runtime import providers

    monkeypatch.setattr(providers, "cuda_devices", lambda: (1, ""))
    trt = providers.TensorRTOptions(cache_dir=tmp_path / "trt", workspace_bytes=1 << 30)
    plan = providers.plan_providers(None, tensorrt=trt)
    built = set(providers.ort.get_available_providers())
    expected = [p for p in providers.DEFAULT_PROVIDERS if p in built]
    assert plan.providers == expected
    if providers.TENSORRT in built:
        options = plan.options[0]
        assert options["trt_engine_cache_enable"] is True and options["trt_fp16_enable"] is True
        assert options["trt_max_workspace_size"] == 1 << 30
        assert (
            options["trt_engine_cache_path"] == str(tmp_path / "trt")
            and (tmp_path / "trt").is_dir()
        )
    monkeypatch.setattr(providers, "cuda_devices", lambda: (0, "no NVIDIA driver (test)"))
    plan = providers.plan_providers(["trt", "cuda", "cpu"])
    assert plan.providers == ["CPUExecutionProvider"]
    assert set(plan.skipped.values()) <= {"no NVIDIA driver (test)"} | {
        v for v in plan.skipped.values() if v.startswith("not built")
    }
    with pytest.raises(ProviderError, match="unknown execution provider"):
        providers.plan_providers(["vulkan"])


def test_single_frame_matches_pytorch(det1, torch_model, shared_datasets):
    frame = fx.raccoon_image(shared_datasets, "raccoon-1")
    det = det1.predict(frame)
    assert isinstance(det, Detections) and len(det) > 0
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
    assert det.scores.dtype == np.float32 and det.labels.dtype == np.int64
    assert det.names == ["raccoon"] * len(det) and det.image_size == frame.shape[:2]
    assert np.all(np.diff(det.scores) <= 0)
    assert_same(reference(torch_model, frame), det, "raccoon-1")
    # the labelled raccoon is found
    gt = np.array(fx.raccoon_boxes(shared_datasets, "raccoon-1")[0])
    assert np.abs(det.boxes[0] - gt).max() < 40


def test_flat_gray_frame_gives_empty_result(det1, det2):
    gray = np.full((240, 320, 3), 128, dtype=np.uint8)
    for det in (det1.predict(gray), *det2.predict([gray, gray, gray])):
        assert len(det) == 0
        assert det.boxes.shape == (0, 4) and det.boxes.dtype == np.float32
        assert det.scores.shape == (0,) and det.labels.shape == (0,) and det.names == []


def test_non_multiple_of_32_frame(det1, torch_model, shared_datasets):
    frame = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-10"), (457, 301))
    det = det1.predict(frame)
    assert len(det) > 0 and det.image_size == (301, 457)
    assert_same(reference(torch_model, frame), det, "301x457")


def test_batched_list_padding_and_mixed_sizes(det1, det2, torch_model, shared_datasets):
    a = fx.raccoon_image(shared_datasets, "raccoon-1")
    b = cv2.resize(fx.raccoon_image(shared_datasets, "raccoon-101"), (a.shape[1], a.shape[0]))
    c = fx.raccoon_image(shared_datasets, "raccoon-10")  # another size
    # Three frames on a batch-2 model: same-size a and b share a batch, c runs padded with a copy.
    results = det2.predict([a, c, b])
    assert [r.image_size for r in results] == [a.shape[:2], c.shape[:2], b.shape[:2]]
    for frame, result in zip((a, c, b), results, strict=True):
        single = det1.predict(frame)
        assert len(result) == len(single) > 0
        np.testing.assert_allclose(result.boxes, single.boxes, atol=0.05)
        np.testing.assert_allclose(result.scores, single.scores, atol=1e-4)
    # Two sizes forced into one batch: each is padded right/bottom to the common size with the
    # mean colour (the documented letterbox); boxes come back clipped to each frame.
    mixed = det2.predict([a, c])
    height, width = max(a.shape[0], c.shape[0]), max(a.shape[1], c.shape[1])
    for frame, result in zip((a, c), mixed, strict=True):
        h, w = frame.shape[:2]
        assert result.image_size == (h, w)
        assert np.all(result.boxes >= 0) and np.all(result.boxes[:, [0, 2]] <= w)
        assert np.all(result.boxes[:, [1, 3]] <= h)
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = C.MEAN_BGR_UINT8
        canvas[:h, :w] = frame
        ref = reference(torch_model, canvas)
        ref["boxes"][:, 0::2] = ref["boxes"][:, 0::2].clip(0, w)
        ref["boxes"][:, 1::2] = ref["boxes"][:, 1::2].clip(0, h)
        keep = ((ref["boxes"][:, 2] - ref["boxes"][:, 0]) >= 1) & (
            (ref["boxes"][:, 3] - ref["boxes"][:, 1]) >= 1
        )
        assert keep.any()
        assert_same({k: v[keep] for k, v in ref.items()}, result, f"letterboxed {h}x{w}")
    # An N x H x W x 3 array is a list of frames.
    stacked = det2.predict(np.stack([a, b]))
    assert isinstance(stacked, list) and len(stacked) == 2


def test_score_threshold_filters(b1, shared_datasets):
    frame = fx.raccoon_image(shared_datasets, "raccoon-110")
    everything = Detector(b1, providers=["cpu"], threads=1).predict(frame)
    confident = Detector(b1, providers=["cpu"], threads=1, score_threshold=0.5).predict(frame)
    assert len(everything) > len(confident) > 0
    assert np.all(confident.scores >= 0.5)
    np.testing.assert_array_equal(confident.boxes, everything.boxes[everything.scores >= 0.5])


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((240, 320, 3), np.float32), "dtype uint8, got float32"),
        (np.zeros((240, 320), np.uint8), "3 dimensions"),
        (np.zeros((240, 320, 4), np.uint8), "BGRA2BGR"),
        (np.zeros((3, 240, 320), np.uint8), "channels-first"),
        (np.zeros((8, 320, 3), np.uint8), "outside the supported"),
        ([[0, 1], [2, 3]], "frame 0: expected a numpy array"),
        ("frame.jpg", "list of them"),
        ([np.zeros((240, 320, 3), np.uint8), "frame.jpg"], "frame 1: expected a numpy array"),
    ],
)
def test_invalid_input_is_refused_clearly(det1, frame, message):
    with pytest.raises(InputError, match=message):
        det1.predict(frame)


def test_model_without_metadata_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a detector ONNX model"):
        Detector(write_onnx(tmp_path / "plain.onnx"), providers=["cpu"])
    newer = {
        C.KEY_FORMAT: C.FORMAT_TAG,
        C.KEY_CONTRACT: "99",
        C.KEY_CLASS_NAMES: '["a"]',
        C.KEY_INPUT_FORMAT: C.INPUT_FLOAT,
        C.KEY_BATCH: "1",
        C.KEY_DETECTIONS: "100",
        C.KEY_SCORE_THRESHOLD: "0.05",
    }
    with pytest.raises(ModelError, match="newer than this runtime"):
        Detector(write_onnx(tmp_path / "newer.onnx", newer), providers=["cpu"])
    with pytest.raises(ModelError, match="lack"):
        Detector(
            write_onnx(tmp_path / "outputs.onnx", {**newer, C.KEY_CONTRACT: "1"}), providers=["cpu"]
        )
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx: not a readable ONNX model"):
        Detector(tmp_path / "junk.onnx", providers=["cpu"])
    with pytest.raises(FileNotFoundError):
        Detector(tmp_path / "missing.onnx")


def test_predict_folder_writes_images_and_coco_results(b2, tmp_path, shared_datasets, capsys):
    from pycocotools.coco import COCO

    src = tmp_path / "frames"
    src.mkdir()
    names = ["raccoon-1", "raccoon-110", "raccoon-10"]
    for name in names:
        cv2.imwrite(str(src / f"{name}.jpg"), fx.raccoon_image(shared_datasets, name))
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    code = predict.run(parser.parse_args([str(b2), str(src), "--out", str(out), "--score", "0.3"]))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "predict: 3 images (1 unreadable, skipped)" in printed
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{n}.jpg" for n in names)
    results = json.loads((out / "results.json").read_text())
    assert results and all(r["score"] >= 0.3 and r["category_id"] == 1 for r in results)
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] > 0 and r["bbox"][3] > 0 for r in results)
    gt = COCO(str(out / "images.json"))
    res = gt.loadRes(str(out / "results.json"))
    assert len(res.getAnnIds()) == len(results)
    assert set(res.getImgIds()) == {1, 2, 3}
    # with --annotations the image ids are the ground truth's, and COCOeval accepts the pair
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "id": 100 + i,
                        "file_name": f"{n}.jpg",
                        "height": int(fx.raccoon_image(shared_datasets, n).shape[0]),
                        "width": int(fx.raccoon_image(shared_datasets, n).shape[1]),
                    }
                    for i, n in enumerate(names)
                ],
                "annotations": [
                    {
                        "id": 1 + i,
                        "image_id": 100 + i,
                        "category_id": 1,
                        "iscrowd": 0,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "area": (b[2] - b[0]) * (b[3] - b[1]),
                    }
                    for i, n in enumerate(names)
                    for b in fx.raccoon_boxes(shared_datasets, n)
                ],
                "categories": [{"id": 1, "name": "raccoon"}],
            }
        )
    )
    out2 = tmp_path / "out2"
    code = predict.run(
        parser.parse_args(
            [
                str(b2),
                str(src),
                "--out",
                str(out2),
                "--score",
                "0.3",
                "--annotations",
                str(gt_file),
                "--no-draw",
            ]
        )
    )
    assert code == 0
    results2 = json.loads((out2 / "results.json").read_text())
    assert {r["image_id"] for r in results2} <= {100, 101, 102} and len(results2) == len(results)
    res2 = COCO(str(gt_file)).loadRes(str(out2 / "results.json"))
    assert len(res2.getAnnIds()) == len(results2)


def test_predict_video(b1, tmp_path, shared_datasets, capsys):
    frame = fx.raccoon_image(shared_datasets, "raccoon-1")
    h, w = frame.shape[:2]
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    assert writer.isOpened()
    for _ in range(4):
        writer.write(frame)
    writer.release()
    out = tmp_path / "video_out"
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    assert (
        predict.run(parser.parse_args([str(b1), str(video), "--out", str(out), "--score", "0.3"]))
        == 0
    )
    assert "predict: 4 images" in capsys.readouterr().out
    annotated = [p for p in out.iterdir() if p.name.startswith("clip_annotated")]
    assert len(annotated) == 1
    cap = cv2.VideoCapture(str(annotated[0]))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == 4
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2, 3, 4}


def test_benchmark_cli_writes_table_and_json(b1, b2, checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            str(b1),
            str(b2),
            "--checkpoint",
            str(checkpoint),
            "--size",
            "256",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--providers",
            "cpu",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    assert "| onnxruntime | CPU | b1.onnx | 1 | 1 |" in printed
    data = json.loads(out.read_text())
    rows = data["results"]
    keys = {(r["engine"], r["model"], r["frames"]) for r in rows}
    assert keys == {
        ("onnxruntime", "b1.onnx", 1),
        ("onnxruntime", "b2.onnx", 1),
        ("onnxruntime", "b2.onnx", 2),
        ("torch", checkpoint.name, 1),
        ("torch", checkpoint.name, 2),
    }
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iters"] == 3
        assert r["fps"] == pytest.approx(r["frames"] * 1000 / r["p50_ms"], rel=1e-2)


# ---- per-class thresholds, IOBinding, bad model files ----------------------------------------


def with_metadata(src: Path, dst: Path, extra: dict[str, str]) -> Path:
    model = onnx.load(str(src))
    for key, value in extra.items():
        found = [p for p in model.metadata_props if p.key == key]
        entry = found[0] if found else model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dst))
    return dst


def test_per_class_thresholds_from_metadata_unless_the_caller_gives_one(
    b1, tmp_path, shared_datasets
):
    frame = fx.raccoon_image(shared_datasets, "raccoon-110")
    everything = Detector(b1, providers=["cpu"], threads=1).predict(frame)
    cut = float(np.sort(everything.scores)[len(everything) // 2])
    model = with_metadata(b1, tmp_path / "thr.onnx", {C.KEY_CLASS_SCORE_THRESHOLDS: f"[{cut}]"})
    det = Detector(model, providers=["cpu"], threads=1)
    kept = det.predict(frame)
    assert 0 < len(kept) < len(everything) and np.all(kept.scores >= cut)
    np.testing.assert_array_equal(kept.boxes, everything.boxes[everything.scores >= cut])
    assert det.describe_threshold() == f"score >= {cut:g}"
    caller = Detector(model, providers=["cpu"], threads=1, score_threshold=0.05).predict(frame)
    assert len(caller) == len(everything)
    bad = with_metadata(b1, tmp_path / "bad.onnx", {C.KEY_CLASS_SCORE_THRESHOLDS: "[0.5, 0.7]"})
    with pytest.raises(ModelError, match="bad.onnx: metadata class_score_thresholds"):
        Detector(bad, providers=["cpu"])


def test_per_class_thresholds_apply_by_label(b1, tmp_path, monkeypatch):
    """Two classes with different thresholds: rows are kept by their own class's value."""
    two = with_metadata(
        b1,
        tmp_path / "two.onnx",
        {C.KEY_CLASS_NAMES: '["raccoon", "dog"]', C.KEY_CLASS_SCORE_THRESHOLDS: "[0.3, 0.8]"},
    )
    det = Detector(two, providers=["cpu"], threads=1)
    k = det.info.detections_per_image
    boxes = np.zeros((1, k, 4), np.float32)
    boxes[0, :4] = [[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 9, 9], [2, 2, 8, 8]]
    scores = np.zeros((1, k), np.float32)
    scores[0, :4] = [0.9, 0.7, 0.5, 0.2]
    labels = np.zeros((1, k), np.int64)
    labels[0, :4] = [2, 2, 1, 1]
    monkeypatch.setattr(det, "_infer", lambda feed: [boxes, scores, labels, np.array([4])])
    result = det.predict(np.zeros((64, 64, 3), np.uint8))
    assert result.names == ["dog", "raccoon"]  # dog 0.7 < 0.8 and raccoon 0.2 < 0.3 dropped
    np.testing.assert_array_equal(result.scores, np.float32([0.9, 0.5]))
    assert det.describe_threshold() == "per-class score thresholds (raccoon 0.30, dog 0.80)"


def test_io_binding_gives_the_same_detections(b2, det2, shared_datasets):
    frames = [
        fx.raccoon_image(shared_datasets, n) for n in ("raccoon-1", "raccoon-110", "raccoon-10")
    ]
    bound = Detector(b2, providers=["cpu"], threads=1, io_binding=True)
    assert bound._binding is not None and det2._binding is None  # CPU default: plain run
    for a, b in zip(det2.predict(frames), bound.predict(frames), strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.names == b.names


def test_empty_and_truncated_model_files_are_model_errors(b1, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.onnx: empty file"):
        Detector(tmp_path / "empty.onnx", providers=["cpu"])
    data = b1.read_bytes()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"half\.onnx: not a readable ONNX model"):
        Detector(tmp_path / "half.onnx", providers=["cpu"])


# ---- predict: safe reading and writing -------------------------------------------------------


def run_predict(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return predict.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture
def frames_dir(tmp_path, shared_datasets) -> Path:
    src = tmp_path / "frames"
    src.mkdir()
    for name in ("raccoon-1", "raccoon-10"):
        (src / f"{name}.jpg").write_bytes(
            (shared_datasets / "raccoon-voc" / "images" / f"{name}.jpg").read_bytes()
        )
    return src


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_predict_refuses_output_inside_its_input(b1, frames_dir, tmp_path, capsys):
    before = snapshot(frames_dir)
    assert run_predict(b1, frames_dir, "--out", frames_dir) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert run_predict(b1, frames_dir, "--out", frames_dir / "sub") == 2
    # an output whose images/ is a link to the input (as after `convert --link`)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "images").symlink_to(frames_dir)
    assert run_predict(b1, linked / "images", "--out", linked) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert snapshot(frames_dir) == before and not (linked / "results.json").exists()


def test_predict_never_overwrites_or_writes_through_links(b1, frames_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_predict(b1, frames_dir, "--out", out, "--score", "0.3") == 0
    first = snapshot(out)
    assert run_predict(b1, frames_dir, "--out", out) == 2
    assert "results.json: exists; pass --overwrite" in capsys.readouterr().err
    assert snapshot(out) == first
    assert run_predict(b1, frames_dir, "--out", out, "--overwrite") == 0
    # a link planted in the output folder is refused, even with --overwrite
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"keep me")
    (out / "images" / "raccoon-1.jpg").unlink()
    (out / "images" / "raccoon-1.jpg").symlink_to(victim)
    assert run_predict(b1, frames_dir, "--out", out, "--overwrite") == 2
    assert "is a symlink" in capsys.readouterr().err and victim.read_bytes() == b"keep me"


def test_predict_stops_with_the_file_name_when_a_write_fails(
    b1, frames_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(predict.cv2, "imwrite", lambda path, image: False)  # a full disk
    out = tmp_path / "full"
    assert run_predict(b1, frames_dir, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{out / 'images' / 'raccoon-1.jpg'}: cv2.imwrite failed" in err
    assert not list((out / "images").iterdir())  # no partial or temporary file left
    assert not (out / "results.json").exists()


def test_predict_reports_truncated_and_oversized_images_by_name(
    b1, frames_dir, tmp_path, capsys, monkeypatch
):
    data = (frames_dir / "raccoon-10.jpg").read_bytes()
    (frames_dir / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert cv2.imread(str(frames_dir / "cut.jpg")) is not None  # OpenCV alone fills it gray
    # a PNG whose header says 30000 x 30000: refused from the header, never decoded
    ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    png = bytearray(png.tobytes())
    png[16:24] = (30000).to_bytes(4, "big") * 2
    (frames_dir / "bomb.png").write_bytes(bytes(png))
    real_imread = cv2.imread

    def imread(path, *args):
        assert not str(path).endswith(("bomb.png", "cut.jpg")), f"decoded {path}"
        return real_imread(path, *args)

    monkeypatch.setattr(cv2, "imread", imread)
    out = tmp_path / "out"
    assert run_predict(b1, frames_dir, "--out", out, "--no-draw") == 0
    printed = capsys.readouterr().out
    assert "predict: 2 images (2 unreadable, skipped)" in printed
    assert "cut.jpg: the JPEG has no end marker" in printed
    assert "bomb.png: 30000x30000 pixels (from its header) is over the limit" in printed


def test_header_sizes_match_the_decoded_images(tmp_path):
    from detector.coco_rules import image_truncation as truncation
    from detector.runtime.images import header_size

    image = np.zeros((37, 53, 3), np.uint8)
    for suffix in (".jpg", ".png", ".bmp", ".webp", ".tif"):
        path = tmp_path / f"a{suffix}"
        assert cv2.imwrite(str(path), image)
        assert header_size(path) == (53, 37), suffix
        assert truncation(path) is None, suffix
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-20])
    assert "PNG has no IEND" in truncation(tmp_path / "cut.png")
