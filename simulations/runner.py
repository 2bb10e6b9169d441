"""Running a simulation's experiments: the loop over (experiment, seed), skipping finished ones.

    out/
      config.toml                  the resolved config (defaults filled in, paths absolute)
      sites/                       the hospitals: synthetic ones written here, re-partitioned
                                   ones written here, given folders linked here
      public/                      the public model(s) experiments start from
      flower/                      this run's own FLWR_HOME, the SuperLink's and runs' logs
      experiments/NAME/seed-S/     one folder per experiment and seed: rows.csv, done.json;
                                   federated: run-config.toml, the ServerApp's results.jsonl,
                                   checkpoints/, final/, ledgers/SITE (each hospital's store)
      results.csv                  the long table of every finished experiment
      experiments.csv              what each experiment is (kind, strategy, dp, epsilon...)
      summary.md, plots/*.png, report.html

What each kind of experiment does is its own module in `simulations.experiments`, found
through its table `KINDS`: pooled and local-only baselines train here in plain PyTorch, a
federated experiment is a real `flwr run` in Flower's simulation engine.

An experiment whose folder holds a `done.json` with the same fingerprint (everything that
decides its result, `SimulationConfig.fingerprint`) is not run again; an unfinished one is
run again from the start, in a fresh folder (a fresh ledger store: each experiment is a
separate simulated federation, so each spends its own budget).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from client.local import SECURE_RNG_NOTE
from shared_model.contract.metric_registry import HEADLINE
from shared_model.files import atomic_write_text
from simulations import report
from simulations.config import SimulationConfig
from simulations.experiments import CHECKS, KINDS, kind_of
from simulations.experiments.context import Context, SimulationError, Unit, finite_mean
from simulations.experiments.flower import CONFIG_FILE, FlowerLink
from simulations.sites import open_sites, prepare_sites

ROWS_FILE = "rows.csv"
DONE_FILE = "done.json"


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
        return pd.DataFrame([self.cfg.describe(e) for e in self.cfg.experiments])

    def collect(self) -> pd.DataFrame:
        """The long table of every finished unit of this config, in config order."""
        frames = [report.read_results(u.folder(self.out) / ROWS_FILE)
                  for u in self.units if self.is_done(u)]
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
        for kind in dict.fromkeys(kind_of(u.experiment) for u in todo):
            if kind in CHECKS:
                CHECKS[kind](self.out)
        if any(u.experiment.dp or kind_of(u.experiment) == "local-dp" for u in todo):
            self.echo(SECURE_RNG_NOTE)  # once, instead of Opacus' warning per engine
        if todo:
            self._run_units(todo, outcome)
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

    def _run_units(self, todo: list[Unit], outcome: Outcome) -> None:
        """Prepare and open the hospitals, then run every unit in `todo`, a failure
        stopping only its own unit; the tables are written after each."""
        sites = prepare_sites(self.cfg, self.out, self.echo)
        self.echo(f"{len(sites.dirs)} hospitals:")
        opened = open_sites(self.cfg, sites, self.echo)
        link = FlowerLink(self.out, self.cfg.resources.ray_address, self.echo)
        try:
            with self._progress_bar() as progress:
                self._progress = progress
                ctx = Context(cfg=self.cfg, out=self.out, sites=sites, opened=opened,
                              echo=self.echo, progress=progress, lines=self.lines, link=link)
                overall = progress.add_task(
                    "experiments", total=len(self.units), completed=len(outcome.skipped), info=""
                )
                for i, unit in enumerate(todo, start=1):
                    self.echo(f"[{i}/{len(todo)}] {unit.title}: {unit.experiment.label}")
                    started = time.monotonic()
                    try:
                        self._run_unit(unit, ctx)
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
            link.close()

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
        acc = rows[rows["metric"] == report.TEST + HEADLINE.name]["value"].tolist()
        eps = rows[rows["metric"] == report.EPSILON]["value"].tolist()
        text = f"; mean test {HEADLINE.label} {finite_mean(acc):.3f}" if acc else ""
        finite = [e for e in eps if math.isfinite(e)]
        if finite:
            text += f", epsilon spent up to {max(finite):.2f}"
        return text

    def _run_unit(self, unit: Unit, ctx: Context) -> None:
        """Run `unit` by its kind's entry in KINDS, in a fresh folder; its rows.csv and,
        last, its done.json (what marks it finished)."""
        folder = unit.folder(self.out)
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished or outdated run: start afresh
        folder.mkdir(parents=True)
        started = time.monotonic()
        rows = KINDS[kind_of(unit.experiment)](unit, ctx)
        seconds = time.monotonic() - started
        rows.append(unit.row(0, report.ALL_SITES, report.SECONDS, seconds))
        rows += [unit.row(0, s.name, report.TEST_CASES, len(s.test)) for s in ctx.opened]
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
