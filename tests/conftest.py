"""Shared fixtures. Tests read the real exports in ../shared/datasets (never modified)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_fixtures as fx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DETECTOR_SHARED", REPO_ROOT.parent / "shared"))
SHARED_DATASETS = SHARED / "datasets"
SHARED_WEIGHTS = SHARED / "weights"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.fail(f"shared datasets not found at {SHARED_DATASETS} (set DETECTOR_SHARED)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    if not SHARED_WEIGHTS.is_dir():
        pytest.fail(f"shared weights not found at {SHARED_WEIGHTS} (set DETECTOR_SHARED)")
    return SHARED_WEIGHTS


# Shared by tests/test_export.py and tests/test_runtime.py: one small trained checkpoint.
@pytest.fixture(scope="module")
def onnx_one_torch_thread():
    with fx.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return fx.work_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(work, shared_datasets) -> Path:
    return fx.trained_checkpoint(work, shared_datasets)


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    from detector.model import load_model

    model, _ = load_model(checkpoint)
    return model
