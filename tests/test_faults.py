"""Fault injection: a night-time retrain survives crashes, signals, a full disk, diverging losses
and hostile files (bad data sets: tests/test_faults_data.py).

The crash tests run ``detector train`` in a subprocess through a small driver (written to a temp
folder) that calls ``cli.main`` with test hooks switched on by environment variables: it prints a
marker line before every training forward pass and around every checkpoint write, and can pause
half-way through writing a checkpoint (a window to kill it in). The test reads the markers and
sends SIGKILL / SIGTERM / SIGINT at seeded moments, resumes with ``--resume`` and compares the
final weights bit for bit with an uninterrupted run (CPU, one thread, same seed).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from coco_fixtures import tiny_config, write_coco128_subset

from detector import cli
from detector import model as model_mod
from detector.config import ConfigError, load_config
from detector.model import WeightsError, load_checkpoint
from detector.run_folder import read_metrics_csv
from detector.train import train

REPO = Path(__file__).resolve().parents[1]

DRIVER = r'''
"""`detector train` through cli.main, with the fault-injection hooks of tests/test_faults.py."""
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # the same arithmetic in every run: results are compared bit for bit

from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

import detector
from detector import data as data_mod
from detector import model as model_mod


def say(*words):
    print("@@", *words, flush=True)


def which_write(name):
    """FILE:N:SECONDS -> ((FILE, N), SECONDS): the N-th write of FILE in this process."""
    value = os.environ.get(name, "")
    if not value:
        return None, 0.0
    file, n, seconds = value.rsplit(":", 2)
    return (file, int(n)), float(seconds)


FORWARD_SLEEP = float(os.environ.get("FAULT_FORWARD_SLEEP", "0"))
LOAD_SLEEP = float(os.environ.get("FAULT_LOAD_SLEEP", "0"))
SLOW_WRITE, SLOW_SECONDS = which_write("FAULT_SLOW_SAVE")  # pause half-way through the write
PAUSE_WRITE, PAUSE_SECONDS = which_write("FAULT_PAUSE_AFTER_SAVE")  # pause after the rename
forwards = 0
writes = {}
real_forward = GeneralizedRCNN.forward


def forward(self, images, targets=None):
    global forwards
    if self.training:
        forwards += 1
        say("FORWARD", forwards)
        time.sleep(FORWARD_SLEEP)  # a signal sent on the marker lands during this batch
    return real_forward(self, images, targets)


GeneralizedRCNN.forward = forward
real_getitem = data_mod.DetectionDataset.__getitem__


def getitem(self, index):
    time.sleep(LOAD_SLEEP)  # keeps DataLoader workers busy: batches are still pending
    return real_getitem(self, index)


data_mod.DetectionDataset.__getitem__ = getitem
real_write_with = model_mod.atomic_write_with


class HalfThenPause:
    """Writes half the bytes, makes them durable, pauses: the file is half-written on disk."""

    def __init__(self, f, name):
        self.f, self.name = f, name

    def write(self, data):
        data = memoryview(data)
        half = len(data) // 2
        self.f.write(data[:half])
        self.f.flush()
        os.fsync(self.f.fileno())
        say("SAVE-MID", self.name)
        time.sleep(SLOW_SECONDS)
        return half + self.f.write(data[half:])


def write_with(path, write):
    name = Path(path).name
    writes[name] = writes.get(name, 0) + 1
    if (name, writes[name]) == SLOW_WRITE:
        real_write_with(path, lambda f: write(HalfThenPause(f, name)))
    else:
        real_write_with(path, write)
    say("SAVE-END", name)
    if (name, writes[name]) == PAUSE_WRITE:
        time.sleep(PAUSE_SECONDS)


model_mod.atomic_write_with = write_with

from detector import cli

sys.exit(cli.main(["train", *sys.argv[1:]]))  # `detector train ARGS...`
'''

# 4 images, one per batch, the optimizer stepping every 2 batches, 2 epochs: 8 forward passes,
# 4 optimizer steps, checkpoints at the end of each epoch. Augmentation on, so the resumed runs
# must restore the RNG and the per-sample seeds to match.
NIGHT = {
    "train": {"epochs": 2, "batch_size": 1, "accumulate": 2, "warmup_iters": 2},
    "augment": {"scale": 0.5},
}


@pytest.fixture(scope="module")
def tiny_set(shared_datasets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_coco128")
    return write_coco128_subset(shared_datasets, root, count=4, name="train.json")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "fault_driver.py"
    path.write_text(DRIVER)
    return path


def night_yaml(path: Path, train_json: Path, out_dir: Path, num_workers: int = 0) -> Path:
    cfg = tiny_config(train_json, None, out_dir, **NIGHT)
    values = cfg.to_dict()
    values["train"]["name"] = "night"
    values["data"]["num_workers"] = num_workers
    path.write_text(yaml.safe_dump(values))
    return path


@dataclass
class Segment:
    returncode: int
    output: str
    signalled: bool


def run_segment(
    driver: Path,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    at: tuple[str, int] | None = None,
    sig: int = signal.SIGKILL,
    group: bool = False,
    timeout: float = 240,
) -> Segment:
    """Run the driver; on the ``at`` = (marker, n-th occurrence) line, send ``sig`` to the
    process (or with ``group`` to its process group, as Ctrl-C in a terminal or systemd do)."""
    proc = subprocess.Popen(
        [sys.executable, str(driver), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )

    def kill_group() -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout, kill_group)
    watchdog.start()
    lines: list[str] = []
    seen: Counter[str] = Counter()
    sent = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if at is None or sent or not line.startswith("@@ "):
                continue
            marker = line[3:].strip()
            seen[marker] += 1
            if (marker, seen[marker]) == at:
                (os.killpg if group else os.kill)(proc.pid, sig)
                sent = True
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        kill_group()
    output = "".join(lines)
    assert at is None or sent, f"marker {at} never came:\n{output[-3000:]}"
    return Segment(proc.returncode, output, sent)


@pytest.fixture(scope="module")
def reference(driver, tiny_set, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run every interrupted one must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    config = night_yaml(root / "night.yaml", tiny_set, root / "runs")
    done = run_segment(driver, [str(config), "--no-progress"])
    assert done.returncode == 0, done.output[-3000:]
    assert done.output.count("@@ FORWARD") == 8
    return load_checkpoint(root / "runs/night/last.pt")


def assert_same_training(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["state"]["step"] == expected["state"]["step"] == 4
    assert got["state"]["epoch"] == expected["state"]["epoch"] == 2
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs from the uninterrupted run"
    buffers = expected["optimizer"]["state"]
    assert buffers, "SGD momentum buffers expected"
    for index, entry in buffers.items():
        for name, value in entry.items():
            assert torch.equal(got["optimizer"]["state"][index][name], value), (index, name)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# crashes and signals


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigkill_at_seeded_moments_then_resume_is_bit_identical(
    driver, tiny_set, reference, tmp_path
):
    rng = random.Random(20240611)
    half_written = rng.choice(["best.pt", "last.pt"])  # killed half-way through writing it
    mid_epoch = rng.randint(1, 4)  # killed during this forward pass of the resumed epoch 2
    print(
        f"kill plan: mid-write of epoch 2's {half_written}, then forward {mid_epoch}, "
        "then right after epoch 2's last.pt"
    )
    config = night_yaml(tmp_path / "night.yaml", tiny_set, tmp_path / "runs")
    run = tmp_path / "runs/night"

    # 1: SIGKILL half-way through writing a checkpoint at the end of epoch 2
    seg = run_segment(
        driver,
        [str(config), "--no-progress"],
        env={"FAULT_SLOW_SAVE": f"{half_written}:2:60"},
        at=(f"SAVE-MID {half_written}", 1),
    )
    assert seg.returncode == -signal.SIGKILL
    partial = list(run.glob(f".{half_written}.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0, list(run.iterdir())
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_checkpoint(partial[0])  # the half-written file is unreadable ...
    last = load_checkpoint(run / "last.pt")  # ... and never replaced the good one
    assert (last["state"]["epoch"], last["state"]["iteration"]) == (1, 0)
    epoch1 = digest(run / "last.pt")

    # 2: resume from the folder, SIGKILL in the middle of the redone epoch 2
    seg = run_segment(
        driver, [str(config), "--resume", str(run), "--no-progress"], at=(f"FORWARD {mid_epoch}", 1)
    )
    assert seg.returncode == -signal.SIGKILL
    assert "resuming" in seg.output and "at epoch 2, batch 0" in seg.output
    assert digest(run / "last.pt") == epoch1

    # 3: resume the newest run of the config (--resume alone), SIGKILL right after the final
    # last.pt is in place, before the end-of-run work
    seg = run_segment(
        driver,
        [str(config), "--resume", "--no-progress"],
        env={"FAULT_PAUSE_AFTER_SAVE": "last.pt:1:60"},
        at=("SAVE-END last.pt", 1),
    )
    assert seg.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "last.pt")["state"]["epoch"] == 2

    # 4: resume from the file: nothing left to train, finishes cleanly
    seg = run_segment(driver, [str(config), "--resume", str(run / "last.pt"), "--no-progress"])
    assert seg.returncode == 0, seg.output[-3000:]
    assert "completed after 2 epochs" in seg.output

    assert_same_training(load_checkpoint(run / "last.pt"), reference)
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == ["1", "2"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["night"]  # no night-2
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "stale temp files left"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_and_ctrl_c_to_the_process_group_save_exit_0_and_resume_bit_identical(
    driver, tiny_set, reference, tmp_path
):
    """With a DataLoader worker, signals sent to the whole group (systemd, SLURM, Ctrl-C in a
    terminal) reach the worker too; the run must still stop at a batch boundary and save."""
    config = night_yaml(tmp_path / "night.yaml", tiny_set, tmp_path / "runs", num_workers=1)
    run = tmp_path / "runs/night"
    env = {"FAULT_FORWARD_SLEEP": "0.3", "FAULT_LOAD_SLEEP": "0.3"}

    # SIGTERM during batch 2 of epoch 1: it finishes that accumulation window, saves, exits 0
    seg = run_segment(
        driver,
        [str(config), "--no-progress"],
        env=env,
        at=("FORWARD 2", 1),
        sig=signal.SIGTERM,
        group=True,
    )
    assert seg.returncode == 0, seg.output[-3000:]
    assert "SIGTERM received" in seg.output and "stopped by SIGTERM after 0 epochs" in seg.output
    assert "resume with --resume" in seg.output
    state = load_checkpoint(run / "last.pt")["state"]
    assert (state["epoch"], state["iteration"], state["step"]) == (0, 2, 1)

    # Ctrl-C during the first batch of epoch 2: the epoch-1 checkpoint is written on the way,
    # then it stops at the next window start
    seg = run_segment(
        driver,
        [str(config), "--resume", str(run), "--no-progress"],
        env=env,
        at=("FORWARD 3", 1),
        sig=signal.SIGINT,
        group=True,
    )
    assert seg.returncode == 0, seg.output[-3000:]
    assert "stopped by SIGINT after 1 epochs" in seg.output
    state = load_checkpoint(run / "last.pt")["state"]
    assert (state["epoch"], state["iteration"], state["step"]) == (1, 2, 3)

    seg = run_segment(driver, [str(config), "--resume", str(run), "--no-progress"])
    assert seg.returncode == 0, seg.output[-3000:]
    assert_same_training(load_checkpoint(run / "last.pt"), reference)


@pytest.mark.slow
def test_two_runs_in_one_folder_the_second_refuses_naming_the_pid(
    driver, tiny_set, tmp_path, cli_main, capsys
):
    config = night_yaml(tmp_path / "night.yaml", tiny_set, tmp_path / "runs")
    run = tmp_path / "runs/night"
    seg = run_segment(driver, [str(config), "--no-progress"], at=("FORWARD 5", 1))
    assert seg.returncode == -signal.SIGKILL  # killed in epoch 2: epoch 1's last.pt is there
    before = digest(run / "last.pt")
    first = subprocess.Popen(
        [sys.executable, str(driver), str(config), "--resume", str(run), "--no-progress"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "FAULT_FORWARD_SLEEP": "120"},
    )
    try:
        assert first.stdout is not None
        for line in first.stdout:  # the first resumed run is training ...
            if line.startswith("@@ FORWARD 1"):
                break
        # ... so a second one on the same folder stops before touching anything
        assert cli_main(["train", str(config), "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by another training run (pid {first.pid})" in err, err
        assert digest(run / "last.pt") == before
    finally:
        first.kill()
        first.wait(timeout=60)
    # the kernel released the killed run's lock: resuming works
    assert cli_main(["train", str(config), "--resume", str(run), "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt")["state"]["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# disk full


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_set, tmp_path, monkeypatch):
    real_write_with = model_mod.atomic_write_with
    saves: Counter[str] = Counter()
    before: dict[str, bytes] = {}

    def write_with(path, write):
        name = Path(path).name
        saves[name] += 1
        if name == "last.pt" and saves[name] == 2:  # epoch 2's last.pt: the disk fills up
            before["last.pt"] = Path(path).read_bytes()

            class FullDisk:
                def __init__(self, f):
                    self.f = f

                def write(self, data):
                    self.f.write(memoryview(data)[: len(data) // 3])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            return real_write_with(path, lambda f: write(FullDisk(f)))
        return real_write_with(path, write)

    monkeypatch.setattr(model_mod, "atomic_write_with", write_with)
    cfg = tiny_config(
        tiny_set,
        None,
        tmp_path,
        train={"epochs": 2, "batch_size": 2},
        augment={"hflip": 0.0, "brightness_contrast": 0.0},
    )
    with pytest.raises(OSError) as err:
        train(cfg, progress=False)
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert "could not write checkpoint" in message and "last.pt" in message
    assert (
        "No space left on device" in message
        and "the previous file there, if any, is intact" in message
    )
    run = tmp_path / "t"
    assert (run / "last.pt").read_bytes() == before["last.pt"]  # byte for byte
    assert load_checkpoint(run / "last.pt")["state"]["epoch"] == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# diverging losses


def _nan_loss_from(call: int, real):
    calls = {"n": 0}

    def forward(self, images, targets=None):
        out = real(self, images, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= call:
                out = {k: v * float("nan") for k, v in out.items()}
        return out

    return forward


@pytest.fixture
def cli_main():
    return cli.main


def test_nonfinite_losses_across_epochs_stop_the_run_exit_2(
    tiny_set, tmp_path, monkeypatch, cli_main, capsys
):
    """2 batches per epoch, the limit 3 in a row: the streak must carry over epoch boundaries."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    monkeypatch.setattr(GeneralizedRCNN, "forward", _nan_loss_from(2, GeneralizedRCNN.forward))
    config = tmp_path / "nan.yaml"
    values = tiny_config(
        tiny_set,
        None,
        tmp_path / "runs",
        train={"epochs": 4, "batch_size": 2, "max_nonfinite_batches": 3},
    ).to_dict()
    config.write_text(yaml.safe_dump(values))
    assert cli_main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: 3 batches in a row had a non-finite loss or gradient (image ids [" in err
    assert "last good checkpoint" in err and "Lower train.lr" in err
    last = load_checkpoint(tmp_path / "runs/t/last.pt")
    assert last["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_nonfinite_gradient_with_a_finite_loss_never_reaches_the_weights(
    tiny_set, tmp_path, monkeypatch, caplog
):
    """A finite loss whose gradient is NaN (an overflow in backward): the step must be skipped,
    or NaN weights end up in last.pt/best.pt as if the epoch had gone well."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    real = GeneralizedRCNN.forward
    calls = {"n": 0}

    def forward(self, images, targets=None):
        out = real(self, images, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # first batch of epoch 2
                out["loss_classifier"].register_hook(lambda grad: grad * float("nan"))
        return out

    monkeypatch.setattr(GeneralizedRCNN, "forward", forward)
    cfg = tiny_config(tiny_set, None, tmp_path, train={"epochs": 2, "batch_size": 2})
    with caplog.at_level(logging.WARNING, logger="detector"):
        result = train(cfg, progress=False)
    assert result.stop_reason == "completed"
    assert any(
        "non-finite gradient" in r.getMessage() and "image ids" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    for name in ("last.pt", "best.pt"):
        weights = load_checkpoint(result.run_dir / name)["model"]
        bad = [
            k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        assert not bad, f"{name} holds non-finite weights: {bad[:5]}"


# ---------------------------------------------------------------------------------------------
# hostile files


class Payload:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_by_evaluate_and_resume(tiny_set, tmp_path, cli_main, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "detector-checkpoint", "model": Payload(marker)}, hostile)
    assert cli_main(["evaluate", str(hostile), "--data", str(tiny_set)]) == 2
    assert "refused to load" in capsys.readouterr().err

    config = tmp_path / "c.yaml"
    values = tiny_config(tiny_set, None, tmp_path / "runs").to_dict()
    values["train"]["name"] = "night"
    config.write_text(yaml.safe_dump(values))
    run = tmp_path / "runs/night"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(hostile.read_bytes())
    for resume in ([str(run)], [str(run / "last.pt")], []):  # folder, file, newest run
        assert cli_main(["train", str(config), "--resume", *resume, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "last.pt: refused to load" in err and "could run code" in err, err
    assert not marker.exists(), "the payload ran"

    # a truncated or foreign last.pt is a clear error too, never a traceback
    torch.save({"conv.weight": torch.zeros(3)}, run / "last.pt")
    assert cli_main(["train", str(config), "--resume", str(run), "--no-progress"]) == 2
    assert "not a checkpoint written by detector" in capsys.readouterr().err
    (run / "last.pt").write_bytes(hostile.read_bytes()[:100])
    assert cli_main(["train", str(config), "--resume", str(run), "--no-progress"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_checkpoint_with_the_format_tag_but_no_class_names_is_a_clear_error(
    tiny_set, tmp_path, cli_main, capsys
):
    partial = tmp_path / "partial.pt"
    torch.save(
        {"format": "detector-checkpoint", "model": {}, "arch": "fasterrcnn_mobilenet_v2_fpn"},
        partial,
    )
    assert cli_main(["evaluate", str(partial), "--data", str(tiny_set)]) == 2
    err = capsys.readouterr().err
    assert "partial.pt: incomplete checkpoint, no class_names" in err and "best.pt" in err, err
    values = tiny_config(tiny_set, None, tmp_path / "runs").to_dict()
    values["model"]["weights"] = str(partial)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    assert cli_main(["train", str(config), "data.preflight=false", "--no-progress"]) == 2
    assert "partial.pt: incomplete checkpoint, no class_names" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_yaml_is_loaded_safely(tmp_path, cli_main, capsys):
    marker = tmp_path / "pwned"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  name: {tag}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config)
    assert cli_main(["train", str(config)]) == 2
    assert "evil.yaml: not valid YAML" in capsys.readouterr().err
    # the same tag in a command-line override
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  epochs: 1\n")
    with pytest.raises((ConfigError, yaml.YAMLError)):
        load_config(plain, [f"train.name={tag}"])
    assert not marker.exists(), "the YAML tag ran"


def test_onnx_runtime_refuses_bad_frames_and_foreign_files(tmp_path):
    runtime = pytest.importorskip("detector.runtime")
    import numpy as np

    ok = np.zeros((48, 64, 3), np.uint8)
    assert runtime.check_frame(ok) is ok
    cases = [
        ([[0, 1], [2, 3]], "expected a numpy array HxWx3 uint8 BGR"),
        (ok.astype(np.float32) / 255, "expected dtype uint8, got float32 (scale 0..1 floats"),
        (ok.astype(np.uint16), "expected dtype uint8, got uint16"),
        (ok[..., 0], "a grayscale image needs cv2.cvtColor"),
        (np.zeros((48, 64, 4), np.uint8), "drop alpha"),
        (np.zeros((3, 48, 64), np.uint8), "channels-first"),
        (np.zeros((1, 1, 48, 64, 3), np.uint8), "expected 3 dimensions"),
        (np.zeros((8, 64, 3), np.uint8), "size 64x8 outside the supported"),
        (np.zeros((0, 0, 3), np.uint8), "outside the supported"),
    ]
    for frame, expected in cases:
        with pytest.raises(runtime.InputError, match=None) as err:
            runtime.check_frame(frame, 2)
        assert expected in str(err.value) and "frame 2" in str(err.value), (expected, err.value)

    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x08\x07 not a protobuf at all" * 50)
    with pytest.raises(runtime.ModelError, match="model.onnx"):
        runtime.Detector(garbage, providers=["cpu"])
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["boxes"])],
        "foreign",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, None, None])],
    )
    foreign = tmp_path / "foreign.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, foreign)
    with pytest.raises(runtime.ModelError, match="not a detector ONNX model"):
        runtime.Detector(foreign, providers=["cpu"])


def test_checkpoint_written_by_this_pipeline_holds_only_plain_data(tiny_set, reference):
    """What resume restores (RNG states, optimizer, scheduler) must load with weights_only=True:
    if it ever needed a pickled class, resume would have to load unsafely."""
    assert {"model", "optimizer", "scheduler", "rng", "state", "config"} <= set(reference)
    json.dumps(reference["config"])  # the config is plain data
    json.dumps(reference["state"])
