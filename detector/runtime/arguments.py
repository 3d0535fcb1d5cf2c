"""Command-line options of the runtime (providers, TensorRT, CPU fallback), shared by
``detector predict`` and ``detector benchmark``, and the Detector keyword arguments they give."""

from __future__ import annotations

import argparse
from typing import Any


def add_provider_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="required execution providers in order of preference (tensorrt cuda cpu): the run "
        "fails unless one of them starts; CPU only if named (default: TensorRT, CUDA, CPU, "
        "whichever starts, with a warning below TensorRT)",
    )
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device for CUDA/TensorRT")
    parser.add_argument(
        "--trt-cache", default=None, metavar="DIR", help="TensorRT engine + timing cache folder"
    )
    parser.add_argument(
        "--no-trt-fp16",
        action="store_true",
        help="TensorRT in fp32 only (default: fp16 kernels allowed, trt_fp16_enable)",
    )
    parser.add_argument(
        "--trt-workspace-gb",
        type=float,
        default=None,
        metavar="GB",
        help="TensorRT builder workspace limit (trt_max_workspace_size; default: TensorRT's)",
    )
    parser.add_argument(
        "--trt-exclude-ops",
        default=None,
        metavar="OPS",
        help="comma-separated op types TensorRT leaves to CUDA (trt_op_types_to_exclude; "
        "default: onnxruntime's; '' excludes none)",
    )
    parser.add_argument(
        "--trt-profile",
        nargs=3,
        default=None,
        metavar=("MIN", "OPT", "MAX"),
        help="TensorRT optimisation profile, e.g. images:1x320x320x3 images:1x720x1280x3 "
        "images:1x1080x1920x3 (default: the one stored in the model at export)",
    )
    parser.add_argument(
        "--no-cpu-fallback",
        action="store_true",
        help="refuse a session in which any node would run on CPU "
        "(session.disable_cpu_ep_fallback; CUDA leaves shape nodes on CPU, so off by default)",
    )


def detector_options(args: argparse.Namespace) -> dict[str, Any]:
    """Detector(...) keyword arguments from the options above."""
    exclude = args.trt_exclude_ops
    workspace = args.trt_workspace_gb
    return {
        "providers": args.providers,
        "device_id": args.device_id,
        "trt_cache_dir": args.trt_cache,
        "trt_fp16": not args.no_trt_fp16,
        "trt_workspace_bytes": None if workspace is None else int(workspace * (1 << 30)),
        "trt_exclude_ops": None if exclude is None else [s for s in exclude.split(",") if s],
        "trt_profile": tuple(args.trt_profile) if args.trt_profile else None,
        "cpu_fallback": not args.no_cpu_fallback,
    }
