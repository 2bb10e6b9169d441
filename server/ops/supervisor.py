"""The supervisor of one SuperLink and every process around it: the one place that
starts Flower processes, submits runs and follows them.

Built from `server/ops/processes.py` (environment, process groups, clean-up) and
`server/ops/flower_commands.py` (command lines, the flwr CLI).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.ops.flower_commands import FlwrCli, flower_bin
from server.ops.processes import (
    FlowerError,
    FlowerProcess,
    ProcessGroup,
    address,
    port_open,
    wait_until,
)

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
    run states (`flwr ls --format json`). The simulation harness (`simulations/`) and
    `medfuse deploy local` (`server/ops/federation.py`) both run their Flower processes here.
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
