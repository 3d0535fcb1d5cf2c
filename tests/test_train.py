"""Real training runs on tiny real sets (coco128 images, official COCO JSON), CPU."""

import logging

import pytest
import torch
import yaml
from coco_fixtures import stop_at_call, tiny_config, write_coco128_subset

from detector import cli
from detector import train as train_mod
from detector.model import build_model, load_checkpoint
from detector.run_folder import TrainingError, read_metrics_csv
from detector.train import seed_everything, train


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # a failed start (here: weights) leaves no run folder, so the next run is not tiny-4
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny", "tiny-2"]
    # best.pt cannot resume: the error names the file that can
    assert cli.main(["train", str(config), "--resume", str(run / "best.pt")]) == 2
    err = capsys.readouterr().err
    assert "no optimizer state" in err and str(run / "last.pt") in err and str(run) in err
    # `--resume KEY=VALUE`: an override for the newest run (tiny-2, complete: nothing to train)
    assert cli.main(["train", str(config), "--resume", "train.max_hours=2", "--no-progress"]) == 0
    assert "completed after 1 epochs" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "runs/tiny-2/config.yaml").read_text())["train"][
        "max_hours"
    ] == pytest.approx(2.0)
    assert cli.main(["train", str(config), "--resume", "train.lr=0.5", "--no-progress"]) == 2
    assert "train.lr=0.5 (the run has 0.01)" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------------------------
# pure functions with overnight consequences


def _train_cfg(**train):
    from detector.config import config_from_dict

    return config_from_dict({"train": train})


def test_make_lr_lambda_warms_up_then_follows_cosine_or_steps():
    cosine = train_mod.make_lr_lambda(
        _train_cfg(warmup_iters=10, warmup_factor=0.1, scheduler="cosine"), 10, 110
    )
    assert cosine(0) == pytest.approx(0.1)
    assert cosine(5) == pytest.approx(0.55)  # linear from warmup_factor to 1
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5)  # half-way through the cosine
    assert cosine(110) == pytest.approx(0.0) and cosine(500) == pytest.approx(0.0)
    step = train_mod.make_lr_lambda(
        _train_cfg(warmup_iters=0, scheduler="step", milestones=[2, 3], gamma=0.1), 10, 40
    )
    assert [step(s) for s in (0, 19)] == [1.0, 1.0]
    assert step(20) == pytest.approx(0.1) and step(39) == pytest.approx(0.01)
    # a warmup longer than the run ends before the last step: the run reaches the full lr
    short = train_mod.make_lr_lambda(_train_cfg(warmup_iters=100, warmup_factor=0.001), 5, 5)
    assert short(4) == pytest.approx(1.0)


def test_compute_deadline_takes_the_earliest_and_rolls_until_over_midnight():
    import datetime as dt

    start = dt.datetime(2026, 1, 14, 22, 0).timestamp()  # 22:00 local time, far from DST
    hours = 3600.0
    assert train_mod.compute_deadline(_train_cfg(), start) is None
    assert train_mod.compute_deadline(_train_cfg(max_hours=2), start) == start + 2 * hours
    assert train_mod.compute_deadline(_train_cfg(until="23:30"), start) == start + 1.5 * hours
    assert train_mod.compute_deadline(_train_cfg(until="06:00"), start) == start + 8 * hours
    assert train_mod.compute_deadline(_train_cfg(until="22:00"), start) == start + 24 * hours
    both = _train_cfg(max_hours=10, until="06:00")
    assert train_mod.compute_deadline(both, start) == start + 8 * hours


def test_resume_never_takes_an_override_as_its_run():
    parser = cli.build_parser()

    def parse(*words):
        args, extra = parser.parse_known_args(cli.resume_takes_no_override(["train", *words]))
        return args.resume, [*args.overrides, *extra]

    assert parse("c.yaml", "--resume", "train.max_hours=2") == ("auto", ["train.max_hours=2"])
    assert parse("c.yaml", "--resume", "eval.every=2", "train.until=06:00") == (
        "auto",
        ["eval.every=2", "train.until=06:00"],
    )
    assert parse("c.yaml", "--resume") == ("auto", [])
    for run in ("runs/x", "runs/x/last.pt", "runs/a=b", "night"):
        assert parse("c.yaml", "--resume", run, "train.patience=3") == (run, ["train.patience=3"])
    assert parse("c.yaml") == (None, [])


