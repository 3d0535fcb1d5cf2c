"""Train stage: the frozen-backbone fine-tuning loop, checkpoints, resume and the time budget.

Flat on purpose, in the style of torchvision's references/detection and DETR's engine: one
``Run`` holds what a run trains with, and short functions act on it in the order a run goes:
``prepare`` -> ``restore`` (resume) -> ``one_epoch`` (``train_one_epoch``, then ``finish_epoch``:
last.pt, evaluation, best.pt, metrics.csv) -> ``final_evaluation`` -> ``finish``. Everything a
resumed run needs to continue bit-for-bit (model, optimizer, scheduler, scaler, RNG, position in
the epoch) is in ``last.pt``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import random
import resource
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from . import branches, distributed, feature_cache
from .config import Config, parse_clock
from .data import (
    CocoSet,
    DatasetError,
    DetectionDataset,
    aspect_ratio_groups,
    build_augmentation,
    data_sets,
    describe,
    epoch_batches,
    load_coco,
    make_loader,
)
from .evaluate import Metrics, evaluate, format_metrics, run_evaluation
from .fileio import atomic_write_text
from .model import BuildInfo, build_model, load_checkpoint, save_checkpoint, unfreeze_last_blocks
from .report import format_report, write_report
from .run_folder import (
    TrainingError,
    load_resume_checkpoint,
    locked_run_dir,
    new_run_dir,
    read_metrics_csv,
    remove_stale_temp_files,
    resolve_resume,
    resumed_config,
    run_log,
    write_metrics_csv,
)

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint."""

    epoch: int = 0  # the epoch being (or next to be) trained, 0-based
    iteration: int = 0  # next batch index inside that epoch
    step: int = 0  # optimizer steps taken
    best_map: float = -1.0
    best_epoch: int = -1
    evals_since_best: int = 0
    unfrozen: bool = False
    # last.pt is written before the epoch's evaluation: True there until the evaluation is done,
    # so a resume after a crash in evaluation evaluates that epoch first.
    pending_eval: bool = False


@dataclass
class TrainResult:
    run_dir: Path
    best_map: float
    best_epoch: int
    epochs_done: int
    stop_reason: str
    final_metrics: Metrics | None = None
    seconds: float = 0.0
    images_seen: int = 0
    peak_ram_mb: float = 0.0  # this process's peak resident memory
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated over the run (CUDA only)
    rank: int = 0  # torchrun: the process that wrote the run folder is rank 0
    classes: str = ""  # model.keep_classes: which classes came from where (branches.describe)


@dataclass
class StopFlags:
    """Set by signal handlers, read between batches."""

    signal_name: str | None = None
    deadline: float | None = None  # time.time() value
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What one training run holds while it trains (every rank has its own)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    progress: bool
    start_time: float
    train_set: CocoSet
    val_set: CocoSet | None
    model: torch.nn.Module
    info: BuildInfo
    later_params: list[torch.nn.Parameter]  # what the unfreeze phase adds
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    dataset: DetectionDataset
    total_epochs: int
    state: TrainState = field(default_factory=TrainState)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv
    cache: feature_cache.FeatureCache | None = None
    writer: Any = None  # TensorBoard SummaryWriter, rank 0 only
    flags: StopFlags = field(default_factory=StopFlags)
    rank_rng: list[dict[str, Any]] | None = None  # torchrun: every rank's RNG after its epoch
    stop_reason: str | None = None
    images_seen: int = 0
    last_eval_seconds: float = 0.0
    final_metrics: Metrics | None = None

    @property
    def main(self) -> bool:
        return distributed.is_main()


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name} but CUDA is not available; use train.device=cpu")
    return device


