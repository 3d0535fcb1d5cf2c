#!/usr/bin/env python
"""Add deer to a raccoon + rabbit detector without changing what it detects (model.keep_classes).

Stages (each reads what the earlier ones wrote under runs/keep_classes/):

  prepare  raccoon-voc + the rabbit Roboflow export converted, merged with tools/merge.py and
           split 80/20 (seed 0); deer-automl converted and split 80/20 (seed 0);
  base     the earlier detector: fasterrcnn_mobilenet_v2_fpn on ImageNet MobileNetV2, FPN and
           the last 8 body blocks trainable, on raccoon + rabbit (configs/base-offline.yaml's
           settings on these two classes);
  add      from the base checkpoint, with the same budget and settings, at the same time
           (one torch thread each):
           keep  model.keep_classes=true (one model: raccoon, rabbit, Deer; Deer's own RPN);
           keep-shared  the same with model.freeze_rpn=true (Deer on the base's RPN);
           replace  today's path: the base's predictor replaced by a Deer one (trunk frozen);
           then the base classes' AP of the base and of both merged models on the base val
           set, the deer AP of every run on the deer val set, and a check that the merged
           models' raccoon/rabbit detections are bit-identical to the base's on every base val
           image;
  latency  CPU per frame (PyTorch eager) of a two-branch model vs its two one-branch models run
           one after the other (random weights): R50-FPN at 800 px, MobileNetV2-FPN at 320
           and 800 px;
  ort-latency  the same three cases in CPU ONNX Runtime (each model exported with
           detector.export), alone in a few minutes; results in keep_classes_ort_latency_cpu.json.

    python benchmarks/keep_classes.py prepare
    python benchmarks/keep_classes.py base --budget-min 30 --epochs 10
    python benchmarks/keep_classes.py add --budget-min 30 --epochs 4
    python benchmarks/keep_classes.py latency
    python benchmarks/keep_classes.py ort-latency --repeats 3 --threads 1

Results: benchmarks/results/keep_classes_cpu.json, updated after every stage.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detector.config import config_from_dict  # noqa: E402
from detector.fileio import atomic_write_text  # noqa: E402

log = logging.getLogger("keep_classes")

WORK = ROOT / "runs" / "keep_classes"
RESULTS = ROOT / "benchmarks" / "results" / "keep_classes_cpu.json"
SHARED = Path(os.environ.get("DETECTOR_SHARED", ROOT.parent / "shared"))
BACKBONE = SHARED / "weights" / "mobilenet_v2-b0353104.pth"


def _run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=env)


def prepare() -> None:
    """Both data sets, with the pipeline's own tools only."""
    data = SHARED / "datasets"
    src = WORK / "data" / "sources"
    base, deer = WORK / "data" / "base", WORK / "data" / "deer"
    _run("tools/convert.py", str(data / "raccoon-voc"), "--from", "voc", "--out",
         str(src / "raccoon"), "--overwrite")  # fmt: skip
    _run("tools/convert.py", str(data / "rabbit-roboflow-labelstudio/train/_annotations.coco.json"),
         "--from", "coco", "--out", str(src / "rabbit"), "--overwrite")  # fmt: skip
    _run("tools/merge.py", str(src / "raccoon/annotations.json"),
         str(src / "rabbit/annotations.json"), "--names", "raccoon", "rabbit", "--drop-empty",
         "--copy", "--out", str(base / "merged.json"), "--no-progress")  # fmt: skip
    _run("tools/split.py", str(base / "merged.json"), "--val", "0.2", "--seed", "0",
         "--no-progress")  # fmt: skip
    _run("tools/convert.py", str(data / "deer-automl"), "--from", "automl", "--out", str(deer),
         "--overwrite")  # fmt: skip
    _run("tools/split.py", str(deer / "annotations.json"), "--val", "0.2", "--seed", "0",
         "--no-progress")  # fmt: skip


def common_settings(budget_min: float, name: str) -> dict[str, Any]:
    """configs/base-offline.yaml's settings (320 px, batch 4, SGD 0.02, cosine)."""
    return {
        "data": {"num_workers": 1},
        "model": {
            "arch": "fasterrcnn_mobilenet_v2_fpn",
            "min_size": 320,
            "max_size": 512,
            "box_batch_size_per_image": 128,
            "rpn_post_nms_top_n_test": 300,
        },
        "augment": {"hflip": 0.5, "scale": 0.0, "brightness_contrast": 0.3},
        "train": {
            "batch_size": 4,
            "lr": 0.02,
            "warmup_iters": 50,
            "max_hours": budget_min / 60.0,
            "out_dir": str(WORK / "runs"),
            "name": name,
        },
        "eval": {"grid_images": 4},
    }


