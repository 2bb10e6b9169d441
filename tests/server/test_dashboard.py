"""The coordinator's live dashboard: its state comes from the run's own files, it serves
on 127.0.0.1, and in headless Chromium the page shows the rounds and sites and follows a
run as it goes (a screenshot is kept)."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.app import main
from server.ops.dashboard import (
    budget_level,
    budget_share,
    round_ticks,
    serve_in_background,
    state,
    summary_line,
)
from tests.server.test_app import context, grid

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run(out: Path) -> None:
    main(grid(), context(**{"output-dir": str(out)}))


def test_state_is_read_from_the_runs_own_files(tmp_path: Path):
    out = tmp_path / "run"
    empty = state(out)
    _run(out)
    done = state(out)
    assert empty["rounds_done"] == 0 and empty["sites"] == {}
    assert done["rounds_done"] == done["rounds_planned"] == 3 and done["finished"]
    assert set(done["sites"]) == {"site-00", "site-01"}
    site = done["sites"]["site-00"]
    assert [r for r, _ in site["accuracy"]] == [1, 2, 3] and site["verdict"] == "accepted"
    assert len(done["round_seconds"]) == 3


def test_in_a_simulation_folder_it_follows_the_experiment_written_last(tmp_path: Path):
    # Prepare: a simulation's output folder with two federated experiments' runs
    sim = tmp_path / "sim"
    first, second = (sim / "experiments" / name / "seed-0" for name in ("fedavg", "fedprox"))
    _run(first)
    _run(second)
    os.utime(first / "results.jsonl")  # the first is the one being written now
    # Execute
    shown = state(sim)
    # Assert
    assert shown["run_dir"] == str(first) and shown["rounds_done"] == 3
    assert state(tmp_path / "nothing-yet")["sites"] == {}


def test_it_serves_the_page_and_the_state_on_loopback(tmp_path: Path):
    out = tmp_path / "run"
    _run(out)
    server, url = serve_in_background(out)
    try:
        assert url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        data = json.loads(urllib.request.urlopen(url + "api/state", timeout=10).read())
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "nothing", timeout=10)
    finally:
        server.shutdown()
    assert "medfuse dashboard" in page and "<script>" in page
    assert "<script src" not in page and "<link" not in page  # no CDN: everything inline
    assert data["rounds_done"] == 3


def _get(url: str, host: str) -> tuple[int, bytes]:
    """A raw HTTP/1.1 GET to the dashboard on 127.0.0.1 with the given Host header."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /api/state HTTP/1.1\r\nHost: {host}\r\n"
                     "Connection: close\r\n\r\n".encode())
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_it_answers_only_requests_addressed_to_loopback(tmp_path: Path):
    # Prepare: a DNS-rebinding page reaches 127.0.0.1 with its own name as Host
    out = tmp_path / "run"
    _run(out)
    server, url = serve_in_background(out)
    # Execute
    try:
        evil = _get(url, "evil.example")
        evil_port = _get(url, "evil.example:8765")
        loopback = [_get(url, h)[0] for h in
                    ("127.0.0.1", "127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765")]
    finally:
        server.shutdown()
    # Assert
    assert evil[0] == evil_port[0] == 403 and b"rounds_done" not in evil[1]
    assert loopback == [200] * 5


def test_a_folder_without_a_run_says_what_it_waits_for(tmp_path: Path):
    # Prepare: a folder that is neither a ServerApp output-dir nor a simulation's
    out = tmp_path / "not-a-run"
    out.mkdir()
    (out / "notes.txt").write_text("hello")
    # Execute
    empty, line = state(out), summary_line(state(out))
    _run(out)
    done = state(out)
    # Assert: one line that names what was expected, gone once the run writes
    assert empty["waiting"] == line
    assert "results.jsonl" in line and "experiments/NAME/seed-S" in line and str(out) in line
    assert done["waiting"] is None and summary_line(done).startswith("round 3/3")


@pytest.mark.parametrize(("planned", "ticks"), [
    (0, []), (1, [1]), (3, [1, 2, 3]), (10, list(range(1, 11))), (11, [1, 2, 4, 6, 8, 10]),
    (23, [1, 5, 10, 15, 20]), (100, [1, *range(10, 101, 10)]),
])
def test_the_x_axis_labels_round_numbers(planned: int, ticks: list[int]):
    # Execute
    got = round_ticks(planned)
    # Assert: integers from round 1, never an index 0 or a fraction, ten labels or so
    assert got == ticks and all(type(t) is int for t in got)


def test_the_state_carries_the_round_numbers_to_label(tmp_path: Path):
    # Prepare
    out = tmp_path / "run"
    _run(out)
    # Execute
    shown, empty = state(out), state(tmp_path / "nothing-yet")
    # Assert: 1..planned, the same numbers as the accuracy points' rounds
    points = [r for r, _ in shown["sites"]["site-00"]["accuracy"]]
    assert shown["round_ticks"] == [1, 2, 3] == points
    assert empty["round_ticks"] == []