def compute_deadline(cfg: Config, start: float) -> float | None:
    """The earliest of start + max_hours and the next occurrence of ``until`` (local time)."""
    deadlines = []
    if cfg.train.max_hours is not None:
        deadlines.append(start + cfg.train.max_hours * 3600.0)
    if cfg.train.until is not None:
        hours, minutes = parse_clock(cfg.train.until)
        now = dt.datetime.fromtimestamp(start)
        target = now.replace(hour=hours, minute=minutes, second=0, microsecond=0)
        if target <= now:
            target += dt.timedelta(days=1)
        deadlines.append(target.timestamp())
    return min(deadlines) if deadlines else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def make_lr_lambda(cfg: Config, steps_per_epoch: int, total_steps: int):
    """Linear warmup, then cosine to zero or steps at the milestone epochs."""
    warmup = min(cfg.train.warmup_iters, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            alpha = step / max(warmup, 1)
            return cfg.train.warmup_factor * (1 - alpha) + alpha
        if cfg.train.scheduler == "cosine":
            progress = (step - warmup) / max(total_steps - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        epoch = step // max(steps_per_epoch, 1)
        return cfg.train.gamma ** sum(1 for m in cfg.train.milestones if epoch >= m)

    return factor


def build_optimizer(cfg: Config, model: torch.nn.Module, later_params: list[torch.nn.Parameter]):
    """Group 0: what trains now; group 1 (if any): what the unfreeze phase adds, at a lower lr.

    Frozen parameters never get a gradient, and torch optimizers skip parameters whose grad is
    None, so group 1 stays untouched until the unfreeze phase switches requires_grad on.
    """
    later_ids = {id(p) for p in later_params}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in later_ids]
    if not trainable:
        raise TrainingError("nothing to train: every parameter is frozen (check model.freeze_*)")
    groups = [{"params": trainable, "lr": cfg.train.lr}]
    if later_params:
        groups.append({"params": later_params, "lr": cfg.train.lr * cfg.train.unfreeze.lr_scale})
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.train.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def set_train_mode(model: torch.nn.Module, cfg: Config, unfrozen: bool) -> None:
    """Train mode for what trains; frozen parts stay in eval mode (BN statistics, dropout)."""
    model.train()
    if cfg.model.freeze_backbone and not unfrozen:
        model.backbone.eval()
    if cfg.model.freeze_rpn:
        model.rpn.eval()
        model.rpn.training = True  # the RPN must still produce training-mode proposal counts


def unfreeze_candidates(model: torch.nn.Module, cfg: Config) -> list[torch.nn.Parameter]:
    """Parameters the unfreeze phase will train: last backbone blocks + FPN (frozen for now)."""
    if cfg.train.unfreeze.epochs == 0 or not cfg.model.freeze_backbone:
        return []
    params = unfreeze_last_blocks(model, cfg.train.unfreeze.backbone_blocks)
    for p in params:
        p.requires_grad_(False)
    return params


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# A run, top to bottom
# --------------------------------------------------------------------------------------------


def train(
    cfg: Config,
    resume: str | Path | None = None,
    run_dir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) a run; returns where it went and how it ended."""
    start_time = time.time()
    started_distributed = distributed.init_from_env(cfg.train.device)
    try:
        return _train_entry(cfg, resume, run_dir, progress, start_time)
    finally:
        if started_distributed:
            distributed.cleanup()


def _train_entry(
    cfg: Config, resume: str | Path | None, run_dir: Path | None, progress: bool, start_time: float
) -> TrainResult:
    """Lock and log to the run folder (rank 0), then prepare, restore and train.

    A start that fails before the first batch (data, pre-flight, weights, cache) removes the
    folder it created, so the next attempt gets the same name, not ``NAME-2``.
    """
    main = distributed.is_main()
    resume_path = resolve_resume(resume) if resume is not None else None
    created = resume_path is None and run_dir is None
    if resume_path is not None:
        run_dir = resume_path.parent
    elif created:
        _check_epochs(cfg)
        run_dir = distributed.broadcast_object(new_run_dir(cfg) if main else None)
    run_dir = Path(run_dir)
    started = False
    try:
        with contextlib.ExitStack() as folder:
            if main:  # rank 0 writes the run folder, its log included
                run_dir.mkdir(parents=True, exist_ok=True)
                folder.enter_context(locked_run_dir(run_dir))
                remove_stale_temp_files(run_dir)
                folder.enter_context(run_log(run_dir))
            checkpoint = None
            if resume_path is not None:
                checkpoint = load_resume_checkpoint(resume_path)
                cfg = resumed_config(cfg, checkpoint, resume_path)
                log.info(
                    "resuming %s at epoch %d, batch %d",
                    resume_path,
                    checkpoint["state"]["epoch"] + 1,
                    checkpoint["state"]["iteration"],
                )
            run = prepare(cfg, run_dir, start_time, progress and main)
            if checkpoint is not None:
                restore(run, checkpoint)
            run.cache = build_cache(run)
            started = True
            return run_training(run)
    except BaseException:
        if created and main and not started:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _check_epochs(cfg: Config) -> None:
    if cfg.train.epochs + cfg.train.unfreeze.epochs < 1:
        raise TrainingError(
            f"train.epochs={cfg.train.epochs} (and train.unfreeze.epochs="
            f"{cfg.train.unfreeze.epochs}): nothing to train; set train.epochs to 1 or more"
        )


def prepare(cfg: Config, run_dir: Path, start_time: float, progress: bool) -> Run:
    """Data, model, optimizer, schedule and mixed precision of a run at its first batch."""
    if distributed.is_main():
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.train.seed)
    device = distributed.device_for(select_device(cfg.train.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        torch.cuda.reset_peak_memory_stats(device)
    train_set, val_set = load_data(cfg, progress)
    model, info = build_model(cfg.model, train_set.class_names)
    if cfg.model.keep_classes and val_set is not None:  # scored on every class of the model
        val_set = load_coco(cfg.data.val_annotations, cfg.data.val_images, model.class_names)
    later_params = unfreeze_candidates(model, cfg)
    model.to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, later_params)
    dataset = build_dataset(cfg, train_set)
    total_epochs = cfg.train.epochs + cfg.train.unfreeze.epochs
    scheduler = build_scheduler(cfg, optimizer, len(dataset), total_epochs)
    amp_dtype = autocast_dtype(cfg, device)
    log.info(
        "device %s, %s",
        device,
        f"autocast {str(amp_dtype).removeprefix('torch.')}" if amp_dtype else "float32",
    )
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        progress=progress,
        start_time=start_time,
        train_set=train_set,
        val_set=val_set,
        model=model,
        info=info,
        later_params=later_params,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype,
        dataset=dataset,
        total_epochs=total_epochs,
        rows=read_metrics_csv(run_dir / "metrics.csv"),
    )


def load_data(cfg: Config, progress: bool) -> tuple[CocoSet, CocoSet | None]:
    """Train and val sets, checked by the pre-flight (every image read once) when it is on."""
    try:
        train_set, val_set = data_sets(cfg.data)
    except DatasetError:
        if cfg.data.preflight:  # the loader stops at the first problem: list them all instead
            from .preflight import preflight_data

            preflight_data(cfg.data, progress=progress)
        raise
    log.info("train: %s", describe(train_set))
    if val_set is not None:
        log.info("val: %s", describe(val_set))
    if cfg.data.preflight:
        from .preflight import preflight  # reads every image once; stops with the full list

        preflight(train_set, val_set, progress=progress)
    return train_set, val_set


def build_dataset(cfg: Config, train_set: CocoSet) -> DetectionDataset:
    dataset = DetectionDataset(train_set, build_augmentation(cfg.augment), seed=cfg.train.seed)
    if cfg.data.aspect_ratio_groups:
        dataset.groups = aspect_ratio_groups(train_set, cfg.data.aspect_ratio_groups)
    if cfg.data.cache_images:
        dataset.preload(cfg.data.cache_images_max_gb)
    return dataset


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, num_images: int, total_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine/step over the run's optimizer steps (this rank's share of the batches)."""
    batches_per_epoch = math.ceil(
        math.ceil(num_images / cfg.train.batch_size) / distributed.world_size()
    )
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.accumulate)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, make_lr_lambda(cfg, steps_per_epoch, total_epochs * steps_per_epoch)
    )


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    """Continue from last.pt: weights, counters, optimizer, schedule, scaler and RNG."""
    run.model.load_state_dict(checkpoint["model"])
    run.state = TrainState(**checkpoint["state"])
    if run.state.unfrozen:
        for p in run.later_params:
            p.requires_grad_(True)
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint)
    run.rank_rng = distributed.gather_object(rng_state())
    run.rows = [r for r in run.rows if int(r["epoch"]) <= run.state.epoch]


