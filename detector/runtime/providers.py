"""onnxruntime execution providers: TensorRT, then CUDA, then CPU, with reasons for each skip.

``onnxruntime-gpu`` lists the TensorRT and CUDA providers whether or not this machine has a GPU,
a driver or the TensorRT libraries, and onnxruntime falls back to the next provider on its own
when one fails to start. So a provider is first checked here (built in? an NVIDIA driver and a
device?), then the session is created, and ``session.get_providers()`` says which one really
runs: a requested provider missing from it failed to initialise (its libraries are missing).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (TENSORRT, CUDA, CPU)

ALIASES = {
    "tensorrt": TENSORRT,
    "trt": TENSORRT,
    "cuda": CUDA,
    "gpu": CUDA,
    "cpu": CPU,
}


class ProviderError(RuntimeError):
    """None of the requested execution providers can run here."""


def provider_name(name: str) -> str:
    """``"cuda"`` -> ``"CUDAExecutionProvider"``; full names pass through."""
    key = name.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    if key.endswith("ExecutionProvider"):
        return key
    raise ProviderError(
        f"unknown execution provider {name!r}; use tensorrt, cuda, cpu or a full onnxruntime name"
    )


def cuda_devices() -> tuple[int, str]:
    """(number of CUDA devices, reason when 0), asked of the NVIDIA driver itself (no torch)."""
    library = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(library)
    except OSError:
        return 0, f"no NVIDIA driver ({library} not found)"
    try:
        status = cuda.cuInit(0)
        if status != 0:
            return 0, f"the NVIDIA driver found no usable GPU (cuInit error {status})"
        count = ctypes.c_int(0)
        status = cuda.cuDeviceGetCount(ctypes.byref(count))
        if status != 0 or count.value == 0:
            return 0, "the NVIDIA driver reports no GPU"
        return count.value, ""
    except AttributeError:
        return 0, f"{library} is not a CUDA driver library"


@dataclass
class ProviderPlan:
    providers: list[str] = field(default_factory=list)
    options: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def plan_providers(
    requested: Sequence[str] | None = None,
    *,
    device_id: int = 0,
    trt_cache_dir: str | os.PathLike | None = None,
    trt_fp16: bool = False,
) -> ProviderPlan:
    """The providers (in order, with their options) worth trying, and why the others are not.

    TensorRT options: ``trt_engine_cache_enable`` / ``trt_engine_cache_path`` (and the timing
    cache) point at ``trt_cache_dir`` when given, so engines are built once per model, input
    shape and GPU instead of at every start; ``trt_fp16_enable`` lets TensorRT pick fp16 kernels.
    """
    names = [provider_name(p) for p in (requested or DEFAULT_PROVIDERS)]
    available = set(ort.get_available_providers())
    plan = ProviderPlan()
    gpu_count: int | None = None
    gpu_reason = ""
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        if name not in available:
            plan.skipped[name] = (
                f"not built into this onnxruntime ({ort.__version__}, {ort.get_device()})"
            )
            continue
        if name in (TENSORRT, CUDA):
            if gpu_count is None:
                gpu_count, gpu_reason = cuda_devices()
            if gpu_count == 0:
                plan.skipped[name] = gpu_reason
                continue
            if device_id >= gpu_count:
                plan.skipped[name] = f"device_id {device_id} but only {gpu_count} GPU(s)"
                continue
        options: dict[str, Any] = {}
        if name == TENSORRT:
            options = {"device_id": device_id, "trt_fp16_enable": bool(trt_fp16)}
            if trt_cache_dir is not None:
                cache = Path(trt_cache_dir)
                cache.mkdir(parents=True, exist_ok=True)
                options.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=str(cache),
                    trt_timing_cache_enable=True,
                    trt_timing_cache_path=str(cache),
                )
        elif name == CUDA:
            options = {"device_id": device_id}
        plan.providers.append(name)
        plan.options.append(options)
    return plan


def create_session(
    model: str | os.PathLike | bytes,
    requested: Sequence[str] | None = None,
    *,
    session_options: ort.SessionOptions | None = None,
    device_id: int = 0,
    trt_cache_dir: str | os.PathLike | None = None,
    trt_fp16: bool = False,
) -> tuple[ort.InferenceSession, dict[str, str]]:
    """An InferenceSession on the first provider that works; logs which one and why not others.

    Returns ``(session, skipped)`` where ``skipped`` maps provider name to the reason.
    Raises :class:`ProviderError` when none of ``requested`` can run here.
    """
    plan = plan_providers(
        requested, device_id=device_id, trt_cache_dir=trt_cache_dir, trt_fp16=trt_fp16
    )
    if not plan.providers:
        reasons = "; ".join(f"{k}: {v}" for k, v in plan.skipped.items())
        raise ProviderError(f"none of the requested execution providers can run here ({reasons})")
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(
        source,
        sess_options=session_options,
        providers=plan.providers,
        provider_options=plan.options,
    )
    active = session.get_providers()
    skipped = dict(plan.skipped)
    for name in plan.providers:
        if name not in active:
            skipped[name] = (
                "failed to initialise (libraries missing? see onnxruntime's messages above)"
            )
    chosen = active[0] if active else "?"
    if plan.providers[0] != chosen or skipped:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        log.info("onnxruntime provider: %s (skipped %s)", chosen, reasons)
    else:
        log.info("onnxruntime provider: %s", chosen)
    if TENSORRT in active and trt_cache_dir is None:
        log.warning(
            "TensorRT without an engine cache (trt_cache_dir): engines are rebuilt at every start"
        )
    return session, skipped
