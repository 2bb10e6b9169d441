"""The tables of the simulation config (`simulations/config.py` holds the whole file):
[sites], [model], [public], [training], [resources] and [[experiment]], each a frozen
pydantic model with `extra="forbid"` and kebab-case keys.

`RUN_KEYS` lists every simulation key that is also a run-config key, once: the section
fields take their bounds from `RunConfig` and their defaults from `[tool.flwr.app.config]`
through it, `SimulationConfig.flower_run_config` writes the run config from it, and
`HARNESS_KEYS` (what a `run-config` table may not set) is made from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared_model.config import Fusion, Modality, ModelConfig, ModelSize, parse_label_set
from shared_model.contract.run_config import (
    RunConfig,
    StrategyName,
    device_name,
    pyproject_defaults,
)
from shared_model.contract.validation import messages
from shared_model.tooling.synth import Difficulty, Labeller, LabelMix, Style

Kind = Literal["pooled", "local", "public", "federated", "bow"]
Partition = Literal["natural", "iid", "dirichlet", "quantity"]
Scalar = bool | int | float | str

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# Every simulation key ("table.key") that becomes a run-config key, in the order they are
# written: a key the experiment leaves unset (None) keeps the value before it.
RUN_KEYS: dict[str, str] = {
    "training.rounds": "num-server-rounds",
    "training.local-epochs": "local-epochs",
    "training.batch-size": "batch-size",
    "training.lr": "lr",
    "model.image-size": "image-size",
    "model.fusion": "fusion",
    "model.model-size": "model-size",
    "model.labels": "labels",
    "experiment.rounds": "num-server-rounds",
    "experiment.strategy": "strategy",
    "experiment.dp": "dp",
    "experiment.epsilon": "epsilon",
    "experiment.modality": "modality",
}


def _where(run_key: str) -> str:
    """The simulation keys that set `run_key`, for a message."""
    keys = [sim.split(".", 1) for sim, run in RUN_KEYS.items() if run == run_key]
    return " or ".join(f"the experiment's {key}" if table == "experiment" else f"[{table}] {key}"
                       for table, key in keys)


# Run-config keys the harness sets itself; an experiment's `run-config` may not set them.
HARNESS_KEYS: dict[str, str] = {
    **{run_key: _where(run_key) for run_key in RUN_KEYS.values()},
    "seed": "seeds",
    "sites-dir": "[sites]",
    "output-dir": "the --out folder",
    "min-available-nodes": "(derived from the number of hospitals)",
    "min-train-nodes": "(derived from the number of hospitals and fraction-train)",
    "min-evaluate-nodes": "(derived from the number of hospitals and fraction-evaluate)",
    "resume": "(an unfinished experiment is run again from the start)",
    "initial-model": "[public] (the federation starts from the public model)",
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def run_default(key: str) -> Any:
    """A default taken from `[tool.flwr.app.config]`: the run config's one place."""
    return pyproject_defaults()[key]


_FROM_PYPROJECT: Any = object()  # run_key_field's default: the run config's own


def run_key_field(sim_key: str, default: Any = _FROM_PYPROJECT, **kwargs: Any) -> Any:
    """The field of a key in `RUN_KEYS`: `RunConfig`'s bounds; its default from
    `[tool.flwr.app.config]` unless the simulation has its own (`default`: None for an
    experiment's key, which leaves the value before it)."""
    run_key = RUN_KEYS[sim_key]
    if default is _FROM_PYPROJECT:
        kwargs["default_factory"] = partial(run_default, run_key)
    else:
        kwargs["default"] = default
    field = Field(**kwargs)
    field.metadata = list(RunConfig.model_fields[run_key.replace("-", "_")].metadata)
    return field


class Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_kebab, populate_by_name=True
    )


# keys that describe synthetic data only: dropped when real folders replace it
SYNTHETIC_SITE_KEYS = ("count", "cases-per-site", "label-skew", "label-mix", "difficulty",
                       "style")
SYNTHETIC_PUBLIC_KEYS = ("difficulty", "labeller")


# settings added to synthetic sites after results were first stamped and fingerprinted:
# at their default they are left out of both, so older stamps and results still match
LATER_SITE_DEFAULTS: dict[str, str] = {"style": "house", "label_mix": "balanced"}