def _merge(into: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    for key, value in updates.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value
    return into


def load_results() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_results(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(results, indent=2) + "\n")


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "when_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def run_base(budget_min: float, epochs: int) -> None:
    from detector.train import train

    values = _merge(
        common_settings(budget_min, "base"),
        {
            "data": {
                "train_annotations": str(WORK / "data/base/train.json"),
                "val_annotations": str(WORK / "data/base/val.json"),
            },
            "model": {"weights": "none", "weights_backbone": str(BACKBONE)},
            "train": {
                "epochs": 0,
                "unfreeze": {"epochs": epochs, "backbone_blocks": 8, "lr_scale": 1.0},
            },
        },
    )
    before = machine()
    result = train(config_from_dict(values), progress=False)
    results = load_results()
    results["base"] = {
        "run": str(result.run_dir.relative_to(ROOT)),
        "classes": ["raccoon", "rabbit"],
        "budget_min": budget_min,
        "planned_epochs": epochs,
        "epochs_done": result.epochs_done,
        "stop_reason": result.stop_reason,
        "wall_min": round(result.seconds / 60, 2),
        "val": result.final_metrics.as_row() if result.final_metrics else None,
        "per_class_ap": result.final_metrics.per_class_ap if result.final_metrics else None,
        "machine_before": before,
        "machine_after": machine(),
    }
    save_results(results)


def run_deer(variant: str, budget_min: float, epochs: int) -> None:
    """One deer run from the base: ``keep`` (model.keep_classes), ``keep-shared`` (and
    model.freeze_rpn) or ``replace`` (today's path).

    No val set in the run: all are evaluated afterwards by ``add``, on the same sets.
    """
    import torch

    from detector.train import train

    torch.set_num_threads(1)  # the runs share the machine evenly

    values = _merge(
        common_settings(budget_min, f"deer-{variant}"),
        {
            "data": {"train_annotations": str(WORK / "data/deer/train.json")},
            "model": {
                "weights": str(WORK / "runs/base/best.pt"),
                "freeze_backbone": True,
                "keep_classes": variant.startswith("keep"),
                "freeze_rpn": variant == "keep-shared",
            },
            "train": {"epochs": epochs},
        },
    )
    result = train(config_from_dict(values), progress=False)
    print(json.dumps({"run": str(result.run_dir), "images_seen": result.images_seen,
                      "epochs_done": result.epochs_done, "stop_reason": result.stop_reason,
                      "wall_min": round(result.seconds / 60, 2)}))  # fmt: skip


def _score(model, val_json: Path, class_names: list[str]) -> tuple[dict[str, Any], list]:
    import torch

    from detector.data import load_coco
    from detector.evaluate import coco_metrics, predict

    cset = load_coco(val_json, class_names=class_names)
    results = predict(model, cset, torch.device("cpu"), batch_size=4, progress=False)
    metrics, _ = coco_metrics(cset, results)
    row = {**metrics.as_row(), "per_class_ap": metrics.per_class_ap,
           "per_class_ap50": metrics.per_class_ap50, "absent": metrics.absent_classes}  # fmt: skip
    return row, results


DEER_VARIANTS = ("keep", "keep-shared", "replace")


def run_add(budget_min: float, epochs: int) -> None:
    """The deer runs at once (same budget, same machine load), then every score."""
    from detector.model import load_checkpoint, load_model

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = machine()
    jobs = {
        variant: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "deer",
                "--variant",
                variant,
                "--budget-min",
                str(budget_min),
                "--epochs",
                str(epochs),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for variant in DEER_VARIANTS
    }
    runs = {}
    for variant, job in jobs.items():
        out, _ = job.communicate()
        if job.returncode != 0:
            raise SystemExit(f"deer-{variant} failed (exit {job.returncode})")
        runs[variant] = json.loads(out.strip().splitlines()[-1])
    after_training = machine()
    base_path = WORK / "runs/base/best.pt"
    base, base_ckpt = load_model(base_path)
    base_val, deer_val = WORK / "data/base/val.json", WORK / "data/deer/val.json"
    base_before, base_results = _score(base, base_val, base_ckpt["class_names"])
    earlier_ids = set(base_ckpt["category_ids"])
    scores: dict[str, Any] = {}
    for variant in DEER_VARIANTS:
        model, ckpt = load_model(Path(runs[variant]["run"]) / "best.pt")
        names = ckpt["class_names"]
        scores[f"deer_{variant}"], _ = _score(model, deer_val, names)
        if variant.startswith("keep"):
            after, results_after = _score(model, base_val, names)
            earlier = [r for r in results_after if r["category_id"] in earlier_ids]
            scores[f"base_classes_after_{variant}"] = after
            scores[f"base_detections_bit_identical_{variant}"] = earlier == base_results
    base_state = load_checkpoint(WORK / "runs/base/last.pt")["state"]
    results = load_results()
    results["base"] = {
        **results.get("base", {}),
        "run": str(base_path.parent.relative_to(ROOT)),
        "stopped_at": {"epoch": base_state["epoch"] + 1, "batch": base_state["iteration"]},
    }
    results["add"] = {
        "budget_min_each": budget_min,
        "planned_epochs": epochs,
        "runs_in_parallel": len(DEER_VARIANTS),
        "torch_threads_each": 1,
        **runs,
        "base_classes_before": base_before,
        "base_detections_compared": len(base_results),
        **scores,
        "machine_before": before,
        "machine_after_training": after_training,
        "machine_after": machine(),
    }
    save_results(results)
    print(json.dumps(results["add"], indent=2))


LATENCY_CASES = [  # (arch, min_size, max_size, test-time proposals per image after NMS)
    ("fasterrcnn_resnet50_fpn", 800, 1333, 1000),
    ("fasterrcnn_mobilenet_v2_fpn", 320, 512, 300),
    ("fasterrcnn_mobilenet_v2_fpn", 800, 1333, 300),
]


def _latency_models(arch: str, min_size: int, max_size: int, proposals: int):
    """Two one-branch models on one random trunk (2 and 1 classes) and their merged model."""
    import torch

    from detector.branches import Branch, BranchRecord, MultiBranchFasterRCNN, from_plain
    from detector.config import ModelConfig
    from detector.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, weights="none", min_size=min_size, max_size=max_size,
                      rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals)  # fmt: skip
    first, _ = build_model(cfg, ["raccoon", "rabbit"])
    second, _ = build_model(cfg, ["Deer"])
    second.backbone = first.backbone  # one trunk, as keep_classes and merge require
    merged = from_plain(first, BranchRecord(["raccoon", "rabbit"], None, "random"))
    merged = MultiBranchFasterRCNN(
        merged.transform, merged.backbone,
        [*merged.branches, Branch(second.rpn, second.roi_heads)],
        [*merged.records, BranchRecord(["Deer"], None, "random", trained=True)],
    )  # fmt: skip
    return first.eval(), second.eval(), merged.eval()


