"""The GPU check behind ``benchmarks/gpu_check.sh`` (run that; it bounds the time).

Two steps, because the GPU machine has no internet and no ../shared:

* ``gpu_check.sh --prepare [--checkpoint CKPT]`` on the CPU machine writes
  ``benchmarks/gpu_bundle/``: a deer COCO subset (40 train / 20 val images) for the training
  speed, 10 deer frames for parity, and, with a checkpoint, ONNX variants (batch 1, batch 6,
  fp16) made by ``detector export``. Carry that folder (it is git-ignored) with the working tree.
* ``gpu_check.sh [OUT]`` on the GPU machine (default OUT: benchmarks/results/gpu/) runs what
  the machine can, installs nothing, and writes ``OUT/summary.json``: each section with
  ``status`` (ran / skipped / failed) and the reason. Sections: environment; eager fp32/fp16
  latency (torch on CUDA: R50-FPN at 800 px, mbv3-320; batch 1 and 6); frozen-training speed on
  CUDA (benchmarks/frozen_training.py: plain loop vs ours vs cached, AMP); TensorRT (where
  onnxruntime-gpu and TensorRT's libraries are present: each ONNX variant, fp16, engine build
  time, p50/p99 at 640x480, 1280x720, 1920x1080, parity with CPU on the 10 deer frames).

``--dry-run`` runs the same code on CPU at the smallest settings (the GPU parts are not
measured and say so): it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "benchmarks" / "gpu_bundle"
SIZES = ((640, 480), (1280, 720), (1920, 1080))
EAGER = (("fasterrcnn_resnet50_fpn", 800), ("fasterrcnn_mobilenet_v3_large_320_fpn", 320))
BUDGET_S = {"eager_latency": 100, "frozen_training": 170, "tensorrt": 160}


def section(name: str, status: str, reason: str, **data: Any) -> dict[str, Any]:
    print(f"gpu_check: {name}: {status}: {reason}", flush=True)
    return {"name": name, "status": status, "reason": reason, **data}


def torch_cuda() -> tuple[Any, str]:
    """(torch or None, why not usable on CUDA)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return torch, f"torch {torch.__version__} sees no CUDA device"
    return torch, ""


def environment() -> dict[str, Any]:
    torch, why = torch_cuda()
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    if torch is not None:
        info["torch"] = torch.__version__
        info["cuda"] = "" if why else torch.cuda.get_device_name(0)
    try:
        import onnxruntime as ort

        from detector.runtime import providers

        info["onnxruntime"] = f"{ort.__version__} {ort.get_available_providers()}"
        info["tensorrt_missing_library"] = providers.missing_library(providers.TENSORRT)
    except ImportError as e:
        info["onnxruntime"] = f"not importable: {e}"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(q, capture_output=True, text=True).stdout.strip()
    return section("environment", "ran", "what this machine holds", info=info)


def timed(fn: Any, iters: int, warmup: int, sync: Any = None) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1000)
    p50, p99 = np.percentile(times, [50, 99])
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2), "iters": iters}


def eager_latency(dry_run: bool) -> dict[str, Any]:
    torch, why = torch_cuda()
    if torch is None or (why and not dry_run):
        return section("eager_latency", "skipped", why)
    import torchvision

    device = "cpu" if dry_run else "cuda"
    plan = (
        [(EAGER[1][0], 320, 1, "fp32")]
        if dry_run
        else [
            (arch, size, batch, precision)
            for arch, size in EAGER
            for batch in (1, 6)
            for precision in ("fp32", "fp16")
        ]
    )
    rows = []
    deadline = time.monotonic() + BUDGET_S["eager_latency"]
    for arch, size, batch, precision in plan:
        if time.monotonic() > deadline:
            rows.append({"arch": arch, "batch": batch, "precision": precision, "skipped": "budget"})
            continue
        builder = getattr(torchvision.models.detection, arch)
        model = builder(weights=None, weights_backbone=None).to(device).eval()
        images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
        autocast = torch.autocast(device, dtype=torch.float16, enabled=precision == "fp16")
        sync = torch.cuda.synchronize if device == "cuda" else None

        def call(model=model, images=images, autocast=autocast) -> None:
            with torch.inference_mode(), autocast:
                model(images)

        stats = timed(call, iters=1 if dry_run else 20, warmup=0 if dry_run else 5, sync=sync)
        rows.append({"arch": arch, "size": size, "batch": batch, "precision": precision, **stats})
        print(f"  {arch} {size}px batch {batch} {precision}: {stats}", flush=True)
    reason = (
        "dry run: mbv3-320 batch 1 fp32 on CPU only (GPU latency not measured)"
        if dry_run
        else "random-init weights (no COCO weights offline); fp16 = torch.autocast float16"
    )
    return section("eager_latency", "ran", reason, device=device, results=rows)


