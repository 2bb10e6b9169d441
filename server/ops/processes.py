"""Flower processes as processes: their environment, ports, start, stop and clean-up.

Every Flower process medfuse starts (flower-superlink, flower-supernode, flwr, and what
they spawn: flower-superexec, flwr-serverapp, flwr-clientapp) gets its environment from
`flower_env()`: offline (no telemetry, no update check, no Ray usage stats, no runtime
dependency installation), an own FLWR_HOME (never ~/.flwr), the venv's bin first on PATH
(the SuperLink and SuperNode spawn `flower-superexec` by name), and a tag that marks every
descendant so that `ProcessGroup.stop_all()` finds and stops them all, even the ones
Flower detaches into their own session.

What each process is told to do (its command line, the flwr CLI) is
`server/ops/flower_commands.py`; the supervisor of a whole SuperLink is
`server/ops/supervisor.py`.
"""

from __future__ import annotations

import atexit
import contextlib
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

import psutil

LOOPBACK = "127.0.0.1"
TAG_VAR = "MEDFUSE_PROCESS_TAG"  # inherited by every descendant: how stop_all finds them

# Environment every Flower process needs offline (no update check, no telemetry, no Ray
# usage stats). Written into every command a human copies (`server/ops/handouts.py`);
# `flower_env()` builds the environment of every process medfuse starts from this same table.
OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Flower's SuperExec, which starts each ServerApp and ClientApp process, looks for new work
# every 1 s by default: on the path of every message. A tenth of a second costs nothing
# measurable (one local HTTP call).
PROMPT_ENV: dict[str, str] = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
FLOWER_ENV: dict[str, str] = {**OFFLINE_ENV, **PROMPT_ENV}  # what every Flower process gets


class FlowerError(RuntimeError):
    """A Flower process or CLI call did not do what was asked; the message says what."""


# ------------------------------------------------------------------ environment


def venv_bin() -> Path:
    return Path(sys.executable).parent


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


# ------------------------------------------------------------------ waiting


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
