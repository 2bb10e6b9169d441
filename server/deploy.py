"""`medfuse deploy local`: the real distributed path on one machine, over 127.0.0.1.

Provisions a throwaway federation (CA, SuperLink TLS identity, one key per hospital) into
a temporary folder, starts a SuperLink (TLS, SuperNode authentication, a state database)
and one SuperNode per hospital (each with its own site folder: synthetic by default),
registers the hospitals' keys, waits until every node is online, submits the app with
`flwr run`, streams its log, and prints the final per-site table from the ServerApp's
output folder. It supervises what it started while the run goes:

- a SuperNode that dies is restarted once the SuperLink has marked it offline (the
  SuperLink refuses to activate a node it still thinks online); it comes back under the
  same node id (its key is registered) and with its privacy ledger (its `state-dir`);
- a SuperLink that dies is restarted on the same port with the same database; Flower then
  marks the running run failed, and the run is resubmitted with `resume=true`, which
  continues from the ServerApp's last checkpoint.

Every process it started is stopped at the end, also on Ctrl-C, SIGTERM or failure.
`LocalFederation` is the same machinery for tests (fault injection on real processes).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.provision import CONNECTION_NAME, Provisioned, node_config_string, provision
from server.supervisor import (
    COMPLETED,
    FINISHED,
    LOOPBACK,
    FlowerError,
    FlowerProcess,
    Submission,
    Supervisor,
    address,
    descendants,
    free_ports,
    superlink_command,
    supernode_command,
    terminate,
    wait_until,
    write_connection,
    write_run_config,
)
from shared_model.config import MANIFEST

PROJECT_DIR = Path(__file__).resolve().parent.parent
SUPERLINK = "superlink"
_RESTARTED = "restarted"  # a run lost to a SuperLink restart: resubmit with resume
_SITE_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")

Echo = Callable[[str], None]


class DeployError(RuntimeError):
    """The local deployment could not finish; the message says where to look."""


class DeployConfig(BaseModel):
    """What `medfuse deploy local` runs (validated before any process starts)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hospitals: int = Field(3, ge=1, le=32, description="number of SuperNodes")
    rounds: int = Field(2, ge=1, le=10_000)
    sites: tuple[Path, ...] = Field((), description="site folders; empty = synthetic")
    out: Path = Field(Path("runs/deploy-local"), description="results, final model, logs")
    cases_per_site: int = Field(60, ge=10, description="synthetic sites only")
    image_size: int = Field(32, ge=16, le=1024)
    seed: int = 0
    min_nodes: int | None = Field(None, ge=1, description="default: all but one hospital")
    round_timeout: float = Field(600.0, gt=0)
    node_wait_timeout: float = Field(180.0, gt=0)
    max_resumes: int = Field(3, ge=0)
    run_timeout: float | None = Field(None, gt=0, description="give up after this many s")
    run_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    public: bool = Field(True, description="start from a public model (built once, cached)")
    timed_nodes: bool = Field(False, description="nodes send the seconds each message took "
                              "(released without DP): for the bench's round overhead")
    public_cases: int = Field(1000, ge=50, description="synthetic public corpus size")
    keep_workdir: bool = False
    app_dir: Path = PROJECT_DIR

    @model_validator(mode="after")
    def _check(self) -> DeployConfig:
        if self.sites and len(self.sites) != self.hospitals:
            raise ValueError(
                f"--sites gives {len(self.sites)} folders but --hospitals is {self.hospitals}"
            )
        for s in self.sites:
            if not (s / MANIFEST).is_file():
                raise ValueError(f"--sites {s}: no manifest.csv there (run `medfuse data check`)")
        if self.min_nodes is not None and self.min_nodes > self.hospitals:
            raise ValueError(f"--min-nodes {self.min_nodes} exceeds --hospitals {self.hospitals}")
        if not (self.app_dir / "pyproject.toml").is_file():
            raise ValueError(f"app_dir {self.app_dir}: no pyproject.toml (the Flower app)")
        return self

    @property
    def quorum(self) -> int:
        return self.min_nodes if self.min_nodes is not None else max(1, self.hospitals - 1)

    def flower_run_config(self, output_dir: Path) -> dict[str, object]:
        base: dict[str, object] = {
            "num-server-rounds": self.rounds,
            "min-train-nodes": self.quorum,
            "min-evaluate-nodes": self.quorum,
            "min-available-nodes": self.quorum,
            "round-timeout": self.round_timeout,
            "image-size": self.image_size,
            "seed": self.seed,
            "output-dir": str(output_dir.resolve()),
        }
        base.update(self.run_config)
        base["resume"] = False
        return base


def site_names(sites: Sequence[Path]) -> list[str]:
    """Hospital names from site folder names: safe for provisioning, unique."""
    names: list[str] = []
    for s in sites:
        base = _SITE_NAME_BAD.sub("-", Path(s).resolve().name).strip("-.")[:28] or "site"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


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


# ------------------------------------------------------------------ results