def later_defaults(settings: BaseModel) -> set[str]:
    """The names in LATER_SITE_DEFAULTS at their default in `settings` (sites or synth)."""
    return {k for k, default in LATER_SITE_DEFAULTS.items() if getattr(settings, k) == default}


class SitesConfig(Section):
    """Where the hospitals come from and how the cases are split between them."""

    source: Literal["synthetic", "folders"] = "synthetic"
    folders: tuple[Path, ...] = Field((), description="site folders (format v1), one each")
    count: int = Field(5, ge=1, le=1000, description="synthetic hospitals to write")
    cases_per_site: int = Field(200, ge=10, le=100_000, description="synthetic, mean")
    label_skew: float = Field(
        0.5, ge=0.0, description="synthetic: Dirichlet alpha of each site's label mix; 0 = none"
    )
    label_mix: LabelMix = Field(
        "balanced", description="synthetic: the labels' overall shares, balanced or nih "
        "(as NIH ChestX-ray14's studies: 88% normal)")
    difficulty: Difficulty = Field(
        "standard", description="synthetic: standard, or hard (fainter findings, more "
        "clutter, fewer informative reports)")
    style: Style = Field(
        "house", description="synthetic: house, or unseen (scanners and report styles the "
        "synthetic public corpus never uses: how a public start transfers)")
    seed: int = Field(0, ge=0, description="data seed: synthetic hospitals and partitioning")
    partition: Partition = Field("natural", description="natural = one hospital per folder")
    hospitals: int | None = Field(None, ge=2, le=10_000, description="re-partitioned count")
    alpha: float = Field(0.5, gt=0.0, description="dirichlet: label skew, smaller = more")
    quantity_alpha: float = Field(
        1.0, gt=0.0, description="quantity: Dirichlet alpha of site sizes, smaller = more unequal"
    )
    min_cases: int = Field(10, ge=3, description="re-partitioned: fewest cases per hospital")
    link: Literal["hardlink", "copy"] = Field("hardlink", description="images of new sites")

    @model_validator(mode="after")
    def _check(self) -> SitesConfig:
        given = self.model_fields_set
        if self.source == "folders":
            if not self.folders:
                raise ValueError("sites.source='folders' needs sites.folders (a list of paths)")
            synthetic_only = sorted(
                _kebab(k) for k in given & {k.replace("-", "_") for k in SYNTHETIC_SITE_KEYS}
            )
            if synthetic_only:
                raise ValueError(
                    f"sites.{', sites.'.join(synthetic_only)} apply to synthetic sites only "
                    "(sites.source='folders')"
                )
        elif self.folders:
            raise ValueError(
                "sites.folders given but sites.source='synthetic'; set source = \"folders\""
            )
        if self.partition == "natural":
            if self.hospitals is not None:
                raise ValueError(
                    f"sites.hospitals={self.hospitals} needs sites.partition = iid, dirichlet "
                    "or quantity (natural keeps one hospital per folder)"
                )
        elif self.hospitals is None:
            raise ValueError(f"sites.partition={self.partition!r} needs sites.hospitals")
        return self

    @property
    def natural_count(self) -> int:
        return len(self.folders) if self.source == "folders" else self.count

    @property
    def num_hospitals(self) -> int:
        """How many simulated hospitals the experiments see."""
        return self.hospitals if self.hospitals is not None else self.natural_count


class ModelSection(Section):
    image_size: int = run_key_field("model.image-size")
    fusion: Fusion = run_key_field("model.fusion")
    model_size: ModelSize = run_key_field("model.model-size")
    labels: str = run_key_field("model.labels")

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        labels = parse_label_set(self.labels)  # ValueError naming the label
        preset = ModelConfig.large if self.model_size == "large" else ModelConfig.small
        try:
            preset(image_size=self.image_size, fusion=self.fusion, num_classes=len(labels))
        except ValidationError as exc:
            raise ValueError("; ".join(messages(exc))) from None
        return self


