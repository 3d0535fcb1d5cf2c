"""Issue 7, the offline transfer story on CPU in small: an ImageNet MobileNetV2-FPN detector is
trained, its checkpoint seeds a frozen retrain for another class set, evaluates, exports to ONNX
and runs in the deploy runtime; the configs and the data preparation of benchmarks/transfer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from coco_fixtures import tiny_config, write_coco128_subset

from detector.config import load_config
from detector.model import load_checkpoint, load_model
from detector.train import train

REPO = Path(__file__).resolve().parents[1]
MBV2 = "mobilenet_v2-b0353104.pth"


def _tiny_sets(shared_datasets: Path, root: Path) -> tuple[Path, Path, Path]:
    """coco128 images at 192 px: a base train set, its val set, and a one-class 'new class' set."""
    base = write_coco128_subset(shared_datasets, root, count=8, name="train.json")
    ids = [i["id"] for i in json.loads(base.read_text())["images"]]
    val = write_coco128_subset(shared_datasets, root, image_ids=ids[:3], name="val.json")
    data = json.loads(base.read_text())
    person = next(c for c in data["categories"] if c["name"] == "person")
    keep = [a for a in data["annotations"] if a["category_id"] == person["id"]]
    with_person = {a["image_id"] for a in keep}
    new = root / "person.json"
    new.write_text(
        json.dumps(
            {
                "images": [i for i in data["images"] if i["id"] in with_person],
                "annotations": keep,
                "categories": [person],
            }
        )
    )
    return base, val, new


@pytest.mark.slow
def test_mobilenet_v2_checkpoint_seeds_a_frozen_retrain_that_exports_and_runs(
    shared_datasets, shared_weights, tmp_path
):
    base_json, val_json, new_json = _tiny_sets(shared_datasets, tmp_path / "data")
    v2 = {"arch": "fasterrcnn_mobilenet_v2_fpn", "weights_backbone": str(shared_weights / MBV2)}
    # 1. the base detector: ImageNet body, later blocks + FPN trainable (as configs/base-offline.yaml)
    base_cfg = tiny_config(
        base_json,
        val_json,
        tmp_path / "runs",
        model={**v2, "freeze_backbone": True},
        eval={"grid_images": 0},
        train={
            "epochs": 0,
            "name": "base",
            "batch_size": 4,
            "unfreeze": {"epochs": 1, "backbone_blocks": 3, "lr_scale": 1.0},
        },
    )
    base = train(base_cfg, progress=False)
    assert base.final_metrics is not None and base.best_epoch == 1
    base_ckpt = load_checkpoint(base.run_dir / "best.pt")
    assert len(base_ckpt["class_names"]) > 1

    # 2. the overnight retrain: start from that checkpoint, backbone + FPN frozen, new predictor
    retrain_cfg = tiny_config(
        new_json,
        new_json,
        tmp_path / "runs",
        model={
            "arch": v2["arch"],
            "weights": str(base.run_dir / "best.pt"),
            "freeze_backbone": True,
        },
        train={"epochs": 1, "name": "retrain", "batch_size": 3},
        eval={"grid_images": 0},
    )
    retrain = train(retrain_cfg, progress=False)
    metrics = retrain.final_metrics
    assert metrics is not None and metrics.num_images == 3 and 0.0 <= metrics.ap50 <= 1.0
    final = load_checkpoint(retrain.run_dir / "best.pt")
    assert final["class_names"] == ["person"]
    assert final["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 2
    assert final["weights_source"].startswith("file:")
    frozen = [k for k in base_ckpt["model"] if k.startswith("backbone.")]
    assert len(frozen) > 100
    for key in frozen:  # body and FPN of the base detector, bit-identical
        assert torch.equal(final["model"][key], base_ckpt["model"][key]), key
    for key in ("rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight"):
        assert not torch.equal(final["model"][key], base_ckpt["model"][key]), key

    # 3. ONNX export (parity-checked against PyTorch on real images) and ONNX Runtime
    from detector.export import export_onnx

    onnx_path = tmp_path / "person.onnx"
    report = export_onnx(
        retrain.run_dir / "best.pt",
        onnx_path,
        batch=1,
        parity_images=tmp_path / "data" / "images",
        parity_limit=3,
    )
    assert onnx_path.is_file() and report.parity is not None and report.parity.passed, (
        report.format()
    )
    assert report.parity.images >= 3

    from detector.runtime import Detector

    model, _ = load_model(retrain.run_dir / "best.pt")
    detector = Detector(onnx_path, providers=["cpu"])
    assert detector.class_names == ["person"] and detector.batch_size == 1
    for image_path in sorted((tmp_path / "data" / "images").iterdir())[:2]:
        frame = cv2.imread(str(image_path))
        found = detector.predict(frame)
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
        with torch.inference_mode():
            expected = model([torch.from_numpy(np.ascontiguousarray(rgb)).float() / 255.0])[0]
        keep = expected["scores"] >= detector.score_threshold
        assert len(found) == int(keep.sum()) and found.image_size == frame.shape[:2]
        want_scores, want_boxes = expected["scores"][keep].numpy(), expected["boxes"][keep].numpy()
        np.testing.assert_allclose(found.scores, want_scores, atol=1e-3)
        for box, score in zip(found.boxes, found.scores, strict=True):  # ties may swap order
            same_score = np.abs(want_scores - score) <= 1e-3
            assert np.abs(want_boxes[same_score] - box).max(axis=1).min() <= 0.5, (box, score)
        assert set(found.names) <= {"person"}


def test_offline_configs_load_and_point_at_what_prepare_sh_writes():
    deer = load_config(REPO / "configs/deer-offline.yaml")
    assert deer.data.train_annotations == "datasets/deer/train.json"
    assert deer.data.val_annotations == "datasets/deer/val.json"
    assert deer.model.arch == "fasterrcnn_mobilenet_v2_fpn"
    assert deer.train.max_hours is not None and deer.train.out_dir.startswith("runs")
    base = load_config(REPO / "configs/base-offline.yaml")
    assert base.model.arch == deer.model.arch and base.model.min_size == deer.model.min_size
    prepare = (REPO / "benchmarks/transfer/prepare.sh").read_text()
    assert "OUT_DEER:-datasets/deer}" in prepare
    assert f"OUT_BASE:-{Path(base.data.train_annotations).parent.as_posix()}}}" in prepare
    for cfg in (deer, base):  # the ImageNet file, by path relative to the repository root
        weights = cfg.model.weights_backbone
        assert weights.endswith(MBV2) and (REPO / weights).resolve().name == MBV2


def test_deer_offline_config_stops_on_its_time_budget_with_its_best_model(
    shared_datasets, shared_weights, tmp_path
):
    """configs/deer-offline.yaml on 4 small images with a 30 s budget, and epochs enough that
    the budget, not the epoch count, ends the run whatever the machine's speed."""
    assert load_config(REPO / "configs/deer-offline.yaml").train.unfreeze.epochs == 12
    train_json = write_coco128_subset(
        shared_datasets, tmp_path / "data", count=4, name="train.json"
    )
    budget_s = 30.0
    cfg = load_config(
        REPO / "configs/deer-offline.yaml",
        [
            f"data.train_annotations={train_json}",
            f"data.val_annotations={train_json}",
            "data.num_workers=0",
            f"model.weights_backbone={shared_weights / MBV2}",
            "model.min_size=160",
            "model.max_size=192",
            f"train.max_hours={budget_s / 3600!r}",
            f"train.out_dir={tmp_path / 'runs'}",
            "eval.grid_images=0",
            "train.unfreeze.epochs=1000",
        ],
    )
    result = train(cfg, progress=False)
    assert result.stop_reason == "time budget reached"
    assert 1 <= result.epochs_done < 1000 and (result.run_dir / "best.pt").is_file()
    assert result.final_metrics is not None
    assert load_checkpoint(result.run_dir / "best.pt")["state"]["best_epoch"] == result.best_epoch
    # stops before the budget plus the evaluation of best.pt that follows it (slack: shared CPUs)
    assert result.seconds < budget_s + 30


