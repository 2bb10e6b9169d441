"""The ServerApp's main() on a fake in-process grid: config errors, outputs, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from server.app import initial_arrays, main, resolve_output_dir
from server.checkpoint import load_latest
from server.results import FEDERATION, read_rows
from server.strategy import BYTES_RECEIVED, BYTES_SENT, ROUND_SECONDS
from shared_model.config import ModelConfig
from shared_model.contract import wire
from shared_model.contract.run_config import RunConfig, RunConfigError, pyproject_defaults
from shared_model.model import MedFuseModel
from tests.server.fakes import Crash, FakeGrid, deterministic_site


def context(**overrides) -> Context:
    flat = pyproject_defaults()
    flat.update({"image-size": 32, "num-server-rounds": 3, "min-train-nodes": 2,
                 "min-evaluate-nodes": 2, "min-available-nodes": 2})
    flat.update(overrides)
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=flat)


def grid(crash_before_round=None) -> FakeGrid:
    return FakeGrid({200 + i: deterministic_site(i, 20 + 10 * i) for i in range(2)},
                    crash_before_round=crash_before_round)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("strategy", "fedsgd", "strategy"),
        ("fraction-train", 1.5, "fraction-train"),
        ("num-server-rounds", 0, "num-server-rounds"),
        ("min-available-nodes", 1, "min-available-nodes=1 is below min-train-nodes=2"),
        ("no-such-key", 1, "no-such-key"),
    ],
)
def test_a_bad_run_config_stops_before_any_round(tmp_path, key, value, says, flwr_log):
    # Prepare
    out = tmp_path / "out"
    g = grid()
    # Execute
    with pytest.raises(RunConfigError) as err:
        main(g, context(**{key: value, "output-dir": str(out)}))
    # Assert
    assert says in str(err.value)
    assert any("did not start" in line and says in line for line in flwr_log)
    assert g.sent == [] and not out.exists()


def test_relative_output_dir_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.chdir(tmp_path)
    # Execute / Assert
    assert resolve_output_dir("runs/x") == tmp_path.resolve() / "runs" / "x"
    assert resolve_output_dir(str(tmp_path / "abs")) == tmp_path / "abs"


def test_a_run_writes_results_checkpoints_and_the_final_model(tmp_path):
    # Prepare
    out = tmp_path / "run"
    # Execute
    main(grid(), context(**{"output-dir": str(out)}))
    # Assert
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "round-0001.pt", "round-0002.pt", "round-0003.pt"]
    rows = read_rows(out / "results.jsonl")
    assert {r.round for r in rows} == {1, 2, 3}
    assert {r.site for r in rows} == {"site-00", "site-01", FEDERATION}
    # the server timed every round (train sent to evaluated)
    timed = [r for r in rows if r.site == FEDERATION and r.metric == ROUND_SECONDS]
    assert sorted(r.round for r in timed) == sorted({r.round for r in rows}) and all(
        r.value > 0 for r in timed)
    assert {r.phase for r in rows} == {"train", "evaluate"}
    # every round's model was evaluated: rounds 1 and 2 inside the next round's train
    # message (evaluate-with-train), the final one in an evaluate message of its own
    evaluated = {(r.round, r.site) for r in rows if r.phase == "evaluate"
                 and r.metric == wire.M_ACCURACY}
    assert evaluated == {(k, s) for k in (1, 2, 3) for s in ("site-00", "site-01")}
    # and counted the array bytes each way: the model down once a round (and once more for
    # the final evaluation), the update up
    model_bytes = sum(v.numpy().nbytes for v in initial_arrays(
        RunConfig.parse(context().run_config)).values())
    for phase, messages in (("train", 6), ("evaluate", 2)):
        sent = [r.value for r in rows if r.phase == phase and r.metric == BYTES_SENT]
        assert sent == [model_bytes] * messages, phase
    up = [r.value for r in rows if r.phase == "train" and r.metric == BYTES_RECEIVED]
    assert len(up) == 6 and all(v > 0 for v in up)
    final = torch.load(out / "final" / "model.pt", weights_only=True)
    model = MedFuseModel(ModelConfig(**final["model_config"]))
    model.load_state_dict(final["model"])  # every tensor, strict
    card = json.loads((out / "final" / "model_card.json").read_text())
    assert card["rounds"] == 3 and card["sites"] == ["site-00", "site-01"]
    assert card["labels"] == list(final["labels"])
    assert card["privacy"]["epsilon_spent_per_site"] == {"site-00": 1.5, "site-01": 1.5}
    assert set(card["final_metrics"]) == {"site-00", "site-01", "mean"}
    assert load_latest(out).rows == rows


def test_resume_gives_the_same_final_model_as_an_uninterrupted_run(tmp_path):
    # Prepare
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    main(grid(), context(**{"output-dir": str(straight), "strategy": "fedadam"}))
    with pytest.raises(Crash):
        main(grid(crash_before_round=3),
             context(**{"output-dir": str(crashed), "strategy": "fedadam"}))
    assert not (crashed / "final").exists()
    # Execute
    main(grid(), context(**{"output-dir": str(crashed), "strategy": "fedadam",
                            "resume": True}))
    # Assert
    a = torch.load(straight / "final" / "model.pt", weights_only=True)["model"]
    b = torch.load(crashed / "final" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    def untimed(folder) -> list:  # wall times differ from run to run
        return [r for r in read_rows(folder / "results.jsonl")
                if r.metric not in (ROUND_SECONDS, wire.M_SECONDS)]

    assert untimed(straight) == untimed(crashed)
    init = MedFuseModel(ModelConfig(**torch.load(straight / "final" / "model.pt",
                                                 weights_only=True)["model_config"]))
    assert any(not np.allclose(init.state_dict()[k].numpy(), a[k].numpy()) for k in a)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    # Prepare
    out = tmp_path / "run"
    main(grid(), context(**{"output-dir": str(out), "num-server-rounds": 1}))
    # Execute / Assert
    with pytest.raises(RunConfigError, match="model config differs"):
        main(grid(), context(**{"output-dir": str(out), "resume": True, "fusion": "concat"}))


def test_a_fresh_run_replaces_the_earlier_runs_outputs(tmp_path):
    # Prepare
    out = tmp_path / "run"
    main(grid(), context(**{"output-dir": str(out)}))
    # Execute
    main(grid(), context(**{"output-dir": str(out), "num-server-rounds": 1}))
    # Assert
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "round-0001.pt"]
    assert {r.round for r in read_rows(out / "results.jsonl")} == {1}


def test_the_coordinators_audit_log_holds_every_reply_and_what_was_done_with_it(tmp_path):
    from typer.testing import CliRunner

    from medfuse import app as medfuse_app
    from shared_model import audit_log

    out = tmp_path / "run"
    main(grid(), context(**{"output-dir": str(out)}))
    entries = audit_log.verify(out / audit_log.LOG_FILE)
    # 3 rounds x 2 sites x (train + evaluate)
    assert len(entries) == 12
    trains = [e for e in entries if e["what"].startswith("train")]
    assert all(e["verdict"] == "accepted" and e["arrays"]["count"] > 0 for e in trains)
    assert all(e["arrays"] is None for e in entries if e["what"].startswith("evaluate"))
    shown = CliRunner().invoke(medfuse_app, ["audit-log", "show", str(out)])
    checked = CliRunner().invoke(medfuse_app, ["audit-log", "verify", str(out)])
    assert shown.exit_code == 0 and "site-00" in shown.output
    assert checked.exit_code == 0 and "12 entries" in checked.output
    (out / audit_log.LOG_FILE).write_text("")  # emptied
    refused = CliRunner().invoke(medfuse_app, ["audit-log", "verify", str(out)])
    assert refused.exit_code == 1 and "truncated" in refused.output


def test_the_model_card_describes_the_bundle(tmp_path):
    out = tmp_path / "run"
    main(grid(), context(**{"output-dir": str(out)}))
    card = json.loads((out / "final" / "model_card.json").read_text())
    assert card["input"]["image_size"] == card["model_config"]["image_size"]
    assert "normalisation" in card["input"] and card["input"]["formats"]
    assert set(card["site_sizes"]) == {"site-00", "site-01"}
    assert card["started_from"]["initial_model"] == "random initialisation"
    assert "not a medical device" in card["intended_use"] and card["limits"]
    md = (out / "final" / "model_card.md").read_text()
    assert "intended use" in md and "started from" in md
