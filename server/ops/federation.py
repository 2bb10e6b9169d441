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

`medfuse deploy local` (`server/ops/deploy.py`) runs one; tests use it for fault
injection on real processes.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.ops.flower_commands import (
    superlink_command,
    supernode_command,
    write_connection,
    write_run_config,
)
from server.ops.handouts import CONNECTION_NAME, node_config_string
from server.ops.pki import Provisioned
from server.ops.processes import (
    LOOPBACK,
    FlowerError,
    FlowerProcess,
    address,
    descendants,
    free_ports,
    terminate,
    wait_until,
)
from server.ops.provision import provision
from server.ops.supervisor import COMPLETED, FINISHED, Submission, Supervisor

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml
SUPERLINK = "superlink"
_RESTARTED = "restarted"  # a run lost to a SuperLink restart: resubmit with resume

Echo = Callable[[str], None]


class DeployError(RuntimeError):
    """The local deployment could not finish; the message says where to look."""


# ------------------------------------------------------------------ the federation


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


class LocalFederation(Supervisor):
    """A SuperLink and N SuperNodes on 127.0.0.1, TLS and node authentication on; what
    it adds to the `Supervisor`: provisioning, the nodes, restarts, resumed runs."""

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
        self.sites = {n: Path(p).resolve() for n, p in sites.items()}
        self.epsilon_budget = epsilon_budget
        self.timed_nodes = timed_nodes
        ports = free_ports(1 + len(self.sites))
        self.port = ports[0]
        self.node_ports = dict(zip(self.sites, ports[1:], strict=True))
        self.database = self.workdir / "superlink.db"
        self.prov: Provisioned = provision(
            self.workdir / "provision", list(self.sites), [], self.port, bind_host=LOOPBACK
        )
        write_connection(
            self.group.flwr_home, CONNECTION_NAME, address(self.port), self.prov.ca_cert
        )
        self.node_ids: dict[str, int] = {}
        self.nodes: dict[str, FlowerProcess] = {}
        self.held_down: set[str] = set()  # nodes a caller stopped on purpose: not restarted
        self.superlink_restarts = 0
        self.node_restarts: dict[str, int] = {n: 0 for n in self.sites}
        self._superlink_kids: set[int] = set()

    def round_seconds(self) -> list[float]:
        """Wall time of each round as the ServerApp's log showed it: from the start of a
        round's training to the start of the next round (the last one: to the run's end).
        An attempt cut short by a SuperLink restart is not counted; its rerun is."""
        events: list[tuple[int | None, float]] = []
        for t, line in self.timeline("medfuse: global round", "medfuse: done after"):
            m = re.search(r"global round (\d+)/", line)
            events.append((int(m.group(1)) if m else None, t))
        out = []
        for (rnd, t), (nxt, t_next) in zip(events, events[1:], strict=False):
            if rnd is not None and nxt != rnd:
                out.append(t_next - t)
        return out

    # -------------------------------------------------------------- start / stop

    def start(self, timeout: float = 180.0) -> None:
        """SuperLink up, every key registered, every SuperNode online."""
        self.start_deployed_superlink()
        for name in self.sites:
            self.node_ids[name] = self.cli.register(self.prov.public_key(name), name)
        self.say("registered " + ", ".join(f"{n} (node {i})" for n, i in self.node_ids.items()))
        for name in self.sites:
            self.start_node(name)
        self.wait_online(timeout=timeout)

    def start_deployed_superlink(self) -> FlowerProcess:
        cmd = superlink_command(port=self.port, database=self.database,
                                ca_cert=self.prov.ca_cert, cert=self.prov.superlink_cert,
                                key=self.prov.superlink_key, auth=True)  # fmt: skip
        proc = self.start_superlink(cmd, self.port, timeout=60, name=SUPERLINK)
        self.say(f"SuperLink up on {address(self.port)} (TLS, node auth)")
        return proc

    def node_command(
        self,
        name: str,
        *,
        private_key: Path | None = None,
        root_cert: Path | None | bool = True,
        port: int | None = None,
        max_retries: int | None = None,
    ) -> list[str]:
        """The SuperNode command of hospital `name` (other key / no CA for refusal tests)."""
        ca = self.prov.hospital_ca_cert(name) if root_cert is True else root_cert or None
        state = self.workdir / "state" / name
        return supernode_command(
            superlink=address(self.port),
            port=port if port is not None else self.node_ports[name],
            root_cert=ca,
            private_key=private_key or self.prov.private_key(name),
            node_config=node_config_string(
                str(self.sites[name]), name, "auto", self.epsilon_budget, str(state),
                release_compute_time=self.timed_nodes,
            ),
            max_retries=max_retries,
        )

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

    # -------------------------------------------------------------- runs

    def submit_config(self, run_config: Mapping[str, object]) -> Submission:
        path = self.workdir / f"run-config-{self._submissions + 1}.toml"
        return self.submit(write_run_config(path, run_config))

    def run(
        self,
        run_config: Mapping[str, object],
        *,
        max_resumes: int = 3,
        timeout: float | None = None,
        poll: float = 1.0,
        on_tick: Callable[[LocalFederation, Submission], None] | None = None,
    ) -> RunOutcome:
        """Submit, supervise (restart dead nodes / SuperLink, resume), until the run ends."""
        t0 = time.monotonic()
        output_dir = Path(str(run_config.get("output-dir", "."))).resolve()
        sub = self.submit_config(run_config)
        run_ids, resumes = [sub.run_id], 0
        while True:
            status = self._supervise(sub, t0, timeout, poll, on_tick)
            if status == COMPLETED:
                break
            if status != _RESTARTED or resumes >= max_resumes:
                raise DeployError(
                    f"run {sub.run_id} ended {status}; logs in {self.group.logs_dir}\n"
                    + "\n".join(sub.lines[-40:])
                )
            resumes += 1
            self.say(f"run {sub.run_id} ended after a SuperLink restart: resubmitting with "
                     f"resume=true ({resumes}/{max_resumes})")
            self.bring_back_nodes()
            sub = self.submit_config({**run_config, "resume": True})
            run_ids.append(sub.run_id)
        return RunOutcome(
            run_ids=run_ids, status=status, resumes=resumes, seconds=time.monotonic() - t0,
            output_dir=output_dir, traffic=self.traffic(run_ids),
            superlink_restarts=self.superlink_restarts, node_restarts=dict(self.node_restarts),
        )

    def _supervise(self, sub: Submission, t0: float, timeout: float | None, poll: float,
                   on_tick: Callable[[LocalFederation, Submission], None] | None) -> str:
        """Watch one submission until Flower calls its run finished (its status), or until
        the SuperLink died and was restarted (`_RESTARTED`: the run is lost, resume it)."""
        next_status = 0.0
        while True:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise DeployError(f"the run did not finish within {timeout:.0f} s")
            time.sleep(poll)
            if on_tick is not None:
                on_tick(self, sub)
            self._remember_superlink_children()
            if not self.superlink_alive():
                sub.follower.stop(timeout=5)
                self.restart_superlink()
                # the restart orphaned the run (its ServerApp is gone): stop it now rather
                # than wait for Flower to mark it failed
                if not self.run_status(sub.run_id).startswith(FINISHED):
                    self.stop_run(sub.run_id)
                    self.wait_finished(sub.run_id, timeout=60)
                return _RESTARTED
            self._restart_dead_nodes()
            # the log stream ending is a hint; Flower's run status is the answer
            if time.monotonic() >= next_status or not sub.streaming():
                status = self.run_status(sub.run_id)
                if status.startswith(FINISHED):
                    return status
                next_status = time.monotonic() + 5.0
