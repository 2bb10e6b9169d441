"""The run's results as a long table, written as the run goes (no Flower).

One JSON object per line in `<output-dir>/results.jsonl`:

    {"round": 3, "site": "site-01", "node_id": 123, "phase": "evaluate",
     "metric": "accuracy", "value": 0.71}

`phase` is `train` (what a site reported after training, plus the server's own verdict on
its update: `update-accepted` 0/1 and `update-norm`) or `evaluate` (the global model on the
site's held-out split). Rows are appended and flushed after every round, so a crashed run
keeps every finished round; a resumed run first restores the rows of its checkpoint.

Views on the same rows: a per-round table (mean and per-site accuracy and epsilon), the
privacy ledger (epsilon spent per site per round), and the final per-site summary.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from shared_model.contract import wire
from shared_model.contract.metric_registry import HEADLINE, View, shown_in
from shared_model.files import atomic_write_text

Phase = Literal["train", "evaluate"]
TRAIN: Phase = "train"
EVALUATE: Phase = "evaluate"

# Server-side metrics (never cross the network): the verdict on each site's update.
M_UPDATE_ACCEPTED = "update-accepted"
M_UPDATE_NORM = "update-norm"

RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Row:
    """One measurement: (round, site, node, phase, metric) -> value."""

    round: int
    site: str
    node_id: int
    phase: Phase
    metric: str
    value: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Row:
        return cls(
            round=int(d["round"]),  # type: ignore[arg-type]
            site=str(d["site"]),
            node_id=int(d["node_id"]),  # type: ignore[arg-type]
            phase=str(d["phase"]),  # type: ignore[arg-type]
            metric=str(d["metric"]),
            value=float(d["value"]),  # type: ignore[arg-type]
        )


class ResultsWriter:
    """Appends rows to the results file; each `append` is flushed and synced to disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rows: Iterable[Row]) -> None:
        lines = "".join(r.to_json() + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def replace(self, rows: Iterable[Row]) -> None:
        """Rewrite the file to hold exactly `rows`, atomically (a resumed run restores the
        rows of its checkpoint, dropping any of rounds it will redo)."""
        atomic_write_text(self.path, "".join(r.to_json() + "\n" for r in rows))


def read_rows(path: Path) -> list[Row]:
    """Every row of a results file; a torn last line (a crash mid-write) is ignored."""
    rows: list[Row] = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(Row.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return rows


# ------------------------------------------------------------------ views


def _value(rows: Iterable[Row], phase: str, metric: str) -> dict[tuple[int, str], float]:
    """(round, site) -> value of one metric in one phase."""
    return {(r.round, r.site): r.value for r in rows if r.phase == phase and r.metric == metric}


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}"


FEDERATION = "federation"  # the site name of rows about the federation as a whole


def sites_of(rows: Iterable[Row]) -> list[str]:
    return sorted({r.site for r in rows if r.site != FEDERATION})


def central_epsilon(rows: Iterable[Row]) -> float | None:
    """The federation's client-level epsilon after its last released round (None
    without central DP)."""
    spent = [r.value for r in rows if r.site == FEDERATION and r.metric == wire.M_CENTRAL_EPSILON]
    return max(spent) if spent else None


def privacy_ledger(rows: Iterable[Row]) -> dict[str, dict[int, float]]:
    """site -> {round: cumulative epsilon that site reported after training that round}.

    The epsilon in each train reply is the site's running total over everything released
    from its data, so the last entry is what the site has spent.
    """
    ledger: dict[str, dict[int, float]] = {}
    for (rnd, site), eps in sorted(_value(rows, TRAIN, wire.M_EPSILON).items()):
        ledger.setdefault(site, {})[rnd] = eps
    return ledger


def epsilon_spent(rows: Iterable[Row], metric: str = wire.M_EPSILON) -> dict[str, float]:
    """site -> the largest cumulative epsilon it reported (train or evaluate); `metric`
    M_EVAL_EPSILON for the evaluation budget. Infinite where a site released without DP."""
    spent: dict[str, float] = {}
    for r in rows:
        if r.metric == metric and not math.isnan(r.value):
            spent[r.site] = max(spent.get(r.site, 0.0), r.value)
    return spent


def final_metrics(rows: Iterable[Row]) -> dict[str, dict[str, float]]:
    """site -> its evaluate metrics from the last round it was evaluated, plus 'mean'
    (the unweighted mean over sites of each metric)."""
    rows = [r for r in rows if r.site != FEDERATION]
    last: dict[str, int] = {}
    for r in rows:
        if r.phase == EVALUATE:
            last[r.site] = max(last.get(r.site, 0), r.round)
    per_site: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.phase == EVALUATE and last.get(r.site) == r.round:
            per_site.setdefault(r.site, {})[r.metric] = r.value
    metrics = sorted({m for d in per_site.values() for m in d} - {wire.M_NUM_EXAMPLES})
    out: dict[str, dict[str, float]] = {s: per_site[s] for s in sorted(per_site)}
    if per_site:
        out["mean"] = {m: _mean([d[m] for d in per_site.values() if m in d]) for m in metrics}
    return out


def round_table(server_round: int, total_rounds: int, rows: Iterable[Row]) -> Table:
    """One round at a glance: per site, the update verdict, train loss, the metrics the
    registry shows per round (accuracy, macro-F1) and cumulative epsilon; a last line
    with the means over sites."""
    rows = [r for r in rows if r.round == server_round]
    shown = shown_in(View.ROUND)
    values = {m.name: _value(rows, EVALUATE, m.name) for m in shown}
    loss = _value(rows, TRAIN, wire.M_TRAIN_LOSS)
    accepted = _value(rows, TRAIN, M_UPDATE_ACCEPTED)
    eps = _value(rows, TRAIN, wire.M_EPSILON)
    eps_eval = _value(rows, EVALUATE, wire.M_EPSILON)

    table = Table(title=f"round {server_round}/{total_rounds}", title_justify="left")
    table.add_column("site", justify="left")
    table.add_column("update", justify="left")
    for col in ("train loss", *(m.label for m in shown), "epsilon"):
        table.add_column(col, justify="right")

    means: dict[str, list[float]] = {name: [] for name in ("loss", *values, "eps")}
    for site in sites_of(rows):
        key = (server_round, site)
        verdict = {1.0: "used", 0.0: "left out"}.get(accepted.get(key, -1.0), "-")
        e = eps.get(key, eps_eval.get(key))
        site_values = {"loss": loss.get(key), **{n: v.get(key) for n, v in values.items()},
                       "eps": e}
        for name, v in site_values.items():
            if v is not None:
                means[name].append(v)
        table.add_row(site, verdict, _fmt(loss.get(key)),
                      *(m.fmt(values[m.name].get(key)) for m in shown), _fmt(e, 2))
    table.add_section()
    table.add_row("mean", "", _fmt(_mean(means["loss"])),
                  *(m.fmt(_mean(means[m.name])) for m in shown), _fmt(_mean(means["eps"]), 2))
    return table


def ledger_table(rows: Iterable[Row]) -> Table:
    """The privacy ledger: epsilon spent per site (rows) after each round (columns)."""
    ledger = privacy_ledger(rows)
    rounds = sorted({r for d in ledger.values() for r in d})
    table = Table(title="privacy ledger (epsilon)", title_justify="left")
    table.add_column("site")
    for rnd in rounds:
        table.add_column(f"r{rnd}", justify="right")
    for site, by_round in sorted(ledger.items()):
        table.add_row(site, *(_fmt(by_round.get(rnd), 2) for rnd in rounds))
    return table


def round_line(server_round: int, rows: Iterable[Row]) -> str:
    """A one-line summary: mean and per-site headline metric (accuracy) and epsilon."""
    rows = [r for r in rows if r.round == server_round]
    acc = _value(rows, EVALUATE, HEADLINE.name)
    eps = _value(rows, TRAIN, wire.M_EPSILON)
    tag = HEADLINE.narrow
    parts = []
    for site in sites_of(rows):
        key = (server_round, site)
        parts.append(f"{site} {tag}={HEADLINE.fmt(acc.get(key))} eps={_fmt(eps.get(key), 2)}")
    mean_acc = _mean([v for v in acc.values()])
    mean_eps = _mean([v for v in eps.values()])
    return (
        f"round {server_round}: mean {tag}={HEADLINE.fmt(mean_acc)} eps={_fmt(mean_eps, 2)} | "
        + "; ".join(parts)
    )


def render(table: Table, width: int = 110) -> str:
    """A rich table as plain text (for a log, which may not be a terminal)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines())