def frozen_training(dry_run: bool, out: Path, bundle: Path) -> dict[str, Any]:
    torch, why = torch_cuda()
    data = bundle / "deer"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "frozen_training.py"), str(data),
        "--out", str(out / "frozen_training_cuda.json"), "--device", "cuda", "--amp",
        "--train-images", "40", "--val-images", "20", "--epochs", "3", "--batch-size", "4",
        "--archs", "fasterrcnn_mobilenet_v3_large_fpn", "--methods", "plain", "ours", "cached",
        "--notes", "gpu_check.sh: small settings",
    ]  # fmt: skip
    if dry_run:
        return section("frozen_training", "skipped", "dry run (GPU only)", command=command)
    if why:
        return section("frozen_training", "skipped", why)
    if not (data / "train.json").is_file():
        return section("frozen_training", "skipped", f"no {data}/train.json (run --prepare)")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=BUDGET_S["frozen_training"]
        )
    except subprocess.TimeoutExpired:
        return section(
            "frozen_training", "failed", f"over its {BUDGET_S['frozen_training']} s budget"
        )
    if done.returncode != 0:
        return section("frozen_training", "failed", done.stderr[-1500:], command=command)
    report = json.loads((out / "frozen_training_cuda.json").read_text())
    return section("frozen_training", "ran", "mbv3-FPN, 40 images, 3 epochs, bf16 AMP",
                   table=report.get("table"), results=report.get("results"))  # fmt: skip


def tensorrt_available() -> str:
    """Why TensorRT cannot run here ('' when it can)."""
    try:
        import onnxruntime as ort

        from detector.runtime import providers
    except ImportError as e:
        return f"onnxruntime not importable ({e})"
    if providers.TENSORRT not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no TensorRT provider (CPU package)"
    count, why = providers.cuda_devices()
    if count == 0:
        return why
    providers.preload_gpu_libraries()
    library = providers.missing_library(providers.TENSORRT)
    return f"{library} not found (TensorRT libraries missing)" if library else ""


def frames_at(frames: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    return [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]


def matched(a: Any, b: Any) -> dict[str, Any]:
    """Greedy IoU >= 0.5 same-label matching of two Detections."""
    used, ious, score_diffs = set(), [], []
    for box, label, score in zip(a.boxes, a.labels, a.scores, strict=True):
        best, best_iou = None, 0.5
        for j, (other, other_label) in enumerate(zip(b.boxes, b.labels, strict=True)):
            if j in used or other_label != label:
                continue
            lt, rb = np.maximum(box[:2], other[:2]), np.minimum(box[2:], other[2:])
            inter = float(np.prod(np.clip(rb - lt, 0, None)))
            union = float(np.prod(box[2:] - box[:2]) + np.prod(other[2:] - other[:2]) - inter)
            iou = inter / union if union > 0 else 0.0
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            ious.append(best_iou)
            score_diffs.append(abs(float(score) - float(b.scores[best])))
    return {"a": len(a), "b": len(b), "matched": len(used), "min_iou": min(ious, default=None),
            "max_score_diff": max(score_diffs, default=None)}  # fmt: skip


def bench_model(
    model: Path, provider: str, frames: list[np.ndarray], dry_run: bool, cache: Path
) -> dict:
    from detector.runtime import Detector, InputError

    t = time.perf_counter()
    det = Detector(
        model, providers=[provider], trt_cache_dir=cache, trt_fp16=True, score_threshold=0.3
    )
    row: dict[str, Any] = {"model": model.name, "provider": det.provider, "sizes": {}}
    for size in SIZES[:1] if dry_run else SIZES:
        batch = frames_at(frames, size)[: det.batch_size]
        try:
            first = time.perf_counter()
            det.predict(batch)  # TensorRT builds (or loads) the engine for this shape here
            build = time.perf_counter() - (t if not row["sizes"] else first)
            stats = timed(
                lambda b=batch: det.predict(b),
                iters=2 if dry_run else 30,
                warmup=1 if dry_run else 5,
            )
            row["sizes"][f"{size[0]}x{size[1]}"] = {"engine_build_s": round(build, 2), **stats}
        except InputError as e:  # a static export refuses other sizes
            row["sizes"][f"{size[0]}x{size[1]}"] = {"refused": str(e)[:200]}
    return row


def tensorrt(dry_run: bool, bundle: Path) -> dict[str, Any]:
    why = "" if dry_run else tensorrt_available()
    if why:
        return section("tensorrt", "skipped", why)
    models = sorted((bundle / "models").glob("*.onnx"))
    frame_files = sorted((bundle / "frames").glob("*.jpg"))[:10]
    if not models or not frame_files:
        return section(
            "tensorrt",
            "skipped",
            f"no models or frames in {bundle} (run --prepare --checkpoint CKPT)",
        )
    frames = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in frame_files]
    provider = "cpu" if dry_run else "tensorrt"
    rows, parity = [], []
    deadline = time.monotonic() + BUDGET_S["tensorrt"]
    with tempfile.TemporaryDirectory() as cache:
        from detector.runtime import Detector

        for model in models:
            if time.monotonic() > deadline:
                rows.append({"model": model.name, "skipped": "time budget"})
                continue
            rows.append(bench_model(model, provider, frames, dry_run, Path(cache) / model.stem))
            test = Detector(
                model,
                providers=[provider],
                trt_cache_dir=Path(cache) / model.stem,
                score_threshold=0.3,
            )
            reference = Detector(model, providers=["cpu"], score_threshold=0.3)
            pairs = zip(test.predict(frames), reference.predict(frames), strict=True)
            parity.append({"model": model.name, "frames": [matched(a, b) for a, b in pairs]})
    reason = (
        "dry run: CPU provider vs CPU, 640x480 only (TensorRT not measured)"
        if dry_run
        else "TensorRT fp16 vs CPU fp32"
    )
    return section("tensorrt", "ran", reason, results=rows, parity=parity)