class PublicSection(Section):
    """The public data the federation starts from (`medfuse pretrain`), built once.

    synthetic: the project's SYNTHETIC stand-in for a pooled public archive (many source
    hospitals with their own seeds, scanners and report styles, and label noise: never a
    federation's data); folders: public datasets converted to format v1; none:
    federations start from random weights. `views`: domain randomisation while
    pretraining (CentralConfig.views)."""

    source: Literal["synthetic", "folders", "none"] = "none"
    folders: tuple[Path, ...] = Field((), description="public folders (format v1)")
    cases: int = Field(2000, ge=50, le=1_000_000, description="synthetic archive size")
    seed: int = Field(0, ge=0, description="synthetic archive seed (streams of its own)")
    epochs: int = Field(8, ge=1, le=1000, description="pretraining epochs")
    difficulty: Difficulty = Field(
        "standard", description="synthetic archive: its films and reports")
    labeller: Labeller = Field(
        "noisy", description="synthetic archive: true labels with random noise, or labels "
        "mined from its reports as report-mining labellers do")
    views: Literal["none", "mild", "strong"] = Field(
        "none", description="random views of each batch while pretraining (domain "
        "randomisation, shared_model/augment.py): none, mild or strong")

    @model_validator(mode="after")
    def _check(self) -> PublicSection:
        if (self.source == "folders") != bool(self.folders):
            raise ValueError("public.folders is for public.source = \"folders\" (and needs it)")
        synthetic_only = sorted(set(SYNTHETIC_PUBLIC_KEYS) & self.model_fields_set)
        if self.source != "synthetic" and synthetic_only:
            raise ValueError(f"public.{', public.'.join(synthetic_only)} apply to the synthetic "
                             "archive only (public.source = \"synthetic\")")
        return self

    @property
    def enabled(self) -> bool:
        return self.source != "none"


class TrainingSection(Section):
    rounds: int = run_key_field("training.rounds", 5, description="federated rounds")
    local_epochs: int = run_key_field("training.local-epochs")
    batch_size: int = run_key_field("training.batch-size")
    lr: float = run_key_field("training.lr")
    central_epochs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="pooled and local-only epochs; default rounds * local-epochs",
    )
    run_config: dict[str, Scalar] = Field(
        default_factory=dict, description="extra run-config keys for every federated run"
    )

    @property
    def epochs(self) -> int:
        return self.central_epochs or self.rounds * self.local_epochs


class ResourcesSection(Section):
    client_cpus: int = Field(1, ge=1, le=1024, description="CPUs per simulated hospital (Ray)")
    client_gpus: float = Field(0.0, ge=0.0, description="GPUs per simulated hospital (Ray)")
    ray_cpus: int | None = Field(None, ge=1, description="CPUs Ray may use; default all")
    ray_address: str | None = Field(
        None, min_length=1, description="an existing Ray cluster to run the simulated "
        "hospitals on (what `ray start --head` prints, e.g. 10.0.0.5:6379); default: a Ray "
        "instance on this machine")
    central_threads: int = Field(
        1,
        ge=1,
        le=1024,
        description="torch threads of pooled/local-only training and the final tests; more "
        "than one pays only on free cores (on a busy 2-core machine, 2 threads ran 14x slower)",
    )
    device: str = Field("auto", description="pooled/local-only and final tests: auto, cpu, cuda")
    timeout: float = Field(3600.0, gt=0.0, description="seconds one federated run may take")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return device_name(value)

    @model_validator(mode="after")
    def _check(self) -> ResourcesSection:
        if self.ray_address is not None and self.ray_cpus is not None:
            raise ValueError("ray-cpus and ray-address: the cluster's nodes say how many CPUs "
                             "they give (`ray start --num-cpus`); drop ray-cpus")
        return self


