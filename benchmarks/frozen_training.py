"""Frozen-backbone training speed: a plain torchvision loop vs our loop vs our cached-feature path.

Run by hand (CPU is fine; small by default):

    python tools/convert.py /work/shared/datasets/deer-automl --out /tmp/deer
    python tools/split.py /tmp/deer/annotations.json
    nice -n 5 python benchmarks/frozen_training.py /tmp/deer --out benchmarks/results/frozen_training_cpu.json

Same data (the first --train-images / --val-images of train.json / val.json), the same start
weights (one random-init state_dict per architecture, saved once and loaded by every method:
COCO weights are not available offline), the same epochs, batch size, optimizer (SGD, constant
lr, no clipping) and augmentation (horizontal flip 0.5, as the torchvision tutorial), RPN/RoI
sampling at torchvision's defaults (--box-batch-size changes the RoIs per image for every method). Methods, each in its own process (peak RAM is its own):

  plain    the torchvision tutorial loop: model from the torchvision builder, requires_grad False
           on the backbone (and eval mode: frozen BN statistics), Dataset + DataLoader, SGD
  ours     detector.train.train, normal loop
  cached   detector.train.train with train.cache_features=true (FPN features cached; RPN + RoI heads train)
  plain-frozen-rpn / cached-frozen-rpn
           the same with the RPN frozen too (cached: proposals cached, only the RoI heads run)
  <ours method>-bf16
           the same with train.amp_cpu (bfloat16 autocast on a CPU with AVX512-BF16/AMX); the
           plain loop stays float32, as the tutorial writes it

Start weights: by default one random-init model per architecture (COCO weights are not
available offline, so val mAP stays near 0 and cannot show "equal mAP"). With --start CKPT,
every method starts from that pipeline checkpoint (a team's earlier detector: its arch, its
trained backbone + FPN) with one seeded new box predictor for this data's classes (re-initialised
when it already has them), so val mAP is meaningful. For an arch torchvision has no builder for (MobileNetV2-FPN) the plain loop gets
the torchvision FasterRCNN from detector.model.model_from_checkpoint, so its frozen BatchNorm is
our fused one: that plain baseline is a little faster than a user's would be.

images/s is steady state (epochs after the first; the first carries one-time start-up costs);
wall time is the whole training (cached: building the cache included), evaluation excluded.
val mAP: detector.evaluate.evaluate of the final weights on the val subset, for every method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARCHS = {
    "fasterrcnn_resnet50_fpn": "resnet50",
    "fasterrcnn_mobilenet_v3_large_fpn": "mobilenet_v3",
    "fasterrcnn_mobilenet_v2_fpn": "mobilenet_v2",  # ours, for --start with an ImageNet-MobileNetV2 detector
}
METHODS = (
    "plain",
    "ours",
    "cached",
    "plain-frozen-rpn",
    "cached-frozen-rpn",
    "ours-bf16",
    "cached-bf16",
    "cached-frozen-rpn-bf16",
)


def subset(src: Path, out: Path, count: int) -> Path:
    data = json.loads(src.read_text())
    images = sorted(data["images"], key=lambda i: i["id"])[:count]
    ids = {i["id"] for i in images}
    data = {
        **data,
        "images": images,
        "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
    }
    out.write_text(json.dumps(data))
    return out


@torch.no_grad()
def start_weights(arch: str, train_json: Path, image_dir: Path, args, path: Path) -> None:
    """One random-init model per architecture, saved as a pipeline checkpoint (same start for all).

    Random init, but with the backbone's BatchNorm statistics calibrated on 8 training images
    (train-mode forward passes, cumulative averages) before they are frozen: with the default
    statistics (mean 0, var 1) a random ResNet-50 multiplies activations layer after layer and
    the very first losses are inf, which measures nothing.
    """
    from detector.config import ModelConfig
    from detector.data import DetectionDataset, load_coco
    from detector.model import build_model, frozen_batchnorm

    cset = load_coco(train_json, image_dir)
    torch.manual_seed(0)
    model, _ = build_model(
        ModelConfig(
            arch=arch,
            weights="none",
            min_size=args.min_size,
            max_size=args.max_size,
            freeze_backbone=False,
        ),
        cset.class_names,
    )
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.eval()
    model.backbone.train()
    dataset = DetectionDataset(cset)
    for i in range(0, 8, 2):
        images = [dataset[j][0] for j in range(i, min(i + 2, len(dataset)))]
        model.backbone(model.transform(images)[0].tensors)
    frozen_batchnorm(model.backbone)
    save_start(path, model, arch, cset)


def save_start(path: Path, model, arch: str, cset) -> None:
    """A start checkpoint every method loads: the model and its classes, no training state."""
    from detector.model import save_checkpoint

    checkpoint = {"model": model.state_dict(), "arch": arch, "class_names": cset.class_names}
    checkpoint.update(category_ids=cset.category_ids, config={}, state={})
    save_checkpoint(path, checkpoint)


def start_from_checkpoint(source: Path, train_json: Path, image_dir: Path, args, work: Path) -> str:
    """The earlier detector ``source`` with one seeded new box predictor for this data's classes,
    saved as ``work/<arch>-start.pt``; returns the arch."""
    from detector.config import ModelConfig
    from detector.data import load_coco
    from detector.model import build_model, load_checkpoint, replace_predictor

    cset = load_coco(train_json, image_dir)
    arch = load_checkpoint(source)["arch"]
    torch.manual_seed(0)
    model, info = build_model(
        ModelConfig(arch=arch, weights=str(source), min_size=args.min_size, max_size=args.max_size),
        cset.class_names,
    )
    if not info.predictor_replaced:  # the same classes: the predictor is learned again
        print(
            f"{source} already has this data's classes: its box predictor is re-initialised (seed 0)"
        )
        torch.manual_seed(0)
        replace_predictor(model, len(cset.class_names) + 1)
    save_start(work / f"{arch}-start.pt", model, arch, cset)
    return arch


# --------------------------------------------------------------------------------------------
# (a) the plain torchvision loop, as a user writes it from the tutorial
# --------------------------------------------------------------------------------------------


class PlainDataset(torch.utils.data.Dataset):
    def __init__(self, annotations: Path, image_dir: Path, train: bool):
        import torchvision.transforms.v2 as T

        data = json.loads(annotations.read_text())
        self.images = sorted(data["images"], key=lambda i: i["id"])
        self.label = {c["id"]: i + 1 for i, c in enumerate(data["categories"])}
        self.anns: dict[int, list] = {}
        for a in data["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        self.image_dir = image_dir
        self.transforms = T.Compose([T.RandomHorizontalFlip(0.5)] if train else [])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from torchvision import tv_tensors
        from torchvision.io import read_image

        info = self.images[i]
        image = read_image(str(self.image_dir / info["file_name"]))
        anns = [a for a in self.anns.get(info["id"], []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32
        ).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
            "labels": torch.tensor([self.label[a["category_id"]] for a in anns], dtype=torch.int64),
        }
        image, target = self.transforms(tv_tensors.Image(image), target)
        return image.float() / 255.0, target


def run_plain(arch: str, args, train_json: Path, start: Path, freeze_rpn: bool) -> dict:
    import torchvision

    from detector.model import load_checkpoint

    checkpoint = load_checkpoint(start)
    torch.manual_seed(args.seed)
    if hasattr(torchvision.models.detection, arch):
        builder = getattr(torchvision.models.detection, arch)
        model = builder(
            weights=None,
            weights_backbone=None,
            num_classes=len(checkpoint["class_names"]) + 1,
            min_size=args.min_size,
            max_size=args.max_size,
            box_batch_size_per_image=args.box_batch_size,
        )
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (
            missing,
            unexpected,
        )
    else:  # no torchvision builder (MobileNetV2-FPN): the same torchvision FasterRCNN, built by us
        from detector.model import model_from_checkpoint

        model = model_from_checkpoint(checkpoint)
        model.transform.min_size, model.transform.max_size = (args.min_size,), args.max_size
        model.roi_heads.fg_bg_sampler.batch_size_per_image = args.box_batch_size
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    if freeze_rpn:
        for p in model.rpn.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    dataset = PlainDataset(train_json, args.data / "images", train=True)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=lambda b: tuple(zip(*b, strict=True)),
    )
    device = torch.device(args.device)
    model.to(device)
    # --amp on CUDA: the tutorial's torch.autocast (bfloat16, no loss scaling), as ours does.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    epoch_seconds = []
    for _ in range(args.epochs):
        model.train()
        model.backbone.eval()  # frozen BN statistics (FrozenBatchNorm with COCO weights does the same)
        tic = time.perf_counter()
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with autocast:
                loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - tic)
    return {"model": model, "epoch_seconds": epoch_seconds, "build_seconds": 0.0}


# --------------------------------------------------------------------------------------------
# (b) / (c) our engine
# --------------------------------------------------------------------------------------------


def run_ours(
    arch: str,
    args,
    train_json: Path,
    start: Path,
    cache: bool,
    freeze_rpn: bool,
    bf16: bool,
    out: Path,
) -> dict:
    from detector import feature_cache
    from detector import train as train_mod
    from detector.config import config_from_dict
    from detector.model import load_model
    from detector.run_folder import read_metrics_csv

    timings = {"build_seconds": 0.0}
    real_build = feature_cache.build_feature_cache

    def timed_build(*a, **k):
        tic = time.perf_counter()
        result = real_build(*a, **k)
        timings["build_seconds"] = time.perf_counter() - tic
        return result

    feature_cache.build_feature_cache = timed_build
    cfg = config_from_dict(
        {
            "data": {
                "train_annotations": str(train_json),
                "train_images": str(args.data / "images"),
                "num_workers": args.workers,
                "preflight": False,
                "aspect_ratio_groups": args.aspect_ratio_groups,
            },
            "model": {
                "arch": arch,
                "weights": str(start),
                "min_size": args.min_size,
                "max_size": args.max_size,
                "freeze_rpn": freeze_rpn,
                "box_batch_size_per_image": args.box_batch_size,
            },
            "augment": {"hflip": 0.5, "brightness_contrast": 0.0},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "weight_decay": args.weight_decay,
                "scheduler": "step",
                "milestones": [10_000],
                "warmup_iters": 0,
                "clip_grad_norm": 0.0,
                "seed": args.seed,
                "device": args.device,
                "amp": args.amp or bf16,  # amp_cpu needs amp on
                "cache_features": cache,
                "amp_cpu": bf16,
                "out_dir": str(out),
                "name": "run",
            },
            "eval": {"grid_images": 0},
        }
    )
    result = train_mod.train(cfg, progress=False)
    rows = read_metrics_csv(result.run_dir / "metrics.csv")
    model, _ = load_model(result.run_dir / "last.pt")
    return {"model": model, "epoch_seconds": [float(r["epoch_seconds"]) for r in rows], **timings}


def one(args) -> None:
    """Child process: one method on one architecture; prints a JSON line."""
    from detector.data import load_coco
    from detector.evaluate import evaluate

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    work = args.work
    train_json, val_json = work / "train.json", work / "val.json"
    start = work / f"{args.arch}-start.pt"
    bf16 = args.method.endswith("-bf16")
    freeze_rpn = args.method.removesuffix("-bf16").endswith("frozen-rpn")
    if args.method.startswith("plain"):
        run = run_plain(args.arch, args, train_json, start, freeze_rpn)
    else:
        run = run_ours(
            args.arch,
            args,
            train_json,
            start,
            args.method.startswith("cached"),
            freeze_rpn,
            bf16,
            work / f"runs-{args.arch}-{args.method}",
        )
    train_set = load_coco(train_json, args.data / "images")
    val = load_coco(val_json, args.data / "images", class_names=train_set.class_names)
    device = torch.device(args.device)
    metrics = evaluate(run["model"].to(device).eval(), val, device, grid_images=0)
    epochs = run["epoch_seconds"]
    steady = epochs[1:] or epochs
    n = len(train_set.image_ids)
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "arch": args.arch,
                "method": args.method,
                "images_per_s": n * len(steady) / sum(steady),
                "wall_seconds": sum(epochs) + run["build_seconds"],
                "cache_build_seconds": run["build_seconds"],
                "epoch_seconds": [round(s, 2) for s in epochs],
                "val_mAP": metrics.map,
                "val_AP50": metrics.ap50,
                "peak_ram_mb": peak / 1024,
            }
        ),
        flush=True,
    )


def table(results: list[dict]) -> str:
    lines = [
        "| arch | method | images/s (steady) | speed-up vs plain | wall s (train) | cache build s | val mAP | val AP50 | peak RAM MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = next(
            (
                b
                for b in results
                if b["arch"] == r["arch"]
                and b["method"] == ("plain-frozen-rpn" if "frozen-rpn" in r["method"] else "plain")
            ),
            None,
        )
        speed = r["images_per_s"] / base["images_per_s"] if base else float("nan")
        lines.append(
            f"| {ARCHS.get(r['arch'], r['arch'])} | {r['method']} | {r['images_per_s']:.2f} | {speed:.2f}x | "
            f"{r['wall_seconds']:.0f} | {r['cache_build_seconds']:.0f} | {r['val_mAP']:.4f} | "
            f"{r['val_AP50']:.4f} | {r['peak_ram_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "data", type=Path, help="folder with train.json, val.json, images/ (convert + split)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/frozen_training_cpu.json")
    )
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--val-images", type=int, default=20)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of every method (data order, sampling); start weights stay seed 0",
    )
    parser.add_argument(
        "--aspect-ratio-groups",
        type=int,
        default=0,
        help="data.aspect_ratio_groups of our methods (the plain loop shuffles freely)",
    )
    parser.add_argument(
        "--box-batch-size",
        type=int,
        default=512,
        help="RoIs sampled per image for the box head, every method (torchvision: 512)",
    )
    parser.add_argument("--archs", nargs="+", default=list(ARCHS)[:2], choices=list(ARCHS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS)[:5], choices=list(METHODS))
    parser.add_argument(
        "--start",
        type=Path,
        help="pipeline checkpoint every method starts from (its arch; --archs is ignored)",
    )
    parser.add_argument(
        "--notes", default="", help="free text stored with the results (load, contention)"
    )
    parser.add_argument("--device", default="cpu", help="torch device of every method (cpu, cuda)")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision (bfloat16 autocast) on CUDA, every method",
    )
    parser.add_argument("--one", dest="method", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        one(args)
        return 0

    work = Path(tempfile.mkdtemp(prefix="frozen_bench_"))
    train_json = subset(args.data / "train.json", work / "train.json", args.train_images)
    subset(args.data / "val.json", work / "val.json", args.val_images)
    results = []
    started = time.time()
    archs = args.archs
    if args.start:
        archs = [start_from_checkpoint(args.start, train_json, args.data / "images", args, work)]
    for arch in archs:
        if not args.start:
            start_weights(arch, train_json, args.data / "images", args, work / f"{arch}-start.pt")
        for method in args.methods:
            command = [
                sys.executable,
                __file__,
                str(args.data),
                "--one",
                method,
                "--arch",
                arch,
                "--work",
                str(work),
            ] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in (
                    "min_size",
                    "max_size",
                    "epochs",
                    "batch_size",
                    "lr",
                    "weight_decay",
                    "workers",
                    "box_batch_size",
                    "seed",
                    "aspect_ratio_groups",
                    "device",
                )
            ]
            if args.amp:
                command.append("--amp")
            proc = subprocess.run(command, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{arch} {method} failed")
            results.append(json.loads(line[len("RESULT ") :]))
            print(f"{arch} {method}: {results[-1]}", flush=True)
    report = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("method", "arch", "work")
        },
        "start_weights": (
            f"{args.start} with one new box predictor for this data's classes (torch.manual_seed(0)); shared by all methods"
            if args.start
            else "one random-init state_dict per architecture (torch.manual_seed(0)), backbone BatchNorm statistics calibrated on 8 training images then frozen; shared by all methods (COCO weights are not available offline)"
        ),
        "host": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "total_seconds": time.time() - started,
        "results": results,
        "table": table(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
