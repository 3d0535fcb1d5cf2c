"""ONNX Runtime vs PyTorch eager latency of the exported detectors on the CPU, and what each
export and session option buys (goal: ORT <= 0.6x eager).

    python benchmarks/onnx_latency.py                      # CPU: mbv3-320 and R50-FPN at 800x800
    python benchmarks/onnx_latency.py --iters 10 --r50-iters 4

For each case the model is built with random weights (no COCO detector weights exist offline;
latency does not depend on the weights except through the detections left after the score
threshold, which random weights leave at ~0, so the last NMS is nearly free in both engines) and
exported with ``detector.export.export_model`` (no parity: random weights) in several variants:

* ``dynamic float``: any frame size, float32 RGB input, graph as traced (no onnxsim);
* ``+ simplified``: the same graph simplified by onnxsim;
* ``+ raw input``: uint8 BGR frames in, the conversion inside the graph (the export's default);
* ``static``: ``--input-size`` of the frame, every shape folded to a constant;
* ``static b6``: the static graph at batch 6 (time per frame = batch time / 6).

Each ORT variant is timed per frame from the HxWx3 uint8 BGR frame (float variants include the
numpy conversion the runtime does), alternating iteration by iteration with PyTorch eager
``model([tensor])`` under ``torch.inference_mode`` (model time only) with the same thread count,
so load from other processes on a shared machine hits both alike. The best variant is also timed
with onnxruntime's graph optimisation level (basic vs all) and 1 thread vs all cores.

Writes ``benchmarks/results/onnx_latency_cpu.json`` and prints Markdown tables. When a CUDA
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


CASES = {
    "mbv3_320@800": Case("mbv3_320@800", "fasterrcnn_mobilenet_v3_large_320_fpn", 800),
    "mbv3_320@640": Case("mbv3_320@640", "fasterrcnn_mobilenet_v3_large_320_fpn", 640),
    "r50@800": Case("r50@800", "fasterrcnn_resnet50_fpn", 800),
    "r50@512": Case("r50@512", "fasterrcnn_resnet50_fpn", 512, min_size=512, max_size=853),
}


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


@dataclass
class Variant:
    name: str
    raw_input: bool
    simplify: bool
    static: bool = False
    batch: int = 1


VARIANTS = [
    Variant("dynamic float", raw_input=False, simplify=False),
    Variant("dynamic float simplified", raw_input=False, simplify=True),
    Variant("dynamic raw simplified", raw_input=True, simplify=True),
    Variant("static raw simplified", raw_input=True, simplify=True, static=True),
    Variant("static raw simplified b6", raw_input=True, simplify=True, static=True, batch=6),
]


def ort_session(path: Path, threads: int, level: str = "all") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session: ort.InferenceSession, bgr: np.ndarray, variant: Variant):
    """One call: a batch of ``variant.batch`` copies of the frame, from uint8 BGR."""
    batch = np.ascontiguousarray(np.stack([bgr] * variant.batch))

    def run():
        feed = batch
        if not variant.raw_input:  # what the runtime does for a float-input model
            feed = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
            feed /= np.float32(255.0)
        return session.run(None, {"images": feed})

    return run


def export_variant(model: torch.nn.Module, case: Case, variant: Variant, work: Path) -> Path:
    path = work / f"{case.name}_{variant.name.replace(' ', '_')}.onnx"
    export_model(
        model,
        path,
        class_names=[f"class{i}" for i in range(90)],
        arch=case.arch,
        batch=variant.batch,
        raw_input=variant.raw_input,
        simplify_graph=variant.simplify,
        input_size=(case.size, case.size) if variant.static else None,
        parity=False,
    )
    return path


def bench_cpu(case: Case, iters: int, warmup: int, threads: int, work: Path) -> dict:
    torch.set_num_threads(threads)
    model = build(case)
    x = frame(case.size)
    bgr = np.ascontiguousarray((x[0].transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8))
    xt = torch.from_numpy(x[0])

    def run_torch():
        with torch.inference_mode():
            return model([xt])

    rows, paths = [], {}
    for variant in VARIANTS:
        t = time.perf_counter()
        paths[variant.name] = path = export_variant(model, case, variant, work)
        export_s = time.perf_counter() - t
        run_ort = ort_runner(ort_session(path, threads), bgr, variant)
        ort_ms, torch_ms = time_pair(run_ort, run_torch, iters, warmup)
        ort_ms = [t / variant.batch for t in ort_ms]
        rows.append(_row(case, variant.name, "all", threads, ort_ms, torch_ms, export_s, path))
        print(json.dumps(rows[-1]), flush=True)
    best = VARIANTS[3]
    for level, n in (("basic", threads), ("all", 1)):
        run_ort = ort_runner(ort_session(paths[best.name], n, level), bgr, best)
        torch.set_num_threads(n)
        ort_ms, torch_ms = time_pair(run_ort, run_torch, iters, warmup)
        rows.append(_row(case, best.name, level, n, ort_ms, torch_ms, 0.0, paths[best.name]))
        print(json.dumps(rows[-1]), flush=True)
    torch.set_num_threads(threads)
    return {
        "case": case.name,
        "arch": case.arch,
        "input": f"{case.size}x{case.size}",
        "internal_min_size": model.transform.min_size[-1],
        "iters": iters,
        "warmup": warmup,
        "variants": rows,
    }


def _row(case, variant, level, threads, ort_ms, torch_ms, export_s, path) -> dict:
    o, e = percentiles(ort_ms), percentiles(torch_ms)
    return {
        "variant": variant,
        "optimization_level": level,
        "threads": threads,
        "ort_cpu_per_frame": o,
        "torch_eager_cpu": e,
        "ratio_p50": round(o["p50_ms"] / e["p50_ms"], 3),
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
            model,
            path,
            class_names=names,
            arch=case.arch,
            fp16=fp16,
            raw_input=False,
            parity=False,
            device="cuda",
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
        default=["mbv3_320@800", "r50@800"],
        help="which cases to run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_latency_cpu.json")
    args = parser.parse_args()

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.cases:
            case = CASES[key]
            iters = args.r50_iters if case.arch.startswith("fasterrcnn_resnet50") else args.iters
            print(f"{case.name}: exporting and timing ({iters} iterations)...", flush=True)
            rows.append(bench_cpu(case, iters, args.warmup, args.threads, Path(tmp)))
        gpu_rows = []
        if torch.cuda.is_available() and cuda_devices()[0] > 0:
            for key in ("mbv3_320@800", "r50@800"):
                gpu_rows += bench_gpu(CASES[key], args.iters, args.warmup, Path(tmp))

    payload = {
        "what": "ONNX Runtime CPU (per frame, from uint8 BGR) vs PyTorch eager CPU (model "
        "time, batch 1) per export variant and session setting, random weights",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
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
        "\n| model @ input | variant | ORT level | threads | ORT p50 ms/frame | eager p50 ms "
        "| ORT / eager |\n|---|---|---|---:|---:|---:|---:|"
    )
    for r in rows:
        for v in r["variants"]:
            print(
                f"| {r['case']} | {v['variant']} | {v['optimization_level']} | {v['threads']} | "
                f"{v['ort_cpu_per_frame']['p50_ms']:.0f} | {v['torch_eager_cpu']['p50_ms']:.0f} | "
                f"{v['ratio_p50']:.2f} |"
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
