"""Shared fixtures. Tests read the real exports in ../shared/datasets (never modified)."""

from __future__ import annotations

import os
from pathlib import Path

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