@pytest.mark.parametrize(("epsilon", "budget", "level", "share"), [
    (0.0, 8.0, "green", 0.0), (3.99, 8.0, "green", 3.99 / 8), (4.0, 8.0, "amber", 0.5),
    (7.2, 8.0, "amber", 0.9), (7.3, 8.0, "red", 7.3 / 8), (9.0, 8.0, "red", 1.0),
    (math.inf, 8.0, "red", 1.0),  # no DP: no guarantee at all
    (None, 8.0, None, None), (1.0, None, None, None), (1.0, 0, None, None),
])
def test_an_epsilon_bar_is_coloured_by_the_share_of_the_budget_spent(
        epsilon: float | None, budget: float | None, level: str | None, share: float | None):
    # Execute / Assert: green below half, amber up to 90%, red above; grey when unknown
    assert budget_level(epsilon, budget) == level
    assert budget_share(epsilon, budget) == share


def test_the_state_colours_each_site_against_the_runs_budget(tmp_path: Path):
    # Prepare: the same sites' spend against the default budget and a tight one
    roomy, tight = tmp_path / "roomy", tmp_path / "tight"
    _run(roomy)
    main(grid(), context(**{"output-dir": str(tight), "epsilon": 2.0}))
    # Execute
    wide, narrow = state(roomy), state(tight)
    # Assert: the budget is the run config's, read from the checkpoint
    for shown, budget in ((wide, 8.0), (narrow, 2.0)):
        assert shown["epsilon_budget"] == budget
        for site in shown["sites"].values():
            assert site["budget_share"] == min(site["epsilon"] / budget, 1.0)
            assert site["budget_level"] == budget_level(site["epsilon"], budget)
    assert {s["budget_level"] for s in wide["sites"].values()} == {"green"}
    assert {s["budget_level"] for s in narrow["sites"].values()} == {"amber"}


def test_in_a_simulation_folder_it_says_which_experiment_it_follows_and_why(tmp_path: Path):
    # Prepare: one federated run, then a second written later
    sim = tmp_path / "sim"
    first, second = (sim / "experiments" / name / "seed-0" for name in ("fedavg", "fedprox"))
    _run(first)
    alone = state(sim)
    _run(second)
    os.utime(second / "results.jsonl", (1e9, 1e9))  # the first is the one written last
    # Execute
    shown, plain = state(sim), state(first)
    # Assert
    assert (alone["experiment"], alone["seed"]) == ("fedavg", "0")
    assert alone["following"] == f"following fedavg, seed 0: the only federated run in {sim}"
    assert (shown["experiment"], shown["seed"]) == ("fedavg", "0")
    assert shown["following"] == (f"following fedavg, seed 0: the one written to last of 2 "
                                  f"federated runs in {sim} (fedavg, seed 0; fedprox, seed 0)")
    assert summary_line(shown).startswith("fedavg seed 0: round 3/3")
    assert plain["experiment"] is None and plain["following"] is None


def _chromium(*args: str, timeout: float = 60) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-default-apps", "--virtual-time-budget=5000"]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True,
                          timeout=timeout)
    return done.stdout


def _text(dom: str) -> str:
    """What a reader sees of a dumped DOM: no script or style, each tag a space."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here "
                    "(`make browser` installs it as root with apt-get)")
def test_the_page_follows_a_run_in_headless_chromium(tmp_path: Path):
    """The page follows a simulation's experiment in headless Chromium. Its screenshot is
    kept as an artefact: `dashboard.png` under pytest's tmp_path, and a copy in the folder
    `$MEDFUSE_ARTIFACTS` names when that variable is set (CI can upload it from there)."""
    # Prepare: the dashboard of a simulation's output folder where no run has written yet
    sim = tmp_path / "sim"
    sim.mkdir()
    server, url = serve_in_background(sim)
    shot = tmp_path / "dashboard.png"
    try:
        before = _chromium("--dump-dom", url)
        # Execute: the experiment runs while the dashboard serves
        _run(sim / "experiments" / "demo-fedavg" / "seed-0")
        after = _chromium("--dump-dom", url)
        _chromium(f"--screenshot={shot}", "--window-size=1000,800", url)
    finally:
        server.shutdown()
    if os.environ.get("MEDFUSE_ARTIFACTS"):
        kept = Path(os.environ["MEDFUSE_ARTIFACTS"])
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, kept / shot.name)
    # Assert: the page drew the state, then followed the run to its end
    seen, text = _text(before), _text(after)
    assert "round 0 of ?" in seen and "site-00" not in seen
    assert "round 3 of 3" in text and "finished" in text
    assert "site-00" in text and "site-01" in text and "accepted" in text
    # which experiment, the x axis in round numbers under "round", bars coloured by spend
    assert "following demo-fedavg, seed 0: the only federated run in" in text
    chart = re.search(r'<svg id="chart".*?</svg>', after, flags=re.DOTALL)
    assert chart is not None and ">round</text>" in chart.group(0)
    assert re.findall(r'<text [^>]*class="xtick"[^>]*>([^<]*)</text>', after) == ["1", "2", "3"]
    assert after.count('<span class="green"') == 2 and "18% of 8" in text
    assert shot.read_bytes().startswith(b"\x89PNG")
    print(f"\nscreenshot: {shot}")
