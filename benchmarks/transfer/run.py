#!/usr/bin/env python
"""Does a pretrained, frozen backbone give a good deer detector offline? (issue 7)

Trains, each under the same time budget and at the same image size, with the pipeline's own
``detector.train.train``:

  base  the "earlier detector": fasterrcnn_mobilenet_v2_fpn on ImageNet MobileNetV2, later
        stages trainable, on the base classes (configs/base-offline.yaml);
  a     random backbone: body frozen, FPN + heads trained (the trainable set of (b));
  b     ImageNet backbone: body frozen, FPN + heads trained;
  c     the base detector's checkpoint, backbone + FPN frozen, new Deer predictor;
  d     (c), then an unfreeze phase (last 5 body blocks + FPN at lr x 0.1).

Every deer run starts from configs/deer-offline.yaml; the per-configuration overrides are in
VARIANTS below and are written to the results. The epoch count of each run is planned from a
short timing probe so that its cosine schedule ends inside the budget; ``train.max_hours``
(the budget) stops it in any case, keeping its best model.

    bash benchmarks/transfer/prepare.sh
    python benchmarks/transfer/run.py --budget-min 60 --base-budget-min 60

Results go to benchmarks/transfer/results.json, rewritten after every run (partial results
survive an interruption); the runs themselves to runs/transfer/.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from detector.config import Config, load_config  # noqa: E402
from detector.data import (  # noqa: E402
    DetectionDataset,
    build_augmentation,
    data_sets,
    epoch_batches,
    load_coco,
    make_loader,
)
from detector.evaluate import Metrics, evaluate  # noqa: E402
from detector.fileio import atomic_write_text  # noqa: E402
from detector.model import build_model, load_checkpoint, load_model  # noqa: E402
from detector.train import build_optimizer, set_train_mode, train, unfreeze_candidates  # noqa: E402

log = logging.getLogger("transfer")

DEER_CONFIG = "configs/deer-offline.yaml"
BASE_CONFIG = "configs/base-offline.yaml"
RESULTS = "benchmarks/transfer/results.json"

# kind: "single" = one phase (epochs all trainable from the start), "frozen" = only the
# frozen phase, "two" = frozen phase then the unfreeze phase.
VARIANTS: dict[str, dict[str, Any]] = {
    "a": {
        "label": "random backbone, frozen (body frozen but features.18; FPN + heads train)",
        "kind": "single",
        "overrides": [
            "model.weights=none",
            "model.weights_backbone=none",
            "model.freeze_backbone=true",
            "train.unfreeze.backbone_blocks=1",
            "train.unfreeze.lr_scale=1.0",
        ],
    },
    "b": {
        "label": "ImageNet backbone, frozen (body frozen but features.18; FPN + heads train)",
        "kind": "single",
        "overrides": [
            "model.weights=none",
            "model.freeze_backbone=true",
            "train.unfreeze.backbone_blocks=1",
            "train.unfreeze.lr_scale=1.0",
        ],
        "backbone": True,
    },
    "c": {
        "label": "base detector, backbone + FPN frozen (RPN + RoI heads train)",
        "kind": "frozen",
        "overrides": ["model.freeze_backbone=true"],
        "base": True,
    },
    "d": {
        "label": "(c) + unfreeze phase (last 5 body blocks + FPN at lr x 0.1)",
        "kind": "two",
        "overrides": [
            "model.freeze_backbone=true",
            "train.unfreeze.backbone_blocks=5",
            "train.unfreeze.lr_scale=0.1",
        ],
        "base": True,
    },
}

UNFREEZE_SHARE = 0.35  # of the budget, for the unfreeze phase of (d)
SETUP_SECONDS = 20.0  # preflight + model build inside the budget, before the first batch


# --------------------------------------------------------------------------------------------
# Epoch planning
# --------------------------------------------------------------------------------------------


def probe(cfg: Config, unfrozen: bool, batches: int = 6, warmup: int = 2) -> dict[str, float]:
    """Seconds per training image (trainable set of the phase) and per evaluated image.

    Two warm-up batches, then six timed: with one and two, (b) was probed at 0.45 s per image
    and trained at 0.25, so its plan used half the budget. `--epochs` fixes the schedule.
    """
    torch.manual_seed(0)
    train_set, val_set = data_sets(cfg.data)
    model, _ = build_model(cfg.model, train_set.class_names)
    later = unfreeze_candidates(model, cfg)
    if unfrozen:
        for p in later:
            p.requires_grad_(True)
    optimizer = build_optimizer(cfg, model, later)
    dataset = DetectionDataset(train_set, build_augmentation(cfg.augment), seed=0)
    set_train_mode(model, cfg, unfrozen)
    order = epoch_batches(len(dataset), cfg.train.batch_size, 0, 0)[: batches + warmup]
    timed = images = 0.0
    for i, (imgs, targets) in enumerate(make_loader(dataset, order, cfg.train.batch_size, 0)):
        tic = time.perf_counter()
        loss = sum(model(imgs, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            timed += time.perf_counter() - tic
            images += len(imgs)
    model.eval()
    val = DetectionDataset(val_set)
    count = min(2 * cfg.train.batch_size, len(val))
    with torch.inference_mode():
        model([val[0][0]])
        tic = time.perf_counter()
        for start in range(0, count, cfg.train.batch_size):
            model([val[j][0] for j in range(start, min(start + cfg.train.batch_size, count))])
        eval_s = (time.perf_counter() - tic) / count
    return {
        "train_s_per_image": timed / max(images, 1),
        "eval_s_per_image": eval_s,
        "train_images": len(train_set.image_ids),
        "val_images": len(val_set.image_ids),
    }


def plan_epochs(
    budget_s: float, speed: dict[str, float], second: dict[str, float] | None, min_epochs: int = 1
) -> tuple[int, int]:
    """(phase-1 epochs, phase-2 epochs) whose training + per-epoch evaluation fit the budget."""
    n_train, n_val = speed["train_images"], speed["val_images"]
    eval_s = n_val * speed["eval_s_per_image"]
    available = 0.95 * budget_s - SETUP_SECONDS - eval_s  # the final evaluation of best.pt
    epoch1 = n_train * speed["train_s_per_image"] + eval_s + 2.0  # + checkpoints
    if second is None:
        return max(min_epochs, math.floor(available / epoch1)), 0
    epoch2 = n_train * second["train_s_per_image"] + eval_s + 2.0
    e2 = max(1, math.floor(UNFREEZE_SHARE * available / epoch2))
    e1 = max(1, math.floor((available - e2 * epoch2) / epoch1))
    return e1, e2


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def run_config(
    name: str,
    config_path: str,
    overrides: list[str],
    kind: str,
    budget_min: float,
    out_dir: str,
    epochs: tuple[int, int] | None,
) -> dict[str, Any]:
    common = [
        f"train.max_hours={budget_min / 60.0!r}",
        f"train.out_dir={out_dir}",
        f"train.name={name}",
    ]
    cfg = load_config(config_path, overrides + common)
    probe_start = time.time()
    speeds: dict[str, Any] = {}
    if epochs is None:
        # Probe the speed of each phase, then plan the epochs.
        if kind == "frozen":
            speeds["phase1"] = probe(cfg, unfrozen=False)
            e1, e2 = plan_epochs(budget_min * 60, speeds["phase1"], None)
        elif kind == "single":
            speeds["phase1"] = probe(
                load_config(
                    config_path, overrides + common + ["train.epochs=0", "train.unfreeze.epochs=1"]
                ),
                unfrozen=True,
            )
            e2, e1 = plan_epochs(budget_min * 60, speeds["phase1"], None)
        else:
            two = load_config(
                config_path, overrides + common + ["train.epochs=1", "train.unfreeze.epochs=1"]
            )
            speeds["phase1"] = probe(two, unfrozen=False)
            speeds["phase2"] = probe(two, unfrozen=True)
            e1, e2 = plan_epochs(budget_min * 60, speeds["phase1"], speeds["phase2"])
    else:
        e1, e2 = epochs
    probe_s = time.time() - probe_start
    final = overrides + common + [f"train.epochs={e1}", f"train.unfreeze.epochs={e2}"]
    cfg = load_config(config_path, final)
    log.info(
        "%s: %s epochs frozen + %s epochs unfrozen, budget %.1f min (probe %.0f s)",
        name,
        e1,
        e2,
        budget_min,
        probe_s,
    )
    result = train(cfg, progress=False)
    record = record_run(
        result.run_dir,
        result.final_metrics,
        result.stop_reason,
        result.epochs_done,
        result.best_epoch,
        result.seconds,
        result.images_seen,
    )
    return {
        "config": config_path,
        "overrides": final,
        "planned_epochs": {"frozen": e1, "unfreeze": e2},
        **record,
        "probe_s": round(probe_s, 1),
        "probe": speeds,
    }


def record_run(
    run_dir: Path,
    metrics: Metrics | None,
    stop_reason: str,
    epochs_done: int,
    best_epoch: int,
    seconds: float,
    images_seen: int,
) -> dict[str, Any]:
    """What a run reached. A run whose budget ended inside its first epoch has no best.pt: its
    last.pt (the model at the stop) is evaluated on the val set instead, after the budget."""
    evaluated, eval_s = "best.pt", None
    if metrics is None and (run_dir / "last.pt").is_file():
        tic = time.time()
        model, checkpoint = load_model(run_dir / "last.pt")
        val_set = load_coco(
            checkpoint["config"]["data"]["val_annotations"],
            checkpoint["config"]["data"]["val_images"],
            class_names=list(checkpoint["class_names"]),
        )
        metrics = evaluate(
            model, val_set, torch.device("cpu"), out_dir=run_dir / "last_eval", grid_images=8
        )
        evaluated, eval_s = (
            "last.pt (no epoch completed within the budget)",
            round(time.time() - tic, 1),
        )
    rows: list[dict[str, str]] = []
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    m = metrics
    return {
        "epochs_done": epochs_done,
        "stop_reason": stop_reason,
        "best_epoch": best_epoch,
        "evaluated": evaluated,
        "post_budget_eval_s": eval_s,
        "mAP": round(m.map, 4) if m else None,
        "AP50": round(m.ap50, 4) if m else None,
        "AP75": round(m.ap75, 4) if m else None,
        "AR100": round(m.ar100, 4) if m else None,
        "per_class_AP50": {k: round(v, 4) for k, v in m.per_class_ap50.items()} if m else None,
        "wall_s": round(seconds, 1),
        # training throughput: the epochs' own rows, else images seen over the wall time
        "train_images_per_s": round(
            sum(float(r["epoch_seconds"]) * float(r["images_per_s"]) for r in rows)
            / sum(float(r["epoch_seconds"]) for r in rows),
            3,
        )
        if rows
        else None,
        "overall_images_per_s": round(images_seen / max(seconds, 1e-9), 3),
        "images_seen": images_seen,
        "val_AP50_per_epoch": [round(float(r["AP50"]), 4) for r in rows if r.get("AP50")],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],  # other users of the CPUs
        "run_dir": str(run_dir),
        "checkpoint": str(run_dir / ("best.pt" if evaluated == "best.pt" else "last.pt")),
    }


_SUMMARY = re.compile(
    r"run (\S+): (.+?) after (\d+) epochs in ([\d.]+) min \(([\d.]+) images/s overall\)"
)


def record_finished_run(run_dir: Path) -> dict[str, Any]:
    """record_run for a run trained earlier (its train.log summary line gives time and images)."""
    found = _SUMMARY.findall((run_dir / "train.log").read_text(encoding="utf-8"))
    if not found:
        raise SystemExit(f"{run_dir}/train.log: no end-of-run summary line; did the run finish?")
    _, reason, epochs, minutes, rate = found[-1]
    seconds = float(minutes) * 60
    best = run_dir / "best.pt"
    metrics = None
    best_epoch = -1
    if best.is_file():
        checkpoint = load_checkpoint(best)
        best_epoch = int(checkpoint["state"]["best_epoch"])
        model, _ = load_model(best)
        val_set = load_coco(
            checkpoint["config"]["data"]["val_annotations"],
            checkpoint["config"]["data"]["val_images"],
            class_names=list(checkpoint["class_names"]),
        )
        metrics = evaluate(model, val_set, torch.device("cpu"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    return {
        "config_resolved": str(run_dir / "config.yaml"),
        "planned_epochs": {
            "frozen": config["train"]["epochs"],
            "unfreeze": config["train"]["unfreeze"]["epochs"],
        },
        **record_run(
            run_dir, metrics, reason, int(epochs), best_epoch, seconds, round(float(rate) * seconds)
        ),
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The README table from a results JSON."""
    meta = results["meta"]
    lines = [
        "| config | deer val mAP | AP50 | AP75 | AR100 | budget | wall | images seen | "
        "train img/s | evaluated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("base", results.get("base"), meta["base_budget_min"])]
    rows += [(k, v, meta["budget_min_per_config"]) for k, v in sorted(results["configs"].items())]
    for key, r, budget in rows:
        if not r or r.get("mAP") is None:
            lines.append(f"| {key} | not run | | | | {budget:g} min | | | | |")
            continue
        what = "base val (8 classes)" if key == "base" else r["label"]
        lines.append(
            f"| ({key}) {what} | {r['mAP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | "
            f"{r['AR100']:.3f} | {budget:g} min | {r['wall_s'] / 60:.1f} min | {r['images_seen']} "
            f"({r['epochs_done']} epoch{'' if r['epochs_done'] == 1 else 's'} done) | {r['overall_images_per_s']:.2f} | "
            f"{r.get('evaluated', 'best.pt').split(' ')[0]} |"
        )
    return "\n".join(lines)


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget-min",
        type=float,
        default=60.0,
        help="time budget of each deer configuration, minutes (train.max_hours)",
    )
    parser.add_argument(
        "--base-budget-min",
        type=float,
        default=60.0,
        help="time budget of the base detector, minutes",
    )
    parser.add_argument(
        "--base-checkpoint",
        default=None,
        help="use this base detector best.pt instead of training one",
    )
    parser.add_argument(
        "--only",
        default="a,b,c,d",
        help="deer configurations to run, comma-separated (default a,b,c,d)",
    )
    parser.add_argument("--min-size", type=int, default=320, help="model.min_size of every run")
    parser.add_argument("--max-size", type=int, default=512, help="model.max_size of every run")
    parser.add_argument(
        "--epochs",
        default=None,
        help="fixed 'FROZEN,UNFREEZE' epochs instead of planning from the probe",
    )
    parser.add_argument("--out-dir", default="runs/transfer", help="train.out_dir of the runs")
    parser.add_argument(
        "--results", default=RESULTS, help="results JSON (rewritten after each run)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="train.device")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the base and configurations already in --results",
    )
    parser.add_argument(
        "--from-run",
        action="append",
        default=[],
        metavar="KEY=RUN_DIR",
        help="record configuration KEY from a run trained earlier, no training",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the results JSON as the README's markdown table and exit",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads((ROOT / args.results).read_text(encoding="utf-8"))))
        return 0

    os.chdir(ROOT)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    for needed in ("datasets/deer/train.json", "datasets/deer/val.json"):
        if not Path(needed).is_file():
            parser.error(f"{needed} not found: run bash benchmarks/transfer/prepare.sh first")
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown configuration(s) {unknown}; choose from {list(VARIANTS)}")
    fixed = tuple(int(v) for v in args.epochs.split(",")) if args.epochs else None
    size = [
        f"model.min_size={args.min_size}",
        f"model.max_size={args.max_size}",
        f"train.device={args.device}",
    ]

    results_path = Path(args.results)
    results: dict[str, Any] = {
        "meta": {
            "command": " ".join(
                [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]
            ),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "budget_min_per_config": args.budget_min,
            "base_budget_min": args.base_budget_min,
            "min_size": args.min_size,
            "max_size": args.max_size,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.platform(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "device": args.device,
            "deer_config": DEER_CONFIG,
            "base_config": BASE_CONFIG,
        },
        "base": None,
        "configs": {},
    }
    if args.append and results_path.is_file():
        previous = json.loads(results_path.read_text(encoding="utf-8"))
        results["base"] = previous.get("base")
        results["configs"] = previous.get("configs", {})
        results["meta"]["earlier_commands"] = [
            *previous["meta"].get("earlier_commands", []),
            previous["meta"]["command"],
        ]
    for item in args.from_run:
        key, _, run_dir = item.partition("=")
        if key not in VARIANTS or not run_dir:
            parser.error(f"--from-run {item!r}: expected KEY=RUN_DIR with KEY in {list(VARIANTS)}")
        results["configs"][key] = {
            "label": VARIANTS[key]["label"],
            **record_finished_run(Path(run_dir)),
        }
        keys = [k for k in keys if k != key]
    write_results(results_path, results)

    base_checkpoint = args.base_checkpoint
    if base_checkpoint is None and any(VARIANTS[k].get("base") for k in keys):
        for needed in ("runs/transfer/data/base/train.json", "runs/transfer/data/base/val.json"):
            if not Path(needed).is_file():
                parser.error(f"{needed} not found: run bash benchmarks/transfer/prepare.sh first")
        log.info("== base detector (%s), budget %.1f min", BASE_CONFIG, args.base_budget_min)
        base = run_config(
            "base",
            BASE_CONFIG,
            size,
            "single",
            args.base_budget_min,
            args.out_dir,
            (0, fixed[0] + fixed[1]) if fixed else None,
        )
        base["label"] = "base detector (person, vehicles, raccoon, rabbit)"
        results["base"] = base
        write_results(results_path, results)
        base_checkpoint = base["checkpoint"]
        if base["stop_reason"].startswith("stopped by"):
            return 1
    elif (
        base_checkpoint is not None
        and (results.get("base") or {}).get("checkpoint") != base_checkpoint
    ):
        results["base"] = {"checkpoint": base_checkpoint, "trained": False}

    for key in keys:
        variant = VARIANTS[key]
        overrides = list(size) + list(variant["overrides"])
        if variant.get("base"):
            overrides.append(f"model.weights={base_checkpoint}")
        log.info("== (%s) %s, budget %.1f min", key, variant["label"], args.budget_min)
        record = run_config(
            f"deer-{key}",
            DEER_CONFIG,
            overrides,
            variant["kind"],
            args.budget_min,
            args.out_dir,
            fixed,
        )
        results["configs"][key] = {"label": variant["label"], **record}
        write_results(results_path, results)
        if record["stop_reason"].startswith("stopped by"):
            log.warning("(%s) %s: benchmark ends here", key, record["stop_reason"])
            return 1
        log.info(
            "(%s) val mAP %.3f AP50 %.3f in %.1f min",
            key,
            record["mAP"] or 0,
            record["AP50"] or 0,
            record["wall_s"] / 60,
        )
    results["meta"]["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    write_results(results_path, results)
    print(
        json.dumps(
            {
                k: {"mAP": v.get("mAP"), "AP50": v.get("AP50"), "wall_s": v.get("wall_s")}
                for k, v in results["configs"].items()
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
