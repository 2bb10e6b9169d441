"""Checkpoints: atomic, self-describing, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from server.app import checkpoint_each_round
from server.checkpoint import (
    Checkpoint,
    _row_dict,
    build_model_card,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    write_final,
)
from server.results import EVALUATE, Row
from server.strategy import ROUND_SECONDS, GuardedStrategy, build_strategy
from shared_model.contract import wire
from shared_model.contract.run_config import RunConfig, pyproject_defaults
from tests.server.fakes import Crash, FakeGrid, array_record, deterministic_site, numpy_arrays


def state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"a.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "a.bias": np.zeros(3, dtype=np.float32)}


def make_ck(rnd: int, **kw) -> Checkpoint:
    return Checkpoint(round=rnd, arrays=state(), model_config={"image_size": 32},
                      run_config={"strategy": "fedavg"}, **kw)


def test_checkpoint_round_trip_describes_itself(tmp_path):
    # Prepare
    rows = [Row(1, "site-00", 5, EVALUATE, wire.M_ACCURACY, 0.5)]
    strategy_state = {"inner": {"m_t": {"a.bias": np.ones(3)}}, "random_state": (3, (1, 2), None)}
    # Execute
    path = save_checkpoint(tmp_path, make_ck(1, rows=rows, strategy_state=strategy_state))
    ck = load_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    # Assert
    assert path.name == "round-0001.pt"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "round-0001.pt"
    for k, v in state().items():
        np.testing.assert_array_equal(ck.arrays[k], v)
        assert ck.arrays[k].dtype == v.dtype
    assert ck.rows == rows and ck.round == 1
    np.testing.assert_array_equal(ck.strategy_state["inner"]["m_t"]["a.bias"], np.ones(3))
    assert ck.strategy_state["random_state"] == (3, (1, 2), None)
    assert set(raw) >= {"model", "model_config", "run_config", "round", "code_version",
                        "strategy", "rows"}
    assert raw["code_version"].startswith("medfuse ")
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_load_latest_follows_the_pointer_and_survives_a_torn_file(tmp_path):
    # Prepare
    assert load_latest(tmp_path) is None
    save_checkpoint(tmp_path, make_ck(1))
    save_checkpoint(tmp_path, make_ck(2))
    # Execute: a crash left a torn round 3 that `latest` does not name
    (tmp_path / "checkpoints" / "round-0003.pt").write_bytes(b"torn")
    latest = load_latest(tmp_path)
    # Assert
    assert latest is not None and latest.round == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "round-0001.pt", "round-0002.pt", "round-0003.pt"]


def test_final_model_and_card(tmp_path):
    # Prepare
    rows = [Row(2, "site-00", 5, EVALUATE, wire.M_ACCURACY, 0.5),
            Row(2, "site-00", 5, EVALUATE, wire.M_AUROC, float("nan")),
            Row(2, "site-00", 5, "train", wire.M_EPSILON, 3.0)]
    card = build_model_card(model_config={"image_size": 32}, run_config={"dp": True,
                            "epsilon": 8.0, "delta": 1e-5}, labels=("a", "b"), rounds=2,
                            rows=rows, strategy="fedavg", version="medfuse test")
    # Execute
    folder = write_final(tmp_path, arrays=state(), card=card)
    # Assert
    saved = torch.load(folder / "model.pt", weights_only=True)
    assert saved["labels"] == ["a", "b"] and saved["round"] == 2
    assert set(saved["model"]) == set(state())
    js = json.loads((folder / "model_card.json").read_text())
    assert js["privacy"]["epsilon_spent_per_site"] == {"site-00": 3.0}
    assert js["final_metrics"]["site-00"]["auroc"] is None  # NaN -> null: strict JSON
    assert js["sites"] == ["site-00"] and js["rounds"] == 2
    assert "| site-00 | 3 |" in (folder / "model_card.md").read_text()


# ------------------------------------------------------------------ resume


def _run_config(strategy: str, **extra: object) -> RunConfig:
    flat = pyproject_defaults()
    flat.update({"strategy": strategy, "num-server-rounds": 4, "min-train-nodes": 3,
                 "min-available-nodes": 3, "min-evaluate-nodes": 3, "server-lr": 0.05,
                 **extra})
    return RunConfig.parse(flat)


def _federation(run: RunConfig, out, offset=0, arrays=None, crash_before_round=None,
                globals_seen=None):
    """Run the guarded strategy the way server/app.py does, with checkpoints to `out`;
    each round's global model is appended to `globals_seen` where given."""
    grid = FakeGrid({100 + i: deterministic_site(i, 10 * (i + 1)) for i in range(3)},
                    crash_before_round=crash_before_round)
    rows: list[Row] = []

    def hook(rnd, global_arrays, new_rows) -> None:
        rows.extend(new_rows)
        if globals_seen is not None:
            globals_seen.append(numpy_arrays(global_arrays))

    guarded = GuardedStrategy(build_strategy(run), max_norm=run.update_max_norm,
                              total_rounds=run.num_server_rounds, round_offset=offset,
                              on_round_end=hook, average_decay=run.ema_decay)
    if offset:
        ck = load_latest(out)
        guarded.load_checkpoint_state(ck.strategy_state)
        rows.extend(ck.rows)
        arrays = array_record(ck.arrays)
    guarded.start(grid, arrays, num_rounds=run.num_server_rounds - offset, timeout=10,
                  train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                  evaluate_fn=checkpoint_each_round(out, run, "test", guarded, rows))
    return numpy_arrays(guarded.global_arrays), rows


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedavgm"])
def test_resume_after_a_crash_gives_the_same_weights_as_an_uninterrupted_run(
    tmp_path, strategy
):
    # Prepare
    run = _run_config(strategy)
    init = array_record(state())
    # Execute: one run of 4 rounds; one that crashes in round 3 and is resumed
    straight, straight_rows = _federation(run, tmp_path / "straight", arrays=init)
    with pytest.raises(Crash):
        _federation(run, tmp_path / "crashed", arrays=init, crash_before_round=3)
    last = load_latest(tmp_path / "crashed")
    resumed, resumed_rows = _federation(run, tmp_path / "crashed", offset=last.round)
    # Assert
    assert last.round == 2
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    timed = (ROUND_SECONDS, wire.M_SECONDS)  # wall times differ from run to run
    assert ([r for r in resumed_rows if r.metric not in timed]
            == [r for r in straight_rows if r.metric not in timed])
    assert load_latest(tmp_path / "crashed").round == 4
    moved = max(float(np.abs(straight[k] - state()[k]).max()) for k in straight)
    assert moved > 0.01  # the rounds did change the model