def prepare(checkpoint: Path | None, bundle: Path) -> int:
    """Build benchmarks/gpu_bundle/ on the CPU machine (needs ../shared and the full install)."""
    deer = ROOT.parent / "shared" / "datasets" / "deer-automl"
    work = Path(tempfile.mkdtemp(prefix="gpu_bundle_"))
    py = [sys.executable]
    subprocess.run(
        [*py, str(ROOT / "tools" / "convert.py"), str(deer), "--out", str(work / "deer")],
        check=True,
    )
    subprocess.run(
        [*py, str(ROOT / "tools" / "split.py"), str(work / "deer" / "annotations.json")], check=True
    )
    target = bundle / "deer"
    (target / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 40), ("val", 20)):
        coco = json.loads((work / "deer" / f"{split}.json").read_text())
        coco["images"] = coco["images"][:count]
        keep = {im["id"] for im in coco["images"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        (target / f"{split}.json").write_text(json.dumps(coco))
        for im in coco["images"]:
            shutil.copy2(work / "deer" / "images" / im["file_name"], target / "images")
    (bundle / "frames").mkdir(exist_ok=True)
    for path in sorted((deer / "images").glob("*.jpg"))[-10:]:
        shutil.copy2(path, bundle / "frames")
    shutil.rmtree(work, ignore_errors=True)
    if checkpoint is not None:
        export_variants(checkpoint, bundle)
    print(f"gpu_check: bundle written to {bundle}; carry it with the working tree")
    return 0


def export_variants(checkpoint: Path, bundle: Path) -> None:
    (bundle / "models").mkdir(exist_ok=True)
    frames = str(bundle / "frames")
    for name, extra in (("b1", []), ("b6", ["--batch", "6"]), ("b1-fp16", ["--fp16"])):
        out = bundle / "models" / f"{name}.onnx"
        command = [sys.executable, "-m", "detector", "export", str(checkpoint), "--out", str(out),
                   "--parity-images", frames, *extra]  # fmt: skip
        subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "out", nargs="?", type=Path, default=ROOT / "benchmarks" / "results" / "gpu"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU only, smallest settings")
    parser.add_argument("--prepare", action="store_true", help="write benchmarks/gpu_bundle/ here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="--prepare: export this")
    parser.add_argument("--bundle", type=Path, default=None, help="default benchmarks/gpu_bundle")
    args = parser.parse_args()
    bundle = (args.bundle or BUNDLE).resolve()
    if args.prepare:
        return prepare(args.checkpoint, bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sections": [],
    }
    steps = (
        ("environment", environment),
        ("eager_latency", lambda: eager_latency(args.dry_run)),
        ("frozen_training", lambda: frozen_training(args.dry_run, args.out, bundle)),
        ("tensorrt", lambda: tensorrt(args.dry_run, bundle)),
    )
    for name, step in steps:
        try:
            summary["sections"].append(step())
        except Exception as e:  # one section failing must not lose the others' figures
            summary["sections"].append(section(name, "failed", f"{type(e).__name__}: {e}"))
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    skipped = [f"{s['name']} ({s['reason']})" for s in summary["sections"] if s["status"] != "ran"]
    print(
        f"gpu_check: wrote {args.out / 'summary.json'}; skipped or failed: {'; '.join(skipped) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    raise SystemExit(main())
