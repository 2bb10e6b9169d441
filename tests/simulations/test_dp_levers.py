"""The in-process lever harness: a federated run with every lever on, and a local run,
charged to their own ledgers (the product's private_round)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.model import MedFuseModel
from shared_model.model_file import payload
from simulations.dp_levers import run


@pytest.fixture
def public(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.small(image_size=32)
    path = tmp_path / "public.pt"
    torch.save(payload(MedFuseModel(cfg).state_dict(), cfg, DEFAULT_LABELS, round=0), path)
    return path


def test_a_federation_with_every_lever_and_a_local_run(tiny_federation, public, tmp_path):
    common = {"sites": str(tiny_federation[0].parent), "public": str(public),
              "out": str(tmp_path / "out"), "rounds": "2", "eps": "8"}
    fed = run("fed", {**common, "augmult": "2", "momentum": "0.5", "ema": "0.5",
                      "reserve": "2", "pepochs": "1", "sched": "cosine"})
    local = run("local", {**common, "mode": "local"})
    assert len(fed["curve"]) == 2 and len(fed["personalised"]) == 2
    assert all(0.0 <= a <= 1.0 for a in fed["per_site"] + fed["personalised"])
    assert len(local["per_site"]) == 2
    lines = (tmp_path / "out" / "levers.jsonl").read_text().splitlines()
    assert [json.loads(x)["name"] for x in lines] == ["fed", "local"]
    with pytest.raises(SystemExit, match="another name"):
        run("fed", common)  # its ledgers exist: never charged twice
