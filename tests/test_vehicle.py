"""The vehicle side: a venv with only the runtime's packages, the C++ example, gpu_check.sh."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import cv2
import numpy as np
import onnx_fixtures as fx
import pytest

from detector.runtime import Detector

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("onnx_one_torch_thread")]


@pytest.fixture(scope="module")
def b2(work, shared_datasets) -> Path:
    return fx.exported(work, shared_datasets, "b2", batch=2)[0]


@pytest.fixture(scope="module")
def frames(tmp_path_factory, shared_datasets) -> Path:
    folder = tmp_path_factory.mktemp("vehicle_frames")
    for name in ("raccoon-1", "raccoon-110", "raccoon-10"):
        cv2.imwrite(str(folder / f"{name}.jpg"), fx.raccoon_image(shared_datasets, name))
    return folder


def test_vehicle_extra_matches_requirements_file():
    extra = pyproject()["project"]
    listed = [
        line.strip()
        for line in (ROOT / "requirements-vehicle.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert listed == extra["optional-dependencies"]["vehicle"]
    # TensorRT 10 (libnvinfer.so.10, what onnxruntime-gpu's provider links), never 11.x
    assert all(re.search(r"tensorrt-cu1[23]-libs==10\.", r) for r in listed if "tensorrt" in r)


def _runtime_packages() -> list[str]:
    """The runtime extra with the CPU onnxruntime (no GPU here), at the installed versions."""
    extra = pyproject()["project"]
    names = [re.split(r"[<>=;\[ ]", r)[0] for r in extra["optional-dependencies"]["runtime"]]
    names = ["onnxruntime" if n == "onnxruntime-gpu" else n for n in names]
    assert sorted(names) == ["numpy", "onnxruntime", "opencv-python-headless"]
    import onnxruntime

    pins = {"onnxruntime": onnxruntime.__version__}  # the CPU wheel of the installed version
    return [f"{n}=={pins[n]}" if n in pins else n for n in names]


def test_runtime_alone_in_a_fresh_venv(b2, frames, tmp_path):
    """detector --help / predict / benchmark where only numpy, OpenCV and onnxruntime exist."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # onnxruntime's own small dependencies come along; the project itself without its deps.
    subprocess.run([*pip, *_runtime_packages()], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, timeout=300)
    missing = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([m for m in ('torch', 'torchvision', 'tqdm', "
            "'yaml', 'PIL') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert missing.stdout.strip() == "[]", missing.stdout
    cli = str(env_dir / "bin" / "detector")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [cli, *map(str, a)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    helped = run("--help")
    assert helped.returncode == 0 and "predict" in helped.stdout, helped.stderr
    out = tmp_path / "pred"
    predicted = run("predict", b2, frames, "--out", out, "--providers", "cpu", "--score", "0.3")
    assert predicted.returncode == 0, predicted.stderr
    assert "predict: 3 images" in predicted.stdout
    assert "predict: 3/3 img" in predicted.stderr  # the plain counter (no tqdm here)
    assert len(list((out / "images").iterdir())) == 3 and (out / "results.json").is_file()
    timed = run(
        "benchmark",
        b2,
        "--size",
        "256",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--providers",
        "cpu",
        "--threads",
        "1",
        "--json",
        tmp_path / "bench.json",
    )
    assert timed.returncode == 0, timed.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["results"]


def _onnxruntime_headers() -> Path | None:
    for candidate in (
        os.environ.get("ONNXRUNTIME_INCLUDE_DIR"),
        ROOT / "examples" / "cpp" / "third_party" / "onnxruntime" / "include",
        "/usr/include/onnxruntime",
        "/usr/local/include/onnxruntime",
    ):
        if candidate and (Path(candidate) / "onnxruntime_cxx_api.h").is_file():
            return Path(candidate)
    return None


def test_cpp_example_reads_the_contract_and_matches_python(b2, frames, tmp_path):
    if not (shutil.which("cmake") and shutil.which("g++") and shutil.which("make")):
        pytest.skip("cmake, make or g++ missing: the C++ example cannot be built here")
    headers = _onnxruntime_headers()
    if headers is None:
        pytest.skip(
            "ONNX Runtime C++ headers not found (the wheel ships the library only): set "
            "ONNXRUNTIME_INCLUDE_DIR or put them in examples/cpp/third_party/onnxruntime/include "
            "(examples/cpp/README.md)"
        )
    build = tmp_path / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            ROOT / "examples" / "cpp",
            "-B",
            build,
            f"-DONNXRUNTIME_INCLUDE_DIR={headers}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(["cmake", "--build", build], check=True, capture_output=True, timeout=600)
    # three frames of one size on a batch-2 model: two batches, the second padded
    frame = cv2.imread(str(frames / "raccoon-1.jpg"))
    ppm = []
    for i, f in enumerate([frame, cv2.flip(frame, 1), frame]):
        ppm.append(tmp_path / f"f{i}.ppm")
        cv2.imwrite(str(ppm[-1]), f)
    done = subprocess.run(
        [build / "detector_example", b2, *ppm, "--score", "0.3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "batch 2" in done.stdout
    expected = Detector(b2, providers=["cpu"], threads=1, score_threshold=0.3).predict(
        [cv2.imread(str(p)) for p in ppm]
    )
    for i, det in enumerate(expected):
        assert f"frame {i}: {len(det)} detections" in done.stdout
        rows = [
            line.split()[3:] for line in done.stdout.splitlines() if line.startswith(f"frame {i} ")
        ]
        got = np.array([[float(v) for v in row] for row in rows], np.float32).reshape(-1, 5)
        np.testing.assert_allclose(got[:, 0], det.scores, atol=1e-4)
        np.testing.assert_allclose(got[:, 1:], det.boxes, atol=1e-2)
    broken = subprocess.run(
        [build / "detector_example", ppm[0], ppm[0]], capture_output=True, text=True, timeout=60
    )
    assert broken.returncode == 1 and "error:" in broken.stderr


def test_gpu_check_dry_run_says_what_it_skips(b2, frames, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    shutil.copy2(b2, bundle / "models" / "b2.onnx")
    shutil.copytree(frames, bundle / "frames")
    out = tmp_path / "gpu"
    done = subprocess.run(
        ["bash", ROOT / "benchmarks" / "gpu_check.sh", "--dry-run", "--bundle", bundle, out],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == ["environment", "eager_latency", "frozen_training", "tensorrt"]
    assert sections["frozen_training"]["status"] == "skipped"
    assert "--device" in sections["frozen_training"]["command"]
    assert "GPU latency not measured" in sections["eager_latency"]["reason"]
    trt = sections["tensorrt"]
    assert trt["status"] == "ran" and "TensorRT not measured" in trt["reason"]
    assert trt["results"][0]["sizes"]["640x480"]["p50_ms"] > 0
    # the parity code on CPU against CPU: every detection matched, identical scores
    for f in trt["parity"][0]["frames"]:
        assert f["a"] == f["b"] == f["matched"]
        assert f["max_score_diff"] in (None, 0.0)
    assert "skipped or failed: frozen_training" in done.stdout
