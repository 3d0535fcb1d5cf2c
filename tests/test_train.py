"""Real training runs on tiny real sets (coco128 images, official COCO JSON), CPU."""

import logging

import pytest
import torch
import yaml
from coco_fixtures import stop_at_call, tiny_config, write_coco128_subset

from detector import cli
from detector import train as train_mod
from detector.model import build_model, load_checkpoint
from detector.train import TrainingError, read_metrics_csv, seed_everything, train


@pytest.fixture(scope="module")
def tiny(shared_datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco128_tiny")
    train_json = write_coco128_subset(
        shared_datasets, root, count=4, keep_negatives=1, name="train.json"
    )
    val_json = write_coco128_subset(
        shared_datasets, root, image_ids=_val_ids(train_json), name="val.json"
    )
    return train_json, val_json


def _val_ids(train_json):
    import json

    data = json.loads(train_json.read_text())
    return [i["id"] for i in data["images"]][:2]


def test_overfit_four_images_and_frozen_parts_stay_bit_identical(tiny, tmp_path, shared_weights):
    """The product's case: a frozen pretrained backbone (ImageNet MobileNetV2), heads learn."""
    train_json, _ = tiny
    backbone = str(shared_weights / "mobilenet_v2-b0353104.pth")
    cfg = tiny_config(
        train_json,
        None,
        tmp_path,
        model={"arch": "fasterrcnn_mobilenet_v2_fpn", "weights_backbone": backbone},
        train={"epochs": 12, "batch_size": 5, "lr": 0.02, "scheduler": "step"},
        augment={"hflip": 0.0, "brightness_contrast": 0.0},
    )
    seed_everything(cfg.train.seed)
    initial, _ = build_model(cfg.model, _class_names(train_json))
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}
    result = train(cfg, progress=False)
    rows = read_metrics_csv(result.run_dir / "metrics.csv")
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 12
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3]), losses
    final = load_checkpoint(result.run_dir / "last.pt")["model"]
    backbone_keys = [k for k in final if k.startswith("backbone.")]
    assert len(backbone_keys) > 100
    for key in backbone_keys:
        assert torch.equal(final[key], initial_state[key]), f"frozen tensor {key} changed"
    assert not torch.equal(
        final["roi_heads.box_predictor.cls_score.weight"],
        initial_state["roi_heads.box_predictor.cls_score.weight"],
    )
    rpn_conv = next(k for k in final if k.startswith("rpn.head.conv") and k.endswith("weight"))
    assert not torch.equal(final[rpn_conv], initial_state[rpn_conv])


def _class_names(train_json):
    import json

    return [c["name"] for c in json.loads(train_json.read_text())["categories"]]


def test_frozen_rpn_stays_bit_identical(tiny, tmp_path):
    train_json, _ = tiny
    cfg = tiny_config(train_json, None, tmp_path, model={"freeze_rpn": True}, train={"epochs": 1})
    seed_everything(cfg.train.seed)
    initial, _ = build_model(cfg.model, _class_names(train_json))
    result = train(cfg, progress=False)
    final = load_checkpoint(result.run_dir / "last.pt")["model"]
    for key, value in initial.state_dict().items():
        if key.startswith(("backbone.", "rpn.")):
            assert torch.equal(final[key], value), key
    assert not torch.equal(
        final["roi_heads.box_head.fc6.weight"],
        initial.state_dict()["roi_heads.box_head.fc6.weight"],
    )


