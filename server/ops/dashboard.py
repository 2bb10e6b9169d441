"""`medfuse dashboard RUN_DIR`: a live page on 127.0.0.1 that follows a federated run.

It reads what the ServerApp already writes into its output folder, and nothing else:
`results.jsonl` (per site and round: accuracy, loss, epsilon, update verdicts, round
seconds), the latest checkpoint (the run config: rounds planned, budget) and the
coordinator's audit log (why an update was left out). The page is one HTML file with its
script inline (no CDN, no internet) that asks `/api/state` every two seconds and redraws:
rounds done and planned, an accuracy curve per site, each site's epsilon against its
budget, the last verdict per site. It binds to 127.0.0.1 only, and answers only requests
whose Host is a loopback name: a web page that rebinds its own name to 127.0.0.1 (DNS
rebinding) gets 403, not the run's state.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jinja2

from server.checkpoint import load_latest
from server.results import EVALUATE, FEDERATION, M_UPDATE_ACCEPTED, RESULTS_FILE, TRAIN, read_rows
from shared_model import wire
from shared_model.audit_log import LOG_FILE, read
from shared_model.metric_registry import HEADLINE

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


def followed(out: Path) -> Path:
    """The run folder to show: `out` itself when it is a ServerApp's output folder; in a
    simulation's output folder, the federated experiment written to last (the one running,
    or the last one run)."""
    if (out / RESULTS_FILE).is_file() or not (out / "experiments").is_dir():
        return out
    runs = sorted(out.glob(f"experiments/*/seed-*/{RESULTS_FILE}"),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else out


def state(out: Path) -> dict[str, Any]:
    """Everything the page shows, from the run's own files."""
    out = followed(Path(out))
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
            s["epsilon"] = _finite(r.value) if math.isfinite(r.value) else "inf"
        if r.phase == TRAIN and r.metric == M_UPDATE_ACCEPTED:
            s["accepted"] = bool(r.value)
    verdicts = _verdicts(out)
    for name, s in sites.items():
        s["verdict"] = verdicts.get(name, "")
        s["accuracy"] = [[k, v] for k, v in sorted(s["accuracy"].items())]
    seconds = {r.round: r.value for r in rows if r.site == FEDERATION
               and r.metric == "round-seconds"}
    return {
        "run_dir": str(out), "rounds_done": max((r.round for r in rows), default=0),
        "rounds_planned": run.get("num-server-rounds"), "strategy": run.get("strategy"),
        "epsilon_budget": run.get("epsilon"), "dp": run.get("dp"),
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
    return (f"round {s['rounds_done']}/{s['rounds_planned'] or '?'}, {len(s['sites'])} sites"
            + (", finished" if s["finished"] else ""))
