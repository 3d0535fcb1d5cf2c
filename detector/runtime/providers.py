"""onnxruntime execution providers: TensorRT, then CUDA, then CPU, with reasons for each skip.

``onnxruntime-gpu`` lists the TensorRT and CUDA providers whether or not this machine has a GPU,
a driver or the TensorRT libraries. When a provider's libraries are missing, onnxruntime either
raises (TensorRT) or drops the provider and runs the whole graph on CPU with only a log line
(CUDA); its Python wrapper then retries on CPU by itself. So here:

* a provider is first checked (built in? an NVIDIA driver and a device?);
* onnxruntime's own fallback is turned off (``enable_fallback=0`` at creation,
  ``disable_fallback()`` for runs), and ``session.get_providers()`` says which one really runs;
* providers the caller names are required: the session must run on one of them (CPU only if
  named), else :class:`ProviderError` says which provider failed and, where it can be found,
  which library is missing (``libnvinfer.so.10``, ``libcudnn.so.9``, ...);
* the automatic chain (no providers named) takes the first that works and logs a WARNING when
  that is not its first choice, TensorRT.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (TENSORRT, CUDA, CPU)
GPU_PROVIDERS = (TENSORRT, CUDA)

ALIASES = {
    "tensorrt": TENSORRT,
    "trt": TENSORRT,
    "cuda": CUDA,
    "gpu": CUDA,
    "cpu": CPU,
}

# onnxruntime's provider libraries (capi/libonnxruntime_providers_<name>.so) and the TensorRT
# libraries that the pip wheels tensorrt-cu12/-cu13(-libs) put in site-packages/tensorrt_libs.
PROVIDER_LIBRARY = {TENSORRT: "tensorrt", CUDA: "cuda"}
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")

# "ONNX Runtime may assign nodes to CPU" is fine for CUDA (shape nodes), so refusing it is opt-in.
DISABLE_CPU_FALLBACK_KEY = "session.disable_cpu_ep_fallback"


class ProviderError(RuntimeError):
    """None of the requested execution providers can run here."""


@dataclass
class TensorRTOptions:
    """TensorRT execution provider settings (``trt_*`` provider options of onnxruntime).

    fp16: ``trt_fp16_enable`` (on by default: TensorRT picks fp16 kernels where it is faster).
    cache_dir: engine + timing cache folder; without it every start rebuilds the engines (minutes).
    workspace_bytes: ``trt_max_workspace_size`` (None: TensorRT's default, the whole GPU memory).
    exclude_ops: ``trt_op_types_to_exclude``, op types left to CUDA (None: onnxruntime's default;
        an empty list excludes nothing).
    profile: (min, opt, max) shapes, ``"images:1x3x320x320"`` each, for a dynamic-size model
        (None: the profile stored in the model's metadata, if any).
    """

    fp16: bool = True
    cache_dir: str | os.PathLike | None = None
    workspace_bytes: int | None = None
    exclude_ops: Sequence[str] | None = None
    profile: tuple[str, str, str] | None = None

    def provider_options(self, device_id: int) -> dict[str, Any]:
        options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": bool(self.fp16)}
        if self.cache_dir is not None:
            cache = Path(self.cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
            options.update(
                trt_engine_cache_enable=True,
                trt_engine_cache_path=str(cache),
                trt_timing_cache_enable=True,
                trt_timing_cache_path=str(cache),
            )
        if self.workspace_bytes is not None:
            options["trt_max_workspace_size"] = int(self.workspace_bytes)
        if self.exclude_ops is not None:
            options["trt_op_types_to_exclude"] = ",".join(self.exclude_ops)
        if self.profile is not None:
            low, opt, high = self.profile
            options.update(
                trt_profile_min_shapes=low, trt_profile_opt_shapes=opt, trt_profile_max_shapes=high
            )
        return options


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


def missing_library(provider: str) -> str | None:
    """The first shared library that onnxruntime's library for ``provider`` cannot load, if any.

    Loading ``capi/libonnxruntime_providers_<name>.so`` the way onnxruntime does makes the
    dynamic linker name the first dependency it cannot find (``libnvinfer.so.10: cannot open
    shared object file``).
    """
    short = PROVIDER_LIBRARY.get(provider)
    if short is None or sys.platform == "win32":
        return None
    path = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{short}.so"
    if not path.is_file():
        return path.name
    try:
        ctypes.CDLL(str(path))
    except OSError as e:
        message = str(e)
        if "cannot open shared object file" in message:
            return message.split(":", 1)[0].strip()
    return None  # it loads (or fails for another reason: onnxruntime's own error says which)


def preload_gpu_libraries() -> list[str]:
    """Make pip-installed CUDA, cuDNN and TensorRT libraries findable; returns what was said.

    ``onnxruntime.preload_dlls()`` (onnxruntime >= 1.21) loads CUDA and cuDNN from the
    ``nvidia-*`` wheels; the TensorRT wheels' libraries (``tensorrt_libs``) are loaded here.
    Without this, libraries installed with pip are not found unless LD_LIBRARY_PATH names them.
    """
    said: list[str] = []
    if hasattr(ort, "preload_dlls"):
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                ort.preload_dlls()
        except Exception as e:  # preload is a convenience: the session check below decides
            said.append(f"onnxruntime.preload_dlls failed: {e}")
        said += [line for line in printed.getvalue().splitlines() if line.strip()]
    spec = importlib.util.find_spec("tensorrt_libs")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        for name in TENSORRT_LIBRARIES:
            candidate = Path(folder) / name
            if candidate.is_file():
                try:
                    ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    said.append(f"cannot load {candidate}: {e}")
    for line in said:
        log.debug("preload: %s", line)
    return said


@dataclass
class ProviderPlan:
    providers: list[str] = field(default_factory=list)
    options: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def plan_providers(
    requested: Sequence[str] | None = None,
    *,
    device_id: int = 0,
    tensorrt: TensorRTOptions | None = None,
) -> ProviderPlan:
    """The providers (in order, with their options) worth trying, and why the others are not."""
    names = [provider_name(p) for p in (requested or DEFAULT_PROVIDERS)]
    available = set(ort.get_available_providers())
    plan = ProviderPlan()
    gpu_count: int | None = None
    gpu_reason = ""
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        if name not in available:
            plan.skipped[name] = (
                f"not built into this onnxruntime ({ort.__version__}, {ort.get_device()}; "
                "the GPU providers need the onnxruntime-gpu package)"
            )
            continue
        if name in GPU_PROVIDERS:
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
            options = (tensorrt or TensorRTOptions()).provider_options(device_id)
        elif name == CUDA:
            options = {"device_id": device_id}
        plan.providers.append(name)
        plan.options.append(options)
    return plan


def _failure_reason(provider: str, error: BaseException | None) -> str:
    library = missing_library(provider)
    if library:
        return f"failed to start: {library} not found (install it or add its folder to LD_LIBRARY_PATH)"
    if error is not None:
        return f"failed to start: {str(error).strip().splitlines()[-1][:300]}"
    return "failed to start (see onnxruntime's error above)"


def _open(
    source: str | bytes,
    plan: ProviderPlan,
    session_options: ort.SessionOptions | None,
    skipped: dict[str, str],
) -> ort.InferenceSession:
    """A session on the plan's providers, dropping the first one each time creation fails."""
    providers, options = list(plan.providers), list(plan.options)
    while True:
        try:
            return ort.InferenceSession(
                source,
                sess_options=session_options,
                providers=providers,
                provider_options=options,
                enable_fallback=0,  # onnxruntime's silent retry on CPU: decided here instead
            )
        except (RuntimeError, ValueError, ort_errors.Fail, ort_errors.EPFail) as e:
            if providers[0] not in GPU_PROVIDERS:
                raise  # the CPU provider failing is the model's problem, not the machine's
            skipped[providers[0]] = _failure_reason(providers[0], e)
            providers, options = providers[1:], options[1:]
            if not providers:
                raise ProviderError(_refusal(plan.providers, skipped)) from None


def create_session(
    model: str | os.PathLike | bytes,
    requested: Sequence[str] | None = None,
    *,
    session_options: ort.SessionOptions | None = None,
    device_id: int = 0,
    tensorrt: TensorRTOptions | None = None,
    cpu_fallback: bool = True,
) -> tuple[ort.InferenceSession, dict[str, str]]:
    """An InferenceSession on a provider that works; logs which one and why not the others.

    ``requested``: providers the caller requires (one of them must run; CPU only if named);
    None: the automatic chain TensorRT -> CUDA -> CPU. ``cpu_fallback=False`` sets onnxruntime's
    ``session.disable_cpu_ep_fallback``: session creation fails if any node would run on CPU.
    Returns ``(session, skipped)``, ``skipped`` mapping provider name to the reason.
    Raises :class:`ProviderError` when no required provider can run here.
    """
    required = [provider_name(p) for p in requested] if requested else None
    plan = plan_providers(required, device_id=device_id, tensorrt=tensorrt)
    if not plan.providers:
        raise ProviderError(_refusal(required or list(DEFAULT_PROVIDERS), plan.skipped))
    if any(p in GPU_PROVIDERS for p in plan.providers):
        preload_gpu_libraries()
    if not cpu_fallback:
        session_options = session_options or ort.SessionOptions()
        session_options.add_session_config_entry(DISABLE_CPU_FALLBACK_KEY, "1")
    source = model if isinstance(model, bytes) else str(model)
    skipped = dict(plan.skipped)
    session = _open(source, plan, session_options, skipped)
    session.disable_fallback()  # a provider failing during a run raises instead of going to CPU
    active = session.get_providers()
    for name in plan.providers:
        if name not in active and name not in skipped:
            skipped[name] = _failure_reason(name, None)
    chosen = active[0] if active else "?"
    if required is not None and chosen not in required:
        raise ProviderError(_refusal(required, skipped))
    first_choice = (required or list(DEFAULT_PROVIDERS))[0]
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    if chosen != first_choice:
        log.warning("onnxruntime provider: %s, not %s (%s)", chosen, first_choice, reasons)
    else:
        log.info("onnxruntime provider: %s", chosen)
    if chosen == TENSORRT and (tensorrt is None or tensorrt.cache_dir is None):
        log.warning(
            "TensorRT without an engine cache (trt_cache_dir): engines are rebuilt at every start"
        )
    return session, skipped


def _refusal(required: Sequence[str], skipped: dict[str, str]) -> str:
    reasons = "; ".join(f"{name}: {skipped.get(name, 'did not start')}" for name in required)
    hint = "" if CPU in required else " (add cpu to the providers to allow running on CPU)"
    return f"none of the requested execution providers can run here: {reasons}{hint}"
