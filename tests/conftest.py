"""Shared test setup: one torch thread per test process (2-core CI), no phoning home, and a
tiny synthetic federation that tests open instead of downloading anything."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TINY_IMAGE = 32


@pytest.fixture(autouse=True, scope="session")
def _own_privacy_store(tmp_path_factory: pytest.TempPathFactory):
    """No test (nor a Flower process a test starts) writes the machine's real ledger store."""
    os.environ["MEDFUSE_PRIVACY_STORE"] = str(tmp_path_factory.mktemp("privacy-store"))
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two synthetic hospitals, 40 cases each, 32 px: enough for a round, fast on CI."""
    from shared_model.tooling.synth import SynthConfig, write_federation

    out = tmp_path_factory.mktemp("federation")
    return write_federation(
        out, SynthConfig(sites=2, cases_per_site=40, seed=7, image_size=TINY_IMAGE)
    )