def _timed_row(runs: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Median wall and process CPU ms of each run (one warm-up, then ``repeats`` interleaved
    rounds), and the merged models' cost over the sum of the two one-branch models."""
    import statistics

    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            tic, cpu_tic = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - tic)
            cpu[name].append(time.process_time() - cpu_tic)
    ms = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
    cpu_ms = {k: round(1000 * statistics.median(v), 1) for k, v in cpu.items()}
    row: dict[str, Any] = {"ms": ms, "cpu_ms": cpu_ms, "repeats": repeats}
    for key in ("merged", "merged_shared_rpn"):
        row[f"{key}_over_sum"] = round(ms[key] / (ms["first"] + ms["second"]), 3)
        row[f"cpu_{key}_over_sum"] = round(cpu_ms[key] / (cpu_ms["first"] + cpu_ms["second"]), 3)
    return row


def run_latency(repeats: int, threads: int) -> None:
    """PyTorch eager, CPU, one 600x800 frame, median of ``repeats`` interleaved runs: wall time
    and this process's CPU time (on a loaded machine the CPU time is the steadier measure of
    the work a frame needs; with one thread it is that work)."""

    import torch

    torch.set_num_threads(threads)
    before, rows = machine(), []
    for arch, min_size, max_size, proposals in LATENCY_CASES:
        first, second, merged = _latency_models(arch, min_size, max_size, proposals)
        models = {"first": first, "second": second, "merged": merged,
                  "merged_shared_rpn": _shared_rpn(merged)}  # fmt: skip
        frame = [torch.rand(3, 600, 800)]
        with torch.inference_mode():
            runs = {name: functools.partial(model, frame) for name, model in models.items()}
            row = {"arch": arch, "min_size": min_size, "max_size": max_size,
                   "proposals": proposals, **_timed_row(runs, repeats)}  # fmt: skip
        log.info("latency %s", row)
        rows.append(row)
    results = load_results()
    results["latency"] = {
        "runtime": "PyTorch eager (CPU)",
        "torch_threads": torch.get_num_threads(),
        "frame": "600x800 RGB, random weights",
        "rows": rows,
        "machine_before": before,
        "machine_after": machine(),
    }
    save_results(results)


