"""What every experiment kind is given: the unit it runs and a small frozen context."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.progress import Progress

from client.local import local_evaluate
from shared_model.config import CentralConfig, ModelConfig
from shared_model.dataset import SiteData
from shared_model.train import pick_device
from simulations import report
from simulations.config import SimulationConfig
from simulations.sections import Experiment

if TYPE_CHECKING:  # flower.py raises SimulationError: a type here, no import cycle
    from simulations.experiments.flower import FlowerLink

EXPERIMENTS_DIR = "experiments"

# One row of the harness's long table, in `report.COLUMNS` order: (experiment, seed,
# round, site, metric, value). Not `server.results.Row`: that is one ServerApp
# measurement (round, site, node, phase, metric, value), read here into these rows.
ResultRow = tuple[str, int, int, str, str, float]



def finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values; nan when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


class SimulationError(RuntimeError):
    """The simulation cannot go on; the message says what happened and where the logs are."""


@dataclass(frozen=True)
class PreparedSites:
    root: Path  # the folder of site folders the ClientApps read (run config sites-dir)
    dirs: list[Path]  # in partition-id order (sorted by name, as the ClientApp lists them)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dirs]


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

    def row(self, rnd: int, site: str, metric: str, value: float) -> ResultRow:
        return (self.experiment.name, self.seed, rnd, site, metric, float(value))

    def metric_rows(self, rnd: int, site: str, metrics: Mapping[str, float],
                    prefix: str = report.TEST) -> list[ResultRow]:
        """`metrics` of one site as rows named `prefix` + metric (test/accuracy...)."""
        return [self.row(rnd, site, prefix + k, v) for k, v in metrics.items()]


@dataclass(frozen=True)
class Context:
    """What the experiment kinds share in one harness run."""

    cfg: SimulationConfig
    out: Path  # the run's output folder (absolute)
    sites: PreparedSites  # the sites-dir the ClientApps read, and its site folders
    opened: list[SiteData]  # every hospital opened here, in `sites` order
    echo: Callable[[str], None]  # a line for the researcher, above the progress bars
    progress: Progress
    lines: bool  # the terminal shows no bars: say each step as a line instead
    link: FlowerLink  # the simulation SuperLink, started on first use

    @property
    def device(self) -> torch.device:
        """Where baselines train and final models are tested (`[resources] device`)."""
        return pick_device(self.cfg.resources.device)

    def central(self, unit: Unit) -> CentralConfig:
        """How the pooled and local-only baselines train: `[training]`, the unit's seed."""
        t = self.cfg.training
        return CentralConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                             seed=unit.seed, device=self.cfg.resources.device)

    def test(self, model: ModelConfig, site: SiteData,
             state: Mapping[str, torch.Tensor]) -> tuple[dict[str, float], int]:
        """`state`'s exact metrics on `site`'s test split, and how many cases it holds."""
        with self.threads():
            return local_evaluate(model, site, state, self.device, split="test")

    def say(self, text: str) -> None:
        """A step's line where no progress bar shows it (logs, CI)."""
        if self.lines:
            self.echo(text)

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """Torch's CPU threads set to `[resources] central-threads`, then put back."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.cfg.resources.central_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @contextlib.contextmanager
    def bar(self, unit: Unit, total: int, info: str = "") -> Iterator[Callable[[int, str], None]]:
        """A progress bar for `unit`; yields `update(completed, info)`."""
        task = self.progress.add_task(f"  {unit.experiment.name}", total=total, info=info)
        try:
            yield lambda completed, text: self.progress.update(task, completed=completed,
                                                                info=text)
        finally:
            self.progress.remove_task(task)
