"""Provider selection without a GPU: onnxruntime's providers and sessions faked with monkeypatch.

What is faked is what onnxruntime really does (read in its Python wrapper and seen on a machine
without TensorRT): with TensorRT's libraries missing, creating a session whose first provider is
TensorRT raises RuntimeError ("Please install TensorRT libraries"); with CUDA's missing, the
session is created and ``get_providers()`` is ``['CPUExecutionProvider']`` (a log line only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from detector.runtime import ModelError, ProviderError, providers
from detector.runtime.detector import trt_profile_from_metadata
from detector.runtime.modelfile import read_metadata

TRT, CUDA, CPU = providers.TENSORRT, providers.CUDA, providers.CPU


def tiny_model(path: Path, metadata: dict[str, str] | None = None) -> Path:
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


class FakeSession:
    """InferenceSession as onnxruntime-gpu behaves on a machine whose libraries are missing."""

    broken: set[str] = set()  # providers whose libraries are missing on the fake machine
    created: list[dict] = []

    def __init__(self, source, sess_options=None, providers=None, provider_options=None, **kw):
        FakeSession.created.append(
            {"providers": list(providers), "options": provider_options, "kwargs": kw}
        )
        self.sess_options = sess_options
        if providers[0] == TRT and TRT in self.broken:
            raise RuntimeError("Please install TensorRT libraries as mentioned in the requirements")
        active = [p for p in providers if p not in self.broken and p != CPU]
        self._providers = [*active, CPU]
        self.fallback_disabled = False

    def get_providers(self) -> list[str]:
        return self._providers

    def disable_fallback(self) -> None:
        self.fallback_disabled = True


@pytest.fixture
def gpu_machine(monkeypatch):
    """onnxruntime-gpu with a driver and one GPU; FakeSession.broken says what is missing."""
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(providers, "cuda_devices", lambda: (1, ""))
    monkeypatch.setattr(providers, "preload_gpu_libraries", lambda: [])
    monkeypatch.setattr(providers.ort, "InferenceSession", FakeSession)
    missing = {TRT: "libnvinfer.so.10", CUDA: "libcudnn.so.9"}
    monkeypatch.setattr(
        providers,
        "missing_library",
        lambda name: missing.get(name) if name in FakeSession.broken else None,
    )
    FakeSession.broken = set()
    FakeSession.created = []
    return FakeSession


def test_named_tensorrt_with_driver_but_without_libnvinfer_is_refused(gpu_machine, tmp_path):
    gpu_machine.broken = {TRT}
    with pytest.raises(ProviderError, match=r"TensorrtExecutionProvider: .*libnvinfer\.so\.10"):
        providers.create_session(tiny_model(tmp_path / "m.onnx"), ["tensorrt"])
    # onnxruntime's own silent retry on CPU was turned off
    assert gpu_machine.created[0]["kwargs"] == {"enable_fallback": 0}


def test_named_cuda_that_silently_lands_on_cpu_is_refused(gpu_machine, tmp_path):
    gpu_machine.broken = {CUDA}  # onnxruntime creates the session on CPU without raising
    with pytest.raises(ProviderError, match=r"CUDAExecutionProvider: .*libcudnn\.so\.9") as e:
        providers.create_session(tiny_model(tmp_path / "m.onnx"), ["cuda"])
    assert "add cpu to the providers" in str(e.value)


def test_named_tensorrt_then_cuda_runs_on_cuda_with_a_warning(gpu_machine, tmp_path, caplog):
    gpu_machine.broken = {TRT}
    with caplog.at_level(logging.WARNING, logger="detector.runtime"):
        session, skipped = providers.create_session(
            tiny_model(tmp_path / "m.onnx"), ["tensorrt", "cuda"]
        )
    assert session.get_providers()[0] == CUDA and session.fallback_disabled
    assert "libnvinfer.so.10" in skipped[TRT]
    assert [p["providers"] for p in gpu_machine.created] == [[TRT, CUDA], [CUDA]]
    assert any(
        "CUDAExecutionProvider, not TensorrtExecutionProvider" in r.message for r in caplog.records
    )


def test_cpu_is_allowed_only_when_named(gpu_machine, tmp_path, caplog):
    gpu_machine.broken = {TRT, CUDA}
    model = tiny_model(tmp_path / "m.onnx")
    with pytest.raises(ProviderError):
        providers.create_session(model, ["tensorrt", "cuda"])
    with caplog.at_level(logging.WARNING, logger="detector.runtime"):
        session, _ = providers.create_session(model, ["tensorrt", "cpu"])
    assert session.get_providers() == [CPU]
    assert any(
        "CPUExecutionProvider, not TensorrtExecutionProvider" in r.message for r in caplog.records
    )


def test_automatic_chain_warns_below_its_first_choice(gpu_machine, tmp_path, caplog):
    model = tiny_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO, logger="detector.runtime"):
        session, _ = providers.create_session(model, None)
    assert session.get_providers()[0] == TRT
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "provider:" in r.message
    ]
    gpu_machine.broken = {TRT, CUDA}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detector.runtime"):
        session, skipped = providers.create_session(model, None)
    assert session.get_providers() == [CPU]
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("libnvinfer.so.10" in w and "libcudnn.so.9" in w for w in warnings), warnings


def test_tensorrt_options_and_cpu_fallback_switch(gpu_machine, tmp_path):
    trt = providers.TensorRTOptions(
        cache_dir=tmp_path / "cache",
        workspace_bytes=2 << 30,
        exclude_ops=["NonMaxSuppression", "NonZero"],
        profile=("images:1x320x320x3", "images:1x720x1280x3", "images:1x1080x1920x3"),
    )
    session, _ = providers.create_session(
        tiny_model(tmp_path / "m.onnx"), ["tensorrt"], tensorrt=trt, cpu_fallback=False
    )
    options = gpu_machine.created[0]["options"][0]
    assert options["trt_fp16_enable"] is True  # on by default
    assert options["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert options["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert options["trt_max_workspace_size"] == 2 << 30
    assert options["trt_op_types_to_exclude"] == "NonMaxSuppression,NonZero"
    assert options["trt_profile_opt_shapes"] == "images:1x720x1280x3"
    key = providers.DISABLE_CPU_FALLBACK_KEY
    assert session.sess_options.get_session_config_entry(key) == "1"
    fp32 = providers.TensorRTOptions(fp16=False, exclude_ops=[]).provider_options(0)
    assert fp32["trt_fp16_enable"] is False and fp32["trt_op_types_to_exclude"] == ""
    assert "trt_profile_min_shapes" not in fp32 and "trt_engine_cache_path" not in fp32


def test_real_onnxruntime_without_tensorrt_libraries(monkeypatch, tmp_path):
    """The unfaked path: this machine's onnxruntime-gpu, a pretended driver, no libnvinfer."""
    if TRT not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT provider (CPU package)")
    if providers.missing_library(TRT) is None:
        pytest.skip("TensorRT's libraries are installed here")
    monkeypatch.setattr(providers, "cuda_devices", lambda: (1, ""))
    with pytest.raises(
        ProviderError, match=r"TensorrtExecutionProvider: failed to start: lib\S+ not found"
    ):
        providers.create_session(tiny_model(tmp_path / "m.onnx"), ["tensorrt"])