def final_table_rows(output_dir: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the final per-site table from the ServerApp's results file."""
    from server.results import RESULTS_FILE, epsilon_spent, final_metrics, read_rows

    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        raise DeployError(f"no results file at {path}: the ServerApp wrote nothing")
    rows = read_rows(path)
    metrics = final_metrics(rows)
    eps = epsilon_spent(rows)
    nodes: dict[str, int] = {}
    last_round: dict[str, int] = {}
    for r in rows:
        nodes[r.site] = r.node_id
        last_round[r.site] = max(last_round.get(r.site, 0), r.round)
    cols = ["accuracy", "macro-f1", "auroc", "iou", "bleu4", "rouge-l"]
    header = ["site", "node id", "last round", "epsilon", *cols]

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) and v == v else "-"

    table = []
    for site, m in metrics.items():
        if site == "mean":
            continue
        table.append(
            [site, str(nodes.get(site, "-")), str(last_round.get(site, "-")),
             fmt(eps.get(site)), *(fmt(m.get(c)) for c in cols)]
        )  # fmt: skip
    if "mean" in metrics:
        table.append(["mean", "", "", "", *(fmt(metrics["mean"].get(c)) for c in cols)])
    return header, table


def print_final_table(output_dir: Path, echo: Echo = print) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = final_table_rows(output_dir)
    table = Table(title=f"final model, per site ({output_dir})")
    for h in header:
        table.add_column(h, justify="left" if h == "site" else "right")
    for r in rows:
        table.add_row(*r)
    console = Console(width=120)
    with console.capture() as cap:
        console.print(table)
    echo(cap.get().rstrip("\n"))


# ------------------------------------------------------------------ the whole command


def prepare_sites(cfg: DeployConfig, workdir: Path) -> dict[str, Path]:
    if cfg.sites:
        paths = [Path(s).resolve() for s in cfg.sites]
    else:
        from shared_model.synth import SynthConfig, write_federation

        paths = write_federation(
            workdir / "sites",
            SynthConfig(
                sites=cfg.hospitals,
                cases_per_site=cfg.cases_per_site,
                seed=cfg.seed,
                image_size=cfg.image_size,
            ),
        )
    return dict(zip(site_names(paths), paths, strict=True))


def public_start(cfg: DeployConfig, run_config: Mapping[str, object], echo: Echo) -> Path:
    """The public model the federation starts from, cached beside the synthetic sites."""
    from server.pretrain import cached_public_model
    from shared_model.config import cache_root
    from shared_model.run_config import RunConfig, pyproject_defaults

    run = RunConfig.parse({**pyproject_defaults(), **run_config})
    return cached_public_model(cache_root() / "public", run.model(), run.label_set,
                               cases=cfg.public_cases, epochs=4,
                               echo=lambda m: echo(f"[deploy] {m}"))


def deploy_local(cfg: DeployConfig, echo: Echo = print) -> RunOutcome:
    """The whole local deployment; every process is stopped before this returns/raises."""
    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="medfuse-deploy-"))
    fed: LocalFederation | None = None
    outcome: RunOutcome | None = None
    try:
        sites = prepare_sites(cfg, workdir)
        echo(f"[deploy] {len(sites)} hospitals: "
             + ", ".join(f"{n} <- {p}" for n, p in sites.items()))  # fmt: skip
        fed = LocalFederation(workdir, sites, app_dir=cfg.app_dir, logs_dir=out / "logs",
                              echo=echo, timed_nodes=cfg.timed_nodes)  # fmt: skip
        fed.start(timeout=cfg.node_wait_timeout)
        run_config = cfg.flower_run_config(out / "output")
        if cfg.public and "initial-model" not in run_config:
            run_config["initial-model"] = str(public_start(cfg, run_config, echo))
        echo(f"[deploy] flwr run {cfg.app_dir} {CONNECTION_NAME} -c "
             + " ".join(f"{k}={v!r}" for k, v in run_config.items()))
        outcome = fed.run(run_config, max_resumes=cfg.max_resumes, timeout=cfg.run_timeout)
        print_final_table(outcome.output_dir, echo)
        t = outcome.traffic
        n = len(sites)
        rounds = fed.round_seconds()
        per_round = (
            f"rounds took {', '.join(f'{x:.0f}' for x in rounds)} s"
            if rounds else f"{outcome.seconds / cfg.rounds:.0f} s per round incl. start"
        )
        echo(
            f"[deploy] run {'/'.join(map(str, outcome.run_ids))} {outcome.status} in "
            f"{outcome.seconds:.0f} s ({per_round}); network: {t['total-bytes'] / 1e6:.2f} MB "
            f"total, {t['total-bytes'] / max(1, n * cfg.rounds) / 1e6:.2f} MB per hospital "
            "per round"
        )
        if outcome.resumes or outcome.superlink_restarts or any(outcome.node_restarts.values()):
            echo(f"[deploy] resumes: {outcome.resumes}, SuperLink restarts: "
                 f"{outcome.superlink_restarts}, SuperNode restarts: {outcome.node_restarts}")
        echo(f"[deploy] results, checkpoints and final model: {outcome.output_dir}")
        return outcome
    finally:
        if fed is not None:
            fed.close()
            left = fed.group.leftovers()
            if outcome is not None:
                outcome.leftovers = left
            if left:
                echo(f"[deploy] warning: processes still alive after stop: {left}")
        if cfg.keep_workdir:
            echo(f"[deploy] kept the working folder (keys, database, state): {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        echo("[deploy] every process stopped")


__all__ = [
    "DeployConfig",
    "DeployError",
    "LocalFederation",
    "RunOutcome",
    "deploy_local",
]
