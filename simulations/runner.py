"""Running a simulation's experiments: baselines in this process, federated runs in Flower.

    out/
      config.toml                  the resolved config (defaults filled in, paths absolute)
      sites/                       the hospitals: synthetic ones written here, re-partitioned
                                   ones written here, given folders linked here
      flower/                      this run's own FLWR_HOME, the SuperLink's and runs' logs
      experiments/NAME/seed-S/     one folder per experiment and seed: rows.csv, done.json;
                                   federated: run-config.toml, the ServerApp's results.jsonl,
                                   checkpoints/, final/ and ledgers/ (its ledger store)
      results.csv                  the long table of every finished experiment
      experiments.csv              what each experiment is (kind, strategy, dp, epsilon...)
      summary.md, plots/*.png, report.html

Pooled and local-only baselines train here, in plain PyTorch (`shared_model.central`).
A federated experiment is a real `flwr run` of this project's ServerApp and ClientApp in
Flower's simulation engine (Ray backend), on a simulation-mode SuperLink that this run
starts from the project root on a free 127.0.0.1 port and stops at the end, also on an
error or Ctrl-C (Flower's own `:local:` SuperLink would outlive the run and keep the
working directory of whichever app started it). Every Flower process gets the offline
environment of `server.supervisor` (no telemetry, no update check, no Ray usage
stats, no runtime dependency installation).

After a federated run, the final global model (`final/model.pt`) is tested here on each
hospital's test split, so federated and baseline numbers are measured alike.

An experiment whose folder holds a `done.json` with the same fingerprint (everything that
decides its result, `SimulationConfig.fingerprint`) is not run again; an unfinished one is
run again from the start, in a fresh folder (a fresh ledger store: each experiment is a
separate simulated federation, so each spends its own budget).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from server.results import M_UPDATE_ACCEPTED
from server.supervisor import (
    FINISHED,
    FlowerError,
    Submission,
    Supervisor,
    address,
    free_port,
    simulation_superlink_command,
    write_connection,
    write_run_config,
)
from shared_model.config import MANIFEST
from shared_model.files import atomic_write_text
from simulations import report
from simulations.config import LEDGER_DIR, Experiment, SimulationConfig
from simulations.partition import (
    PartitionError,
    label_skew,
    partition,
    read_pool,
    write_partitioned_sites,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "medfuse-simulation"
CONFIG_FILE = "config.toml"
SITES_DIR = "sites"
PUBLIC_DIR = "public"
FLOWER_DIR = "flower"
EXPERIMENTS_DIR = "experiments"
ROWS_FILE = "rows.csv"
DONE_FILE = "done.json"
RUN_CONFIG_FILE = "run-config.toml"
STAMP_FILE = ".medfuse-sites.json"
# ServerApp metrics that say nothing about the model (kept out of the long table)
_SKIP_EVAL = {"epsilon", "delta", "data-error"}
MAX_LISTED_SITES = 12  # more hospitals than this: one summary line per split

Row = tuple[str, int, int, str, str, float]


class SimulationError(RuntimeError):
    """The simulation cannot go on; the message says what happened and where the logs are."""


@dataclass(frozen=True)
class Unit:
    """One experiment with one seed: the unit that is run, skipped or failed."""

    experiment: Experiment
    seed: int

    @property
    def title(self) -> str:
        return f"{self.experiment.name} (seed {self.seed})"

    def folder(self, out: Path) -> Path:
        return out / EXPERIMENTS_DIR / self.experiment.name / f"seed-{self.seed}"


@dataclass
class Outcome:
    """What a `simulate` call did."""

    out: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    files: report.ReportFiles | None = None
    results_csv: Path | None = None


# ---------------------------------------------------------------------- sites


@dataclass(frozen=True)
class PreparedSites:
    root: Path  # the folder of site folders the ClientApps read (run config sites-dir)
    dirs: list[Path]  # in partition-id order (sorted by name, as the ClientApp lists them)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dirs]


def list_site_dirs(root: Path) -> list[Path]:
    """Site folders under `root`, in the order the ClientApp maps partition ids to them."""
    from client.site import list_sites

    return list_sites(root)


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / STAMP_FILE
    try:
        return json.loads(path.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _write_stamp(folder: Path, stamp: dict) -> None:
    atomic_write_text(folder / STAMP_FILE, json.dumps(stamp, indent=2, sort_keys=True))


def _synthetic_sites(cfg: SimulationConfig, root: Path, echo: Callable[[str], None]) -> Path:
    from shared_model.synth import SynthConfig, write_federation

    s = cfg.sites
    synth = SynthConfig(
        sites=s.count,
        cases_per_site=s.cases_per_site,
        seed=s.seed,
        label_skew=s.label_skew or None,
        image_size=cfg.model.image_size,
        difficulty=s.difficulty,
    )
    stamp = {"synthetic": synth.model_dump(mode="json")}
    base = root / "synthetic"
    if base.is_dir() and _stamp_matches(base, stamp) and len(list_site_dirs(base)) == s.count:
        echo(f"sites: {s.count} synthetic hospitals already in {base}")
        return base
    if base.exists():
        shutil.rmtree(base)
    t0 = time.monotonic()
    write_federation(base, synth)
    _write_stamp(base, stamp)
    echo(
        f"sites: wrote {s.count} synthetic hospitals ({s.cases_per_site} cases each on "
        f"average, label skew alpha {s.label_skew or 'none'}, {cfg.model.image_size} px) "
        f"to {base} in {time.monotonic() - t0:.0f} s"
    )
    return base


def _linked_folders(folders: Sequence[Path], root: Path) -> Path:
    """One folder of links to the given site folders (the ClientApps read one sites-dir)."""
    from simulations.partition import _unique_names

    for f in folders:
        if not Path(f).is_dir():
            raise SimulationError(f"site folder {str(f)!r} does not exist")
        if not (Path(f) / MANIFEST).is_file():
            raise SimulationError(
                f"site folder {str(f)!r} has no manifest.csv (a site is a folder holding "
                "manifest.csv and the images it names, dataset format v1)"
            )
    base = root / "natural"
    if base.exists():
        shutil.rmtree(base)  # links only: rmtree never follows them
    base.mkdir(parents=True)
    for f, name in zip(folders, _unique_names([Path(f) for f in folders]), strict=True):
        os.symlink(Path(f).resolve(), base / name, target_is_directory=True)
    return base


def prepare_sites(cfg: SimulationConfig, out: Path, echo: Callable[[str], None]) -> PreparedSites:
    """Write, link or re-partition the hospitals; return the sites-dir and its folders."""
    root = out / SITES_DIR
    root.mkdir(parents=True, exist_ok=True)
    s = cfg.sites
    if s.source == "synthetic":
        natural_root = _synthetic_sites(cfg, root, echo)
        natural = list_site_dirs(natural_root)
    else:
        natural_root = _linked_folders(s.folders, root)
        natural = list_site_dirs(natural_root)
    if s.partition == "natural":
        return PreparedSites(root=natural_root, dirs=natural)

    assert s.hospitals is not None
    manifests = [d / "manifest.csv" for d in natural]
    stamp = {
        "partition": s.model_dump(
            mode="json",
            include={
                "partition",
                "hospitals",
                "alpha",
                "quantity_alpha",
                "min_cases",
                "seed",
                "link",
            },
        ),
        "pool": [[str(m.resolve()), m.stat().st_size, m.stat().st_mtime_ns] for m in manifests],
    }
    base = root / f"{s.partition}-{s.hospitals}"
    if base.is_dir() and _stamp_matches(base, stamp) and len(list_site_dirs(base)) == s.hospitals:
        echo(f"sites: {s.hospitals} re-partitioned hospitals already in {base}")
        return PreparedSites(root=base, dirs=list_site_dirs(base))
    if base.exists():
        shutil.rmtree(base)
    t0 = time.monotonic()
    try:
        pool = read_pool(natural)
        labels = [c.record.get("label", "").strip() for c in pool]
        parts = partition(
            s.partition,
            labels,
            s.hospitals,
            seed=s.seed,
            alpha=s.alpha,
            quantity_alpha=s.quantity_alpha,
            min_size=s.min_cases,
        )
        write_partitioned_sites(pool, parts, base, seed=s.seed, link=s.link)
    except PartitionError as exc:
        raise SimulationError(f"sites.partition={s.partition!r}: {exc}") from None
    _write_stamp(base, stamp)
    sizes = sorted(len(p) for p in parts)
    how = {
        "iid": "IID",
        "dirichlet": f"Dirichlet label skew alpha {s.alpha}",
        "quantity": f"quantity skew alpha {s.quantity_alpha}",
    }[s.partition]
    echo(
        f"sites: {len(pool)} cases of {len(natural)} site folder(s) re-partitioned into "
        f"{s.hospitals} hospitals ({how}): sizes {sizes[0]}..{sizes[-1]} (median "
        f"{sizes[len(sizes) // 2]}), label-mix distance from the pool "
        f"{label_skew(labels, parts):.2f}; written to {base} in "
        f"{time.monotonic() - t0:.0f} s"
    )
    return PreparedSites(root=base, dirs=list_site_dirs(base))


def open_sites(
    cfg: SimulationConfig, sites: PreparedSites, echo: Callable[[str], None], max_listed: int = 5
) -> list:
    """Open every hospital here (baselines and final tests); bad rows are listed and
    skipped; a hospital that cannot be used at all stops the simulation before training."""
    from shared_model.dataset import SiteError, open_site
    from shared_model.tokenizer import Tokenizer

    model = cfg.run_config(cfg.experiments[0], cfg.seeds[0], sites.root, Path("-")).model()
    tokenizer = Tokenizer(model.vocab_size)
    opened = []
    many = len(sites.dirs) > MAX_LISTED_SITES
    for d in sites.dirs:
        try:
            site = open_site(d, labels=cfg.label_set, model=model, tokenizer=tokenizer)
        except SiteError as exc:
            raise SimulationError(f"hospital {d.name} ({d}) cannot be used: {exc}") from None
        bad = site.summary.bad_rows
        line = (
            f"  {d.name}: {len(site.train)} train / {len(site.val)} val / "
            f"{len(site.test)} test cases"
        )
        if bad:
            line += f"; {len(bad)} bad row(s) skipped"
        if bad or not many:
            echo(line)
        for b in bad[:max_listed]:
            echo(f"    row {b.row} ({b.case_id or 'no case_id'}): {b.reason}")
        if len(bad) > max_listed:
            echo(f"    ... and {len(bad) - max_listed} more (medfuse data check {d})")
        opened.append(site)
    if many:
        for split in ("train", "val", "test"):
            n = sorted(len(getattr(s, split)) for s in opened)
            echo(
                f"  {split} cases per hospital: {n[0]}..{n[-1]} (median {n[len(n) // 2]}, "
                f"total {sum(n)})"
            )
    return opened


# ---------------------------------------------------------------------- Flower


def check_outside_app(out: Path, app_dir: Path = PROJECT_DIR) -> None:
    """`flwr run` bundles the app folder minus what its .gitignore ignores: an output
    folder inside it would be bundled (results, configs, model cards) into every run."""
    try:
        rel = out.resolve().relative_to(app_dir.resolve())
    except ValueError:
        return
    try:
        import pathspec  # Flower's own dependency for the same rules
    except ImportError:  # pragma: no cover - installed with flwr
        return
    ignore = app_dir / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    if not spec.match_file(f"{rel.as_posix()}/{CONFIG_FILE}"):
        raise SimulationError(
            f"the output folder {out} is inside the Flower app ({app_dir}) and not ignored "
            "by its .gitignore, so `flwr run` would bundle its files into every federated "
            "run; use a folder under runs/ or outside the project"
        )


def simulation_link(workdir: Path, timeout: float = 120.0,
                    ray_address: str | None = None) -> Supervisor:
    """A simulation-mode SuperLink of this harness run (own FLWR_HOME, free port, logs).
    With `ray_address`, Flower's Ray backend joins that cluster: `ray.init()` reads
    RAY_ADDRESS (Flower 1.42's federation config has no address key for its init-args)."""
    # "local": a Ray instance of this run, even when `ray start` left a cluster running here
    extra = {"RAY_ADDRESS": ray_address or "local"}
    if ray_address and ray_address.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
        # a cluster of several machines: Ray's own rule for this node's address (the one
        # that routes towards the cluster), not the loopback of single-machine runs
        extra["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    link = Supervisor(workdir, CONNECTION, app_dir=PROJECT_DIR, extra_env=extra)
    port = free_port()
    write_connection(link.group.flwr_home, CONNECTION, address(port), None, insecure=True)
    try:
        link.start_superlink(simulation_superlink_command(port), port, timeout=timeout)
    except FlowerError:
        link.close()
        raise
    return link


def federation_config(num_nodes: int, cfg: SimulationConfig) -> str:
    """`flwr run --federation-config`: the simulated nodes and their Ray resources."""
    r = cfg.resources
    text = (f"num-supernodes={num_nodes} client-resources-num-cpus={r.client_cpus} "
            f"client-resources-num-gpus={r.client_gpus}")
    if r.ray_cpus is not None:  # not with a cluster: its nodes say what they give
        text += f" init-args-num-cpus={r.ray_cpus}"
    return text


# ---------------------------------------------------------------------- the runner


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


class Runner:
    """Runs the units of one config into one output folder."""

    def __init__(
        self, cfg: SimulationConfig, console: Console | None = None, progress: bool = True
    ) -> None:
        assert cfg.out is not None, "load_config fills in the output folder"
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.console = console or Console()
        self.show_progress = progress
        self.lines = not self.console.is_terminal  # plain log lines where bars don't show
        self.units = [Unit(e, s) for e in cfg.experiments for s in cfg.seeds]
        self.sites: PreparedSites | None = None
        self.opened: list | None = None
        self.link: Supervisor | None = None
        self._progress: Progress | None = None

    # ------------------------------------------------------------- output

    def echo(self, text: str) -> None:
        (self._progress.console if self._progress else self.console).print(
            text, markup=False, highlight=False, soft_wrap=True
        )

    def is_done(self, unit: Unit) -> bool:
        folder = unit.folder(self.out)
        try:
            done = json.loads((folder / DONE_FILE).read_text())
        except (OSError, ValueError):
            return False
        return (
            done.get("fingerprint") == self.cfg.fingerprint(unit.experiment, unit.seed)
            and (folder / ROWS_FILE).is_file()
        )

    def meta_frame(self) -> pd.DataFrame:
        rows = [
            {
                "experiment": e.name,
                "series": e.series,
                "kind": e.kind,
                "strategy": e.strategy if e.kind == "federated" else "",
                "modality": e.modality,
                "dp": e.dp,
                "epsilon_budget": e.epsilon
                if e.epsilon is not None
                else (
                    self.cfg.flower_run_config(
                        e, seed=0, sites_dir=Path("-"), output_dir=Path("-")
                    )["epsilon"]
                    if e.dp
                    else math.inf
                ),
                "rounds": self.cfg.rounds_of(e)
                if e.kind == "federated"
                else self.cfg.training.epochs,
                "label": e.label,
            }
            for e in self.cfg.experiments
        ]
        return pd.DataFrame(rows)

    def collect(self) -> pd.DataFrame:
        """The long table of every finished unit of this config, in config order."""
        frames = []
        for unit in self.units:
            if self.is_done(unit):
                frames.append(report.read_results(unit.folder(self.out) / ROWS_FILE))
        if not frames:
            return report.empty_results()
        return report.results_frame(pd.concat(frames, ignore_index=True))

    def write_tables(self) -> pd.DataFrame:
        results = self.collect()
        report.write_csv_atomic(results, self.out / report.RESULTS_FILE)
        report.write_csv_atomic(self.meta_frame(), self.out / report.EXPERIMENTS_FILE)
        return results

    # ------------------------------------------------------------- the run

    def run(self) -> Outcome:
        t0 = time.monotonic()
        outcome = Outcome(out=self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.out / CONFIG_FILE,
            "# The resolved simulation config: `medfuse simulate THIS_FILE` runs it again.\n"
            + self.cfg.to_toml(),
        )
        todo = [u for u in self.units if not self.is_done(u)]
        outcome.skipped = [u.title for u in self.units if u not in todo]
        if outcome.skipped:
            self.echo(
                f"already finished in {self.out}, not run again: " + ", ".join(outcome.skipped)
            )
        if any(u.experiment.kind == "federated" for u in todo):
            check_outside_app(self.out)
        if todo:
            self.sites = prepare_sites(self.cfg, self.out, self.echo)
            self.echo(f"{len(self.sites.dirs)} hospitals:")
            self.opened = open_sites(self.cfg, self.sites, self.echo)
        try:
            with self._progress_bar() as progress:
                self._progress = progress
                overall = progress.add_task(
                    "experiments", total=len(self.units), completed=len(outcome.skipped), info=""
                )
                for i, unit in enumerate(todo, start=1):
                    self.echo(f"[{i}/{len(todo)}] {unit.title}: {unit.experiment.label}")
                    started = time.monotonic()
                    try:
                        self._run_unit(unit, progress)
                    except SimulationError as exc:
                        outcome.failed[unit.title] = str(exc)
                        self.echo(f"[{i}/{len(todo)}] {unit.title} FAILED: {exc}")
                    else:
                        outcome.ran.append(unit.title)
                        self.echo(
                            f"[{i}/{len(todo)}] {unit.title}: done in "
                            f"{time.monotonic() - started:.0f} s" + self._headline(unit)
                        )
                    progress.advance(overall)
                    self.write_tables()
        finally:
            self._progress = None
            if self.link is not None:
                self.link.close()
                self.link = None
        results = self.write_tables()
        outcome.results_csv = self.out / report.RESULTS_FILE
        notes = [f"config: {self.out / CONFIG_FILE}; long table: {outcome.results_csv}"]
        if outcome.failed:
            notes.append("not finished: " + ", ".join(outcome.failed))
        outcome.files = report.write_report(
            results, self.out, meta=self.meta_frame(), title=self.cfg.name, notes=notes
        )
        outcome.seconds = time.monotonic() - t0
        return outcome

    def _progress_bar(self) -> Progress:
        return Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.show_progress or not self.console.is_terminal,
        )

    def _headline(self, unit: Unit) -> str:
        try:
            rows = report.read_results(unit.folder(self.out) / ROWS_FILE)
        except (OSError, ValueError):
            return ""
        acc = rows[rows["metric"] == report.TEST + "accuracy"]["value"].tolist()
        eps = rows[rows["metric"] == report.EPSILON]["value"].tolist()
        text = f"; mean test accuracy {_mean(acc):.3f}" if acc else ""
        finite = [e for e in eps if math.isfinite(e)]
        if finite:
            text += f", epsilon spent up to {max(finite):.2f}"
        return text

    def _run_unit(self, unit: Unit, progress: Progress) -> None:
        folder = unit.folder(self.out)
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished or outdated run: start afresh
        folder.mkdir(parents=True)
        started = time.monotonic()
        kind = unit.experiment.kind
        if kind == "pooled":
            rows = self._pooled(unit, progress)
        elif kind == "local" and unit.experiment.dp:
            rows = self._local_dp(unit, folder, progress)
        elif kind == "local":
            rows = self._local(unit, progress)
        elif kind == "public":
            rows = self._public_only(unit)
        else:
            rows = self._federated(unit, folder, progress)
        seconds = time.monotonic() - started
        rows.append((unit.experiment.name, unit.seed, 0, report.ALL_SITES, report.SECONDS, seconds))
        report.write_csv_atomic(report.results_frame(rows), folder / ROWS_FILE)
        done = {
            "experiment": unit.experiment.name,
            "seed": unit.seed,
            "fingerprint": self.cfg.fingerprint(unit.experiment, unit.seed),
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "rows": len(rows),
        }
        atomic_write_text(folder / DONE_FILE, json.dumps(done, indent=2))

    # ------------------------------------------------------------- baselines

    def _central(self, unit: Unit):
        from shared_model.central import CentralConfig

        assert self.sites is not None
        model = self.cfg.run_config(unit.experiment, unit.seed, self.sites.root, Path("-")).model()
        central = CentralConfig(
            epochs=self.cfg.training.epochs,
            batch_size=self.cfg.training.batch_size,
            lr=self.cfg.training.lr,
            seed=unit.seed,
            device=self.cfg.resources.device,
        )
        return model, central

    @contextlib.contextmanager
    def _threads(self):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.cfg.resources.central_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _test_rows(self, unit: Unit, rnd: int, site: str, metrics: dict[str, float]) -> list[Row]:
        name = unit.experiment.name
        return [(name, unit.seed, rnd, site, report.TEST + k, float(v)) for k, v in metrics.items()]

    def _pooled(self, unit: Unit, progress: Progress) -> list[Row]:
        from shared_model.central import train_central
        from shared_model.tokenizer import Tokenizer

        assert self.opened is not None
        model, central = self._central(unit)
        name = unit.experiment.name
        rows: list[Row] = []
        task = progress.add_task(f"  {name}", total=central.epochs, info="")

        def on_epoch(epoch: int, loss: float) -> None:
            rows.append((name, unit.seed, epoch, report.ALL_SITES, report.TRAIN_LOSS, loss))
            progress.update(task, completed=epoch, info=f"epoch {epoch}: loss {loss:.3f}")
            if self.lines:
                self.echo(f"  {name} epoch {epoch}/{central.epochs}: train loss {loss:.3f}")

        start = None
        if self.cfg.uses_public(unit.experiment):
            from shared_model.model_file import load_model_file

            start = load_model_file(self._public_model(unit)).state
        try:
            with self._threads():
                trained, res = train_central(
                    self.opened, model, central, Tokenizer(model.vocab_size), on_epoch=on_epoch,
                    initial_state=start,
                )
        except (ValueError, RuntimeError) as exc:
            raise SimulationError(f"pooled training failed: {exc}") from exc
        for site, metrics in res.per_site.items():
            rows += self._test_rows(unit, central.epochs, site, metrics)
            rows.append((name, unit.seed, central.epochs, site, report.EPSILON, math.inf))
        progress.remove_task(task)
        if unit.experiment.audit:
            rows += self._audit_rows(unit, model, trained.state_dict(), central.epochs)
        return rows

    def _local(self, unit: Unit, progress: Progress) -> list[Row]:
        from shared_model.central import train_central
        from shared_model.tokenizer import Tokenizer

        assert self.opened is not None
        model, central = self._central(unit)
        name = unit.experiment.name
        rows: list[Row] = []
        total = central.epochs * len(self.opened)
        task = progress.add_task(f"  {name}", total=total, info="")
        tokenizer = Tokenizer(model.vocab_size)
        for k, site in enumerate(self.opened):

            def on_epoch(epoch: int, loss: float, site_name: str = site.name, k: int = k) -> None:
                rows.append((name, unit.seed, epoch, site_name, report.TRAIN_LOSS, loss))
                progress.update(
                    task,
                    completed=k * central.epochs + epoch,
                    info=f"{site_name} epoch {epoch}: loss {loss:.3f}",
                )

            try:
                with self._threads():
                    _, res = train_central([site], model, central, tokenizer, on_epoch=on_epoch)
            except (ValueError, RuntimeError) as exc:
                raise SimulationError(f"local training at {site.name} failed: {exc}") from exc
            for s, metrics in res.per_site.items():
                rows.extend(self._test_rows(unit, central.epochs, s, metrics))
                rows.append((name, unit.seed, central.epochs, s, report.EPSILON, math.inf))
            if self.lines:
                acc = res.per_site.get(site.name, {}).get("accuracy", math.nan)
                self.echo(f"  {name} {site.name}: test accuracy {acc:.3f}")
        progress.remove_task(task)
        return rows

    # ------------------------------------------------------------- public start

    def _public_model(self, unit: Unit) -> Path:
        """The public model for this experiment's model config (built once, under
        OUT/public/)."""
        from server.pretrain import cached_public_model

        pub = self.cfg.public
        model, _ = self._central(unit)
        with self._threads():
            return cached_public_model(
                self.out / PUBLIC_DIR, model, self.cfg.label_set,
                folders=pub.folders if pub.source == "folders" else (), cases=pub.cases,
                seed=pub.seed, difficulty=pub.difficulty, labeller=pub.labeller,
                epochs=pub.epochs, batch_size=self.cfg.training.batch_size,
                device=self.cfg.resources.device, echo=self.echo,
            )

    def _public_only(self, unit: Unit) -> list[Row]:
        """The public model alone on every hospital's test split: the federation's start."""
        from client.local import local_evaluate
        from shared_model.model_file import load_model_file
        from shared_model.train import pick_device

        assert self.opened is not None
        start = load_model_file(self._public_model(unit))
        device = pick_device(self.cfg.resources.device)
        rows: list[Row] = []
        with self._threads():
            for site in self.opened:
                metrics, n = local_evaluate(start.model_config, site, start.state, device,
                                            split="test")
                if n:
                    rows += self._test_rows(unit, 0, site.name, metrics)
                    rows.append((unit.experiment.name, unit.seed, 0, site.name,
                                 report.EPSILON, 0.0))
        return rows

    def _local_dp(self, unit: Unit, folder: Path, progress: Progress) -> list[Row]:
        """Each hospital alone, fine-tuning with DP-SGD (the client's own `local_train`)
        from the public model, for as many epochs as a federation has rounds x epochs."""
        from client.local import DPSettings, local_evaluate, local_train
        from client.privacy import LedgerStore
        from shared_model.model import MedFuseModel
        from shared_model.model_file import load_model_file
        from shared_model.run_config import RunConfig
        from shared_model.train import pick_device, seed_everything

        assert self.opened is not None and self.sites is not None
        exp = unit.experiment
        run = RunConfig.parse(self.cfg.flower_run_config(
            exp, seed=unit.seed, sites_dir=self.sites.root, output_dir=folder))
        model = run.model()
        if self.cfg.uses_public(exp):
            state = load_model_file(self._public_model(unit)).state
        else:
            seed_everything(unit.seed)
            state = MedFuseModel(model).state_dict()
        device = pick_device(self.cfg.resources.device)
        store = LedgerStore(folder / LEDGER_DIR)
        epochs = self.cfg.training.epochs
        dp = DPSettings(noise_multiplier=run.noise_multiplier or None,
                        max_grad_norm=run.max_grad_norm, accountant=run.accountant)
        rows: list[Row] = []
        task = progress.add_task(f"  {exp.name}", total=len(self.opened), info="")
        for k, site in enumerate(self.opened):
            with self._threads(), store.lock():
                ledger = store.open(store.identify(site.path), site_name=site.name,
                                    data_path=site.path, epsilon_budget=run.epsilon,
                                    eval_epsilon_budget=2.0, delta=run.delta)
                recipe = run.recipe()
                out = local_train(model, site, state, epochs=epochs, lr=recipe.lr,
                                  batch_size=run.batch_size, dp=dp, ledger=ledger,
                                  save_ledger=store.save, run_id=0, server_round=1,
                                  rounds_left=1, device=device, seed=unit.seed,
                                  optimizer=recipe.optimizer, momentum=recipe.momentum,
                                  train_layers=recipe.train_layers)
            if out.refused or out.state is None:
                raise SimulationError(f"local DP training at {site.name} refused: {out.reason}")
            with self._threads():
                metrics, n = local_evaluate(model, site, out.state, device, split="test")
            if n:
                rows += self._test_rows(unit, epochs, site.name, metrics)
            rows.append((exp.name, unit.seed, epochs, site.name, report.EPSILON, out.epsilon))
            progress.update(task, completed=k + 1, info=site.name)
            if self.lines:
                self.echo(f"  {exp.name} {site.name}: test accuracy "
                          f"{metrics.get('accuracy', math.nan):.3f}, epsilon {out.epsilon:.2f}")
        progress.remove_task(task)
        return rows

    # ------------------------------------------------------------- federated

    def _federated(self, unit: Unit, folder: Path, progress: Progress) -> list[Row]:
        """Submit the experiment to the simulation SuperLink, show its rounds as the
        ServerApp writes them, and read its results and final model."""
        from server.results import RESULTS_FILE, read_rows

        exp = unit.experiment
        rounds = self.cfg.rounds_of(exp)
        sub = self._submit(unit, folder)
        task = progress.add_task(f"  {exp.name}", total=rounds, info=f"run {sub.run_id}")
        try:
            status = self._follow(unit, sub, folder, progress, task)
        finally:
            progress.remove_task(task)
        results_path, final = folder / RESULTS_FILE, folder / "final" / "model.pt"
        server_rows = read_rows(results_path) if results_path.exists() else []
        last = max((r.round for r in server_rows), default=0)
        if not final.is_file() or last < rounds:
            raise SimulationError(
                f"Flower run {sub.run_id} ended {status or 'early'} after {last} of {rounds} "
                "round(s)" + ("" if final.is_file() else " without a final model")
                + f"; log: {sub.follower.log_path}\n" + "\n".join(sub.lines[-30:])
            )
        return self._server_rows(unit, server_rows) + self._final_test(unit, final)

    def _submit(self, unit: Unit, folder: Path) -> Submission:
        """The experiment's run config as a file, and a run of the app on the SuperLink
        (started on first use, restarted if it died)."""
        from shared_model.run_config import RunConfig

        assert self.sites is not None
        exp = unit.experiment
        flat = self.cfg.flower_run_config(
            exp, seed=unit.seed, sites_dir=self.sites.root, output_dir=folder,
            initial_model=self._public_model(unit) if self.cfg.uses_public(exp) else None,
        )
        RunConfig.parse(flat)
        rc_file = write_run_config(folder / RUN_CONFIG_FILE, flat)
        try:
            if self.link is None or not self.link.superlink_alive():
                if self.link is not None:
                    self.link.close()
                self.echo("starting a simulation SuperLink (Flower simulation engine, Ray)")
                self.link = simulation_link(self.out / FLOWER_DIR,
                                            ray_address=self.cfg.resources.ray_address)
            return self.link.submit(
                rc_file, federation_config=federation_config(len(self.sites.dirs), self.cfg),
                show=False,
            )
        except FlowerError as exc:
            raise SimulationError(f"{exp.name} did not start: {exc}") from exc

    def _follow(self, unit: Unit, sub: Submission, folder: Path, progress: Progress,
                task: TaskID) -> str:
        """Until the run is finished (Flower's status), or the ServerApp has written every
        round and the final model; the run's status ('' when not asked)."""
        from server.results import RESULTS_FILE, read_rows

        assert self.link is not None
        link, exp = self.link, unit.experiment
        rounds = self.cfg.rounds_of(exp)
        results_path, final = folder / RESULTS_FILE, folder / "final" / "model.pt"
        deadline = time.monotonic() + self.cfg.resources.timeout
        seen_round, size, status, next_check = 0, -1, "", 0.0
        while True:
            time.sleep(1.0)
            if results_path.exists() and results_path.stat().st_size != size:
                size = results_path.stat().st_size
                seen_round = self._show_round(unit, read_rows(results_path), seen_round,
                                              rounds, progress, task)  # fmt: skip
            if final.is_file() and seen_round >= rounds:
                return status  # the ServerApp writes the final model last
            if time.monotonic() >= next_check:
                with contextlib.suppress(FlowerError):
                    status = link.run_status(sub.run_id)
                if status.startswith(FINISHED):
                    return status
                next_check = time.monotonic() + 5.0
            if not link.superlink_alive():
                raise SimulationError(
                    f"the simulation SuperLink stopped during {exp.name}; its log: "
                    f"{link.superlink.log_path if link.superlink else '?'}"
                )
            if time.monotonic() > deadline:
                link.stop_run(sub.run_id)
                raise SimulationError(
                    f"{exp.name} did not finish within resources.timeout="
                    f"{self.cfg.resources.timeout:.0f} s; log: {sub.follower.log_path}"
                )

    def _show_round(
        self, unit: Unit, rows: list, seen: int, rounds: int, progress: Progress, task: TaskID
    ) -> int:
        done = max((r.round for r in rows), default=0)
        if done <= seen:
            return seen
        for rnd in range(seen + 1, done + 1):
            info = round_line(rows, rnd)
            progress.update(task, completed=rnd, info=info)
            if self.lines:
                self.echo(
                    f"  {unit.experiment.name} round {rnd}/{rounds}: " + info.split(": ", 1)[1]
                )
        return done

    def _server_rows(self, unit: Unit, rows: list) -> list[Row]:
        """The ServerApp's results as long rows: train/<m> per site and round (train/loss,
        train/epsilon...), eval/<m> for the federated evaluation after each round."""
        out: list[Row] = []
        name = unit.experiment.name
        for r in rows:
            if r.phase == "train":
                metric = "loss" if r.metric == "train-loss" else r.metric
                out.append((name, unit.seed, r.round, r.site, f"train/{metric}", r.value))
            elif r.metric not in _SKIP_EVAL:
                out.append((name, unit.seed, r.round, r.site, report.EVAL + r.metric, r.value))
        return out

    def _final_test(self, unit: Unit, final: Path) -> list[Row]:
        """The final global model on every hospital's test split, here."""
        import torch

        from client.local import local_evaluate
        from shared_model.config import ModelConfig
        from shared_model.train import pick_device

        assert self.opened is not None
        payload = torch.load(final, map_location="cpu", weights_only=True)
        model = ModelConfig(**payload["model_config"])
        state = payload["model"]
        rnd = int(payload.get("round", self.cfg.rounds_of(unit.experiment)))
        device = pick_device(self.cfg.resources.device)
        rows: list[Row] = []
        with self._threads():
            for site in self.opened:
                metrics, n = local_evaluate(model, site, state, device, split="test")
                if n:
                    rows += self._test_rows(unit, rnd, site.name, metrics)
        if unit.experiment.audit:
            rows += self._audit_rows(unit, model, state, rnd)
        if unit.experiment.personalise_epsilon is not None:
            rows += self._personalise_rows(unit, state, rnd)
        return rows

    def _personalise_rows(self, unit: Unit, state, rnd: int) -> list[Row]:
        """Each hospital fine-tunes the final model on its own train split with DP-SGD
        (`medfuse personalise`'s step), charged to the experiment's ledger, spending the
        epsilon its node kept out of the federation; personalised/* rows: its test metrics
        here and its total epsilon."""
        import secrets

        from client.local import DPSettings, local_evaluate, local_train
        from client.privacy import LedgerStore
        from shared_model.run_config import RunConfig
        from shared_model.train import pick_device

        assert self.opened is not None
        exp, folder = unit.experiment, unit.folder(self.out)
        run = RunConfig.parse(self.cfg.flower_run_config(
            exp, seed=unit.seed, sites_dir=self.sites.root, output_dir=folder))
        model, recipe = run.model(), run.recipe()
        device = pick_device(self.cfg.resources.device)
        store = LedgerStore(folder / LEDGER_DIR)
        rows: list[Row] = []
        for site in self.opened:
            with self._threads(), store.lock():
                ledger = store.open(store.identify(site.path), site_name=site.name,
                                    data_path=site.path, epsilon_budget=run.epsilon,
                                    eval_epsilon_budget=2.0, delta=run.delta)
                out = local_train(
                    model, site, state, epochs=self.cfg.training.local_epochs, lr=recipe.lr,
                    batch_size=run.batch_size, ledger=ledger, save_ledger=store.save,
                    dp=DPSettings(max_grad_norm=run.max_grad_norm, accountant=run.accountant),
                    run_id=secrets.randbits(31), server_round=1, rounds_left=1,
                    device=device, seed=unit.seed, optimizer=recipe.optimizer,
                    momentum=recipe.momentum, train_layers=recipe.train_layers)
            if out.refused or out.state is None:
                self.echo(f"  {exp.name} {site.name}: personalisation refused: {out.reason}")
                continue
            with self._threads():
                metrics, n = local_evaluate(model, site, out.state, device, split="test")
            rows += [(exp.name, unit.seed, rnd, site.name, report.PERSONALISED + k, float(v))
                     for k, v in metrics.items()]
            rows.append((exp.name, unit.seed, rnd, site.name,
                         report.PERSONALISED + "epsilon", out.epsilon))
            self.echo(f"  {exp.name} {site.name}: personalised test accuracy "
                      f"{metrics.get('accuracy', math.nan):.3f}, epsilon {out.epsilon:.2f}")
        return rows

    def _audit_rows(self, unit: Unit, model, state, rnd: int) -> list[Row]:
        """The loss-threshold membership attack on every hospital (members: its train
        split; non-members: val and test), as audit/* rows, and its ROC plot."""
        from client.audit import audit_site, roc_plot, verdict
        from shared_model.train import pick_device

        assert self.opened is not None
        device = pick_device(self.cfg.resources.device)
        results = []
        with self._threads():
            for site in self.opened:
                if len(site.train) >= 2 and len(site.val) + len(site.test) >= 2:
                    results += audit_site(model, state, site, device=device)
        roc_plot(results, unit.folder(self.out) / "audit-roc.png",
                 title=f"membership inference: {unit.experiment.name}")
        self.echo(f"  {unit.experiment.name} audit: {verdict(results)}")
        rows: list[Row] = []
        for r in results:
            for key, value in (("auc", r.auc), ("auc-lo", r.auc_ci[0]), ("auc-hi", r.auc_ci[1]),
                               ("tpr@1%fpr", r.tpr_at_1), ("tpr@0.1%fpr", r.tpr_at_01)):
                rows.append((unit.experiment.name, unit.seed, rnd, r.site,
                             f"{report.AUDIT}{r.attack}-{key}", float(value)))
        return rows


def round_line(rows: Sequence, rnd: int) -> str:
    """What a researcher sees of round `rnd` from the ServerApp's rows: the latest model
    evaluated so far (with evaluate-with-train a round's model is evaluated inside the next
    round's train message), the most any site has spent, and updates left out (a node's
    refusal or a failed check: the ServerApp's log says why)."""
    def of(phase: str, metric: str, k: int) -> list[float]:
        return [r.value for r in rows if r.round == k and r.phase == phase and r.metric == metric]

    evaluated = next((k for k in range(rnd, 0, -1) if of("evaluate", "accuracy", k)), None)
    info = f"round {rnd}: accuracy " + (
        "-" if evaluated is None else f"{_mean(of('evaluate', 'accuracy', evaluated)):.3f}"
        + ("" if evaluated == rnd else f" (round {evaluated}'s model)"))
    eps = [v for v in of("train", "epsilon", rnd) if math.isfinite(v)]
    if eps:
        info += f", epsilon {max(eps):.2f}"
    verdicts = of("train", M_UPDATE_ACCEPTED, rnd)
    if left_out := sum(v < 0.5 for v in verdicts):
        info += f", {left_out} of {len(verdicts)} updates left out"
    return info
