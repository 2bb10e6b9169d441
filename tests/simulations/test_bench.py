"""`medfuse bench` measures and writes its figures (never a timed assertion)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.bench import parameter_bytes, round_bytes, run_bench


@pytest.mark.slow
def test_bench_writes_every_figure_with_its_settings(tmp_path: Path):
    lines: list[str] = []
    run_bench(tmp_path, quick=True, image_size=32, echo=lines.append)
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("dp_step_ratio", "dp_step_ratio_no_embeddings", "dp_step_ratio_heads",
                "bytes_per_round_ratio", "sim_round_overhead", "hospitals_max"):
        assert data[key]["value"] > 0 and data[key]["settings"], key
    # the secure run finished every round beside the plain one (the difference may be
    # either sign on a noisy machine: a measurement, not an assertion)
    secure = data["secagg_round_extra_s"]["settings"]
    assert len(secure["secure_round_wall_s"]) == len(secure["plain_round_wall_s"]) == 3
    # one model down and one update up per round: 16 bits both ways about half of 32 (the
    # quick bench leaves out the run with only the update in 16 bits)
    sixteen = data["bytes_per_round_ratio_16bit"]["value"]
    assert 0.4 < sixteen / data["bytes_per_round_ratio"]["value"] < 0.6
    assert "bytes_per_round_ratio_16bit_update" not in data
    assert data["bytes_per_round_ratio_16bit"]["goal"].startswith("<= 0.55")
    assert data["dp_step_ratio"]["goal"].startswith("<= 1.6")
    assert data["dp_step_ratio_hooks"]["value"] > 0  # Opacus' hooks, measured beside
    assert any(line.startswith("dp_step_ratio") for line in lines)
    assert data["hospitals_max"]["value"] == 8  # quick: 8 hospitals, 4 sampled
    assert all(p["peak_gb"] > 0 for p in data["hospitals_max"]["settings"]["points"])
    assert (tmp_path / "bench-hospitals.png").is_file()
    # every hospital sampled: all of them trained in the round
    everyone = data["hospitals_all_train"]["settings"]["points"]
    assert [(p["hospitals"], p["trained"]) for p in everyone] == [(4, 4)]  # quick: 4
    assert data["hospitals_all_train"]["goal"].startswith(">= 200")


def test_bytes_count_each_stored_parameter_once():
    s = parameter_bytes(32)
    # the state dict holds each DPLSTM weight once (not under its two names)
    assert s["state_dict_bytes"] == s["parameter_bytes"] > 0


def test_round_bytes_are_each_sites_traffic_before_the_final_round():
    from server.results import Row
    from server.strategy import BYTES_RECEIVED, BYTES_SENT

    rows = [Row(1, "a", 1, "train", BYTES_SENT, 100.0),
            Row(1, "a", 1, "train", BYTES_RECEIVED, 50.0),
            Row(1, "b", 2, "train", BYTES_SENT, 100.0),
            Row(1, "b", 2, "train", BYTES_RECEIVED, 30.0),
            Row(2, "a", 1, "train", BYTES_SENT, 100.0),
            Row(2, "a", 1, "evaluate", BYTES_SENT, 100.0)]  # last round: the final evaluation
    assert round_bytes(rows) == [140.0]


def test_round_overheads_are_wall_time_against_the_slowest_sites_own_seconds():
    from server.results import FEDERATION, Row
    from server.strategy import ROUND_SECONDS
    from shared_model.contract import wire
    from simulations.bench import round_overheads

    rows = [Row(1, FEDERATION, 0, "evaluate", ROUND_SECONDS, 30.0),
            Row(1, "a", 1, "train", wire.M_SECONDS, 4.0),
            Row(1, "a", 1, "evaluate", wire.M_SECONDS, 1.0),
            Row(1, "b", 2, "train", wire.M_SECONDS, 6.0),
            Row(2, "a", 1, "train", wire.M_SECONDS, 2.0)]  # round 2: no wall time yet
    assert round_overheads(rows) == [(30.0, 6.0)]
