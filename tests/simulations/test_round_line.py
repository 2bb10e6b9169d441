"""The harness's per-round progress line, from the ServerApp's result rows."""

from __future__ import annotations

from server.results import EVALUATE, M_UPDATE_ACCEPTED, TRAIN, Row
from simulations.experiments.federated import round_progress as round_line


def row(rnd: int, site: str, phase: str, metric: str, value: float) -> Row:
    return Row(round=rnd, site=site, node_id=0, phase=phase, metric=metric, value=value)


def test_the_line_shows_the_latest_evaluated_model_and_the_most_spent_epsilon():
    # Prepare: round 2's train replies carry round 1's evaluation
    rows = [row(1, s, EVALUATE, "accuracy", a) for s, a in (("a", 0.8), ("b", 0.6))]
    rows += [row(2, s, TRAIN, "epsilon", e) for s, e in (("a", 2.5), ("b", 3.0))]
    rows += [row(2, s, TRAIN, M_UPDATE_ACCEPTED, 1.0) for s in ("a", "b")]
    # Execute / Assert
    assert round_line(rows, 1) == "round 1: accuracy 0.700"
    assert round_line(rows, 2) == "round 2: accuracy 0.700 (round 1's model), epsilon 3.00"


def test_the_line_says_when_updates_were_left_out():
    # Prepare: every site refused round 1 (say, a learning rate above its node's limit)
    rows = [row(1, s, TRAIN, M_UPDATE_ACCEPTED, 0.0) for s in ("a", "b", "c")]
    rows.append(row(1, "d", TRAIN, M_UPDATE_ACCEPTED, 1.0))
    # Execute / Assert
    assert round_line(rows, 1) == "round 1: accuracy -, 3 of 4 updates left out"
