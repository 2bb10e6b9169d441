"""Real deployment on 127.0.0.1: flower-superlink (TLS, node auth, database), one
flower-supernode per hospital, the app submitted with `flwr run`, faults injected into
the real processes. Slow (a round takes 20-50 s in deployment on 2 cores: Flower polls and
starts a fresh ClientApp process per message), so the scenarios share two runs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from server.ops.cli import deploy_app
from server.ops.deploy import DeployConfig
from server.ops.federation import PROJECT_DIR, LocalFederation
from server.ops.processes import free_port
from server.ops.provision import provision
from server.ops.supervisor import Submission
from server.results import RESULTS_FILE, read_rows
from shared_model.contract import wire

pytestmark = pytest.mark.slow


def _accepted(rows, rnd: int) -> dict[str, int]:
    """site -> node id of every update accepted into round `rnd`."""
    return {
        r.site: r.node_id
        for r in rows
        if r.round == rnd and r.phase == "train" and r.metric == "update-accepted" and r.value
    }


def _epsilon(rows, site: str, rnd: int) -> float | None:
    for r in rows:
        if r.site == site and r.round == rnd and r.phase == "train" and r.metric == wire.M_EPSILON:
            return r.value
    return None


def _training_round(node, n: int) -> bool:
    """The SuperNode has received its n-th train message and not yet sent the reply: it
    is training round n. Read from the node's own log, written as it happens (the run's
    log stream, read through `flwr log`, can lag by more than a round's training)."""
    text = node.log_text()
    return (text.count("Receiving: train message") >= n
            and text.count("Sending: train message") < n)  # fmt: skip


def _wait_exit(proc, timeout: float = 60) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    return proc.returncode()


def test_deploy_local_runs_secure_aggregation_over_tls_and_leaves_nothing_behind(
    two_sites: dict[str, Path], tmp_path: Path
):
    # Prepare
    out = tmp_path / "out"
    sites = [str(two_sites[k]) for k in ("h0", "h1")]
    args = ["local", "--rounds", "1", "--image-size", "32", "--out", str(out),
            "--app", str(PROJECT_DIR), "--sites", sites[0], "--sites", sites[1],
            "--min-nodes", "2", "-c", "batch-size=16 secure-aggregation=true"]  # fmt: skip
    # Execute
    t0 = time.monotonic()
    result = CliRunner().invoke(deploy_app, args)
    seconds = time.monotonic() - t0
    # Assert
    assert result.exit_code == 0, result.output
    assert "finished:completed" in result.output
    # the round's training went through Flower's SecAgg+ between the SuperNodes
    assert "round 1: secure aggregation (SecAgg+) with 2 hospitals" in result.output
    assert "Secure aggregation completed" in result.output
    assert "final model, per site" in result.output
    assert "every process stopped" in result.output
    assert "still alive" not in result.output
    rows = read_rows(out / "output" / RESULTS_FILE)
    assert len(_accepted(rows, 1)) == 2
    assert (out / "output" / "final" / "model.pt").is_file()
    assert (out / "logs" / "superlink.log").is_file()
    print(f"\ndeploy local, 2 hospitals, 1 secure round: {seconds:.1f} s")
    keys = ("[deploy", "global round", "aggregat", "site", "h0", "h1", "mean")
    print("\n".join(line for line in result.output.splitlines() if any(k in line for k in keys)))


