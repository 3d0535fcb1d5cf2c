"""A training run's folder: its name, its lock, its log, its metrics.csv, and what resuming it
may change.

A run lives in ``<train.out_dir>/<train.name>`` (``-2``, ``-3``... when taken, so a run never
overwrites another). While a process trains there it holds the folder's lock; ``train.log``
receives every ``detector`` log line; ``metrics.csv`` has a row per epoch. ``--resume`` takes the
folder or its ``last.pt`` and continues with the run's own configuration, of which only the keys
in ``RESUME_SAFE_KEYS`` may change.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .fileio import atomic_write_text
from .model import load_checkpoint

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # in the run folder, held (fcntl.flock) while a process trains there

# Keys a resumed run takes from the command line and config file: they change when the run stops,
# what it logs and how it evaluates, never what it computes. A prefix ending in "." covers a
# section. Other keys must match the run's saved config (see ``resumed_config``).
RESUME_SAFE_KEYS = (
    "train.max_hours",
    "train.until",
    "train.patience",
    "train.log_every",
    "train.max_nonfinite_batches",
    "train.cache_dir",
    "data.num_workers",
    "data.preflight",
    "eval.",
)
# Where a run lives: the folder being resumed decides, whatever these say.
RESUME_LOCATION_KEYS = ("train.name", "train.out_dir")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, nothing to train); the last good checkpoint is kept."""


def check_run_name(name: str | None) -> None:
    """``train.name`` is a folder inside ``train.out_dir``: no absolute path, no ``..``."""
    if name is None:
        return
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise TrainingError(
            f"train.name={name!r}: a run name is a folder name inside train.out_dir (no "
            "absolute path, no '..'); set train.out_dir to choose where runs go"
        )


def new_run_dir(cfg: Config) -> Path:
    """``<out_dir>/<name>``, or ``<name>-2``, ``-3``... if taken: a run never overwrites another."""
    check_run_name(cfg.train.name)
    base = Path(cfg.train.out_dir) / (cfg.train.name or "run")
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)  # atomic: two runs starting at once get two folders
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")


@contextlib.contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock file while training: a second process there stops at once.

    ``flock`` is released by the kernel when the process ends, however it ends (SIGKILL too),
    so a crashed run never leaves a stale lock behind.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise TrainingError(
            f"{run_dir} is in use by another training run (pid {holder}); wait for it to "
            f"finish or stop it (kill -TERM {holder} saves a checkpoint), then resume"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """The run's ``train.log`` gets every ``detector`` log line while it trains."""
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("detector").addHandler(file_log)
    try:
        yield
    finally:
        logging.getLogger("detector").removeHandler(file_log)
        file_log.close()


def remove_stale_temp_files(run_dir: Path) -> None:
    for stale in run_dir.glob(".*.tmp"):  # fileio.atomic_open's half-written file of a killed save
        log.info("removing %s, left by a run killed while saving", stale)
        stale.unlink(missing_ok=True)


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def resolve_resume(resume: str | Path) -> Path:
    """``--resume`` accepts a checkpoint file or a run folder (its last.pt)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise TrainingError(f"cannot resume: {path} not found (give the run folder or its last.pt)")
    return path


def load_resume_checkpoint(path: Path) -> dict[str, Any]:
    """last.pt, or a clear error for a checkpoint that holds only a model (best.pt)."""
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint or "scheduler" not in checkpoint:
        raise TrainingError(
            f"cannot resume from {path}: it holds the model only, no optimizer state "
            f"({path.name} is the model to deploy or evaluate); resume from "
            f"{path.parent / 'last.pt'} or the run folder {path.parent}"
        )
    return checkpoint


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_safe_on_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE_KEYS)


def resumed_config(cfg: Config, checkpoint: dict[str, Any], path: Path) -> Config:
    """The run's saved config, with the safe keys (``RESUME_SAFE_KEYS``) taken from ``cfg``.

    Any other key whose value differs is refused by name: a resumed run continues the training
    it started, and an override that silently did nothing would be worse than an error.
    """
    saved = config_from_dict(checkpoint["config"])
    now, before = _flatten(cfg.to_dict()), _flatten(saved.to_dict())
    refused, taken = [], []
    for key, value in now.items():
        if key in RESUME_LOCATION_KEYS or value == before.get(key):
            continue
        (taken if _is_safe_on_resume(key) else refused).append((key, before.get(key), value))
    if refused:
        listed = "; ".join(f"{k}={new!r} (the run has {old!r})" for k, old, new in refused)
        raise TrainingError(
            f"cannot resume {path.parent} with a different configuration: {listed}. A resumed "
            "run keeps its configuration; only train.max_hours, train.until, train.patience, "
            "train.log_every, train.max_nonfinite_batches, train.cache_dir, data.num_workers, "
            "data.preflight and eval.* may change. Drop those overrides (or undo the edit of "
            f"the config file; the run's own is {path.parent / 'config.yaml'}), or start a "
            "new run without --resume"
        )
    values = saved.to_dict()
    for key, old, new in taken:
        log.info("resume: %s %r -> %r", key, old, new)
        *sections, name = key.split(".")
        node = values
        for section in sections:
            node = node[section]
        node[name] = new
    return config_from_dict(values)
