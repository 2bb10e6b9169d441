"""A real federation on one machine: a SuperLink and N SuperNodes over 127.0.0.1.

`LocalFederation` provisions a throwaway federation (CA, SuperLink TLS identity, one key
per hospital) into its working folder, starts a SuperLink (TLS, SuperNode authentication,
a state database) and one SuperNode per hospital, registers the hospitals' keys, waits
until every node is online, and supervises a run while it goes:

- a SuperNode that dies is restarted once the SuperLink has marked it offline (the
  SuperLink refuses to activate a node it still thinks online); it comes back under the
  same node id (its key is registered) and with its privacy ledger (its `state-dir`);
- a SuperLink that dies is restarted on the same port with the same database; Flower then
  marks the running run failed, and the run is resubmitted with `resume=true`, which
  continues from the ServerApp's last checkpoint.

Its ports, paths and command lines are fixed once, in a `LocalLayout`
(`server/ops/local_layout.py`); what a lost run means (resume it, how often) is
`_ResumingRun`'s policy, kept out of the class that keeps the processes alive.

`medfuse deploy local` (`server/ops/deploy.py`) runs one; tests use it for fault
injection on real processes.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.ops.flower_commands import write_run_config
from server.ops.handouts import CONNECTION_NAME
from server.ops.local_layout import lay_out
from server.ops.processes import (
    FlowerError,
    FlowerProcess,
    address,
    descendants,
    terminate,
    wait_until,
)
from server.ops.supervisor import COMPLETED, FINISHED, Submission, Supervisor

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml
SUPERLINK = "superlink"
_RESTARTED = "restarted"  # a run lost to a SuperLink restart: resubmit with resume
_ROUND = re.compile(r"global round (\d+)/")

Echo = Callable[[str], None]
OnTick = Callable[["LocalFederation", Submission], None]


class DeployError(RuntimeError):
    """The local deployment could not finish; the message says where to look."""


@dataclass
class RunOutcome:
    """How a (possibly resumed) run ended."""

    run_ids: list[int]
    status: str
    resumes: int
    seconds: float
    output_dir: Path
    traffic: dict[str, int]  # inbound / outbound / total bytes, summed over run ids
    superlink_restarts: int
    node_restarts: dict[str, int]
    leftovers: list[int] = field(default_factory=list)  # pids alive after stop (want none)

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


def round_durations(timeline: Sequence[tuple[float, str]]) -> list[float]:
    """Each round runs from the start of its training to the start of the next round (the
    last one: to the run's end). Rounds are told apart by number so that an attempt cut
    short by a SuperLink restart is not counted; its rerun is."""
    events = [(int(m.group(1)) if (m := _ROUND.search(line)) else None, t) for t, line in timeline]
    return [t_next - t for (rnd, t), (nxt, t_next) in itertools.pairwise(events)
            if rnd is not None and nxt != rnd]  # fmt: skip


# ------------------------------------------------------------------ the federation


class LocalFederation(Supervisor):
    """A SuperLink and N SuperNodes on 127.0.0.1, TLS and node authentication on; what
    it adds to the `Supervisor`: the nodes, and bringing crashed processes back."""

    def __init__(
        self,
        workdir: Path,
        sites: Mapping[str, Path],
        *,
        app_dir: Path = PROJECT_DIR,
        logs_dir: Path | None = None,
        echo: Echo = print,
        epsilon_budget: float | None = None,
        timed_nodes: bool = False,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(Path(workdir).resolve(), CONNECTION_NAME, app_dir=app_dir,
                         logs_dir=logs_dir, echo=echo, extra_env=extra_env)  # fmt: skip
        self.workdir = self.group.workdir
        self.layout = lay_out(self.workdir, sites, self.group.flwr_home,
                              epsilon_budget=epsilon_budget, timed_nodes=timed_nodes)  # fmt: skip
        self.sites = self.layout.sites
        self.node_ids: dict[str, int] = {}
        self.nodes: dict[str, FlowerProcess] = {}
        self.held_down: set[str] = set()  # nodes a caller stopped on purpose: not restarted
        self.superlink_restarts = 0
        self.node_restarts: dict[str, int] = {n: 0 for n in self.sites}
        self._superlink_kids: set[int] = set()

    def round_seconds(self) -> list[float]:
        """From the ServerApp's own log, not from polling: the log has each round's start."""
        return round_durations(self.timeline("medfuse: global round", "medfuse: done after"))

    # -------------------------------------------------------------- start / stop

    def start(self, timeout: float = 180.0) -> None:
        """SuperLink up, every key registered, every SuperNode online."""
        self.start_deployed_superlink()
        for name in self.sites:
            self.node_ids[name] = self.cli.register(self.layout.prov.public_key(name), name)
        self.say("registered " + ", ".join(f"{n} (node {i})" for n, i in self.node_ids.items()))
        for name in self.sites:
            self.start_node(name)
        self.wait_online(timeout=timeout)

    def start_deployed_superlink(self) -> FlowerProcess:
        port = self.layout.port
        proc = self.start_superlink(self.layout.superlink_command(), port, timeout=60,
                                    name=SUPERLINK)  # fmt: skip
        self.say(f"SuperLink up on {address(port)} (TLS, node auth)")
        return proc

    def node_command(self, name: str, *, private_key: Path | None = None,
                     root_cert: Path | None | bool = True, port: int | None = None,
                     max_retries: int | None = None) -> list[str]:  # fmt: skip
        """Here as well as on the layout: tests start refused SuperNodes (other key / no
        CA) beside this federation's own."""
        return self.layout.node_command(name, private_key=private_key, root_cert=root_cert,
                                        port=port, max_retries=max_retries)  # fmt: skip
    def start_node(self, name: str) -> FlowerProcess:
        self.held_down.discard(name)
        proc = self.group.start(f"supernode-{name}", self.node_command(name),
                                extra_env=self.extra_env)  # fmt: skip
        self.nodes[name] = proc
        return proc

    def wait_online(self, names: Sequence[str] | None = None, timeout: float = 180.0) -> None:
        names = list(names or self.sites)
        wanted = {self.node_ids[n] for n in names}
        alive = [self.nodes[n] for n in names] + ([self.superlink] if self.superlink else [])
        wait_until(f"SuperNodes {sorted(wanted)} to be online",
                   lambda: wanted <= self.cli.online_node_ids(), timeout, alive=alive)
        self.say(f"online: {', '.join(names)}")

    def node_status(self, name: str) -> str:
        nid = self.node_ids[name]
        for n in self.cli.nodes():
            if int(n["node-id"]) == nid:
                return str(n.get("status"))
        return "unknown"

    def kill_node(self, name: str, hold: bool = False) -> None:
        """SIGKILL a SuperNode (a crash); `hold=True` keeps the supervisor from restarting it."""
        if hold:
            self.held_down.add(name)
        self.nodes[name].kill()
        self.say(f"killed SuperNode {name} (node {self.node_ids[name]})")

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink (a crash); the supervisor restarts it with the same database."""
        assert self.superlink is not None
        self._remember_superlink_children()
        self.superlink.kill()
        self.say("killed the SuperLink")

    def _remember_superlink_children(self) -> None:
        if self.superlink_alive():
            assert self.superlink is not None
            self._superlink_kids.update(descendants(self.superlink.pid))

    def restart_superlink(self) -> None:
        """Same port, same database, same certificates; waits until every node is back."""
        # What the dead SuperLink had started (SuperExec, the ServerApp) must not outlive it:
        # an orphaned ServerApp would go on writing into the output folder.
        if self._superlink_kids:
            terminate(sorted(self._superlink_kids), timeout=5)
            self._superlink_kids.clear()
        self.superlink_restarts += 1
        self.say("restarting the SuperLink (same port, same database)")
        self.start_deployed_superlink()
        running = [n for n, p in self.nodes.items() if p.alive() and n not in self.held_down]
        self.wait_online(running, timeout=180)

    def bring_back_nodes(self, timeout: float = 180.0) -> None:
        """Restart every dead SuperNode (not held down) as soon as the SuperLink lets it in,
        and wait until all of them are online: a resumed run then starts with everyone."""
        wanted = [n for n in self.sites if n not in self.held_down]

        def all_running() -> bool:
            self._restart_dead_nodes()
            return all(self.nodes[n].alive() for n in wanted)

        try:
            wait_until("the SuperNodes to come back", all_running, timeout)
        except FlowerError:
            raise DeployError(f"SuperNodes did not come back within {timeout:.0f} s") from None
        self.wait_online(wanted, timeout=timeout)

    def _restart_dead_nodes(self) -> None:
        for name, proc in self.nodes.items():
            if proc.alive() or name in self.held_down:
                continue
            # The SuperLink activates a node only once it has marked it offline (heartbeat
            # patience, about a minute after a crash); until then a restart would be refused.
            with contextlib.suppress(FlowerError):
                if self.node_status(name) == "online":
                    continue
                self.node_restarts[name] += 1
                self.say(
                    f"SuperNode {name} (node {self.node_ids[name]}) is down and"
                    " offline at the SuperLink: restarting it"
                )
                self.start_node(name)

    def recover(self, sub: Submission) -> bool:
        """One supervision step while `sub` runs. True: the SuperLink had died and is back,
        but the run it carried is lost (its ServerApp is gone); it is stopped now rather
        than left for Flower to mark failed."""
        self._remember_superlink_children()
        if self.superlink_alive():
            self._restart_dead_nodes()
            return False
        sub.follower.stop(timeout=5)
        self.restart_superlink()
        if not self.run_status(sub.run_id).startswith(FINISHED):
            self.stop_run(sub.run_id)
            self.wait_finished(sub.run_id, timeout=60)
        return True

    # -------------------------------------------------------------- runs

    def submit_config(self, run_config: Mapping[str, object]) -> Submission:
        path = self.layout.run_config_path(self._submissions + 1)
        return self.submit(write_run_config(path, run_config))

    def run(
        self,
        run_config: Mapping[str, object],
        *,
        max_resumes: int = 3,
        timeout: float | None = None,
        poll: float = 1.0,
        on_tick: OnTick | None = None,
    ) -> RunOutcome:
        """Submit, supervise (restart dead nodes / SuperLink, resume), until the run ends."""
        return _ResumingRun(self, run_config, max_resumes, timeout, poll, on_tick).finish()


# ------------------------------------------------------------------ one run, resumed


@dataclass
class _ResumingRun:
    """Apart from `LocalFederation` because this is policy, not process keeping: the
    federation brings processes back; whether a run lost to a SuperLink restart is
    resubmitted, how often and for how long, is decided here."""

    fed: LocalFederation
    config: Mapping[str, object]
    max_resumes: int
    timeout: float | None
    poll: float
    on_tick: OnTick | None
    t0: float = field(default_factory=time.monotonic)

    def finish(self) -> RunOutcome:
        sub = self.fed.submit_config(self.config)
        run_ids, resumes = [sub.run_id], 0
        while (status := self._watch(sub)) != COMPLETED:
            if status != _RESTARTED or resumes >= self.max_resumes:
                raise DeployError(f"run {sub.run_id} ended {status}; logs in "
                                  f"{self.fed.group.logs_dir}\n" + "\n".join(sub.lines[-40:]))
            resumes += 1
            self.fed.say(f"run {sub.run_id} ended after a SuperLink restart: resubmitting "
                         f"with resume=true ({resumes}/{self.max_resumes})")
            self.fed.bring_back_nodes()  # a resumed run then starts with everyone
            sub = self.fed.submit_config({**self.config, "resume": True})
            run_ids.append(sub.run_id)
        return self._outcome(run_ids, status, resumes)

    def _watch(self, sub: Submission) -> str:
        """Until Flower calls the run finished (its status), or the SuperLink was
        restarted under it (`_RESTARTED`: lost, resume it)."""
        next_status = 0.0
        while True:
            if self.timeout is not None and time.monotonic() - self.t0 > self.timeout:
                raise DeployError(f"the run did not finish within {self.timeout:.0f} s")
            time.sleep(self.poll)
            if self.on_tick is not None:
                self.on_tick(self.fed, sub)
            if self.fed.recover(sub):
                return _RESTARTED
            # the log stream ending is a hint; Flower's run status is the answer
            if time.monotonic() >= next_status or not sub.streaming():
                status = self.fed.run_status(sub.run_id)
                if status.startswith(FINISHED):
                    return status
                next_status = time.monotonic() + 5.0

    def _outcome(self, run_ids: list[int], status: str, resumes: int) -> RunOutcome:
        fed = self.fed
        return RunOutcome(
            run_ids=run_ids, status=status, resumes=resumes,
            seconds=time.monotonic() - self.t0,
            output_dir=Path(str(self.config.get("output-dir", "."))).resolve(),
            traffic=fed.traffic(run_ids), superlink_restarts=fed.superlink_restarts,
            node_restarts=dict(fed.node_restarts),
        )  # fmt: skip
