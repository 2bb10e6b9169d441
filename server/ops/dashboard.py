"""`medfuse dashboard RUN_DIR`: a live page on 127.0.0.1 that follows a federated run.

It reads what the ServerApp already writes into its output folder, and nothing else:
`results.jsonl` (per site and round: accuracy, loss, epsilon, update verdicts, round
seconds), the latest checkpoint (the run config: rounds planned, budget) and the
coordinator's audit log (why an update was left out). The page is one HTML file with its
script inline (no CDN, no internet) that asks `/api/state` every two seconds and redraws:
rounds done and planned, an accuracy curve per site over round numbers, each site's epsilon
against its budget (green, amber or red by the share spent), the last verdict per site and,
in a simulation's output folder, which experiment and seed it follows and why. It binds to
127.0.0.1 only, and answers only requests whose Host is a loopback name: a web page that
rebinds its own name to 127.0.0.1 (DNS rebinding) gets 403, not the run's state.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jinja2

from server.checkpoint import load_latest
from server.results import EVALUATE, FEDERATION, M_UPDATE_ACCEPTED, RESULTS_FILE, TRAIN, read_rows
from shared_model.audit_log import LOG_FILE, read
from shared_model.contract import wire
from shared_model.contract.metric_registry import HEADLINE

HOST = "127.0.0.1"
# the Host values a browser sends for a page it loaded from this machine (port optional)
_LOOPBACK_HOST = re.compile(r"(127\.0\.0\.1|localhost|\[::1\])(:\d{1,5})?", re.IGNORECASE)


def loopback_host(value: str | None) -> bool:
    """Whether a request's Host header names this machine's loopback (no header: no)."""
    return value is not None and _LOOPBACK_HOST.fullmatch(value.strip()) is not None


def waiting_line(out: Path) -> str:
    """What the dashboard of a folder without a run yet says it expects."""
    return (f"no run in {out} yet: waiting for {RESULTS_FILE} (a ServerApp output-dir) or "
            f"experiments/NAME/seed-S/{RESULTS_FILE} (a simulation's output folder)")


def _run_config(out: Path) -> dict[str, Any]:
    """The run config from the latest checkpoint (or the final model card), if any."""
    card = out / "final" / "model_card.json"
    if card.is_file():
        return dict(json.loads(card.read_text(encoding="utf-8")).get("run_config", {}))
    try:
        ck = load_latest(out)
    except Exception:  # a checkpoint being written: the next poll reads it
        return {}
    return dict(ck.run_config) if ck is not None else {}


def _verdicts(out: Path) -> dict[str, str]:
    """site -> the last train verdict in the coordinator's audit log."""
    last: dict[str, str] = {}
    try:
        entries = read(out / LOG_FILE)
    except (OSError, ValueError):
        return last
    for e in entries:
        if str(e.get("what", "")).startswith("train"):
            last[str(e.get("who", "")).split(" (node")[0]] = str(e.get("verdict", ""))
    return last


def _finite(v: float) -> float | None:
    return v if isinstance(v, int | float) and math.isfinite(v) else None


@dataclass(frozen=True)
class Followed:
    """The run folder the page shows and, in a simulation's output folder, which one it is."""

    run_dir: Path
    experiment: str | None = None
    seed: str | None = None
    why: str | None = None  # one sentence: why this run of the ones there


def _name(run: Path) -> str:
    return f"{run.parent.name}, seed {run.name.removeprefix('seed-')}"


def followed(out: Path) -> Followed:
    """The run folder to show: `out` itself when it is a ServerApp's output folder; in a
    simulation's output folder, the federated experiment written to last (the one running,
    or the last one run)."""
    if (out / RESULTS_FILE).is_file() or not (out / "experiments").is_dir():
        return Followed(out)
    runs = [p.parent for p in sorted(out.glob(f"experiments/*/seed-*/{RESULTS_FILE}"),
                                     key=lambda p: p.stat().st_mtime)]
    if not runs:
        return Followed(out)
    last = runs[-1]
    why = (f"the only federated run in {out}" if len(runs) == 1 else
           f"the one written to last of {len(runs)} federated runs in {out} ("
           + "; ".join(_name(r) for r in sorted(runs)) + ")")
    return Followed(last, last.parent.name, last.name.removeprefix("seed-"), why)


# the share of the budget spent below which a bar is green, and up to which it is amber
GREEN_BELOW, AMBER_UP_TO = 0.5, 0.9


def _spent(epsilon: float | None, budget: object) -> float | None:
    """epsilon / budget, uncapped; None when either is unknown (or the budget is not > 0)."""
    if epsilon is None or not isinstance(budget, int | float) or not budget > 0:
        return None
    return epsilon / budget


