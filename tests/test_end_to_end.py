"""The user's path on real exports: convert -> split -> train -> evaluate, and the README job."""

import subprocess
import sys
from pathlib import Path

import pytest
from coco_fixtures import tiny_config

from detector import cli
from detector.model import load_model
from detector.run_folder import read_metrics_csv
from detector.train import train

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_deer_automl_export_converts_splits_and_trains(shared_datasets, tmp_path):
    out = tmp_path / "deer"
    report = run_tool("tools/convert.py", str(shared_datasets / "deer-automl"), "--out", str(out))
    assert "700 images, 946 boxes, 1 categories" in report
    run_tool("tools/split.py", str(out / "annotations.json"), "--val", "0.2", "--seed", "0")
    cfg = tiny_config(
        out / "train.json",
        out / "val.json",
        tmp_path / "runs",
        train={"epochs": 1, "max_hours": 20 / 3600},
        data={"preflight": False},
    )
    result = train(cfg, progress=False)
    assert result.stop_reason == "time budget reached" and result.images_seen > 0
    model, checkpoint = load_model(result.run_dir / "last.pt")
    assert checkpoint["class_names"] == ["Deer"]
    assert checkpoint["state"]["iteration"] > 0  # stopped mid-epoch, resumable


@pytest.mark.slow  # one epoch of the real sample transfer run (MobileNetV2-FPN, 75 images)
def test_readme_sample_job_runs(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            str(REPO / "configs/sample.yaml"),
            "train.unfreeze.epochs=1",  # the sample trains in its unfreeze phase (FPN + heads)
            f"train.out_dir={tmp_path}",
            "--no-progress",
        ]
    )
    assert code == 0
    run = tmp_path / "sample"
    rows = read_metrics_csv(run / "metrics.csv")
    assert len(rows) == 1 and float(rows[0]["loss"]) > 0 and "mAP" in rows[0]
    assert (run / "best.pt").is_file() and (run / "predictions_grid.png").is_file()
    assert "best.pt (epoch 1)" in capsys.readouterr().out
