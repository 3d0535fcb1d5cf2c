"""Train stage: the frozen-backbone fine-tuning loop, checkpoints, resume and the time budget.

Flat on purpose, in the style of torchvision's references/detection: one function sets the run
up, one trains an epoch, one ties them together. Everything a resumed run needs to continue
bit-for-bit (model, optimizer, scheduler, scaler, RNG, position in the epoch) is in ``last.pt``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import logging
import math
import random
import resource
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
from .config import Config, config_from_dict, parse_clock
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
from .evaluate import Metrics, evaluate, format_metrics
from .fileio import atomic_write_text
from .model import BuildInfo, build_model, load_checkpoint, save_checkpoint, unfreeze_last_blocks

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, nothing to train); the last good checkpoint is kept."""


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


def _checkpoint(
    model,
    cfg: Config,
    cset: CocoSet,
    state: TrainState,
    optimizer=None,
    scheduler=None,
    scaler=None,
    metrics: Metrics | None = None,
    info: BuildInfo | None = None,
    rank_rng: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": cfg.model.arch,
        "class_names": list(cset.class_names),
        "category_ids": list(cset.category_ids),
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "state": state.__dict__.copy(),
        "saved_at": time.time(),
    }
    checkpoint.update(branches.checkpoint_fields(model, cset.category_ids))  # keep_classes
    if metrics is not None:
        checkpoint["metrics"] = {**metrics.as_row(), "per_class_ap": metrics.per_class_ap}
    if info is not None:
        checkpoint["weights_source"] = info.weights_source
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["scheduler"] = scheduler.state_dict()
        checkpoint["scaler"] = scaler.state_dict() if scaler is not None else None
        checkpoint["rng"] = rng_state()
        if rank_rng is not None:
            # torchrun: every rank samples anchors/RoIs on its own images, so its random stream
            # is its own; rank 0's is taken now (evaluation draws from it after the gather).
            checkpoint["rank_rng"] = [checkpoint["rng"], *rank_rng[1:]]
    return checkpoint


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


def new_run_dir(cfg: Config) -> Path:
    """``<out_dir>/<name>``, or ``<name>-2``, ``-3``... if taken: a run never overwrites another."""
    base = Path(cfg.train.out_dir) / (cfg.train.name or "run")
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


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