def test_fedadam_state_is_what_makes_the_resume_exact(tmp_path):
    # Prepare: resume FedAdam but drop its m_t / v_t
    run = _run_config("fedadam")
    init = array_record(state())
    straight, _ = _federation(run, tmp_path / "a", arrays=init)
    with pytest.raises(Crash):
        _federation(run, tmp_path / "b", arrays=init, crash_before_round=3)
    ck = load_latest(tmp_path / "b")
    ck.strategy_state["inner"].clear()
    save_checkpoint(tmp_path / "b", ck)
    # Execute
    forgetful, _ = _federation(run, tmp_path / "b", offset=2)
    # Assert
    assert any(not np.array_equal(forgetful[k], straight[k]) for k in straight)


def test_parameter_average_is_the_final_model_and_resumes_exactly(tmp_path):
    # Prepare: the rounds' aggregates of a plain run (averaging changes only the last
    # round's output, so an averaging run trains through the same aggregates)
    init = array_record(state())
    plain_run, ema_run = _run_config("fedavg"), _run_config("fedavg", **{"ema-decay": 0.5})
    seen: list[dict[str, np.ndarray]] = []
    plain, _ = _federation(plain_run, tmp_path / "plain", arrays=init, globals_seen=seen)
    expected = {k: v.astype(np.float64) for k, v in seen[0].items()}
    for rnd in seen[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * rnd[k] for k in expected}
    # Execute: straight, and crashed in round 3 then resumed
    straight, _ = _federation(ema_run, tmp_path / "straight", arrays=init)
    with pytest.raises(Crash):
        _federation(ema_run, tmp_path / "crashed", arrays=init, crash_before_round=3)
    resumed, _ = _federation(ema_run, tmp_path / "crashed", offset=2)
    # Assert
    assert len(seen) == 4
    for name in straight:
        np.testing.assert_allclose(straight[name], expected[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(resumed[name], straight[name])
    assert any(not np.allclose(straight[k], plain[k]) for k in straight)


def test_checkpoint_rows_are_what_asdict_gives() -> None:
    """The rows are written without asdict's deep copy (a checkpoint holds every row so
    far), but as the same dicts: same keys, order and values."""
    rows = [Row(1, "a", 2, "train", "loss", 0.5),
            Row(3, "federation", 0, EVALUATE, "round-seconds", float("nan"))]
    for r in rows:
        got, want = _row_dict(r), asdict(r)
        assert list(got) == list(want)
        assert all(got[k] == want[k] or (got[k] != got[k] and want[k] != want[k])
                   for k in want)