def test_resume_after_a_stop_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    train_json, _ = tiny
    sections = {"train": {"epochs": 2, "batch_size": 2, "accumulate": 1}, "augment": {"scale": 0.5}}
    full = train(tiny_config(train_json, None, tmp_path / "full", **sections), progress=False)
    expected = load_checkpoint(full.run_dir / "last.pt")

    real_should_stop = stop_at_call(monkeypatch, train_mod, 5)  # the 5th batch: mid epoch 2
    cfg = tiny_config(train_json, None, tmp_path / "parts", **sections)
    stopped = train(cfg, progress=False)
    assert stopped.stop_reason == "stopped by test"
    partial = load_checkpoint(stopped.run_dir / "last.pt")
    assert (partial["state"]["epoch"], partial["state"]["iteration"]) == (1, 1)  # mid epoch 2
    monkeypatch.setattr(train_mod, "_should_stop", real_should_stop)
    resumed = train(cfg, resume=stopped.run_dir, progress=False)
    assert resumed.stop_reason == "completed" and resumed.run_dir == stopped.run_dir
    got = load_checkpoint(stopped.run_dir / "last.pt")
    assert got["state"]["step"] == expected["state"]["step"]
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"
    rows = read_metrics_csv(stopped.run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_time_budget_stops_in_time_and_keeps_the_best_model(tiny, tmp_path):
    train_json, val_json = tiny
    # Calibrate on this machine (CI cores are shared): one epoch with its evaluation.
    one_epoch = train(
        tiny_config(train_json, val_json, tmp_path / "calibrate", train={"epochs": 1}),
        progress=False,
    ).seconds
    budget_s = 5 * one_epoch
    cfg = tiny_config(
        train_json, val_json, tmp_path, train={"epochs": 500, "max_hours": budget_s / 3600}
    )
    result = train(cfg, progress=False)
    assert result.stop_reason == "time budget reached"
    assert result.seconds < budget_s + one_epoch
    best = load_checkpoint(result.run_dir / "best.pt")
    last = load_checkpoint(result.run_dir / "last.pt")
    assert last["state"]["epoch"] >= 1, "a budget of 5 epochs' time should complete one"
    assert best["state"]["best_epoch"] >= 1 and "metrics" in best
    assert last["state"]["epoch"] >= best["state"]["best_epoch"]
    assert (result.run_dir / "pr_curve.png").is_file() and (
        result.run_dir / "predictions_grid.png"
    ).is_file()


def _nan_after(model_forward, bad_calls):
    calls = {"n": 0}

    def forward(self, images, targets=None):
        out = model_forward(self, images, targets)
        calls["n"] += 1
        if self.training and calls["n"] in bad_calls:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    return forward


def test_nonfinite_loss_skips_the_batch_then_stops_with_image_ids(
    tiny, tmp_path, monkeypatch, caplog
):
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    train_json, _ = tiny
    real = GeneralizedRCNN.forward
    monkeypatch.setattr(GeneralizedRCNN, "forward", _nan_after(real, {1}))
    with caplog.at_level(logging.WARNING, logger="detector"):
        result = train(
            tiny_config(train_json, None, tmp_path / "once", train={"epochs": 1}), progress=False
        )
    assert result.stop_reason == "completed"
    assert any("non-finite loss" in r.message and "image ids" in r.message for r in caplog.records)
    final = load_checkpoint(result.run_dir / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())

    monkeypatch.setattr(GeneralizedRCNN, "forward", _nan_after(real, set(range(4, 100))))
    cfg = tiny_config(
        train_json, None, tmp_path / "always", train={"epochs": 3, "max_nonfinite_batches": 2}
    )
    with pytest.raises(TrainingError, match=r"image ids \[\d+"):
        train(cfg, progress=False)
    kept = load_checkpoint(tmp_path / "always/t/last.pt")
    assert kept["state"]["epoch"] == 1  # the last good checkpoint survives


def test_cli_train_evaluate_and_errors(tiny, tmp_path, capsys):
    train_json, val_json = tiny
    config = tmp_path / "tiny.yaml"
    cfg = tiny_config(train_json, val_json, tmp_path / "runs", train={"epochs": 1})
    values = cfg.to_dict()
    values["train"]["name"] = None
    config.write_text(yaml.safe_dump(values))
    assert cli.main(["train", str(config), "train.epochs=2", "--no-progress"]) == 0
    run = tmp_path / "runs/tiny"
    for name in (
        "best.pt",
        "last.pt",
        "metrics.csv",
        "config.yaml",
        "pr_curve.png",
        "predictions_grid.png",
        "train.log",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    assert len(read_metrics_csv(run / "metrics.csv")) == 2
    out = capsys.readouterr().out
    assert "mAP@[.5:.95]" in out
    assert (
        cli.main(
            [
                "evaluate",
                str(run / "best.pt"),
                "--data",
                str(val_json),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "AP50" in out and (tmp_path / "ev/predictions.json").is_file()
    assert (tmp_path / "ev/pr_curve.png").stat().st_size > 1000
    # a second run of the same config never overwrites the first
    assert (
        cli.main(["train", str(config), "train.epochs=1", "--no-progress", "data.preflight=false"])
        == 0
    )
    assert (tmp_path / "runs/tiny-2/last.pt").is_file()
    assert cli.main(["train", str(config), "train.epohcs=3"]) == 2
    assert "train.epohcs" in capsys.readouterr().err
    assert (
        cli.main(["train", str(config), "model.weights=coco", "model.arch=fasterrcnn_resnet50_fpn"])
        == 2
    )
    assert "hub" in capsys.readouterr().err


def test_preflight_lists_every_broken_image_before_training(tiny, tmp_path):
    import json
    import shutil

    from detector.data import DatasetError

    train_json, _ = tiny
    root = tmp_path / "broken"
    shutil.copytree(train_json.parent / "images", root / "images")
    data = json.loads(train_json.read_text())
    names = [i["file_name"] for i in data["images"]]
    (root / "images" / names[0]).write_bytes(
        (root / "images" / names[0]).read_bytes()[:300]
    )  # truncated
    (root / "images" / names[1]).unlink()  # listed but missing
    (root / "train.json").write_text(json.dumps(data))
    cfg = tiny_config(root / "train.json", None, tmp_path / "runs")
    with pytest.raises(DatasetError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    assert names[0] in message and names[1] in message and "2 of 5 images" in message
