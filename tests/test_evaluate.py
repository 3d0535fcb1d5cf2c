"""Metric computation on hand-made sets with known answers: per-class AP, thresholds, confusion."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from detector.data import DatasetError, load_coco
from detector.evaluate import (
    chosen_thresholds,
    class_points,
    coco_metrics,
    confusion_matrix,
    score_thresholds,
)


def write_set(root: Path, categories, images, annotations) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / "set.json"
    anns = [
        {
            "id": i + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": 0,
        }
        for i, (image_id, category_id, bbox) in enumerate(annotations)
    ]
    imgs = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in images]
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": categories}))
    return path


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_per_class_ap_follows_category_ids_not_file_order(tmp_path):
    # COCOeval sorts its category ids; the file lists raccoon (id 2) before dog (id 1).
    path = write_set(
        tmp_path,
        [{"id": 2, "name": "raccoon"}, {"id": 1, "name": "dog"}],
        [1, 2],
        [(1, 2, [10, 10, 30, 30]), (2, 1, [20, 20, 40, 40])],
    )
    cset = load_coco(path)
    metrics, _ = coco_metrics(cset, [det(1, 2, [10, 10, 30, 30], 0.9)])
    assert metrics.per_class_ap == pytest.approx({"raccoon": 1.0, "dog": 0.0})
    assert metrics.per_class["raccoon"]["AP50"] == pytest.approx(1.0)
    assert metrics.per_class["dog"]["AR100"] == pytest.approx(0.0)


def test_per_class_size_table(tmp_path):
    # One small (20x20 = 400 < 32^2) and one medium (40x40) raccoon; only the small one found.
    path = write_set(
        tmp_path,
        [{"id": 1, "name": "raccoon"}],
        [1],
        [(1, 1, [0, 0, 20, 20]), (1, 1, [50, 50, 40, 40])],
    )
    metrics, _ = coco_metrics(load_coco(path), [det(1, 1, [0, 0, 20, 20], 0.9)])
    row = metrics.per_class["raccoon"]
    assert row["AP_small"] == pytest.approx(1.0)
    assert row["AP_medium"] == pytest.approx(0.0)
    assert row["AP_large"] == -1.0  # no large box in the set
    assert row["AR_small"] == pytest.approx(1.0) and row["AR100"] == pytest.approx(0.5)
    assert metrics.ar_small == pytest.approx(1.0) and metrics.ar_large == -1.0


def test_model_class_names_match_ignoring_case_and_whitespace(tmp_path, caplog):
    path = write_set(tmp_path, [{"id": 1, "name": "Raccoon "}], [1], [(1, 1, [0, 0, 20, 20])])
    with caplog.at_level(logging.INFO, logger="detector.data"):
        cset = load_coco(path, class_names=["raccoon"])
    assert cset.class_names == ["raccoon"] and cset.category_ids == [1]
    assert "matched to category 'Raccoon '" in caplog.text
    metrics, _ = coco_metrics(cset, [det(1, 1, [0, 0, 20, 20], 0.9)])
    assert metrics.per_class_ap["raccoon"] == pytest.approx(1.0)


def test_model_class_name_matching_two_spellings_is_refused(tmp_path):
    path = write_set(tmp_path, [{"id": 1, "name": "deer"}, {"id": 2, "name": "Deer"}], [1], [])
    with pytest.raises(DatasetError, match="several categories"):
        load_coco(path, class_names=["DEER"])


# A hand-made set: cat (id 1), dog (id 2), four 100x100 images.
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
TRUTH = [
    (1, 1, [0, 0, 20, 20]),
    (1, 2, [50, 50, 20, 20]),
    (2, 1, [10, 10, 30, 30]),
    (3, 2, [0, 0, 40, 40]),
    (4, 2, [0, 0, 50, 50]),
]
DETECTIONS = [
    det(1, 1, [0, 0, 20, 20], 0.9),  # cat, right
    det(1, 2, [50, 50, 20, 20], 0.8),  # dog, right
    det(2, 1, [60, 60, 20, 20], 0.7),  # cat on background
    det(2, 1, [10, 10, 30, 30], 0.6),  # cat, right
    det(4, 1, [0, 0, 50, 50], 0.55),  # a dog called cat
    det(3, 1, [0, 0, 40, 40], 0.5),  # a cat on a dog the dog detection below also finds
    det(3, 2, [0, 0, 40, 40], 0.3),  # dog, right
    det(1, 2, [80, 0, 10, 10], 0.2),  # dog on background
]


@pytest.fixture
def handmade(tmp_path):
    cset = load_coco(write_set(tmp_path, CATEGORIES, [1, 2, 3, 4], TRUTH))
    _, evaluator = coco_metrics(cset, DETECTIONS)
    return cset, evaluator


def test_thresholds_known_answers(handmade):
    cset, evaluator = handmade
    thresholds = score_thresholds(class_points(evaluator, cset), target_precision=0.9)
    cat, dog = thresholds["per_class"]["cat"], thresholds["per_class"]["dog"]
    # cat: 0.9 TP, 0.7 FP, 0.6 TP, 0.55 FP, 0.5 FP over 2 boxes -> F1 .667 .5 .8 .667 .571
    assert cat["max_f1_threshold"] == pytest.approx(0.6)
    assert cat["max_f1"] == pytest.approx(0.8)
    assert cat["precision_at_max_f1"] == pytest.approx(2 / 3)
    assert cat["recall_at_max_f1"] == pytest.approx(1.0)
    assert cat["target_precision_threshold"] == pytest.approx(0.9)
    assert cat["recall_at_target_precision"] == pytest.approx(0.5)
    # dog: 0.8 TP, 0.3 TP, 0.2 FP over 3 boxes -> F1 .5 .8 .667
    assert dog["max_f1_threshold"] == pytest.approx(0.3)
    assert dog["max_f1"] == pytest.approx(0.8)
    assert dog["target_precision_threshold"] == pytest.approx(0.3)
    assert dog["recall_at_target_precision"] == pytest.approx(2 / 3)
    assert thresholds["target_precision"] == 0.9
    assert chosen_thresholds(thresholds) == pytest.approx({"cat": 0.9, "dog": 0.3})
    # No threshold reaches precision 1.01; max-F1 remains the choice.
    strict = score_thresholds(class_points(evaluator, cset), target_precision=1.01)
    assert strict["per_class"]["cat"]["target_precision_threshold"] is None
    assert strict["per_class"]["cat"]["recall_at_target_precision"] is None
    assert chosen_thresholds(strict)["cat"] == pytest.approx(0.6)


def test_thresholds_with_tied_scores_take_the_whole_tie(tmp_path):
    # Two detections at 0.5 (one right, one wrong): the threshold 0.5 keeps both.
    cset = load_coco(write_set(tmp_path, [{"id": 1, "name": "cat"}], [1], [(1, 1, [0, 0, 20, 20])]))
    dets = [det(1, 1, [0, 0, 20, 20], 0.5), det(1, 1, [60, 60, 20, 20], 0.5)]
    _, evaluator = coco_metrics(cset, dets)
    cat = score_thresholds(class_points(evaluator, cset), 0.9)["per_class"]["cat"]
    assert cat["max_f1_threshold"] == pytest.approx(0.5)
    assert cat["precision_at_max_f1"] == pytest.approx(0.5)
    assert cat["target_precision_threshold"] is None


def test_confusion_matrix_known_answers(handmade):
    cset, _ = handmade
    confusion = confusion_matrix(cset, DETECTIONS, {"cat": 0.5, "dog": 0.2})
    assert confusion.labels == ["cat", "dog", "background"]
    # rows: truth cat, dog, background; columns: predicted cat, dog, background
    assert confusion.matrix.tolist() == [[2, 0, 0], [1, 2, 0], [2, 1, 0]]
    fps = sorted(
        (m.class_name, m.score, m.detail) for m in confusion.mistakes if m.kind == "false_positive"
    )
    assert fps == [
        ("cat", 0.5, "background"),
        ("cat", 0.55, "is dog"),
        ("cat", 0.7, "background"),
        ("dog", 0.2, "background"),
    ]
    assert not [m for m in confusion.mistakes if m.kind == "missed"]


def test_confusion_matrix_at_chosen_thresholds_lists_misses(handmade):
    cset, _ = handmade
    confusion = confusion_matrix(cset, DETECTIONS, {"cat": 0.9, "dog": 0.3})
    assert confusion.matrix.tolist() == [[1, 0, 1], [0, 2, 1], [0, 0, 0]]
    misses = sorted(
        (m.image_id, m.class_name, m.score, m.detail)
        for m in confusion.mistakes
        if m.kind == "missed"
    )
    assert misses == [
        (2, "cat", 0.6, "scored below the threshold"),
        (4, "dog", None, "no detection"),
    ]


def test_confusion_matrix_ignores_detections_in_crowd_regions(tmp_path):
    path = write_set(tmp_path, [{"id": 1, "name": "cat"}], [1], [(1, 1, [0, 0, 20, 20])])
    data = json.loads(path.read_text())
    data["annotations"].append(
        {
            "id": 9,
            "image_id": 1,
            "category_id": 1,
            "bbox": [50, 50, 50, 50],
            "area": 2500,
            "iscrowd": 1,
        }
    )
    path.write_text(json.dumps(data))
    cset = load_coco(path)
    dets = [det(1, 1, [0, 0, 20, 20], 0.9), det(1, 1, [60, 60, 20, 20], 0.8)]
    confusion = confusion_matrix(cset, dets, {"cat": 0.5})
    assert confusion.matrix.tolist() == [[1, 0], [0, 0]]


def raccoon_val_set(root: Path, datasets: Path, count: int = 30) -> Path:
    """A COCO file over the first ``count`` images of the shared raccoon-voc export."""
    import onnx_fixtures as fx

    names = sorted(p.stem for p in (datasets / "raccoon-voc" / "images").glob("*.jpg"))[:count]
    images, anns = [], []
    for i, name in enumerate(names, 1):
        frame = fx.raccoon_image(datasets, name)
        images.append(
            {"id": i, "file_name": f"{name}.jpg", "width": frame.shape[1], "height": frame.shape[0]}
        )
        for x1, y1, x2, y2 in fx.raccoon_boxes(datasets, name):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    path = root / "raccoon_val.json"
    categories = [{"id": 1, "name": "raccoon"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


@pytest.mark.slow
def test_onnx_and_checkpoint_agree_within_half_an_ap_point(
    work, checkpoint, shared_datasets, tmp_path, capsys, onnx_one_torch_thread
):
    import onnx_fixtures as fx

    from detector import cli

    onnx_path = fx.exported(work, shared_datasets, "b1")[0]
    sample_val = Path(__file__).resolve().parents[1] / "datasets" / "sample" / "val.json"
    shared_val = raccoon_val_set(tmp_path, shared_datasets)
    for data, images in (
        (shared_val, shared_datasets / "raccoon-voc" / "images"),
        (sample_val, None),
    ):
        scores = {}
        for model in (checkpoint, onnx_path):
            out = tmp_path / f"{data.stem}-{model.suffix[1:]}"
            argv = ["evaluate", str(model), "--data", str(data), "--out", str(out), "--no-progress"]
            argv += ["--images", str(images)] if images else []
            argv += ["--providers", "cpu"] if model.suffix == ".onnx" else ["--batch-size", "1"]
            assert cli.main(argv) == 0
            scores[model.suffix] = json.loads((out / "metrics.json").read_text())["overall"]
            assert (out / "report.html").is_file() and (out / "thresholds.json").is_file()
        printed = capsys.readouterr().out
        assert "in-graph threshold (0.05, set at export)" in printed
        assert abs(scores[".pt"]["AP"] - scores[".onnx"]["AP"]) <= 0.005
        assert abs(scores[".pt"]["AP50"] - scores[".onnx"]["AP50"]) <= 0.005
    assert scores[".onnx"]["AP50"] > 0.01  # the model finds raccoons: the agreement is not 0 = 0


def test_evaluate_onnx_needs_a_set(tmp_path, capsys):
    from detector import cli

    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    with pytest.raises(SystemExit, match="needs --data"):
        cli.main(["evaluate", str(model)])


def test_false_positive_near_a_box_is_called_box_off(tmp_path):
    cset = load_coco(write_set(tmp_path, [{"id": 1, "name": "cat"}], [1], [(1, 1, [0, 0, 20, 20])]))
    confusion = confusion_matrix(cset, [det(1, 1, [5, 5, 20, 20], 0.9)], {"cat": 0.5})
    assert confusion.matrix.tolist() == [[0, 1], [1, 0]]  # the cat missed, a box on background
    (fp,) = [m for m in confusion.mistakes if m.kind == "false_positive"]
    assert fp.detail == "box off (IoU 0.39)"  # 15 * 15 / (400 + 400 - 225)