def _write_config(path, cfg, name=None):
    values = cfg.to_dict()
    values["train"]["name"] = name
    path.write_text(yaml.safe_dump(values))
    return path


def test_run_names_outside_out_dir_and_zero_epochs_are_refused_leaving_nothing(
    tiny, tmp_path, capsys
):
    train_json, _ = tiny
    config = _write_config(tmp_path / "c.yaml", tiny_config(train_json, None, tmp_path / "runs"))
    for name in ("../escape", str(tmp_path / "abs"), "a/../../escape"):
        assert cli.main(["train", str(config), f"train.name={name}", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "train.name=" in err and "inside train.out_dir" in err, err
        with pytest.raises(TrainingError, match="inside train.out_dir"):
            train(tiny_config(train_json, None, tmp_path / "runs", train={"name": name}))
    assert cli.main(["train", str(config), "train.epochs=0", "--no-progress"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no run folder anywhere


def test_a_crash_in_evaluation_keeps_the_epoch_and_resume_evaluates_it_first(
    tiny, tmp_path, monkeypatch
):
    """last.pt is written before the epoch's evaluation: a val set that crashes COCOeval (a
    missing 'area', say) leaves the epoch's checkpoint, and the resumed run, evaluating that
    epoch first, ends exactly where an uninterrupted run does."""
    train_json, val_json = tiny
    sections = {"train": {"epochs": 2}}
    full = train(tiny_config(train_json, val_json, tmp_path / "full", **sections), progress=False)
    expected = load_checkpoint(full.run_dir / "last.pt")

    real_evaluate = train_mod.evaluate

    def crashing_evaluate(*args, **kwargs):
        raise KeyError("area")

    monkeypatch.setattr(train_mod, "evaluate", crashing_evaluate)
    cfg = tiny_config(train_json, val_json, tmp_path / "parts", **sections)
    with pytest.raises(TrainingError, match=r"evaluation after epoch 1 failed \(KeyError") as err:
        train(cfg, progress=False)
    run = tmp_path / "parts/t"
    assert f"{run / 'last.pt'} holds that epoch" in str(err.value) and "--resume" in str(err.value)
    kept = load_checkpoint(run / "last.pt")
    assert kept["state"]["epoch"] == 1 and kept["state"]["pending_eval"]

    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    resumed = train(cfg, resume=run, progress=False)
    assert resumed.stop_reason == "completed"
    got = load_checkpoint(run / "last.pt")
    assert got["state"] == expected["state"]
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["mAP"] for r in rows)
    expected_rows = read_metrics_csv(full.run_dir / "metrics.csv")
    assert [r["mAP"] for r in rows] == [r["mAP"] for r in expected_rows]


def _fake_evaluate(maps):
    """evaluate() giving these val mAPs in turn; the final evaluation (out_dir) repeats the last."""
    from detector.evaluate import Metrics

    given = []

    def fake(model, cset, device, out_dir=None, **kwargs):
        if out_dir is None:
            given.append(maps[len(given)])
        return Metrics(map=given[-1], num_images=len(cset.image_ids))

    return fake


def test_early_stopping_after_patience_evaluations_without_gain(tiny, tmp_path, monkeypatch):
    train_json, val_json = tiny
    monkeypatch.setattr(train_mod, "evaluate", _fake_evaluate([0.5, 0.4, 0.5, 0.6, 0.7]))
    cfg = tiny_config(train_json, val_json, tmp_path, train={"epochs": 10, "patience": 2})
    result = train(cfg, progress=False)
    assert result.stop_reason == "early stop: no val mAP gain in 2 evaluations"
    assert (result.epochs_done, result.best_epoch, result.best_map) == (3, 1, 0.5)
    assert load_checkpoint(result.run_dir / "best.pt")["state"]["best_epoch"] == 1
    assert [r["epoch"] for r in read_metrics_csv(result.run_dir / "metrics.csv")] == ["1", "2", "3"]
    assert "early stop" in (result.run_dir / "summary.txt").read_text()


def test_undefined_val_map_keeps_the_latest_model_as_best_and_says_so(
    tiny, tmp_path, monkeypatch, caplog
):
    """COCOeval's mAP -1 (a val set of only iscrowd boxes): no mAP beats -1, so best.pt was
    never written while the summary said completed."""
    train_json, val_json = tiny
    monkeypatch.setattr(train_mod, "evaluate", _fake_evaluate([-1.0, -1.0]))
    cfg = tiny_config(train_json, val_json, tmp_path, train={"epochs": 2})
    with caplog.at_level(logging.WARNING, logger="detector"):
        result = train(cfg, progress=False)
    assert result.stop_reason == "completed" and result.best_epoch == 2
    assert load_checkpoint(result.run_dir / "best.pt")["state"]["epoch"] == 2
    assert any("val mAP is undefined" in r.getMessage() for r in caplog.records)
    assert "mAP undefined" in train_mod.summary(result)


def test_log_every_prints_lines_and_tensorboard_gets_each_loss_every_epoch(
    tiny, tmp_path, caplog, capsys
):
    """5 images, batch 2: 3 steps per epoch. log_every=2 logs steps 2, 4, 6 and each epoch's
    last step (3); every loss component goes to TensorBoard; no progress bar is drawn."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_json, val_json = tiny
    cfg = tiny_config(train_json, val_json, tmp_path, train={"epochs": 2, "log_every": 2})
    with caplog.at_level(logging.INFO, logger="detector"):
        result = train(cfg, progress=False)
    lines = [r.getMessage() for r in caplog.records if "img/s" in r.getMessage()]
    assert [int(re.search(r" step (\d+):", line).group(1)) for line in lines] == [2, 3, 4, 6]
    assert all("loss_classifier" in line and "lr " in line for line in lines), lines
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    components = {f"train/{k}" for k in train_mod.LOSS_KEYS}
    assert components | {"train/loss", "train/lr", "epoch/loss", "val/mAP"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3, 4, 6]
    assert [e.step for e in events.Scalars("epoch/loss")] == [1, 2]
    assert "evaluate:" not in capsys.readouterr().err  # progress=False reaches evaluation


def test_resume_takes_safe_overrides_and_refuses_the_others_by_name(tiny, tmp_path, caplog):
    train_json, _ = tiny
    cfg = tiny_config(train_json, None, tmp_path, train={"epochs": 1})
    done = train(cfg, progress=False)
    changed = tiny_config(train_json, None, tmp_path, train={"epochs": 3, "lr": 0.5})
    with pytest.raises(TrainingError) as err:
        train(changed, resume=done.run_dir, progress=False)
    message = str(err.value)
    assert (
        "train.epochs=3 (the run has 1)" in message and "train.lr=0.5 (the run has 0.01)" in message
    )
    assert str(done.run_dir / "config.yaml") in message
    with pytest.raises(TrainingError, match="holds the model only, no optimizer state"):
        train(cfg, resume=done.run_dir / "best.pt", progress=False)
    safe = tiny_config(
        train_json,
        None,
        tmp_path,
        train={"epochs": 1, "max_hours": 2.0, "patience": 4, "name": "other"},
        eval={"every": 3},
    )
    with caplog.at_level(logging.INFO, logger="detector"):
        again = train(safe, resume=done.run_dir, progress=False)
    assert again.run_dir == done.run_dir and again.stop_reason == "completed"
    saved = yaml.safe_load((done.run_dir / "config.yaml").read_text())
    assert (saved["train"]["max_hours"], saved["train"]["patience"], saved["eval"]["every"]) == (
        2.0,
        4,
        3,
    )
    assert saved["train"]["name"] == "t"  # the run folder decides where the run lives
    assert any("resume: train.max_hours None -> 2.0" in r.getMessage() for r in caplog.records)
