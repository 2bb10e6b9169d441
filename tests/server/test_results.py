"""The results file and its views: long rows, appended per round, privacy ledger."""

from __future__ import annotations

import json
import math

from server.results import (
    EVALUATE,
    M_UPDATE_ACCEPTED,
    TRAIN,
    ResultsWriter,
    Row,
    final_metrics,
    ledger_table,
    privacy_ledger,
    read_rows,
    render,
    round_line,
    round_table,
)
from shared_model.contract import wire


def rows_for(rnd: int) -> list[Row]:
    out = []
    for i, site in enumerate(["site-00", "site-01"]):
        out += [
            Row(rnd, site, 10 + i, TRAIN, wire.M_EPSILON, 0.5 * rnd + i),
            Row(rnd, site, 10 + i, TRAIN, wire.M_TRAIN_LOSS, 1.0 / rnd),
            Row(rnd, site, 10 + i, TRAIN, M_UPDATE_ACCEPTED, 1.0),
            Row(rnd, site, 10 + i, EVALUATE, wire.M_ACCURACY, 0.1 * rnd + 0.2 * i),
            Row(rnd, site, 10 + i, EVALUATE, wire.M_NUM_EXAMPLES, 20.0),
        ]
    return out


def test_rows_are_appended_as_json_lines_each_round(tmp_path):
    # Prepare
    writer = ResultsWriter(tmp_path / "out" / "results.jsonl")
    # Execute
    writer.append(rows_for(1))
    after_one = read_rows(writer.path)
    writer.append(rows_for(2))
    # Assert
    assert after_one == rows_for(1)
    assert read_rows(writer.path) == rows_for(1) + rows_for(2)
    first = json.loads(writer.path.read_text().splitlines()[0])
    assert set(first) == {"round", "site", "node_id", "phase", "metric", "value"}


def test_replace_restores_the_checkpoints_rows_and_a_torn_line_is_ignored(tmp_path):
    # Prepare: a crash left round 2 rows and half a line
    writer = ResultsWriter(tmp_path / "results.jsonl")
    writer.append(rows_for(1) + rows_for(2))
    with writer.path.open("a") as fh:
        fh.write('{"round": 3, "site": "si')
    # Execute
    torn = read_rows(writer.path)
    writer.replace(rows_for(1))
    # Assert
    assert torn == rows_for(1) + rows_for(2)
    assert read_rows(writer.path) == rows_for(1)


def test_privacy_ledger_is_epsilon_per_site_per_round():
    # Execute
    ledger = privacy_ledger(rows_for(1) + rows_for(2))
    # Assert
    assert ledger == {"site-00": {1: 0.5, 2: 1.0}, "site-01": {1: 1.5, 2: 2.0}}
    text = render(ledger_table(rows_for(1) + rows_for(2)))
    assert "site-01" in text and "2.00" in text


def test_final_metrics_take_each_sites_last_evaluation_and_the_mean():
    # Execute
    final = final_metrics(rows_for(1) + rows_for(2))
    # Assert
    assert math.isclose(final["site-00"][wire.M_ACCURACY], 0.2)
    assert math.isclose(final["site-01"][wire.M_ACCURACY], 0.4)
    assert math.isclose(final["mean"][wire.M_ACCURACY], 0.3)
    assert wire.M_NUM_EXAMPLES not in final["mean"]


def test_round_table_and_line_show_per_site_and_mean_accuracy_and_epsilon():
    # Execute
    table = render(round_table(2, 5, rows_for(2)))
    line = round_line(2, rows_for(2))
    # Assert
    assert "round 2/5" in table and "mean" in table and "used" in table
    assert "0.300" in table  # mean accuracy (0.2 + 0.4) / 2
    assert line.startswith("round 2: mean acc=0.300 eps=1.50")
    assert "site-00 acc=0.200 eps=1.00" in line
