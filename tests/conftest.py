"""Shared test setup: one torch thread per test process (2-core CI) and no phoning home."""

import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
