"""``detector benchmark MODEL.onnx [...]``: latency percentiles and FPS per execution provider.

Each ONNX model is timed at its own fixed batch size N through the deploy runtime
(``Detector.predict`` on uint8 BGR frames of ``--size`` x ``--size``: conversion, inference and
unpacking, what the vehicle pays), with one frame (padded to N) and with N frames, on every
provider that can run here (or those named by ``--providers``). With ``--checkpoint``, PyTorch
eager (``model(list_of_tensors)`` under ``torch.inference_mode``) is timed on the same frames with
1 and N images. Warm-up iterations are run first and not counted.

Pass a batch-1 and a batch-N model to compare both batch sizes on the ONNX side
(``detector benchmark model_b1.onnx model_b4.onnx --checkpoint best.pt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .runtime import Detector, ModelError, ProviderError, read_image
from .runtime.arguments import add_provider_arguments, detector_options
from .runtime.progress import progress
from .runtime.providers import DEFAULT_PROVIDERS, TensorRTOptions, plan_providers, provider_name

log = logging.getLogger(__name__)


@dataclass
class Timing:
    engine: str  # "onnxruntime" | "torch"
    provider: str  # onnxruntime provider, or torch device
    model: str
    batch: int  # the model's fixed batch size (torch: the number of images)
    frames: int  # frames per call
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    fps: float  # frames per second at the median latency
    iters: int
    detections: int  # detections in the last call (sanity: the model ran on something)


def measure(
    fn: Callable[[], Any], iters: int, warmup: int, desc: str = ""
) -> tuple[np.ndarray, Any]:
    """Latencies in milliseconds of ``iters`` calls after ``warmup`` uncounted ones."""
    result = None
    times = np.empty(iters, dtype=np.float64)
    with progress(warmup + iters, desc or "benchmark", "it") as bar:
        for _ in range(warmup):
            result = fn()
            bar.update(1)
        for i in range(iters):
            t = time.perf_counter()
            result = fn()
            times[i] = (time.perf_counter() - t) * 1000.0
            bar.update(1)
    return times, result


def summarize(times: np.ndarray, *, frames: int, **fields: Any) -> Timing:
    p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    return Timing(
        p50_ms=round(p50, 2),
        p90_ms=round(p90, 2),
        p99_ms=round(p99, 2),
        mean_ms=round(float(times.mean()), 2),
        fps=round(frames * 1000.0 / p50, 2) if p50 > 0 else 0.0,
        iters=int(times.size),
        frames=frames,
        **fields,
    )


def make_frames(
    size: int, count: int, image: Path | None = None, seed: int = 0
) -> list[np.ndarray]:
    """``count`` size x size uint8 BGR frames: the given image resized, else smooth noise."""
    if image is not None:
        frame = read_image(image)  # ImageError (a ValueError) naming the file and why
        return [cv2.resize(frame, (size, size))] * count
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size // 16, 2), max(size // 16, 2), 3), dtype=np.uint8)
    return [
        cv2.resize(np.roll(small, i, axis=0), (size, size), interpolation=cv2.INTER_CUBIC)
        for i in range(count)
    ]


def _take(frames: list[np.ndarray], count: int) -> list[np.ndarray]:
    return [frames[i % len(frames)] for i in range(count)]


def bench_onnx(
    model: Path,
    provider: str,
    frames_all: list[np.ndarray],
    *,
    iters: int,
    warmup: int,
    threads: int | None = None,
    options: dict[str, Any] | None = None,
    required: bool = False,
) -> list[Timing]:
    """Timings of ``model`` on ``provider`` alone (none if it does not start here, unless
    ``required``: then ProviderError)."""
    options = {**(options or {}), "providers": [provider]}
    try:
        det = Detector(model, threads=threads, **options)
    except ProviderError as e:
        if required:
            raise
        log.warning("%s: %s did not start, not timed: %s", model, provider, e)
        return []
    rows = []
    counts = [1] if det.batch_size == 1 else [1, det.batch_size]
    for count in counts:
        frames = _take(frames_all, count)
        desc = f"{model.name} {provider.replace('ExecutionProvider', '')} x{count}"
        times, out = measure(lambda f=frames: det.predict(f), iters, warmup, desc)
        rows.append(
            summarize(
                times,
                frames=count,
                engine="onnxruntime",
                provider=provider,
                model=model.name,
                batch=det.batch_size,
                detections=int(sum(len(d) for d in out)),
            )
        )
    return rows


def bench_torch(
    checkpoint: Path,
    frames_all: list[np.ndarray],
    counts: list[int],
    *,
    iters: int,
    warmup: int,
    device: str = "cpu",
) -> list[Timing]:
    import torch

    from .model import load_model

    model, _ = load_model(checkpoint)
    model = model.to(device).eval()
    tensors = [
        torch.from_numpy(
            np.ascontiguousarray(f[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0
        ).to(device)
        for f in frames_all
    ]

    def call(images: list) -> Any:
        with torch.inference_mode():
            out = model(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    rows = []
    for count in counts:
        images = [tensors[i % len(tensors)] for i in range(count)]
        times, out = measure(lambda im=images: call(im), iters, warmup, f"torch x{count}")
        rows.append(
            summarize(
                times,
                frames=count,
                engine="torch",
                provider=f"eager {device}",
                model=checkpoint.name,
                batch=count,
                detections=int(sum(len(o["boxes"]) for o in out)),
            )
        )
    return rows


def markdown_table(rows: list[Timing]) -> str:
    lines = [
        "| engine | provider | model | batch | frames | p50 ms | p90 ms | p99 ms | FPS |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.engine} | {r.provider.replace('ExecutionProvider', '')} | {r.model} | {r.batch} | "
            f"{r.frames} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | {r.p99_ms:.1f} | {r.fps:.1f} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models",
        type=Path,
        nargs="+",
        metavar="model.onnx",
        help="ONNX models written by `detector export` (each at its own batch size)",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="also time PyTorch eager on this checkpoint"
    )
    parser.add_argument("--size", type=int, default=800, help="frame height and width in pixels")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up iterations")
    parser.add_argument(
        "--image", type=Path, default=None, help="time on this image (resized) instead of noise"
    )
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    add_provider_arguments(parser)  # --providers: each one named is timed (all that run here)
    parser.add_argument(
        "--device", default="cpu", help="PyTorch device for --checkpoint (cpu, cuda)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results to this JSON file"
    )


def run(args: argparse.Namespace) -> int:
    if args.iters < 1 or args.warmup < 0 or args.size < 32:
        print("benchmark: error: need --iters >= 1, --warmup >= 0, --size >= 32", file=sys.stderr)
        return 2
    try:
        requested = [provider_name(p) for p in (args.providers or DEFAULT_PROVIDERS)]
        options = detector_options(args)
        plan = plan_providers(
            requested, device_id=args.device_id, tensorrt=TensorRTOptions(fp16=options["trt_fp16"])
        )
        for name, why in plan.skipped.items():
            print(f"benchmark: {name} skipped: {why}")
        if args.providers and plan.skipped:  # named providers are required
            raise ProviderError(f"requested providers cannot run here: {', '.join(plan.skipped)}")
        rows: list[Timing] = []
        max_batch = 1
        frames = make_frames(args.size, 8, args.image)
        for model in args.models:
            for provider in plan.providers:
                timings = bench_onnx(
                    model,
                    provider,
                    frames,
                    iters=args.iters,
                    warmup=args.warmup,
                    threads=args.threads,
                    options=options,
                    required=bool(args.providers),
                )
                rows += timings
                max_batch = max([max_batch] + [t.batch for t in timings])
        if args.checkpoint is not None:
            counts = sorted({1, max_batch})
            rows += bench_torch(
                args.checkpoint,
                frames,
                counts,
                iters=args.iters,
                warmup=args.warmup,
                device=args.device,
            )
    except (ModelError, ProviderError, FileNotFoundError, ValueError, OSError) as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    print(
        f"\n{args.size}x{args.size} frames, {args.warmup} warm-up + {args.iters} timed iterations\n"
    )
    print(markdown_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "size": args.size,
            "iters": args.iters,
            "warmup": args.warmup,
            "environment": environment(),
            "results": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"\nbenchmark: results written to {args.json}")
    return 0 if rows else 1


if __name__ == "__main__":  # python -m detector.benchmark
    _parser = argparse.ArgumentParser(
        prog="detector benchmark", description=__doc__.splitlines()[0]
    )
    add_arguments(_parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(_parser.parse_args()))