class ExperimentSpec(Section):
    """One `[[experiment]]` table; `epsilons` and `modalities` expand it into several."""

    name: str = Field(min_length=1, max_length=80)
    kind: Kind
    modality: Modality = "fused"
    modalities: tuple[Modality, ...] | None = Field(None, min_length=1)
    strategy: StrategyName = "fedavg"
    dp: bool = False
    epsilon: float | None = Field(None, gt=0.0)
    epsilons: tuple[float, ...] | None = Field(None, min_length=1)
    rounds: int | None = run_key_field("experiment.rounds", None)
    run_config: dict[str, Scalar] = Field(default_factory=dict)
    audit: bool = Field(False, description="membership-inference audit of the final model "
                                           "(pooled and federated experiments)")
    personalise_epsilon: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="federated DP only: each hospital keeps this much of its epsilon out of "
        "the federation (node config epsilon-reserve), then fine-tunes the final model on "
        "its own train split with DP-SGD spending it; the report compares both per site")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"name={value!r}: use letters, digits and - _ . + (it names a folder)")
        return value

    @field_validator("epsilons")
    @classmethod
    def _epsilons(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None:
            bad = [e for e in value if not (math.isfinite(e) and e > 0)]
            if bad:
                raise ValueError(f"every epsilon must be a positive number, got {bad}")
            if len(set(value)) != len(value):
                raise ValueError(f"epsilons={list(value)} repeats a value")
        return value

    @model_validator(mode="after")
    def _check(self) -> ExperimentSpec:
        given = self.model_fields_set
        if self.kind != "federated":
            fed_only = sorted(
                _kebab(k)
                for k in given & {"strategy", "epsilon", "epsilons", "rounds", "run_config"}
                if not (self.kind == "local" and self.dp and k in ("epsilon", "epsilons"))
            )
            if fed_only:
                raise ValueError(
                    f"{', '.join(fed_only)}: federated experiments only (kind={self.kind!r})"
                )
            if self.dp and self.kind != "local":
                raise ValueError(
                    f"dp=true: the {self.kind} baseline trains centrally without DP; "
                    "use a federated (or local) experiment with dp = true"
                )
        if self.audit and self.kind not in ("pooled", "federated"):
            raise ValueError(f"audit=true: pooled and federated experiments only (kind="
                             f"{self.kind!r} has one model per hospital or none of its own)")
        if self.personalise_epsilon is not None and not (self.kind == "federated"
                                                         and self.dp):
            raise ValueError("personalise-epsilon: federated experiments with dp = true only "
                             "(the hospital spends what it kept of its budget)")
        if "modality" in given and self.modalities is not None:
            raise ValueError("give modality or modalities, not both")
        if self.epsilon is not None and self.epsilons is not None:
            raise ValueError("give epsilon or epsilons, not both")
        if not self.dp and (self.epsilon is not None or self.epsilons is not None):
            raise ValueError("epsilon/epsilons given but dp=false; set dp = true")
        if self.modalities is not None and len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities={list(self.modalities)} repeats a value")
        reserved = sorted(k for k in self.run_config if k in HARNESS_KEYS)
        if reserved:
            raise ValueError(
                "run-config may not set "
                + "; ".join(f"{k} (set {HARNESS_KEYS[k]})" for k in reserved)
            )
        return self

    def expand(self) -> list[Experiment]:
        modalities = self.modalities or (self.modality,)
        epsilons: Sequence[float | None]
        if self.dp:
            epsilons = self.epsilons or (self.epsilon,)
        else:
            epsilons = (None,)
        out = []
        for m in modalities:
            for e in epsilons:
                name = self.name
                if self.modalities is not None:
                    name += f"-{m}"
                if self.epsilons is not None:
                    name += f"-eps{e:g}"
                out.append(
                    Experiment(
                        name=name,
                        series=self.name,
                        kind=self.kind,
                        modality=m,
                        strategy=self.strategy,
                        dp=self.dp,
                        epsilon=e,
                        rounds=self.rounds,
                        run_config=dict(self.run_config),
                        audit=self.audit,
                        personalise_epsilon=self.personalise_epsilon,
                    )
                )
        return out


class Experiment(BaseModel):
    """One concrete experiment after expansion: what the runner runs once per seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    series: str  # the [[experiment]] it came from: one line in the privacy-utility plot
    kind: Kind
    modality: Modality
    strategy: StrategyName
    dp: bool
    epsilon: float | None  # None with dp: the run config's default budget
    rounds: int | None
    run_config: dict[str, Scalar]
    audit: bool = False
    personalise_epsilon: float | None = None

    @property
    def label(self) -> str:
        if self.kind == "pooled":
            return "pooled"
        if self.kind == "local":
            return "local-only" + (f" DP eps={self.epsilon:g}" if self.dp and self.epsilon
                                   else " DP" if self.dp else "")
        if self.kind == "public":
            return "public model only"
        if self.kind == "bow":
            return "bag-of-words logistic regression"
        return f"{self.strategy}" + (
            f" DP eps={self.epsilon:g}" if self.dp and self.epsilon else " DP" if self.dp else ""
        )


