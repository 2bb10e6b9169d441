"""Starting and stopping real Flower processes: the one place that knows how.

Every Flower process medfuse starts (flower-superlink, flower-supernode, flwr, and what
they spawn: flower-superexec, flwr-serverapp, flwr-clientapp) gets its environment from
`flower_env()`: offline (no telemetry, no update check, no Ray usage stats, no runtime
dependency installation), an own FLWR_HOME (never ~/.flwr), the venv's bin first on PATH
(the SuperLink and SuperNode spawn `flower-superexec` by name), and a tag that marks every
descendant so that `ProcessGroup.stop_all()` finds and stops them all, even the ones
Flower detaches into their own session.

Flower 1.42 on this machine (see the project's notes): one HTTP port per SuperLink
(`--host/--port`) serves the Fleet, Control and Runtime APIs; each SuperNode needs its own
local `--port` for its ClientApp runtime; `flwr` reads connections from
$FLWR_HOME/config.toml.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.provision import OFFLINE_ENV

LOOPBACK = "127.0.0.1"
TAG_VAR = "MEDFUSE_PROCESS_TAG"  # inherited by every descendant: how stop_all finds them


class FlowerError(RuntimeError):
    """A Flower process or CLI call did not do what was asked; the message says what."""


# ------------------------------------------------------------------ environment and binaries


def venv_bin() -> Path:
    return Path(sys.executable).parent


def flower_bin(name: str) -> str:
    """The path of a Flower executable, preferring the running interpreter's venv."""
    local = venv_bin() / name
    if local.exists():
        return str(local)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise FlowerError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def flower_env(
    flwr_home: Path,
    *,
    tag: str | None = None,
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of every Flower process medfuse starts."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    env.update(
        {
            "FLWR_HOME": str(Path(flwr_home).resolve()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            # Ray's single-machine mode: its node address is 127.0.0.1, not the address of
            # the outward interface (which it finds by routing towards a public address)
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(venv_bin()), env.get("PATH", "")]),
        }
    )
    if tag:
        env[TAG_VAR] = tag
    if extra:
        env.update(extra)
    return env


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """`n` distinct TCP ports free on `host` right now (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def address(port: int, host: str = LOOPBACK) -> str:
    return f"{host}:{port}"


# ------------------------------------------------------------------ processes


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tagged_pids(tag: str) -> list[int]:
    """Processes of this user whose environment carries `TAG_VAR=tag`."""
    return pids_with_env(TAG_VAR, tag)


def pids_with_env(name: str, value: str) -> list[int]:
    """Processes of this user (other than this one) whose environment has `name=value`."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def terminate(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL what is left."""
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    _signal(left, signal.SIGKILL)


@dataclass
class FlowerProcess:
    """One long-running Flower process started by medfuse, its log on disk."""

    name: str
    cmd: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process and everything it started (its group and its descendants)."""
        if self.popen.poll() is None:
            pids = [self.pid, *descendants(self.pid)]
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)  # its own group (start_new_session)
            terminate(pids, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process alone (a crash, for fault tests); its children are left."""
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait(timeout=10)


_LIVE_GROUPS: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()


def _stop_live_groups() -> None:
    for group in list(_LIVE_GROUPS):
        with contextlib.suppress(Exception):
            group.stop_all()


atexit.register(_stop_live_groups)


