"""Where one CPU frame's time goes, per operator, in ONNX Runtime and in PyTorch eager: the
floor under the ORT / eager latency ratio that benchmarks/onnx_latency.py measures.

    python benchmarks/onnx_op_profile.py                      # R50-FPN at 800x800, all cores
    python benchmarks/onnx_op_profile.py --case mbv3_320@800 --threads 1

The model, frame and export are onnx_latency.py's (random weights, 90 classes, the static raw
simplified export, ORT_ENABLE_ALL). ORT's own profiler (``SessionOptions.enable_profiling``) and
``torch.profiler`` each time ``--iters`` frames after a warm-up; times are per frame. The figure
that bounds the ratio is ``ort_conv_over_eager_frame``: ORT's convolution kernels (Conv,
FusedConv) alone over the whole eager frame; if it is above a target ratio, no setting of the
other operators reaches it.

Writes benchmarks/results/onnx_op_profile_<case>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_latency import (  # noqa: E402
    CASES,
    RESULTS,
    VARIANTS,
    build,
    export_variant,
    frame,
    ort_session,
)


def ort_op_ms(path: Path, bgr: np.ndarray, threads: int, iters: int) -> dict[str, float]:
    """Per-frame kernel time by op type (ms), from ORT's profiler."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": bgr[None]}
    session.run(None, feed)  # warm-up (also profiled: dropped below by run index)
    for _ in range(iters):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    first_timed = runs[1]["ts"]  # skip the warm-up run
    for event in events:
        kernel = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if kernel and event["ts"] >= first_timed:
            totals[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / iters / 1000, 1) for op, us in totals.most_common()}


def eager_op_ms(model: torch.nn.Module, x: torch.Tensor, iters: int) -> dict[str, float]:
    """Per-frame self CPU time by aten op (ms), from torch.profiler."""
    with torch.inference_mode():
        model([x])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model([x])
    rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)
    return {r.key: round(r.self_cpu_time_total / iters / 1000, 1) for r in rows}


def wall_ms(run, iters: int) -> float:
    run()
    times = []
    for _ in range(iters):
        tic = time.perf_counter()
        run()
        times.append((time.perf_counter() - tic) * 1000)
    return round(float(np.median(times)), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="r50@800", choices=sorted(CASES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case, variant = CASES[args.case], VARIANTS[3]  # static raw simplified
    model = build(case)
    x = frame(case.size)
    bgr = np.ascontiguousarray((x[0].transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8))
    xt = torch.from_numpy(x[0])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_variant(model, case, variant, Path(tmp))
        session = ort_session(path, args.threads)
        ort_frame = wall_ms(lambda: session.run(None, {"images": bgr[None]}), args.iters)
        with torch.inference_mode():
            eager_frame = wall_ms(lambda: model([xt]), args.iters)
        ort_ops = ort_op_ms(path, bgr, args.threads, args.iters)
    eager_ops = eager_op_ms(model, xt, args.iters)
    ort_conv = sum(v for k, v in ort_ops.items() if "Conv" in k)  # Conv, FusedConv, NchwcConv
    eager_conv = sum(v for k, v in eager_ops.items() if "conv" in k)
    payload = {
        "case": case.name,
        "variant": variant.name,
        "threads": args.threads,
        "iters": args.iters,
        "ort_frame_ms": ort_frame,
        "eager_frame_ms": eager_frame,
        "ort_over_eager": round(ort_frame / eager_frame, 3),
        "ort_conv_ms": round(ort_conv, 1),
        "eager_conv_ms": round(eager_conv, 1),
        "ort_conv_over_eager_conv": round(ort_conv / eager_conv, 3),
        "ort_conv_over_eager_frame": round(ort_conv / eager_frame, 3),
        "ort_ops_ms": ort_ops,
        "eager_ops_self_ms": eager_ops,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    out = RESULTS / f"onnx_op_profile_{case.name.replace('@', '_')}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: v for k, v in payload.items() if "_ops_" not in k}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
