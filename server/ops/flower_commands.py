"""What each Flower process is told: its command line, its config files, the flwr CLI.

Flower 1.42 on this machine (see the project's notes): one HTTP port per SuperLink
(`--host/--port`) serves the Fleet, Control and Runtime APIs; each SuperNode needs its own
local `--port` for its ClientApp runtime; `flwr` reads connections from
$FLWR_HOME/config.toml. The processes themselves (environment, start, stop) are
`server/ops/processes.py`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from server.ops.processes import LOOPBACK, FlowerError, venv_bin
from shared_model.files import atomic_write_text


def flower_bin(name: str) -> str:
    """The path of a Flower executable, preferring the running interpreter's venv."""
    local = venv_bin() / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FlowerError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


# ------------------------------------------------------------------ commands


def superlink_command(
    *,
    port: int,
    database: Path | str,
    ca_cert: Path | None,
    cert: Path | None,
    key: Path | None,
    auth: bool = True,
    host: str = LOOPBACK,
) -> list[str]:
    """flower-superlink with TLS (unless no cert is given), node auth and a state database."""
    cmd = [flower_bin("flower-superlink")]
    if cert is None:
        if auth:
            raise FlowerError("SuperNode authentication needs TLS: give the SuperLink a cert")
        cmd.append("--insecure")
    else:
        assert ca_cert is not None and key is not None
        cmd += [
            "--ssl-ca-certfile", str(ca_cert),
            "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key),
        ]  # fmt: skip
    if auth:
        cmd.append("--enable-supernode-auth")
    cmd += [
        "--database", str(database),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    return cmd


def supernode_command(
    *,
    superlink: str,
    port: int,
    root_cert: Path | None,
    private_key: Path | None,
    node_config: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """flower-supernode; `root_cert=None` means no CA given (not --insecure: TLS stays on)."""
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink]
    if root_cert is not None:
        cmd += ["--root-certificates", str(root_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        cmd += ["--node-config", node_config]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    cmd += ["--host", LOOPBACK, "--port", str(port)]
    return cmd


def simulation_superlink_command(port: int, host: str = LOOPBACK) -> list[str]:
    """flower-superlink in simulation mode (Flower's simulation engine, Ray), loopback only."""
    return [
        flower_bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def write_connection(
    flwr_home: Path,
    name: str,
    superlink: str,
    root_certificates: Path | None,
    *,
    insecure: bool = False,
) -> Path:
    """$FLWR_HOME/config.toml with one [superlink.NAME] connection, the default one."""
    entry: dict[str, object] = {"address": superlink}
    if insecure:
        entry["insecure"] = True
    elif root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    return atomic_write_text(Path(flwr_home) / "config.toml",
                             tomli_w.dumps({"superlink": {"default": name, name: entry}}))


def write_run_config(path: Path, run_config: Mapping[str, object]) -> Path:
    """The run config as the TOML file `flwr run -c FILE.toml` reads (flat keys)."""
    return atomic_write_text(Path(path), tomli_w.dumps(dict(run_config)))


# ------------------------------------------------------------------ the flwr CLI


@dataclass(frozen=True)
class FlwrCli:
    """`flwr` calls against one connection, in one FLWR_HOME, offline; JSON answers."""

    env: Mapping[str, str]
    connection: str
    cwd: Path

    def call(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        cmd = [flower_bin("flwr"), *args]
        try:
            done = subprocess.run(
                cmd,
                cwd=self.cwd,
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise FlowerError(f"{shlex.join(cmd)} took more than {timeout:.0f} s") from exc
        if check and done.returncode != 0:
            raise FlowerError(
                f"{shlex.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}"
                f"{done.stderr[-2000:]}"
            )
        return done.stdout

    def call_json(self, *args: str, timeout: float = 60.0) -> dict:
        out = self.call(*args, "--format", "json", timeout=timeout, check=False)
        try:
            data = json.loads(out[out.index("{") :])
        except ValueError as exc:
            raise FlowerError(
                f"flwr {' '.join(args)}: no JSON in its output:\n{out[-2000:]}"
            ) from exc
        if not data.get("success", False):
            raise FlowerError(f"flwr {' '.join(args)} failed: {data}")
        return data

    def register(self, public_key: Path, name: str | None = None) -> int:
        args = ["supernode", "register", str(public_key), self.connection]
        if name:
            args += ["--name", name]
        return int(self.call_json(*args)["node-id"])

    def nodes(self) -> list[dict]:
        return list(self.call_json("supernode", "list", self.connection)["nodes"])

    def online_node_ids(self) -> set[int]:
        return {int(n["node-id"]) for n in self.nodes() if n.get("status") == "online"}

    def start_run(self, app_dir: Path, run_config_file: Path,
                  federation_config: str | None = None, timeout: float = 300.0) -> int:
        """`flwr run APP CONNECTION -c FILE.toml --format json`: the new run's id."""
        args = ["run", str(app_dir), self.connection, "-c", str(run_config_file)]
        if federation_config:
            args += ["--federation-config", federation_config]
        return int(self.call_json(*args, timeout=timeout)["run-id"])

    def run_info(self, run_id: int) -> dict | None:
        for r in self.call_json("ls", self.connection, "--run-id", str(run_id))["runs"]:
            if int(r["run-id"]) == run_id:
                return r
        return None

    def run_status(self, run_id: int) -> str:
        """Flower's status of the run (`pending`, `running`, `finished:completed`, ...)."""
        info = self.run_info(run_id)
        return str(info["status"]) if info else "unknown"

    def stop_run(self, run_id: int) -> None:
        self.call("stop", str(run_id), self.connection, check=False, timeout=30)
