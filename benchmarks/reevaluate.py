"""Re-evaluate the checkpoints that benchmarks/frozen_training.py left in its work folders.

Each run of frozen_training.py trains in a fresh ``frozen_bench_*`` folder under the temp dir and
keeps our methods' final weights there (``runs-<arch>-<method>/run/last.pt``; the plain loop's
weights are not saved). This scores them again with the current ``detector.evaluate``, e.g. after
a change to evaluation, without training again:

    python benchmarks/reevaluate.py /tmp/raccoon --val-images 40 --min-size 320 --epochs 6 \\
        --out benchmarks/results/frozen_training_cpu_raccoon_reevaluated.json

Only finished runs that match the given data size, resize and epochs are scored. ``trained_at`` tells
runs of different code apart (the benchmark's JSON files name the change of each session).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

import torch
import yaml

from detector.data import load_coco
from detector.evaluate import evaluate
from detector.fileio import atomic_write_text
from detector.model import load_model


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "data", type=Path, help="the folder the benchmark ran on (its images/ are read)"
    )
    parser.add_argument("--work-root", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--val-images", type=int, required=True)
    parser.add_argument("--min-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rows = []
    for checkpoint in sorted(args.work_root.glob("frozen_bench_*/runs-*/run/last.pt")):
        run = checkpoint.parent
        work = run.parent.parent
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        val_json = work / "val.json"
        if (
            not val_json.is_file()
            or len(json.loads(val_json.read_text())["images"]) != args.val_images
            or cfg["model"]["min_size"] != args.min_size
            or cfg["train"]["epochs"] != args.epochs
        ):
            continue
        model, saved = load_model(checkpoint)
        if saved["state"]["epoch"] < args.epochs:  # a run stopped early (or still running)
            continue
        val = load_coco(val_json, args.data / "images", class_names=saved["class_names"])
        metrics = evaluate(model, val, torch.device("cpu"), grid_images=0)
        rows.append(
            {
                "method": run.parent.name.removeprefix("runs-").split("-", 1)[
                    1
                ],  # runs-<arch>-<method>
                "seed": cfg["train"]["seed"],
                "batch_size": cfg["train"]["batch_size"],
                "aspect_ratio_groups": cfg["data"].get("aspect_ratio_groups", 0),
                "trained_at": dt.datetime.fromtimestamp(checkpoint.stat().st_mtime).isoformat(
                    timespec="minutes"
                ),
                "val_mAP": round(metrics.map, 4),
                "val_AP50": round(metrics.ap50, 4),
                "checkpoint": str(checkpoint),
            }
        )
        print(rows[-1], flush=True)
    report = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "evaluation": "detector.evaluate (same-size batches)",
        "results": sorted(
            rows, key=lambda r: (r["method"], r["batch_size"], r["aspect_ratio_groups"], r["seed"])
        ),
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"{len(rows)} checkpoints scored: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
