"""`medfuse deploy local`: the real distributed path on one machine, over 127.0.0.1.

What the command adds to a `LocalFederation` (`server/ops/federation.py`): its validated
config, the hospitals' site folders (synthetic by default), the public model the run
starts from, the `flwr run` submission with the run config, and at the end the per-site
table from the ServerApp's output folder and what the run cost (seconds per round,
bytes on the network). Every process it started is stopped at the end, also on Ctrl-C,
SIGTERM or failure.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.table import Table

from server.ops.federation import PROJECT_DIR, DeployError, Echo, LocalFederation, RunOutcome
from server.ops.handouts import CONNECTION_NAME
from server.ops.processes import FlowerProcess, address
from server.results import RESULTS_FILE, epsilon_spent, final_metrics, read_rows
from shared_model.config import MANIFEST, cache_root
from shared_model.contract.metric_registry import View, shown_in
from shared_model.contract.run_config import RunConfig, pyproject_defaults
from shared_model.tooling.synth import SynthConfig, write_federation

_SITE_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")


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
    warm_clientapps: bool = Field(
        True, description="each SuperNode runs with --isolation process and medfuse's warm "
        "SuperExec beside it (client/warm_exec.py: ClientApp processes forked from one that "
        "imported torch already); false: Flower's own, one fresh process per message")
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


class WarmLocalFederation(LocalFederation):
    """A `LocalFederation` whose SuperNodes run `--isolation process`, each with medfuse's
    warm SuperExec (`client/warm_exec.py`) beside it: a message's ClientApp process is
    forked from one that has imported torch, Opacus and Flower, not started cold (3.6 s
    a message on 2 cores). The SuperExec ends with its SuperNode (`--parent-pid`), and a
    SuperNode brought back gets a new one. It asks its SuperNode for a task every 0.1 s,
    as Flower's own does here (`processes.PROMPT_ENV`, which every process gets)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.executors: dict[str, FlowerProcess] = {}

    def node_command(self, name: str, **kwargs: object) -> list[str]:  # type: ignore[override]
        return [*super().node_command(name, **kwargs), "--isolation", "process"]  # type: ignore[arg-type]

    def start_node(self, name: str) -> FlowerProcess:
        node = super().start_node(name)
        old = self.executors.get(name)
        if old is not None and old.alive():
            old.stop()
        self.executors[name] = self.group.start(
            f"superexec-{name}",
            [sys.executable, "-m", "client.warm_exec", "--runtime-api-address",
             address(self.layout.node_ports[name]), "--parent-pid", str(node.pid)],
            cwd=self.app_dir, extra_env=self.extra_env)
        return node


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


# ------------------------------------------------------------------ results


def final_table_rows(output_dir: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the final per-site table from the ServerApp's results file."""
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
    cols = [m.name for m in shown_in(View.TABLES)]
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
    # `medfuse --help` imports this module (server/ops/cli.py)
    # lazy: the training code behind the public model loads torch and opacus (seconds)
    from server.ops.pretrain import cached_public_model

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
        federation = WarmLocalFederation if cfg.warm_clientapps else LocalFederation
        fed = federation(workdir, sites, app_dir=cfg.app_dir, logs_dir=out / "logs",
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
    "WarmLocalFederation",
    "deploy_local",
]