def build_cache(run: Run) -> feature_cache.FeatureCache | None:
    """train.cache_features: the frozen FPN's features of every view, for the frozen epochs."""
    cfg = run.cfg
    if not cfg.train.cache_features:
        return None
    plan, why_not = feature_cache.plan_cache(cfg)
    if plan is None:
        log.warning("train.cache_features: not used, training on images: %s", why_not)
        return None
    if run.state.epoch >= cfg.train.epochs:
        return None
    cache = feature_cache.build_feature_cache(
        run.model, run.dataset, cfg, plan, run.device, run.progress, amp_dtype=run.amp_dtype
    )
    cache.groups = run.dataset.groups
    return cache


def run_training(run: Run) -> TrainResult:
    """The epoch loop between the signal handlers and the TensorBoard writer, then the end."""
    from torch.utils.tensorboard import SummaryWriter

    run.writer = SummaryWriter(str(run.run_dir / "tensorboard")) if run.main else None
    run.flags = StopFlags(deadline=compute_deadline(run.cfg, run.start_time))
    if run.flags.deadline is not None:
        log.info(
            "time budget: stopping by %s",
            dt.datetime.fromtimestamp(run.flags.deadline).strftime("%Y-%m-%d %H:%M"),
        )
    previous_handlers = _install_signal_handlers(run.flags)
    try:
        if run.state.pending_eval:  # resumed from a last.pt whose evaluation did not finish
            log.info("evaluating epoch %d, which the stopped run had not", run.state.epoch)
            settle_epoch(run)
            check_patience(run)
        while run.stop_reason is None and run.state.epoch < run.total_epochs:
            one_epoch(run)
    finally:
        _restore_signal_handlers(previous_handlers)
        if run.writer is not None:
            run.writer.close()
    run.stop_reason = run.stop_reason or "completed"
    final_evaluation(run)
    return finish(run)