def test_faults_node_kill_superlink_restart_and_intruders(
    make_federation, two_sites: dict[str, Path], tmp_path: Path
):
    """Round 1: a node with an unregistered key and a node without the CA certificate try
    to join (refused; the round goes on with both hospitals). Round 2: SIGKILL hospital h1
    while it trains -> the round's training completes with h0; then SIGKILL the SuperLink
    -> restarted on the same database, h1 restarted (same key: same node id, privacy ledger
    on disk), the failed run resubmitted with resume=true finishes round 2 with both;
    round 1 is not lost. (Two hospitals: on 2 cores every extra node slows each round.)"""
    # Prepare
    # the hospitals' own budget (node config): the resumed round 2 trains again at h0
    fed = make_federation(two_sites, app_dir=PROJECT_DIR, epsilon_budget=1000.0)
    t0 = time.monotonic()
    fed.start(timeout=150)
    startup = time.monotonic() - t0
    stranger = provision(tmp_path / "stranger", "stranger")  # a key never registered
    bad: dict[str, object] = {}
    when: dict[str, float] = {}

    def inject(f: LocalFederation, sub: Submission) -> None:
        now = time.monotonic()
        if not bad and sub.first_seen("global round 1/2 (train)"):
            bad["unregistered"] = f.group.start("unregistered", f.node_command(
                "h0", private_key=stranger.private_key("stranger"), port=free_port()))
            bad["no-ca"] = f.group.start("no-ca", f.node_command(
                "h0", root_cert=None, port=free_port()))  # fmt: skip
        if "node" not in when and _training_round(f.nodes["h1"], 2):
            f.kill_node("h1")  # h1 is training: its ClientApp of round 2 is running
            when["node"] = now
        if ("node" in when and "superlink" not in when
                and sub.first_seen("round 2: aggregating")):  # fmt: skip
            when["superlink"] = now
            f.kill_superlink()

    cfg = DeployConfig(
        hospitals=2, rounds=2, min_nodes=1, round_timeout=100, app_dir=PROJECT_DIR,
        # large budget: the resumed round 2 trains again at h0
        run_config={"batch-size": 16, "epsilon": 1000.0, "noise-multiplier": 1.0},
    )  # fmt: skip

    # Execute
    outcome = fed.run(cfg.flower_run_config(fed.workdir / "output"), max_resumes=2,
                      timeout=780, poll=0.5, on_tick=inject)  # fmt: skip

    # Assert: the faults happened and the run still finished
    assert "node" in when and "superlink" in when, when
    assert outcome.completed, outcome
    assert outcome.superlink_restarts == 1 and outcome.resumes == 1
    assert outcome.node_restarts == {"h0": 0, "h1": 1}
    assert len(outcome.run_ids) == 2
    ids = fed.node_ids
    log = "\n".join(line for _, line in fed.transcript)
    # training of round 2 went on without the killed node
    assert "round 2: aggregating 1 update(s) from h0" in log
    # Flower answers for the killed node with "Node Unavailable", unless the node came back
    # under its id before the SuperLink saw it offline: then the round times out without it
    assert ("left out: error reply: Error: Node Unavailable" in log
            or re.search(r"round 2: no reply from node \d+ .* by the round timeout", log)), log
    assert "Resumed after round 1" in log
    rows = read_rows(outcome.output_dir / RESULTS_FILE)
    assert _accepted(rows, 1) == ids  # round 1 kept across the restart
    again = _accepted(rows, 2)
    assert again.get("h1") == ids["h1"]  # h1 is back, under the same node id
    # h0 was answering the dead run's message when the SuperLink died; Flower's SuperNode
    # has been seen to answer the resumed round only after the round timeout (its old
    # ClientApp retrying to push first): then the round goes on without it, and says so
    assert again.get("h0") == ids["h0"] or (
        f"no reply from node {ids['h0']} (h0) by the round timeout" in log), log
    # its privacy ledger continued on disk: epsilon after round 2 exceeds after round 1
    e1, e2 = _epsilon(rows, "h1", 1), _epsilon(rows, "h1", 2)
    assert e1 is not None and e2 is not None and e2 > e1, (e1, e2)
    assert (outcome.output_dir / "final" / "model.pt").is_file()

    # the intruders were refused and never joined
    assert bad, "round 1 never started"
    assert _wait_exit(bad["unregistered"]) not in (0, None)
    assert "2004" in bad["unregistered"].log_text()  # Flower: no node with this public key
    assert _wait_exit(bad["no-ca"]) not in (0, None)
    assert "CERTIFICATE_VERIFY_FAILED" in bad["no-ca"].log_text()
    nodes = fed.cli.nodes()
    assert {int(n["node-id"]) for n in nodes} == set(ids.values())
    print(f"\nstartup {startup:.1f} s; fault run {outcome.seconds:.1f} s; {outcome.traffic}")
    for t, line in fed.timeline("[deploy", "global round", "aggregating", "aggregate_"):
        print(f"{t:7.1f} {line}")

    # the dropout is logged with the killed node's id (Flower's Node Unavailable reply
    # comes from the SuperLink, src_node_id=1: the server must name the sampled node), or,
    # on the path above where the node came back first, named at the round timeout
    assert (f"update from node {ids['h1']} (h1) left out" in log
            or f"no reply from node {ids['h1']} (h1) by the round timeout" in log), log


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment mentions `text`."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            env = " ".join(f"{k}={v}" for k, v in proc.environ().items())
            if text in " ".join(proc.cmdline()) or text in env:
                found.append(proc.pid)
    return found


def test_ctrl_c_stops_every_process(tmp_path: Path):
    # Prepare: `medfuse deploy local` in its own process, as a user runs it
    script = (
        "from server.ops.cli import deploy_app\n"
        "deploy_app(['local', '--hospitals', '2', '--rounds', '1', '--cases-per-site', '20',"
        f" '--out', {str(tmp_path / 'out')!r}])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=PROJECT_DIR,
    )
    workdir = None
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        for line in proc.stdout:  # until every SuperNode is online
            m = re.search(r"(/\S*medfuse-deploy-[^/\s]+)/", line)
            workdir = workdir or (m.group(1) if m else None)
            if "online:" in line or time.monotonic() > deadline:
                break
        assert workdir is not None and _processes_mentioning(workdir)
        # Execute: Ctrl-C
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Assert
    assert code == 130
    assert _processes_mentioning(workdir) == []
    assert not Path(workdir).exists()
