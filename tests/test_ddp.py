"""Multi-process training as a user launches it: torchrun, 2 CPU processes, gloo backend."""

import json
import os
import re
import shutil
import signal
import subprocess
import threading

import pytest
import yaml
from coco_fixtures import tiny_config, write_coco128_subset

from detector.model import load_checkpoint
from detector.run_folder import read_metrics_csv


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["images", "cached-features"])
def test_torchrun_two_cpu_processes_train_and_write_one_run(shared_datasets, tmp_path, cache):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    train_json = write_coco128_subset(
        shared_datasets, tmp_path / "data", count=4, keep_negatives=1, name="train.json"
    )
    ids = [i["id"] for i in json.loads(train_json.read_text())["images"]][:2]
    val_json = write_coco128_subset(
        shared_datasets, tmp_path / "data", image_ids=ids, name="val.json"
    )
    values = tiny_config(
        train_json,
        val_json,
        tmp_path / "runs",
        train={"epochs": 2, "cache_features": cache, "device": "cpu"},
    ).to_dict()
    values["train"]["name"] = None
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "detector",
            "train",
            str(config),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
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


def _torchrun_driver(driver, args, cwd, stop_at: int | None = None, timeout: float = 240):
    """torchrun (2 CPU processes) on the fault-injection driver of test_faults; with ``stop_at``,
    SIGTERM to torchrun alone once a rank reports that forward pass (as a scheduler stops a job).
    Both ranks write to one pipe, so a marker can share its line with the other rank's."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FAULT_FORWARD_SLEEP": "0.3",
    }
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc_per_node=2", str(driver), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            passes = [int(n) for n in re.findall(r"@@ FORWARD (\d+)", line)]
            if stop_at and not sent and any(n >= stop_at for n in passes):
                proc.send_signal(signal.SIGTERM)
                sent = True
        proc.wait(timeout=60)
    finally:
        timer.cancel()
    output = "".join(lines)
    assert stop_at is None or sent, output[-3000:]
    return proc.returncode, output


@pytest.mark.slow
def test_torchrun_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(
    shared_datasets, tmp_path
):
    """Each rank draws its own random numbers (RPN/RoI sampling on its own images), so a resume
    must give every rank back its own stream, not rank 0's."""
    from test_faults import DRIVER, assert_same_training

    driver = tmp_path / "fault_driver.py"
    driver.write_text(DRIVER)
    train_json = write_coco128_subset(
        shared_datasets, tmp_path / "data", count=8, name="train.json"
    )
    values = tiny_config(
        train_json,
        None,
        tmp_path / "runs",
        train={"epochs": 2, "batch_size": 1, "accumulate": 2, "warmup_iters": 2, "device": "cpu"},
    ).to_dict()
    values["train"]["name"] = "night"
    config = tmp_path / "night.yaml"
    config.write_text(yaml.safe_dump(values))

    code, output = _torchrun_driver(
        driver, [str(config), "--no-progress", "train.name=reference"], tmp_path
    )
    assert code == 0, output[-3000:]
    reference = load_checkpoint(tmp_path / "runs/reference/last.pt")

    # 8 images over 2 ranks, one per batch: 4 forward passes per rank and epoch, 2 optimizer steps.
    # SIGTERM to torchrun during epoch 2; the ranks agree on where to stop, rank 0 saves.
    code, output = _torchrun_driver(driver, [str(config), "--no-progress"], tmp_path, stop_at=5)
    run = tmp_path / "runs/night"
    state = load_checkpoint(run / "last.pt")["state"]
    assert "stopped by SIGTERM" in output, output[-3000:]
    assert state["epoch"] == 1 and 0 < state["iteration"] < 4, state
    code, output = _torchrun_driver(
        driver, [str(config), "--resume", str(run), "--no-progress"], tmp_path
    )
    assert code == 0, output[-3000:]
    assert_same_training(load_checkpoint(run / "last.pt"), reference)