def one_epoch(run: Run) -> None:
    """Train the current epoch (or its rest), then save and evaluate; a stop sets stop_reason."""
    maybe_unfreeze(run)
    epoch_start = time.time()
    data = run.cache if run.cache is not None else run.dataset  # cached views, or images
    data.epoch = run.state.epoch
    losses, seen, stopped = train_one_epoch(run, data, reserve_seconds=run.last_eval_seconds)
    losses, seen = distributed.reduce_epoch(losses, seen, run.device)
    run.rank_rng = distributed.gather_object(rng_state())
    run.images_seen += seen
    if stopped:
        save_at_stop(run, stopped)
        return
    finish_epoch(run, losses, seen, time.time() - epoch_start)
    check_patience(run)


def maybe_unfreeze(run: Run) -> None:
    """At the first unfreeze epoch: the last backbone blocks + FPN train, images replace the cache."""
    state, cfg = run.state, run.cfg
    if state.epoch >= cfg.train.epochs and run.later_params and not state.unfrozen:
        for p in run.later_params:
            p.requires_grad_(True)
        state.unfrozen = True
        log.info(
            "unfreeze phase: %d backbone tensors + FPN now train at lr x %g",
            len(run.later_params),
            cfg.train.unfreeze.lr_scale,
        )
    if run.cache is not None and state.unfrozen:
        log.info("unfreeze phase: the backbone trains, so the feature cache is left for images")
        run.cache = None


def save_at_stop(run: Run, reason: str) -> None:
    """Stopped between batches: last.pt at this very batch (and a first best.pt if none yet)."""
    run.stop_reason = reason
    if run.main:
        save_last(run)
        if not (run.run_dir / "best.pt").is_file():
            # Stopped inside the first epoch: the current model is the best there is.
            save_best(run)
    distributed.barrier()
    log.info(
        "%s: checkpoint saved at epoch %d batch %d",
        reason,
        run.state.epoch + 1,
        run.state.iteration,
    )


def finish_epoch(run: Run, losses: dict[str, float], seen: int, epoch_seconds: float) -> None:
    """A full epoch: its metrics.csv row, last.pt before an evaluation, then ``settle_epoch``."""
    state = run.state
    state.epoch += 1
    state.iteration = 0
    run.rows.append(
        {
            "epoch": state.epoch,
            "phase": "unfreeze" if state.unfrozen else "frozen",
            "lr": run.optimizer.param_groups[0]["lr"],
            **{k: round(v, 5) for k, v in losses.items()},
            "epoch_seconds": round(epoch_seconds, 2),
            "images_per_s": round(seen / max(epoch_seconds, 1e-9), 3),
            **_peak_memory(run.device),
        }
    )
    if run.writer is not None:  # once per epoch, however few steps it had (train.log_every)
        for key, value in losses.items():
            run.writer.add_scalar(f"epoch/{key}", value, state.epoch)
    every = run.cfg.eval.every
    state.pending_eval = run.val_set is not None and (
        state.epoch % every == 0 or state.epoch == run.total_epochs
    )
    if run.main and state.pending_eval:
        # Before evaluating: a crash in evaluation keeps the epoch (resume evaluates it).
        write_metrics_csv(run.run_dir / "metrics.csv", run.rows)
        save_last(run)
    settle_epoch(run)


def settle_epoch(run: Run) -> None:
    """Rank 0 evaluates (when due), keeps the best model, writes metrics.csv and last.pt; the
    other ranks wait, then take its state."""
    if not run.main:
        distributed.barrier()
        run.state.__dict__.update(distributed.broadcast_object(None))
        return
    metrics = evaluate_epoch(run) if run.state.pending_eval else None
    run.state.pending_eval = False
    keep_best(run, metrics)
    if metrics is not None:
        row = next((r for r in reversed(run.rows) if int(r["epoch"]) == run.state.epoch), None)
        if row is None:  # metrics.csv lost its row: keep the metrics at least
            row = {"epoch": run.state.epoch}
            run.rows.append(row)
        row.update({k: round(v, 5) for k, v in metrics.as_row().items()})
    # metrics.csv before last.pt: a resume drops rows past its last.pt, never misses one.
    write_metrics_csv(run.run_dir / "metrics.csv", run.rows)
    save_last(run, metrics)
    distributed.barrier()
    distributed.broadcast_object(run.state.__dict__)


