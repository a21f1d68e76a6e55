"""Shared fixtures: where the real data and Inception weights live, and a tiny CPU budget per test.

Real data is looked up in $WGAN_SHARED (default: ../shared beside the checkout). Tests that need it
are skipped when it is absent; tests that can make their own tiny data do so.
"""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WGAN_SHARED", ROOT.parent / "shared"))
FID_WEIGHTS = SHARED / "models" / "weights-inception-2015-12-05-6726825d.pth"

torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI cores are shared


@pytest.fixture
def shared_dir():
    return SHARED


@pytest.fixture
def mnist_root():
    root = SHARED / "data"
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {root}")
    return root


@pytest.fixture
def fish_dir():
    path = SHARED / "data" / "fish"
    return path if path.is_dir() else None


@pytest.fixture
def fid_weights():
    if not FID_WEIGHTS.exists():
        pytest.skip(f"Inception weights not found at {FID_WEIGHTS}")
    return FID_WEIGHTS
