"""Shared fixtures. Unit tests (tests/unit) never start Ray; integration tests share one cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every test process and every Ray worker it starts must agree on these.
os.environ.setdefault("LORAFORGE_HOME", str(Path(__file__).resolve().parents[1] / ".loraforge" / "test"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def lab():
    """The lab world + pretrained lab model, built once and cached under LORAFORGE_HOME."""
    from loraforge.lab.build import ensure_lab

    return ensure_lab()


@pytest.fixture(scope="session")
def model_dir(lab) -> str:
    """The lab model's folder, as a string for from_pretrained-style calls."""
    return str(lab.model_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two OpenMP threads on a busy 2-core machine run the tiny lab model ~30x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