def budget_share(epsilon: float | None, budget: object) -> float | None:
    """The share of the budget spent, 1 at most (without DP, epsilon is infinite: 1)."""
    spent = _spent(epsilon, budget)
    return None if spent is None else min(spent, 1.0)


def budget_level(epsilon: float | None, budget: object) -> str | None:
    """How a bar reads: "green" below half the budget, "amber" up to 90% of it, "red"
    above (and without DP); None when epsilon or the budget is unknown."""
    spent = _spent(epsilon, budget)
    if spent is None:
        return None
    return "green" if spent < GREEN_BELOW else "amber" if spent <= AMBER_UP_TO else "red"


def round_ticks(planned: int) -> list[int]:
    """The round numbers a chart's x axis labels: 1, then every 1, 2, 5, 10, 20, 50, ...
    rounds up to `planned` (ten labels or so); none for no rounds."""
    step = next(m * 10**e for e in itertools.count() for m in (1, 2, 5)
                if planned <= 10 * m * 10**e)
    return sorted({1, *range(step, planned + 1, step)}) if planned >= 1 else []


def state(out: Path) -> dict[str, Any]:
    """Everything the page shows, from the run's own files."""
    shown = followed(Path(out))
    out = shown.run_dir
    has_run = (out / RESULTS_FILE).is_file()
    rows = read_rows(out / RESULTS_FILE) if has_run else []
    run = _run_config(out)
    sites: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.site == FEDERATION:
            continue
        s = sites.setdefault(r.site, {"accuracy": {}, "epsilon": None, "accepted": None})
        if r.phase == EVALUATE and r.metric == HEADLINE.name:
            s["accuracy"][r.round] = _finite(r.value)
        if r.phase == TRAIN and r.metric == wire.M_EPSILON:
            s["epsilon"] = r.value if not math.isnan(r.value) else None
        if r.phase == TRAIN and r.metric == M_UPDATE_ACCEPTED:
            s["accepted"] = bool(r.value)
    verdicts = _verdicts(out)
    budget = run.get("epsilon")
    for name, s in sites.items():
        s["verdict"] = verdicts.get(name, "")
        s["budget_share"] = budget_share(s["epsilon"], budget)
        s["budget_level"] = budget_level(s["epsilon"], budget)
        if s["epsilon"] is not None and math.isinf(s["epsilon"]):
            s["epsilon"] = "inf"  # JSON has no infinity
        s["accuracy"] = [[k, v] for k, v in sorted(s["accuracy"].items())]
    seconds = {r.round: r.value for r in rows if r.site == FEDERATION
               and r.metric == "round-seconds"}
    done, planned = max((r.round for r in rows), default=0), run.get("num-server-rounds")
    return {
        "run_dir": str(out), "experiment": shown.experiment, "seed": shown.seed,
        "following": (f"following {shown.experiment}, seed {shown.seed}: {shown.why}"
                      if shown.experiment else None),
        "rounds_done": done, "rounds_planned": planned,
        "round_ticks": round_ticks(max(planned or 0, done)),
        "strategy": run.get("strategy"), "epsilon_budget": budget, "dp": run.get("dp"),
        "finished": (out / "final" / "model.pt").is_file(),
        "round_seconds": [[k, v] for k, v in sorted(seconds.items())],
        "sites": dict(sorted(sites.items())),
        "waiting": None if has_run else waiting_line(out),
    }


def _page() -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("server.ops", "templates"),
                             autoescape=True)
    return env.get_template("dashboard.html.j2").render()


def make_server(out: Path, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for `out` on 127.0.0.1 (port 0: a free one); `serve_forever` it."""
    page = _page().encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not loopback_host(self.headers.get("Host")):
                self.send_error(403, "Host must be 127.0.0.1, localhost or [::1]")
                return
            if self.path.split("?")[0] == "/api/state":
                body, kind = json.dumps(state(out)).encode(), "application/json"
            elif self.path in ("/", "/index.html"):
                body, kind = page, "text/html; charset=utf-8"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:  # quiet: the terminal is the user's
            return

    return ThreadingHTTPServer((HOST, port), Handler)


def serve_in_background(out: Path, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start the dashboard in a daemon thread; (server, its URL). `server.shutdown()`."""
    server = make_server(out, port)
    threading.Thread(target=server.serve_forever, daemon=True, name="dashboard").start()
    return server, f"http://{HOST}:{server.server_address[1]}/"


def summary_line(s: Mapping[str, Any]) -> str:
    if s.get("waiting"):
        return str(s["waiting"])
    which = f"{s['experiment']} seed {s['seed']}: " if s.get("experiment") else ""
    return (f"{which}round {s['rounds_done']}/{s['rounds_planned'] or '?'}, "
            f"{len(s['sites'])} sites" + (", finished" if s["finished"] else ""))