def evaluate_epoch(run: Run) -> Metrics:
    """Val metrics of the model as it is now; a failure names the epoch that last.pt keeps."""
    eval_start = time.time()
    try:
        metrics = evaluate(
            run.model,
            run.val_set,
            run.device,
            batch_size=run.cfg.train.batch_size,
            grid_images=0,
            num_workers=0,
            progress=run.progress,
        )
    except Exception as e:
        log.exception("evaluation after epoch %d failed", run.state.epoch)
        raise TrainingError(
            f"evaluation after epoch {run.state.epoch} failed ({type(e).__name__}: {e}); "
            f"{run.run_dir / 'last.pt'} holds that epoch: fix the val set "
            f"({run.val_set.annotations_path}) and resume with --resume {run.run_dir}"
        ) from e
    run.last_eval_seconds = time.time() - eval_start
    log.info("epoch %d val: %s", run.state.epoch, format_metrics(metrics).splitlines()[0])
    for key, value in metrics.as_row().items():
        run.writer.add_scalar(f"val/{key}", value, run.state.epoch)
    return metrics


def keep_best(run: Run, metrics: Metrics | None) -> None:
    """best.pt: the best val mAP so far; the latest model when there is no val mAP to compare."""
    state = run.state
    if metrics is not None and metrics.map < 0:
        # COCOeval's -1: nothing to score (e.g. only iscrowd boxes); no mAP can ever beat it.
        log.warning(
            "epoch %d: val mAP is undefined (%s has no boxes COCOeval can score); best.pt is "
            "the latest model",
            state.epoch,
            run.val_set.annotations_path,
        )
    if metrics is not None and metrics.map >= 0:
        if metrics.map <= state.best_map:
            state.evals_since_best += 1
            return
        state.best_map, state.best_epoch, state.evals_since_best = metrics.map, state.epoch, 0
    elif metrics is None and run.val_set is not None:
        return  # not evaluated this epoch (eval.every)
    else:
        state.best_epoch = state.epoch  # no val mAP: the latest model is the best we know
    save_best(run, metrics)


def check_patience(run: Run) -> None:
    patience = run.cfg.train.patience
    if patience and run.state.evals_since_best >= patience:
        run.stop_reason = f"early stop: no val mAP gain in {patience} evaluations"
        log.info(run.stop_reason)


# --------------------------------------------------------------------------------------------
# Checkpoints and the end of a run
# --------------------------------------------------------------------------------------------


def _checkpoint(run: Run, resumable: bool, metrics: Metrics | None = None) -> dict[str, Any]:
    """The model and what it is (best.pt); with ``resumable``, all a resume needs (last.pt)."""
    cfg, cset = run.cfg, run.train_set
    checkpoint: dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "arch": cfg.model.arch,
        "class_names": list(cset.class_names),
        "category_ids": list(cset.category_ids),
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "state": run.state.__dict__.copy(),
        "saved_at": time.time(),
        "weights_source": run.info.weights_source,
    }
    checkpoint.update(branches.checkpoint_fields(run.model, cset.category_ids))  # keep_classes
    if metrics is not None:
        checkpoint["metrics"] = {**metrics.as_row(), "per_class_ap": metrics.per_class_ap}
    if resumable:
        checkpoint["optimizer"] = run.optimizer.state_dict()
        checkpoint["scheduler"] = run.scheduler.state_dict()
        checkpoint["scaler"] = run.scaler.state_dict() if run.scaler is not None else None
        checkpoint["rng"] = rng_state()
        if run.rank_rng is not None:
            # torchrun: every rank samples anchors/RoIs on its own images, so its random stream
            # is its own; rank 0's is taken now (evaluation draws from it after the gather).
            checkpoint["rank_rng"] = [checkpoint["rng"], *run.rank_rng[1:]]
    return checkpoint


def save_last(run: Run, metrics: Metrics | None = None) -> None:
    save_checkpoint(run.run_dir / "last.pt", _checkpoint(run, resumable=True, metrics=metrics))


def save_best(run: Run, metrics: Metrics | None = None) -> None:
    save_checkpoint(run.run_dir / "best.pt", _checkpoint(run, resumable=False, metrics=metrics))


def restore_rng(checkpoint: dict[str, Any]) -> None:
    """This rank's random state from a checkpoint (see ``_checkpoint``)."""
    saved = checkpoint.get("rank_rng")
    world, rank = distributed.world_size(), distributed.rank()
    if saved is not None and len(saved) == world:
        set_rng_state(saved[rank])
        return
    set_rng_state(checkpoint["rng"])
    if saved is not None or world > 1:
        log.warning(
            "resuming with %d process(es) a run saved with %d: the random streams and the "
            "split of the current epoch's batches differ, so the result will differ from "
            "an uninterrupted run",
            world,
            len(saved) if saved is not None else 1,
        )