def resolve_resume(resume: str | Path) -> Path:
    """``--resume`` accepts a checkpoint file or a run folder (its last.pt)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise TrainingError(f"cannot resume: {path} not found (give the run folder or its last.pt)")
    return path


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
    resume_checkpoint = None
    if resume is not None:
        resume_path = resolve_resume(resume)
        resume_checkpoint = load_checkpoint(resume_path)
        # The run continues with the configuration it started with; only the budget may change.
        saved = config_from_dict(resume_checkpoint["config"])
        saved.train.max_hours, saved.train.until = cfg.train.max_hours, cfg.train.until
        cfg = saved
        run_dir = resume_path.parent
        log.info(
            "resuming %s at epoch %d, batch %d",
            resume_path,
            resume_checkpoint["state"]["epoch"] + 1,
            resume_checkpoint["state"]["iteration"],
        )
    elif run_dir is None:
        run_dir = distributed.broadcast_object(new_run_dir(cfg) if distributed.is_main() else None)
    run_dir = Path(run_dir)
    if not distributed.is_main():  # rank 0 writes the run folder, its log included
        return _train(
            cfg, run_dir, resume_checkpoint, start_time, progress and distributed.is_main()
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp"):  # fileio.atomic_open's half-written file of a killed save
        log.info("removing %s, left by a run killed while saving", stale)
        stale.unlink(missing_ok=True)
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("detector").addHandler(file_log)
    try:
        return _train(cfg, run_dir, resume_checkpoint, start_time, progress)
    finally:
        logging.getLogger("detector").removeHandler(file_log)
        file_log.close()


def _train(
    cfg: Config,
    run_dir: Path,
    resume_checkpoint: dict[str, Any] | None,
    start_time: float,
    progress: bool,
) -> TrainResult:
    main = distributed.is_main()
    if main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.train.seed)
    device = distributed.device_for(select_device(cfg.train.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        torch.cuda.reset_peak_memory_stats(device)

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

    model, info = build_model(cfg.model, train_set.class_names)
    if cfg.model.keep_classes and val_set is not None:  # scored on every class of the model
        val_set = load_coco(cfg.data.val_annotations, cfg.data.val_images, model.class_names)
    later_params = unfreeze_candidates(model, cfg)
    model.to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, later_params)
    dataset = DetectionDataset(train_set, build_augmentation(cfg.augment), seed=cfg.train.seed)
    if cfg.data.aspect_ratio_groups:
        dataset.groups = aspect_ratio_groups(train_set, cfg.data.aspect_ratio_groups)
    if cfg.data.cache_images:
        dataset.preload(cfg.data.cache_images_max_gb)
    batches_per_epoch = math.ceil(
        math.ceil(len(dataset) / cfg.train.batch_size) / distributed.world_size()
    )
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.accumulate)
    total_epochs = cfg.train.epochs + cfg.train.unfreeze.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, make_lr_lambda(cfg, steps_per_epoch, total_epochs * steps_per_epoch)
    )
    amp_dtype = autocast_dtype(cfg, device)
    log.info(
        "device %s, %s",
        device,
        f"autocast {str(amp_dtype).removeprefix('torch.')}" if amp_dtype else "float32",
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    state = TrainState()
    rows = read_metrics_csv(run_dir / "metrics.csv")
    if resume_checkpoint is not None:
        model.load_state_dict(resume_checkpoint["model"])
        state = TrainState(**resume_checkpoint["state"])
        if state.unfrozen:
            for p in later_params:
                p.requires_grad_(True)
        optimizer.load_state_dict(resume_checkpoint["optimizer"])
        scheduler.load_state_dict(resume_checkpoint["scheduler"])
        if scaler is not None and resume_checkpoint.get("scaler"):
            scaler.load_state_dict(resume_checkpoint["scaler"])
        restore_rng(resume_checkpoint)
        rows = [r for r in rows if int(r["epoch"]) <= state.epoch]

    cache = None
    if cfg.train.cache_features:
        plan, why_not = feature_cache.plan_cache(cfg)
        if plan is None:
            log.warning("train.cache_features: not used, training on images: %s", why_not)
        elif state.epoch < cfg.train.epochs:
            cache = feature_cache.build_feature_cache(
                model, dataset, cfg, plan, device, progress, amp_dtype=amp_dtype
            )
            cache.groups = dataset.groups

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard")) if main else None
    flags = StopFlags(deadline=compute_deadline(cfg, start_time))
    if flags.deadline is not None:
        log.info(
            "time budget: stopping by %s",
            dt.datetime.fromtimestamp(flags.deadline).strftime("%Y-%m-%d %H:%M"),
        )
    previous_handlers = _install_signal_handlers(flags)
    stop_reason = "completed"
    images_seen = 0
    last_eval_seconds = 0.0
    try:
        while state.epoch < total_epochs:
            if state.epoch >= cfg.train.epochs and later_params and not state.unfrozen:
                for p in later_params:
                    p.requires_grad_(True)
                state.unfrozen = True
                log.info(
                    "unfreeze phase: %d backbone tensors + FPN now train at lr x %g",
                    len(later_params),
                    cfg.train.unfreeze.lr_scale,
                )
            epoch_start = time.time()
            if cache is not None and state.unfrozen:
                log.info(
                    "unfreeze phase: the backbone trains, so the feature cache is left for images"
                )
                cache = None
            data = cache if cache is not None else dataset  # cached views, or images
            data.epoch = state.epoch
            losses, seen, stopped = train_one_epoch(
                model,
                optimizer,
                scheduler,
                scaler,
                data,
                cfg,
                state,
                device,
                flags,
                last_eval_seconds,
                progress,
                writer,
                amp_dtype=amp_dtype,
            )
            losses, seen = distributed.reduce_epoch(losses, seen, device)
            rank_rng = distributed.gather_object(rng_state())
            images_seen += seen
            epoch_seconds = time.time() - epoch_start
            if stopped:
                stop_reason = stopped
                # Save where we are: a resume continues from this very batch.
                if main:
                    save_checkpoint(
                        run_dir / "last.pt",
                        _checkpoint(
                            model,
                            cfg,
                            train_set,
                            state,
                            optimizer,
                            scheduler,
                            scaler,
                            info=info,
                            rank_rng=rank_rng,
                        ),
                    )
                    if not (run_dir / "best.pt").is_file():
                        # Stopped inside the first epoch: the current model is the best there is.
                        save_checkpoint(
                            run_dir / "best.pt",
                            _checkpoint(model, cfg, train_set, state, info=info),
                        )
                distributed.barrier()
                log.info(
                    "%s: checkpoint saved at epoch %d batch %d",
                    stopped,
                    state.epoch + 1,
                    state.iteration,
                )
                break
            state.epoch += 1
            state.iteration = 0
            metrics = None
            final_epoch = state.epoch == total_epochs
            if not main:  # rank 0 evaluates and writes; the others wait, then take its state
                distributed.barrier()
                state.__dict__.update(distributed.broadcast_object(None))
            elif val_set is not None and (state.epoch % cfg.eval.every == 0 or final_epoch):
                eval_start = time.time()
                metrics = evaluate(
                    model,
                    val_set,
                    device,
                    batch_size=cfg.train.batch_size,
                    grid_images=0,
                    num_workers=0,
                )
                last_eval_seconds = time.time() - eval_start
                log.info("epoch %d val: %s", state.epoch, format_metrics(metrics).splitlines()[0])
                for key, value in metrics.as_row().items():
                    writer.add_scalar(f"val/{key}", value, state.epoch)
                if metrics.map > state.best_map:
                    state.best_map, state.best_epoch, state.evals_since_best = (
                        metrics.map,
                        state.epoch,
                        0,
                    )
                    save_checkpoint(
                        run_dir / "best.pt",
                        _checkpoint(model, cfg, train_set, state, metrics=metrics, info=info),
                    )
                else:
                    state.evals_since_best += 1
            elif val_set is None:
                state.best_epoch = state.epoch  # no val set: the latest model is the best we know
                save_checkpoint(
                    run_dir / "best.pt", _checkpoint(model, cfg, train_set, state, info=info)
                )
            row = {
                "epoch": state.epoch,
                "phase": "unfreeze" if state.unfrozen else "frozen",
                "lr": optimizer.param_groups[0]["lr"],
                **{k: round(v, 5) for k, v in losses.items()},
                "epoch_seconds": round(epoch_seconds, 2),
                "images_per_s": round(seen / max(epoch_seconds, 1e-9), 3),
                **_peak_memory(device),
            }
            if metrics is not None:
                row.update({k: round(v, 5) for k, v in metrics.as_row().items()})
            rows.append(row)
            if main:  # before last.pt: a resume drops rows past its last.pt, never misses one
                write_metrics_csv(run_dir / "metrics.csv", rows)
            if main:
                save_checkpoint(
                    run_dir / "last.pt",
                    _checkpoint(
                        model,
                        cfg,
                        train_set,
                        state,
                        optimizer,
                        scheduler,
                        scaler,
                        metrics,
                        info,
                        rank_rng,
                    ),
                )
                distributed.barrier()
                distributed.broadcast_object(state.__dict__)
            if cfg.train.patience and state.evals_since_best >= cfg.train.patience:
                stop_reason = f"early stop: no val mAP gain in {cfg.train.patience} evaluations"
                log.info(stop_reason)
                break
    finally:
        _restore_signal_handlers(previous_handlers)
        if writer is not None:
            writer.close()

    final_metrics = None
    best_path = run_dir / "best.pt"
    if main and val_set is not None and best_path.is_file():
        # Plots and prediction grid of the model the user will deploy.
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        final_metrics = evaluate(
            model,
            val_set,
            device,
            out_dir=run_dir,
            batch_size=cfg.train.batch_size,
            grid_images=cfg.eval.grid_images,
            draw_score_threshold=cfg.eval.draw_score_threshold,
        )
        atomic_write_text(run_dir / "best_metrics.txt", format_metrics(final_metrics) + "\n")
    distributed.barrier()
    result = TrainResult(
        run_dir,
        state.best_map,
        state.best_epoch,
        state.epoch,
        stop_reason,
        final_metrics,
        time.time() - start_time,
        images_seen,
        **_peak_memory(device),
        rank=distributed.rank(),
        classes=branches.describe(model),
    )
    log.info("run finished: %s", result.stop_reason)
    if distributed.is_main():
        atomic_write_text(run_dir / "summary.txt", summary(result) + "\n")
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
    if result.final_metrics is not None:
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


def train_one_epoch(
    model,
    optimizer,
    scheduler,
    scaler,
    dataset: DetectionDataset | feature_cache.FeatureCache,
    cfg: Config,
    state: TrainState,
    device: torch.device,
    flags: StopFlags,
    reserve_seconds: float,
    progress: bool,
    writer,
    amp_dtype: torch.dtype | None = None,
) -> tuple[dict[str, float], int, str | None]:
    """One pass over the shuffled batches from ``state.iteration`` on (this rank's share).

    ``dataset`` gives images, or cached views of them (train.cache_features): then the batch's
    losses come from the RPN + RoI heads on the cached features, the rest is the same.
    Returns (mean losses, images seen, stop reason or None). Stops only at the start of an
    accumulation window, so a checkpoint never holds half-accumulated gradients.
    """
    set_train_mode(model, cfg, state.unfrozen)
    cached = isinstance(dataset, feature_cache.FeatureCache)
    batches = distributed.shard(
        epoch_batches(
            len(dataset), cfg.train.batch_size, cfg.train.seed, state.epoch, dataset.groups
        )
    )
    # A private generator keeps the DataLoader from drawing on the global RNG, which the
    # model's samplers use: a resumed run then draws exactly what an uninterrupted one would.
    workers = 0 if cached and dataset.where == "RAM" else cfg.data.num_workers
    loader = make_loader(dataset, batches[state.iteration :], cfg.train.batch_size, workers)
    loader.generator = torch.Generator()
    net = distributed.wrap(
        feature_cache.CachedHeads(model, dataset.padding) if cached else model, device
    )
    accumulate = cfg.train.accumulate
    sums: dict[str, float] = defaultdict(float)
    counted = seen = 0
    iteration_seconds = None
    bar = tqdm(
        total=len(batches),
        initial=state.iteration,
        disable=not progress,
        dynamic_ncols=True,
        desc=f"epoch {state.epoch + 1}/{cfg.train.epochs + cfg.train.unfreeze.epochs}",
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    tic = time.time()
    for images, targets in loader:
        index = state.iteration
        window_start = index % accumulate == 0
        window_end = (index + 1) % accumulate == 0 or index + 1 == len(batches)
        if window_start:
            reason = distributed.first_reason(
                _should_stop(flags, iteration_seconds, accumulate, reserve_seconds)
            )
            if reason:
                bar.close()
                return _means(sums, counted), seen, reason
        if not cached:  # cached views move their features to the device themselves
            images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with distributed.no_sync(net, not window_end):
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
            ):
                loss_dict = net(images, targets)
            loss = sum(loss_dict.values())
            nonfinite = distributed.any_true(not torch.isfinite(loss), device)
            if not nonfinite:
                if scaler is not None:
                    scaler.scale(loss / accumulate).backward()
                else:
                    (loss / accumulate).backward()
        if nonfinite:
            ids = [int(t["image_id"]) for t in targets]
            log.warning(
                "non-finite loss %s at epoch %d batch %d (image ids %s): batch skipped",
                {k: float(v.detach()) for k, v in loss_dict.items()},
                state.epoch + 1,
                index,
                ids,
            )
            _count_nonfinite(flags, cfg, ids)
            state.iteration += 1
            bar.update(1)
            continue
        if window_end:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.train.clip_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad_norm)
            else:
                grad_norm = _grad_norm(params)
            if scaler is None and not torch.isfinite(grad_norm):
                # A finite loss with a NaN/inf gradient would turn every weight into NaN, and
                # the epoch's checkpoints with them: skip the step (GradScaler does the same).
                ids = [int(t["image_id"]) for t in targets]
                log.warning(
                    "non-finite gradient (norm %s) at epoch %d batch %d (image ids %s): "
                    "optimizer step skipped",
                    float(grad_norm),
                    state.epoch + 1,
                    index,
                    ids,
                )
                optimizer.zero_grad(set_to_none=True)
                _count_nonfinite(flags, cfg, ids)
            else:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1
                flags.extra["nonfinite_streak"] = 0
        state.iteration += 1
        seen += len(images)
        for key, value in loss_dict.items():
            sums[key] += float(value.detach())
        sums["loss"] += float(loss.detach())
        counted += 1
        now = time.time()
        elapsed, tic = now - tic, now
        iteration_seconds = (
            elapsed if iteration_seconds is None else 0.9 * iteration_seconds + 0.1 * elapsed
        )
        bar.set_postfix(
            loss=f"{sums['loss'] / counted:.3f}",
            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
            img_s=f"{len(images) / max(elapsed, 1e-9):.1f}",
        )
        bar.update(1)
        if writer is not None and state.step % max(cfg.train.log_every, 1) == 0 and window_end:
            writer.add_scalar("train/loss", float(loss.detach()), state.step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state.step)
    bar.close()
    return _means(sums, counted), seen, None


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
