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
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w

from server.provision import FLOWER_ENV
from shared_model.files import atomic_write_text

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
    env.update(FLOWER_ENV)
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


def descendants(pid: int) -> list[int]:
    """Every living descendant of `pid` (children, grandchildren, ...)."""
    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return []


def tagged_pids(tag: str) -> list[int]:
    """Processes of this user whose environment carries `TAG_VAR=tag`."""
    return pids_with_env(TAG_VAR, tag)


def pids_with_env(name: str, value: str) -> list[int]:
    """Processes of this user (other than this one) whose environment has `name=value`."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(name) == value:
                found.append(proc.pid)
    return found


def _alive(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def terminate(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL what is left."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, left = psutil.wait_procs(procs, timeout=timeout)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=timeout)


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


# ------------------------------------------------------------------ the supervisor


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
FINISHED = "finished"  # every final status of a Flower run starts with it
COMPLETED = "finished:completed"


@dataclass
class Submission:
    """One submitted run: its id, and its log as `flwr log --stream` delivers it."""

    run_id: int
    follower: FlowerProcess
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() each line arrived
    started: float = field(default_factory=time.monotonic)
    _reader: threading.Thread | None = None

    def streaming(self) -> bool:
        return self.follower.alive() or (self._reader is not None and self._reader.is_alive())

    def first_seen(self, text: str) -> float | None:
        """When the first line containing `text` arrived (monotonic), or None."""
        for line, t in zip(list(self.lines), list(self.times), strict=False):
            if text in line:
                return t
        return None


class Supervisor:
    """One SuperLink (simulation or deployment) and every process around it, offline.

    It starts the processes (tagged: `close()` stops them and whatever they spawned),
    submits runs with `flwr run --format json` (the run id from Flower's JSON, never
    from log text), follows each run's log with `flwr log --stream`, and asks Flower for
    run states (`flwr ls --format json`). The harness (`simulations/runner.py`) and
    `medfuse deploy local` (`server/deploy.py`) both run their Flower processes here.
    """

    def __init__(
        self,
        workdir: Path,
        connection: str,
        *,
        app_dir: Path,
        logs_dir: Path | None = None,
        echo: Callable[[str], object] = print,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.group = ProcessGroup(Path(workdir), logs_dir=logs_dir)
        self.connection = connection
        self.app_dir = Path(app_dir).resolve()
        self._echo = echo
        self.t0 = time.monotonic()
        self.transcript: list[tuple[float, str]] = []  # (seconds since start, line)
        # one torch thread per Flower process: several share the machine's cores
        self.extra_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra_env or {})}
        self.cli = FlwrCli(env=self.group.env(self.extra_env), connection=connection,
                           cwd=self.app_dir)
        self.superlink: FlowerProcess | None = None
        self.port = 0
        self._submissions = 0

    # -------------------------------------------------------------- output

    def echo(self, line: str) -> None:
        """Pass a line on, keeping it and its time in the transcript."""
        self.transcript.append((time.monotonic() - self.t0, line))
        self._echo(line)

    def say(self, message: str) -> None:
        self.echo(f"[deploy {time.monotonic() - self.t0:5.0f}s] {message}")

    def timeline(self, *markers: str) -> list[tuple[float, str]]:
        """Transcript lines holding any of `markers` (all `[deploy` lines by default)."""
        keys = markers or ("[deploy",)
        return [(t, line) for t, line in self.transcript if any(k in line for k in keys)]

    # -------------------------------------------------------------- the SuperLink

    def start_superlink(self, cmd: Sequence[str], port: int, timeout: float = 120.0,
                        name: str = "superlink") -> FlowerProcess:
        """Start it and wait until its one port serves the Control API."""
        self.port = port
        self.superlink = self.group.start(name, cmd, cwd=self.app_dir, extra_env=self.extra_env)
        wait_until(f"the SuperLink on {address(port)}", lambda: port_open(port), timeout,
                   interval=0.3, alive=[self.superlink])  # fmt: skip
        wait_until("the SuperLink's Control API", lambda: self.cli.nodes() is not None,
                   timeout, alive=[self.superlink])  # fmt: skip
        return self.superlink

    def superlink_alive(self) -> bool:
        return self.superlink is not None and self.superlink.alive()

    # -------------------------------------------------------------- runs

    def submit(self, run_config_file: Path, *, federation_config: str | None = None,
               show: bool = True) -> Submission:
        """Start a run of the app and follow its log (echoed when `show`)."""
        run_id = self.cli.start_run(self.app_dir, run_config_file, federation_config)
        self._submissions += 1
        cmd = [flower_bin("flwr"), "log", str(run_id), self.connection, "--stream"]
        follower = self.group.start(f"run-{self._submissions:03d}-{run_id}", cmd,
                                    cwd=self.app_dir, extra_env=self.extra_env)  # fmt: skip
        sub = Submission(run_id=run_id, follower=follower)
        sub._reader = threading.Thread(target=self._follow, args=(sub, show), daemon=True,
                                       name=f"flwr-log-{run_id}")  # fmt: skip
        sub._reader.start()
        return sub

    def _follow(self, sub: Submission, show: bool) -> None:
        """Read the follower's log file as it grows (like `tail -f`), a line at a time."""
        with sub.follower.log_path.open("r", errors="replace") as fh:
            pending = ""
            while True:
                chunk = fh.read()
                if chunk:
                    pending += chunk
                    *complete, pending = pending.split("\n")
                    for line in complete:
                        self._on_line(sub, line, show)
                elif not sub.follower.alive():
                    if pending:
                        self._on_line(sub, pending, show)
                    return
                else:
                    time.sleep(0.2)

    def _on_line(self, sub: Submission, line: str, show: bool) -> None:
        line = _COLOUR.sub("", line).rstrip()  # Flower colours its level names always
        if line.startswith("$ "):  # the command line ProcessGroup writes first
            return
        sub.lines.append(line)
        sub.times.append(time.monotonic())
        if show:
            self.echo(line)

    def run_status(self, run_id: int) -> str:
        return self.cli.run_status(run_id)

    def wait_finished(self, run_id: int, timeout: float = 120.0) -> str:
        """The run's status once Flower calls it finished, or the last one seen."""
        status = ["unknown"]

        def finished() -> bool:
            status[0] = self.run_status(run_id)
            return status[0].startswith(FINISHED)

        with contextlib.suppress(FlowerError):
            wait_until(f"run {run_id} to finish", finished, timeout, interval=1.0,
                       alive=[self.superlink] if self.superlink else [])  # fmt: skip
        return status[0]

    def stop_run(self, run_id: int) -> None:
        with contextlib.suppress(FlowerError):
            self.cli.stop_run(run_id)

    def traffic(self, run_ids: Sequence[int]) -> dict[str, int]:
        """Bytes in and out of the SuperLink for these runs, as Flower counted them."""
        total = {"inbound-bytes": 0, "outbound-bytes": 0, "total-bytes": 0}
        for rid in run_ids:
            with contextlib.suppress(FlowerError):
                info = self.cli.run_info(rid)
                for k in total:
                    total[k] += int((info or {}).get("network-traffic", {}).get(k, 0))
        return total

    def close(self) -> None:
        self.group.stop_all()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