@dataclass(eq=False)  # hashable by identity: kept in a WeakSet for the atexit hook
class ProcessGroup:
    """Every process of one harness run: started here, tagged, stopped together.

    Use as a context manager (or call `stop_all()` in a `finally`); an `atexit` hook stops
    whatever is still running when the interpreter exits.
    """

    workdir: Path
    logs_dir: Path | None = None  # default: workdir/logs
    tag: str = field(default_factory=lambda: f"medfuse-{uuid.uuid4().hex[:12]}")
    procs: list[FlowerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs_dir = Path(self.logs_dir or self.workdir / "logs").resolve()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        _LIVE_GROUPS.add(self)

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return flower_env(self.flwr_home, tag=self.tag, extra=extra)

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> FlowerProcess:
        assert self.logs_dir is not None
        log_path = self.logs_dir / f"{name}.log"
        with log_path.open("ab") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                list(cmd),
                cwd=cwd or self.workdir,
                env=self.env(extra_env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own group: Ctrl-C in a terminal goes to us only
            )
        proc = FlowerProcess(name=name, cmd=list(cmd), popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def get(self, name: str) -> FlowerProcess:
        for p in reversed(self.procs):
            if p.name == name:
                return p
        raise KeyError(name)

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every process started here, newest first, then any tagged straggler."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout=timeout)
        left = tagged_pids(self.tag)
        if left:
            terminate(left, timeout=timeout)
        _LIVE_GROUPS.discard(self)

    def leftovers(self) -> list[int]:
        return [p for p in tagged_pids(self.tag) if _alive(p)]

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


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


def write_connection(
    flwr_home: Path,
    name: str,
    superlink: str,
    root_certificates: Path | None,
    *,
    insecure: bool = False,
) -> Path:
    """$FLWR_HOME/config.toml with one [superlink.NAME] connection, the default one."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{superlink}"')
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ the flwr CLI


@dataclass(frozen=True)
class FlwrCli:
    """`flwr` calls against one connection, in one FLWR_HOME, offline."""

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

    def runs(self) -> list[dict]:
        return list(self.call_json("ls", self.connection)["runs"])

    def run_info(self, run_id: int) -> dict | None:
        for r in self.call_json("ls", self.connection, "--run-id", str(run_id))["runs"]:
            if int(r["run-id"]) == run_id:
                return r
        return None

    def stop_run(self, run_id: int) -> None:
        self.call("stop", str(run_id), self.connection, check=False, timeout=30)


def wait_until(
    what: str,
    ok: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 1.0,
    alive: Sequence[FlowerProcess] = (),
) -> None:
    """Poll `ok()` until true; fail early (with the log tail) when a needed process died."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FlowerError):
            if ok():
                return
        for p in alive:
            if not p.alive():
                raise FlowerError(
                    f"{p.name} exited ({p.returncode()}) while waiting for {what}:\n{p.tail()}"
                )
        if time.monotonic() > deadline:
            raise FlowerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_for_superlink(cli: FlwrCli, port: int, proc: FlowerProcess, timeout: float = 60) -> None:
    wait_until(f"the SuperLink on port {port}", lambda: port_open(port), timeout, alive=[proc],
               interval=0.3)  # fmt: skip
    wait_until("the SuperLink's Control API", lambda: cli.nodes() is not None, timeout,
               alive=[proc])  # fmt: skip


def wait_for_nodes(
    cli: FlwrCli,
    node_ids: set[int],
    timeout: float = 120,
    alive: Sequence[FlowerProcess] = (),
) -> None:
    """Until every node id in `node_ids` is online at the SuperLink."""
    wait_until(
        f"SuperNodes {sorted(node_ids)} to be online",
        lambda: node_ids <= cli.online_node_ids(),
        timeout,
        interval=1.0,
        alive=alive,
    )


def submit_command(
    app_dir: Path,
    connection: str,
    run_config: Mapping[str, object] | None = None,
    stream: bool = True,
) -> list[str]:
    """`flwr run APP CONNECTION [--stream] [-c "k=v ..."]` (values as TOML)."""
    cmd = [flower_bin("flwr"), "run", str(app_dir), connection]
    if stream:
        cmd.append("--stream")
    if run_config:
        cmd += ["-c", run_config_string(run_config)]
    return cmd


def run_config_string(run_config: Mapping[str, object]) -> str:
    def toml(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    return " ".join(f"{k}={toml(v)}" for k, v in run_config.items())