def final_evaluation(run: Run) -> Metrics | None:
    """Rank 0: best.pt's metrics, PR curve and prediction grid: the model the user deploys."""
    best_path = run.run_dir / "best.pt"
    metrics = None
    if run.main and run.val_set is not None and best_path.is_file():
        run.model.load_state_dict(load_checkpoint(best_path)["model"])
        evaluation = run_evaluation(
            run.model,
            run.val_set,
            run.device,
            out_dir=run.run_dir,
            batch_size=run.cfg.train.batch_size,
            grid_images=run.cfg.eval.grid_images,
            draw_score_threshold=run.cfg.eval.draw_score_threshold,
            model_name=best_path.name,
            progress=run.progress,
        )
        metrics = evaluation.metrics
        atomic_write_text(run.run_dir / "best_metrics.txt", format_metrics(metrics) + "\n")
        # The deployment report (thresholds.json, confusion, gallery, report.html) of best.pt.
        report = write_report(evaluation, run.run_dir, tensorboard_dir=run.run_dir / "tensorboard")
        log.info("deployment report of best.pt:\n%s", format_report(evaluation, report))
    distributed.barrier()
    run.final_metrics = metrics
    return metrics


def finish(run: Run) -> TrainResult:
    """The result, logged and written to summary.txt."""
    state = run.state
    result = TrainResult(
        run.run_dir,
        state.best_map,
        state.best_epoch,
        state.epoch,
        run.stop_reason or "completed",
        run.final_metrics,
        time.time() - run.start_time,
        run.images_seen,
        **_peak_memory(run.device),
        rank=distributed.rank(),
        classes=branches.describe(run.model),
    )
    log.info("run finished: %s", result.stop_reason)
    if run.main:
        atomic_write_text(run.run_dir / "summary.txt", summary(result) + "\n")
    return result


def _peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident RAM of this process and, on CUDA, peak allocated GPU memory (MiB)."""
    peaks = {"peak_ram_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peaks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peaks


def summary(result: TrainResult) -> str:
    lines = [
        f"run {result.run_dir}: {result.stop_reason} after {result.epochs_done} epochs in "
        f"{result.seconds / 60:.1f} min ({result.images_seen / max(result.seconds, 1e-9):.2f} images/s overall, "
        f"peak RAM {result.peak_ram_mb:.0f} MiB"
        + (
            f", peak GPU memory {result.peak_gpu_mb:.0f} MiB)"
            if result.peak_gpu_mb is not None
            else ")"
        ),
    ]
    undefined = result.best_map < 0 <= result.best_epoch  # every val mAP was COCOeval's -1
    if result.final_metrics is not None and (undefined or result.final_metrics.map < 0):
        lines.append(
            f"best.pt: epoch {result.best_epoch}, the latest model: the val set has no boxes "
            "COCOeval can score (mAP undefined); check data.val_annotations"
        )
    elif result.final_metrics is not None:
        lines.append(
            f"best.pt (epoch {result.best_epoch}): " + format_metrics(result.final_metrics)
        )
    elif result.best_epoch >= 0:
        lines.append(f"best.pt: epoch {result.best_epoch} (no val set: the latest model)")
    else:
        lines.append("no epoch completed: resume with --resume to continue")
    if result.classes:
        lines.append(result.classes)
    return "\n".join(lines)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the training forward runs in, or None for float32 (train.amp*)."""
    if not cfg.train.amp:
        if cfg.train.amp_cpu and device.type == "cpu":
            log.warning("train.amp_cpu needs train.amp=true; training in float32")
        return None
    if device.type == "cuda":
        if cfg.train.amp_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if cfg.train.amp_dtype == "bfloat16":
            log.warning(
                "train.amp_dtype=bfloat16: this GPU has no bf16; using float16 with loss scaling"
            )
        return torch.float16
    if device.type == "cpu" and cfg.train.amp_cpu:
        if cpu_has_native_bf16():
            return torch.bfloat16
        log.warning(
            "train.amp_cpu: this CPU has no native bf16 (AVX512-BF16 or AMX); training in float32"
        )
    return None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convs/matmuls faster than float32 (elsewhere oneDNN emulates them)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# --------------------------------------------------------------------------------------------
# One epoch
# --------------------------------------------------------------------------------------------


