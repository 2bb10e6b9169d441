"""The coordinator's live dashboard: its state comes from the run's own files, it serves
on 127.0.0.1, and in headless Chromium the page shows the rounds and sites and follows a
run as it goes (a screenshot is kept)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.app import main
from server.ops.dashboard import serve_in_background, state, summary_line
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


def _chromium(*args: str, timeout: float = 60) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-default-apps", "--virtual-time-budget=5000"]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True,
                          timeout=timeout)
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here "
                    "(`make browser` installs it as root with apt-get)")
def test_the_page_follows_a_run_in_headless_chromium(tmp_path: Path):
    # Prepare: the dashboard of a folder where no run has written yet
    out = tmp_path / "run"
    out.mkdir()
    server, url = serve_in_background(out)
    shots = Path(os.environ.get("MEDFUSE_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        before = _chromium("--dump-dom", url)
        # Execute: the run happens while the dashboard serves
        _run(out)
        after = _chromium("--dump-dom", url)
        _chromium(f"--screenshot={shots / 'dashboard.png'}", "--window-size=1000,800", url)
    finally:
        server.shutdown()
    # Assert: the page drew the state, then followed the run to its end
    assert "round 0 of ?" in before and "site-00" not in before
    assert "round 3 of 3" in after and "finished" in after
    assert "site-00" in after and "site-01" in after and "accepted" in after
    assert (shots / "dashboard.png").read_bytes().startswith(b"\x89PNG")
    print(f"\nscreenshot: {shots / 'dashboard.png'}")
