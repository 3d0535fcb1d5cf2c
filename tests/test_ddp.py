"""Multi-process training as a user launches it: torchrun, 2 CPU processes, gloo backend."""

import json
import os
import shutil
import subprocess

import pytest
import yaml
from coco_fixtures import tiny_config, write_coco128_subset

from detector.model import load_checkpoint
from detector.train import read_metrics_csv


@pytest.mark.parametrize("cache", [False, True], ids=["images", "cached-features"])
def test_torchrun_two_cpu_processes_train_and_write_one_run(shared_datasets, tmp_path, cache):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    train_json = write_coco128_subset(shared_datasets, tmp_path / "data", count=4, keep_negatives=1,
                                      name="train.json")
    ids = [i["id"] for i in json.loads(train_json.read_text())["images"]][:2]
    val_json = write_coco128_subset(shared_datasets, tmp_path / "data", image_ids=ids, name="val.json")
    values = tiny_config(train_json, val_json, tmp_path / "runs",
                         train={"epochs": 2, "cache_features": cache, "device": "cpu"}).to_dict()
    values["train"]["name"] = None
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "detector", "train", str(config),
         "--no-progress"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs").iterdir()]
    assert [p.name for p in runs] == ["tiny"], runs  # one run folder, written by rank 0 only
    run = runs[0]
    last = load_checkpoint(run / "last.pt")
    assert last["state"]["epoch"] == 2
    # 5 images, batch 2 -> 3 batches per epoch, sharded 2 + 2 (padded): 2 steps per epoch.
    assert last["state"]["step"] == 4
    assert (run / "best.pt").is_file() and (run / "pr_curve.png").is_file()
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["loss"]) > 0 and "mAP" in r for r in rows)
    assert proc.stdout.count("mAP@[.5:.95]") >= 1
    assert "distributed: 2 processes (gloo)" in proc.stderr