@dataclass
class EpochMeter:
    """Loss sums and speed of the epoch being trained, and of the stretch since the last log."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counted: int = 0
    seen: int = 0
    iteration_seconds: float | None = None  # smoothed, for the time budget
    tic: float = field(default_factory=time.time)
    window_sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    window_counted: int = 0
    window_seen: int = 0
    window_tic: float = field(default_factory=time.time)

    def add(self, loss_dict: dict[str, torch.Tensor], loss: torch.Tensor, images: int) -> float:
        """Count one batch; returns its seconds."""
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        values["loss"] = float(loss.detach())
        for key, value in values.items():
            self.sums[key] += value
            self.window_sums[key] += value
        self.counted += 1
        self.window_counted += 1
        self.seen += images
        self.window_seen += images
        now = time.time()
        elapsed, self.tic = now - self.tic, now
        self.iteration_seconds = (
            elapsed
            if self.iteration_seconds is None
            else 0.9 * self.iteration_seconds + 0.1 * elapsed
        )
        return elapsed

    def means(self) -> dict[str, float]:
        return _means(self.sums, self.counted)

    def take_window(self) -> tuple[dict[str, float], float]:
        """Mean losses and images/s since the last call."""
        now = time.time()
        means = _means(self.window_sums, self.window_counted)
        speed = self.window_seen / max(now - self.window_tic, 1e-9)
        self.window_sums, self.window_counted = defaultdict(float), 0
        self.window_seen, self.window_tic = 0, now
        return means, speed


def train_one_epoch(
    run: Run,
    dataset: DetectionDataset | feature_cache.FeatureCache,
    reserve_seconds: float = 0.0,
) -> tuple[dict[str, float], int, str | None]:
    """One pass over the shuffled batches from ``state.iteration`` on (this rank's share).

    ``dataset`` gives images, or cached views of them (train.cache_features): then the batch's
    losses come from the RPN + RoI heads on the cached features, the rest is the same.
    ``reserve_seconds``: time the time budget keeps for the end (the last evaluation's).
    Returns (mean losses, images seen, stop reason or None). Stops only at the start of an
    accumulation window, so a checkpoint never holds half-accumulated gradients.
    """
    cfg, state = run.cfg, run.state
    set_train_mode(run.model, cfg, state.unfrozen)
    batches = distributed.shard(
        epoch_batches(
            len(dataset), cfg.train.batch_size, cfg.train.seed, state.epoch, dataset.groups
        )
    )
    loader, net, cached = _epoch_loader(run, dataset, batches)
    accumulate = cfg.train.accumulate
    meter = EpochMeter()
    bar = tqdm(
        total=len(batches),
        initial=state.iteration,
        disable=not run.progress,
        dynamic_ncols=True,
        desc=f"epoch {state.epoch + 1}/{run.total_epochs}",
    )
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    run.optimizer.zero_grad(set_to_none=True)
    with contextlib.closing(bar):
        for images, targets in loader:
            index = state.iteration
            window_end = (index + 1) % accumulate == 0 or index + 1 == len(batches)
            if index % accumulate == 0:
                reason = distributed.first_reason(
                    _should_stop(run.flags, meter.iteration_seconds, accumulate, reserve_seconds)
                )
                if reason:
                    return meter.means(), meter.seen, reason
            if not cached:  # cached views move their features to the device themselves
                images = [img.to(run.device, non_blocking=True) for img in images]
            targets = [
                {k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in targets
            ]
            loss_dict, loss = _forward_backward(run, net, images, targets, window_end)
            stepped = loss is not None and window_end and _optimizer_step(run, params, targets)
            state.iteration += 1
            bar.update(1)
            if loss is None:  # non-finite: the batch is skipped
                continue
            elapsed = meter.add(loss_dict, loss, len(images))
            bar.set_postfix(
                loss=f"{meter.sums['loss'] / meter.counted:.3f}",
                lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                img_s=f"{len(images) / max(elapsed, 1e-9):.1f}",
            )
            if stepped and (
                state.step % max(cfg.train.log_every, 1) == 0 or state.iteration == len(batches)
            ):
                _log_step(run, meter, len(batches))
    return meter.means(), meter.seen, None


def _epoch_loader(run: Run, dataset, batches: list[list[int]]):
    """(DataLoader over the batches from ``state.iteration`` on, the module to train, cached?)."""
    cfg = run.cfg
    cached = isinstance(dataset, feature_cache.FeatureCache)
    # A private generator keeps the DataLoader from drawing on the global RNG, which the
    # model's samplers use: a resumed run then draws exactly what an uninterrupted one would.
    workers = 0 if cached and dataset.where == "RAM" else cfg.data.num_workers
    loader = make_loader(dataset, batches[run.state.iteration :], cfg.train.batch_size, workers)
    loader.generator = torch.Generator()
    net = distributed.wrap(
        feature_cache.CachedHeads(run.model, dataset.padding) if cached else run.model,
        run.device,
    )
    return loader, net, cached


def _forward_backward(
    run: Run, net: torch.nn.Module, images, targets, window_end: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One batch's losses and backward pass; (losses, None) when the loss is non-finite on any
    rank: the batch is skipped, logged with its image ids and counted."""
    device, amp_dtype = run.device, run.amp_dtype
    with distributed.no_sync(net, not window_end):
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
        ):
            loss_dict = net(images, targets)
        loss = sum(loss_dict.values())
        nonfinite = distributed.any_true(not torch.isfinite(loss), device)
        if not nonfinite:
            scaled = loss / run.cfg.train.accumulate
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    if not nonfinite:
        return loss_dict, loss
    ids = [int(t["image_id"]) for t in targets]
    log.warning(
        "non-finite loss %s at epoch %d batch %d (image ids %s): batch skipped",
        {k: float(v.detach()) for k, v in loss_dict.items()},
        run.state.epoch + 1,
        run.state.iteration,
        ids,
    )
    _count_nonfinite(run.flags, run.cfg, ids)
    return loss_dict, None


def _optimizer_step(run: Run, params: list[torch.nn.Parameter], targets) -> bool:
    """Clip and step at the end of an accumulation window; False when the step was skipped
    because the gradient is non-finite (without a GradScaler, which skips such steps itself)."""
    optimizer, scaler, state = run.optimizer, run.scaler, run.state
    if scaler is not None:
        scaler.unscale_(optimizer)
    if run.cfg.train.clip_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.train.clip_grad_norm)
    else:
        grad_norm = _grad_norm(params)
    if scaler is None and not torch.isfinite(grad_norm):
        # A finite loss with a NaN/inf gradient would turn every weight into NaN, and the
        # epoch's checkpoints with them: skip the step (GradScaler does the same).
        ids = [int(t["image_id"]) for t in targets]
        log.warning(
            "non-finite gradient (norm %s) at epoch %d batch %d (image ids %s): "
            "optimizer step skipped",
            float(grad_norm),
            state.epoch + 1,
            state.iteration,
            ids,
        )
        optimizer.zero_grad(set_to_none=True)
        _count_nonfinite(run.flags, run.cfg, ids)
        return False
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    state.step += 1
    run.flags.extra["nonfinite_streak"] = 0
    return True