def test_prepare_sh_writes_disjoint_train_and_val(shared_datasets, tmp_path):
    env = {
        **os.environ,
        "SHARED": str(shared_datasets.parent),
        "PYTHON": sys.executable,
        "OUT_DEER": str(tmp_path / "deer"),
        "OUT_BASE": str(tmp_path / "base"),
    }
    done = subprocess.run(
        ["bash", "benchmarks/transfer/prepare.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for folder, images, boxes in ((tmp_path / "deer", 700, 946), (tmp_path / "base", 525, 813)):
        train_set = json.loads((folder / "train.json").read_text())
        val_set = json.loads((folder / "val.json").read_text())
        names = [{i["file_name"] for i in s["images"]} for s in (train_set, val_set)]
        ids = [{i["id"] for i in s["images"]} for s in (train_set, val_set)]
        assert not names[0] & names[1] and not ids[0] & ids[1], folder
        assert len(names[0]) + len(names[1]) == images
        assert len(train_set["annotations"]) + len(val_set["annotations"]) == boxes
        assert 0.15 < len(names[1]) / images < 0.25
        for s in (train_set, val_set):  # every image the JSON names is there
            assert all(
                (folder / "images" / n).is_file() for n in (i["file_name"] for i in s["images"])
            )
    base_names = [
        c["name"] for c in json.loads((tmp_path / "base/train.json").read_text())["categories"]
    ]
    assert {"person", "car", "raccoon", "rabbit"} <= set(base_names) and "Deer" not in base_names