def test_metadata_is_read_without_onnxruntime_and_bad_files_are_named(tmp_path):
    profile = {
        "trt_profile_min_shapes": "images:1x320x320x3",
        "trt_profile_opt_shapes": "images:1x480x640x3",
        "trt_profile_max_shapes": "images:1x1080x1920x3",
    }
    model = tiny_model(tmp_path / "m.onnx", {"a": "1", **profile})
    meta = read_metadata(model)
    assert meta == dict(ort.InferenceSession(str(model)).get_modelmeta().custom_metadata_map)
    assert trt_profile_from_metadata(meta) == tuple(profile.values())
    assert trt_profile_from_metadata({"trt_profile_min_shapes": "images:1x3x4x4"}) is None
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.onnx: empty file \(0 bytes\)"):
        read_metadata(tmp_path / "empty.onnx")
    data = model.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"cut\.onnx: not a readable ONNX model"):
        read_metadata(tmp_path / "cut.onnx")
    (tmp_path / "text.onnx").write_text("hello, not a model\n")
    with pytest.raises(ModelError, match=r"text\.onnx"):
        read_metadata(tmp_path / "text.onnx")


def test_progress_without_tqdm_is_a_plain_counter(monkeypatch, capsys):
    import sys

    from detector.runtime.progress import Counter, progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    with progress(3, "predict", "img") as bar:
        assert isinstance(bar, Counter)
        bar.update(2)
        bar.update(1)
    assert "predict: 3/3 img" in capsys.readouterr().err


def test_benchmark_refuses_a_named_provider_that_cannot_run(monkeypatch, tmp_path, capsys):
    import argparse

    from detector import benchmark

    monkeypatch.setattr(providers, "cuda_devices", lambda: (0, "no NVIDIA driver (test)"))
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "m.onnx"), "--providers", "cuda", "--iters", "1"])
    assert benchmark.run(args) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err


def test_cli_options_reach_the_detector_arguments():
    import argparse

    from detector.runtime.arguments import add_provider_arguments, detector_options

    parser = argparse.ArgumentParser()
    add_provider_arguments(parser)
    args = parser.parse_args(
        ["--providers", "tensorrt", "cuda", "--no-trt-fp16", "--trt-workspace-gb", "1.5",
         "--trt-exclude-ops", "NonZero,TopK", "--trt-profile", "a", "b", "c",
         "--no-cpu-fallback", "--trt-cache", "/tmp/c", "--device-id", "1"]
    )  # fmt: skip
    assert detector_options(args) == {
        "providers": ["tensorrt", "cuda"],
        "device_id": 1,
        "trt_cache_dir": "/tmp/c",
        "trt_fp16": False,
        "trt_workspace_bytes": int(1.5 * (1 << 30)),
        "trt_exclude_ops": ["NonZero", "TopK"],
        "trt_profile": ("a", "b", "c"),
        "cpu_fallback": False,
    }
    defaults = detector_options(parser.parse_args([]))
    assert defaults["trt_fp16"] is True and defaults["cpu_fallback"] is True
    assert defaults["providers"] is None and defaults["trt_exclude_ops"] is None
