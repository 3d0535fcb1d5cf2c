"""ONNX Runtime vs PyTorch eager latency of the exported detectors (goal: ORT <= 0.6x eager).

    python benchmarks/onnx_latency.py                      # CPU: mbv3-320 and R50-FPN
    python benchmarks/onnx_latency.py --iters 30 --r50-iters 10

For each case the model is built with random weights (no COCO detector weights exist offline;
latency does not depend on the weights except through the detections left after the score
threshold, which random weights leave at ~0, so the last NMS is nearly free in both engines),
exported with ``detector.export.export_model`` (batch 1, float32 input, no parity: random
weights), and timed at batch 1 on the same frame: ``InferenceSession.run`` on the preprocessed
input vs ``model([tensor])`` under ``torch.inference_mode`` (model time only, no decoding). The
two engines alternate iteration by iteration with the same thread count, so load from other
processes on a shared machine hits both alike.

Writes ``benchmarks/results/onnx_latency_cpu.json`` and prints a Markdown table. When a CUDA
GPU is present it also times, at 800 px, TensorRT fp16 and CUDA (fp32 and fp16 graphs) against
PyTorch eager fp32 and autocast fp16 on the GPU, into ``onnx_latency_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from detector.config import config_from_dict
from detector.export import export_model
from detector.model import build_model
from detector.runtime import Detector, ProviderError, cuda_devices

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    name: str
    arch: str
    size: int  # input frame: size x size
    min_size: int | None = None  # model.min_size override (None: the arch default)
    max_size: int | None = None


def percentiles(times: list[float]) -> dict[str, float]:
    p50, p90, p99 = np.percentile(np.asarray(times), [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 1),
        "p90_ms": round(float(p90), 1),
        "p99_ms": round(float(p99), 1),
    }


def build(case: Case, device: str = "cpu") -> torch.nn.Module:
    model_cfg = {"arch": case.arch, "weights": "none", "weights_backbone": "none"}
    if case.min_size:
        model_cfg.update(min_size=case.min_size, max_size=case.max_size)
    cfg = config_from_dict({"model": model_cfg})
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, [f"class{i}" for i in range(90)])  # COCO-sized head
    return model.eval().to(device)


def frame(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    small = rng.random((3, size // 16, size // 16), dtype=np.float32)
    x = torch.nn.functional.interpolate(
        torch.from_numpy(small)[None], size=(size, size), mode="bilinear"
    )
    return x.numpy().astype(np.float32)  # [1, 3, size, size] RGB 0..1, smooth


def time_pair(run_a, run_b, iters: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        run_a()
        run_b()
    a, b = [], []
    for _ in range(iters):
        t = time.perf_counter()
        run_a()
        a.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        run_b()
        b.append((time.perf_counter() - t) * 1000)
    return a, b


def bench_cpu(case: Case, iters: int, warmup: int, threads: int, work: Path) -> dict:
    torch.set_num_threads(threads)
    model = build(case)
    path = work / f"{case.name}.onnx"
    t = time.perf_counter()
    export_model(
        model, path, class_names=[f"class{i}" for i in range(90)], arch=case.arch, parity=False
    )
    export_s = time.perf_counter() - t
    det = Detector(path, providers=["cpu"], threads=threads)
    x = frame(case.size)
    xt = torch.from_numpy(x[0])

    def run_ort():
        return det.session.run(None, {"images": x})

    def run_torch():
        with torch.inference_mode():
            return model([xt])

    ort_ms, torch_ms = time_pair(run_ort, run_torch, iters, warmup)
    o, e = percentiles(ort_ms), percentiles(torch_ms)
    internal = model.transform.min_size[-1]
    return {
        "case": case.name,
        "arch": case.arch,
        "input": f"{case.size}x{case.size}",
        "internal_min_size": internal,
        "threads": threads,
        "iters": iters,
        "warmup": warmup,
        "ort_cpu": o,
        "torch_eager_cpu": e,
        "ratio_p50": round(o["p50_ms"] / e["p50_ms"], 3),
        "ratio_p90": round(o["p90_ms"] / e["p90_ms"], 3),
        "goal_ratio_le_0.6": o["p50_ms"] <= 0.6 * e["p50_ms"],
        "export_s": round(export_s, 1),
        "onnx_mb": round(path.stat().st_size / 1e6, 1),
    }


def bench_gpu(case: Case, iters: int, warmup: int, work: Path) -> list[dict]:
    """TensorRT / CUDA providers vs PyTorch eager on the GPU (only where a GPU exists)."""
    model = build(case, "cuda")
    names = [f"class{i}" for i in range(90)]
    paths = {}
    for fp16 in (False, True):
        path = work / f"{case.name}_{'fp16' if fp16 else 'fp32'}.onnx"
        export_model(
            model, path, class_names=names, arch=case.arch, fp16=fp16, parity=False, device="cuda"
        )
        paths[fp16] = path
    x = frame(case.size)
    xt = torch.from_numpy(x[0]).cuda()
    rows = []

    def eager(half: bool):
        def run():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                model([xt])
            torch.cuda.synchronize()

        return run

    for label, fn in (
        ("torch eager fp32", eager(False)),
        ("torch eager autocast fp16", eager(True)),
    ):
        times, _ = time_pair(fn, lambda: None, iters, warmup)
        rows.append({"case": case.name, "engine": label, **percentiles(times)})
    expected = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
    for provider, fp16 in (("tensorrt", True), ("cuda", False), ("cuda", True)):
        try:
            det = Detector(
                paths[fp16], providers=[provider], trt_cache_dir=work / "trt", trt_fp16=fp16
            )
        except ProviderError as e:
            print(f"{provider}: {e}")
            continue
        if det.provider != expected[provider]:
            print(f"{provider}: did not start (running on {det.provider}); not timed")
            continue
        times, _ = time_pair(
            lambda d=det: d.session.run(None, {"images": x}), lambda: None, iters, warmup
        )
        rows.append(
            {
                "case": case.name,
                "engine": f"ORT {det.provider} {'fp16' if fp16 else 'fp32'}",
                **percentiles(times),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30, help="timed iterations (mbv3)")
    parser.add_argument(
        "--r50-iters", type=int, default=8, help="timed iterations (R50, slow on CPU)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["mbv3_320@800", "mbv3_320@640", "r50@800", "r50@512"],
        help="which cases to run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_latency_cpu.json")
    args = parser.parse_args()

    all_cases = {
        "mbv3_320@800": Case("mbv3_320@800", "fasterrcnn_mobilenet_v3_large_320_fpn", 800),
        "mbv3_320@640": Case("mbv3_320@640", "fasterrcnn_mobilenet_v3_large_320_fpn", 640),
        "r50@800": Case("r50@800", "fasterrcnn_resnet50_fpn", 800),
        "r50@512": Case("r50@512", "fasterrcnn_resnet50_fpn", 512, min_size=512, max_size=853),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.cases:
            case = all_cases[key]
            iters = args.r50_iters if case.arch.startswith("fasterrcnn_resnet50") else args.iters
            print(f"{case.name}: exporting and timing ({iters} iterations)...", flush=True)
            rows.append(bench_cpu(case, iters, args.warmup, args.threads, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
        gpu_rows = []
        if torch.cuda.is_available() and cuda_devices()[0] > 0:
            for key in ("mbv3_320@800", "r50@800"):
                gpu_rows += bench_gpu(all_cases[key], args.iters, args.warmup, Path(tmp))

    payload = {
        "what": "ONNX Runtime CPU vs PyTorch eager CPU, batch 1, model time only, random weights",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(
        "\n| case | input | model min side | ORT CPU p50 / p90 ms | eager p50 / p90 ms | ORT / eager (p50) | <= 0.6x |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['arch'].replace('fasterrcnn_', '')} | {r['input']} | {r['internal_min_size']} | "
            f"{r['ort_cpu']['p50_ms']:.0f} / {r['ort_cpu']['p90_ms']:.0f} | "
            f"{r['torch_eager_cpu']['p50_ms']:.0f} / {r['torch_eager_cpu']['p90_ms']:.0f} | "
            f"{r['ratio_p50']:.2f} | {'yes' if r['goal_ratio_le_0.6'] else 'no'} |"
        )
    print(f"\n{args.threads} threads, written to {args.out}")
    if gpu_rows:
        gpu_out = args.out.with_name("onnx_latency_gpu.json")
        gpu_out.write_text(
            json.dumps({"machine": payload["machine"], "results": gpu_rows}, indent=2) + "\n"
        )
        print("\n| case | engine | p50 ms | p90 ms | p99 ms |\n|---|---|---:|---:|---:|")
        for r in gpu_rows:
            print(
                f"| {r['case']} | {r['engine']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} |"
            )
        print(f"written to {gpu_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
