"""The deployment report on the hand-made set of test_evaluate.py: files, numbers, self-contained HTML."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
from test_evaluate import CATEGORIES, DETECTIONS, TRUTH, write_set

from detector.data import load_coco
from detector.evaluate import Evaluation, coco_metrics
from detector.report import format_report, write_report


@pytest.fixture
def evaluation(tmp_path):
    path = write_set(tmp_path / "set", CATEGORIES, [1, 2, 3, 4], TRUTH)
    rng = np.random.default_rng(0)
    for image_id in (1, 2, 3, 4):
        image = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
        assert cv2.imwrite(str(path.parent / "images" / f"{image_id}.jpg"), image)
    cset = load_coco(path)
    metrics, evaluator = coco_metrics(cset, DETECTIONS)
    return Evaluation(metrics, DETECTIONS, evaluator, cset, "handmade.pt", 0.05)


def test_report_files_and_numbers(evaluation, tmp_path):
    out = tmp_path / "report"
    report = write_report(evaluation, out, target_precision=0.9)
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["target_precision"] == 0.9
    assert thresholds["per_class"]["cat"]["target_precision_threshold"] == pytest.approx(0.9)
    assert thresholds["per_class"]["cat"]["max_f1_threshold"] == pytest.approx(0.6)
    assert thresholds["per_class"]["dog"]["recall_at_target_precision"] == pytest.approx(2 / 3)
    confusion = json.loads((out / "confusion.json").read_text())
    assert confusion["labels"] == ["cat", "dog", "background"]
    assert confusion["matrix"] == [[1, 0, 1], [0, 2, 1], [0, 0, 0]]  # at cat 0.9, dog 0.3
    assert confusion["thresholds"] == pytest.approx({"cat": 0.9, "dog": 0.3})
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"cat", "dog"}
    assert (
        metrics["per_class"]["cat"]["AP_small"] >= 0
        and metrics["per_class"]["cat"]["AP_large"] == -1
    )
    assert "AP_medium" in (out / "metrics.txt").read_text()
    assert cv2.imread(str(out / "confusion.png")) is not None
    # The gallery: the two misses (no false positive survives these thresholds).
    gallery = json.loads((out / "gallery" / "gallery.json").read_text())
    assert sorted((e["kind"], e["class"], e["image_id"]) for e in gallery) == [
        ("missed", "cat", 2),
        ("missed", "dog", 4),
    ]
    for entry in gallery:
        crop = cv2.imread(str(out / "gallery" / entry["file"]))
        assert crop is not None and crop.shape[1] == 192
    assert report.used_thresholds == pytest.approx({"cat": 0.9, "dog": 0.3})
    text = format_report(evaluation, report)
    assert "report.html" in text and "background" in text


def test_report_at_one_threshold_lists_false_positives_by_score(evaluation, tmp_path):
    out = tmp_path / "report"
    write_report(evaluation, out, score_threshold=0.2, gallery_size=3)
    confusion = json.loads((out / "confusion.json").read_text())
    assert confusion["matrix"] == [[2, 0, 0], [1, 2, 0], [2, 1, 0]]
    gallery = json.loads((out / "gallery" / "gallery.json").read_text())
    # The 3 highest-scoring of the 4 false positives, highest first.
    assert [(e["class"], e["score"]) for e in gallery] == [
        ("cat", 0.7),
        ("cat", 0.55),
        ("cat", 0.5),
    ]
    assert [e["file"] for e in gallery] == [
        "false_positive_01.jpg",
        "false_positive_02.jpg",
        "false_positive_03.jpg",
    ]


def test_report_html_is_self_contained(evaluation, tmp_path):
    out = tmp_path / "report"
    write_report(evaluation, out)
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert len(sources) == 1 + 2  # confusion + 2 gallery crops (no PR curve or grid written here)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "thr@P&gt;=0.9" in page and "handmade.pt" in page


def test_report_writes_tensorboard_pr_curves(evaluation, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    write_report(evaluation, tmp_path / "report", tensorboard_dir=log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert {"eval/pr_cat", "eval/pr_dog"} <= set(events.Tags()["tensors"])


def test_gallery_of_a_second_evaluation_replaces_the_first(evaluation, tmp_path):
    out = tmp_path / "report"
    write_report(evaluation, out, score_threshold=0.2, gallery_size=3)
    write_report(evaluation, out, score_threshold=0.2, gallery_size=1)
    assert sorted(p.name for p in (out / "gallery").glob("*.jpg")) == ["false_positive_01.jpg"]


def test_training_run_ends_with_the_report_of_best_pt(shared_datasets, tmp_path):
    from coco_fixtures import tiny_config, write_coco128_subset

    from detector.train import train

    train_json = write_coco128_subset(shared_datasets, tmp_path, count=3, name="train.json")
    ids = [i["id"] for i in json.loads(train_json.read_text())["images"]][:2]
    val_json = write_coco128_subset(shared_datasets, tmp_path, image_ids=ids, name="val.json")
    cfg = tiny_config(train_json, val_json, tmp_path / "runs", train={"epochs": 1})
    result = train(cfg, progress=False)
    for name in ("report.html", "thresholds.json", "metrics.json", "confusion.png"):
        assert (result.run_dir / name).is_file(), name
    thresholds = json.loads((result.run_dir / "thresholds.json").read_text())
    assert thresholds["target_precision"] == 0.9 and "per_class" in thresholds
    assert (result.run_dir / "gallery" / "gallery.json").is_file()


def test_report_of_a_model_that_finds_nothing(evaluation, tmp_path):
    metrics, evaluator = coco_metrics(evaluation.cset, [])
    empty = Evaluation(metrics, [], evaluator, evaluation.cset, "blind.onnx", 0.05)
    out = tmp_path / "report"
    report = write_report(empty, out)
    assert json.loads((out / "thresholds.json").read_text())["per_class"] == {}
    assert json.loads((out / "confusion.json").read_text())["matrix"] == [
        [0, 0, 2],
        [0, 0, 3],
        [0, 0, 0],
    ]
    assert len(report.gallery) == 5 and (out / "report.html").is_file()