def _log_step(run: Run, meter: EpochMeter, num_batches: int) -> None:
    """Every train.log_every optimizer steps and at the epoch's end: a log line and TensorBoard
    scalars (total and per-component losses since the last line, lr)."""
    means, speed = meter.take_window()
    state, lr = run.state, run.optimizer.param_groups[0]["lr"]
    parts = ", ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
    log.info(
        "epoch %d/%d batch %d/%d step %d: loss %.4f (%s), lr %.2e, %.1f img/s",
        state.epoch + 1,
        run.total_epochs,
        state.iteration,
        num_batches,
        state.step,
        means.get("loss", float("nan")),
        parts,
        lr,
        speed,
    )
    if run.writer is not None:
        for key, value in means.items():
            run.writer.add_scalar(f"train/{key}", value, state.step)
        run.writer.add_scalar("train/lr", lr, state.step)


def _count_nonfinite(flags: StopFlags, cfg: Config, ids: list[int]) -> None:
    """Count a skipped batch or step; the streak runs across epochs until a step succeeds."""
    flags.extra.setdefault("nonfinite_image_ids", []).extend(ids)
    streak = flags.extra["nonfinite_streak"] = flags.extra.get("nonfinite_streak", 0) + 1
    if streak >= cfg.train.max_nonfinite_batches:
        raise TrainingError(
            f"{streak} batches in a row had a non-finite loss or gradient (image ids "
            f"{flags.extra['nonfinite_image_ids'][-20:]}); stopping. The last good "
            "checkpoint (last.pt/best.pt) is kept. Lower train.lr or check those images' boxes."
        )


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients (what clip_grad_norm_ returns), without clipping."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _means(sums: dict[str, float], count: int) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in sums.items()}


def _should_stop(
    flags: StopFlags, iteration_seconds: float | None, accumulate: int, reserve_seconds: float
) -> str | None:
    if flags.signal_name:
        return f"stopped by {flags.signal_name}"
    if flags.deadline is not None:
        # Leave room for one more window plus the final evaluation and checkpoint.
        needed = (iteration_seconds or 0.0) * accumulate + reserve_seconds + 5.0
        if time.time() + needed >= flags.deadline:
            return "time budget reached"
    return None


def _install_signal_handlers(flags: StopFlags) -> dict[int, Any]:
    """SIGINT/SIGTERM: finish the batch, save a checkpoint, exit. A second SIGINT aborts."""
    previous: dict[int, Any] = {}

    def handler(signum, _frame):
        if flags.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flags.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: saving a checkpoint after this batch (Ctrl-C again to abort)",
            flags.signal_name,
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
