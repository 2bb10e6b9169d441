"""The process harness without Flower processes: environment, ports, config, cleanup."""

from __future__ import annotations

import os
import sys
import time
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfuse import app as medfuse_app
from server.ops.cli import _parse_overrides
from server.ops.deploy import DeployConfig, site_names
from server.ops.federation import LocalFederation
from server.ops.flower_commands import (
    superlink_command,
    supernode_command,
    write_connection,
    write_run_config,
)
from server.ops.processes import OFFLINE_ENV, TAG_VAR, ProcessGroup, flower_env, free_ports


def test_flower_env_is_offline_with_own_home(tmp_path: Path):
    env = flower_env(tmp_path / "home", tag="t1", base={"PATH": "/usr/bin"})
    for k, v in OFFLINE_ENV.items():
        assert env[k] == v
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str((tmp_path / "home").resolve())
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env[TAG_VAR] == "t1"


def test_commands_carry_tls_auth_and_no_dependency_install(tmp_path: Path):
    sl = superlink_command(port=1234, database=tmp_path / "db", ca_cert=tmp_path / "ca",
                           cert=tmp_path / "c", key=tmp_path / "k")  # fmt: skip
    assert "--enable-supernode-auth" in sl and "--insecure" not in sl
    assert "--disable-runtime-dependency-installation" in sl
    assert sl[sl.index("--host") + 1] == "127.0.0.1" and sl[sl.index("--port") + 1] == "1234"
    sn = supernode_command(superlink="127.0.0.1:1234", port=5, root_cert=tmp_path / "ca",
                           private_key=tmp_path / "k", node_config='data-path="/x"')  # fmt: skip
    assert "--insecure" not in sn and sn[sn.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(RuntimeError, match="TLS"):
        superlink_command(port=1, database="d", ca_cert=None, cert=None, key=None, auth=True)


def test_free_ports_are_distinct():
    ports = free_ports(8)
    assert len(set(ports)) == 8 and all(1024 < p < 65536 for p in ports)


def test_connection_config_is_what_flwr_reads(tmp_path: Path):
    path = write_connection(tmp_path, "medfuse", "127.0.0.1:9", tmp_path / "ca.crt")
    conf = tomllib.loads(path.read_text())
    assert conf["superlink"]["default"] == "medfuse"
    entry = conf["superlink"]["medfuse"]
    assert entry == {"address": "127.0.0.1:9", "root-certificates": str(tmp_path / "ca.crt")}
    assert Path(entry["root-certificates"]).is_absolute()


def test_run_config_file_round_trips_through_flower(tmp_path: Path):
    from flwr.common.config import parse_config_args

    cfg = {"num-server-rounds": 2, "resume": True, "lr": 0.5, "output-dir": "/a b/c",
           "sim-node-config": 'allow-non-private = true, evaluation = "exact"'}
    path = write_run_config(tmp_path / "run-config.toml", cfg)
    assert parse_config_args([str(path)]) == cfg
    assert _parse_overrides(["batch-size=16 strategy='fedprox'", "dp=false"]) == {
        "batch-size": 16, "strategy": "fedprox", "dp": False
    }


def test_process_group_stops_detached_grandchildren(tmp_path: Path):
    # Prepare: a child that starts a grandchild in its own session (as Flower's SuperLink
    # starts its SuperExec), then both sleep
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    group = ProcessGroup(tmp_path)
    try:
        proc = group.start("sleeper", [sys.executable, "-c", script])
        deadline = time.monotonic() + 20
        while len(group.leftovers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(group.leftovers()) == 2 and proc.alive()
    finally:
        # Execute
        group.stop_all(timeout=5)
    # Assert
    assert group.leftovers() == []
    assert not proc.alive()


def test_deploy_config_validates_at_the_boundary(tmp_path: Path):
    cfg = DeployConfig(hospitals=3, rounds=2)
    assert cfg.quorum == 2
    flat = cfg.flower_run_config(tmp_path / "o")
    assert flat["resume"] is False and flat["min-available-nodes"] == 2
    assert Path(str(flat["output-dir"])).is_absolute()
    with pytest.raises(ValueError, match="sites"):
        DeployConfig(hospitals=2, sites=(tmp_path,))
    with pytest.raises(ValueError, match="manifest"):
        DeployConfig(hospitals=1, sites=(tmp_path,))
    with pytest.raises(ValueError, match="min-nodes"):
        DeployConfig(hospitals=2, min_nodes=3)
    with pytest.raises(ValueError):
        DeployConfig(hospitals=2, typo=1)


def test_site_names_are_safe_and_unique(tmp_path: Path):
    assert site_names([tmp_path / "a b", tmp_path / "x" / "a b", tmp_path / "c"]) == [
        "a-b", "a-b-2", "c"
    ]


def test_commands_plug_into_the_medfuse_cli(tmp_path: Path):
    app = medfuse_app  # the coordinator's commands, as medfuse.py composes them
    runner = CliRunner()

    first = runner.invoke(app, ["provision", "--out", str(tmp_path), "--hospitals", "a,b"])
    again = runner.invoke(app, ["provision", "--out", str(tmp_path), "--hospitals", "a,b"])
    helped = runner.invoke(app, ["deploy", "local", "--help"])

    assert first.exit_code == 0, first.output
    assert (tmp_path / "hospitals" / "a" / "supernode.key").is_file()
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    assert helped.exit_code == 0 and "--hospitals" in helped.output


def test_round_seconds_from_the_streamed_log():
    fed = object.__new__(LocalFederation)  # no processes: only the transcript matters
    fed.transcript = [
        (10.0, "INFO : medfuse: global round 1/2 (train)"),
        (40.0, "INFO : medfuse: global round 2/2 (train)"),
        (90.0, "INFO : medfuse: global round 2/2 (train)"),  # resumed after a restart
        (120.0, "INFO : medfuse: done after 2 rounds; ..."),
    ]
    assert fed.round_seconds() == [30.0, 30.0]