CLASS_NAMES = {
    "first": ["raccoon", "rabbit"],
    "second": ["Deer"],
    "merged": ["raccoon", "rabbit", "Deer"],
}
ORT_RESULTS = ROOT / "benchmarks" / "results" / "keep_classes_ort_latency_cpu.json"


def _shared_rpn(merged):
    """``merged`` with its second branch's RoI heads on the first branch's RPN, as
    model.keep_classes with model.freeze_rpn builds it: one RPN pass for both branches."""
    from dataclasses import replace

    from detector.branches import Branch, MultiBranchFasterRCNN

    first, second = merged.branches
    records = [merged.records[0], replace(merged.records[1], rpn_from=0)]
    return MultiBranchFasterRCNN(
        merged.transform, merged.backbone, [first, Branch(first.rpn, second.roi_heads)], records
    ).eval()


def _ort_session(onnx_path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_ort_latency(repeats: int, threads: int) -> None:
    """CPU ONNX Runtime, one 600x800 uint8 BGR frame, median of ``repeats`` interleaved runs of
    each exported graph (``detector.export.export_model``, batch 1, raw input, dynamic size, not
    simplified, no parity: random weights) of the two one-branch models and their merged model."""
    import tempfile

    import numpy as np

    from detector.export import export_model

    before, rows = machine(), []
    frame = np.random.default_rng(0).integers(0, 256, (1, 600, 800, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        for arch, min_size, max_size, proposals in LATENCY_CASES:
            first, second, merged = _latency_models(arch, min_size, max_size, proposals)
            models = {"first": first, "second": second, "merged": merged,
                      "merged_shared_rpn": _shared_rpn(merged)}  # fmt: skip
            sessions = {}
            for name, model in models.items():
                out = Path(tmp) / f"{name}.onnx"
                names = CLASS_NAMES.get(name, ["raccoon", "rabbit", "Deer"])
                export_model(model, out, class_names=list(names), parity=False,
                             simplify_graph=False)  # fmt: skip
                sessions[name] = _ort_session(out, threads)
            runs = {name: functools.partial(session.run, None, {"images": frame})
                    for name, session in sessions.items()}  # fmt: skip
            row = {"arch": arch, "min_size": min_size, "max_size": max_size,
                   "proposals": proposals, **_timed_row(runs, repeats)}  # fmt: skip
            log.info("ort latency %s", row)
            rows.append(row)
    ORT_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ORT_RESULTS, json.dumps({
        "runtime": "ONNX Runtime CPUExecutionProvider, ORT_ENABLE_ALL",
        "intra_op_threads": threads,
        "graph": "detector.export.export_model: batch 1, uint8 BGR input, dynamic size, "
                 "not simplified",
        "frame": "600x800 uint8 BGR, random weights",
        "rows": rows,
        "machine_before": before,
        "machine_after": machine(),
    }, indent=2) + "\n")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "stage", choices=["prepare", "base", "add", "deer", "latency", "ort-latency"]
    )
    parser.add_argument("--budget-min", type=float, default=10.0)
    parser.add_argument("--epochs", type=int, default=6, help="planned epochs of a training run")
    parser.add_argument("--variant", choices=DEER_VARIANTS, help="deer: which run")
    parser.add_argument("--repeats", type=int, default=5, help="latency: timed runs per model")
    parser.add_argument("--threads", type=int, default=1, help="latency: torch threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.stage == "prepare":
        prepare()
    elif args.stage == "base":
        run_base(args.budget_min, args.epochs)
    elif args.stage == "deer":
        run_deer(args.variant, args.budget_min, args.epochs)
    elif args.stage == "add":
        run_add(args.budget_min, args.epochs)
    elif args.stage == "latency":
        run_latency(args.repeats, args.threads)
    elif args.stage == "ort-latency":
        run_ort_latency(args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
