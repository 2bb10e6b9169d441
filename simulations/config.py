"""The simulation config: which hospitals, which experiments, how many rounds (no Flower).

A TOML file, validated by a frozen pydantic model with `extra="forbid"`: an unknown key or
a bad value stops `medfuse simulate` before any training, with a message that names the
key, the value and what is allowed. `simulations/default.toml` is the built-in default
(`make demo`). Keys are kebab-case, as in Flower's run config.

    name = "demo"
    seeds = [0]                      # every experiment runs once per seed

    [sites]                          # the hospitals
    source = "synthetic"             # or "folders" (+ folders = ["/data/a", ...])
    count = 5                        # synthetic hospitals
    cases-per-site = 200
    label-skew = 0.5                 # Dirichlet alpha of each synthetic site's label mix
    partition = "natural"            # natural | iid | dirichlet | quantity
    hospitals = 50                   # re-partitioned: how many hospitals (not natural)
    alpha = 0.5                      # dirichlet: label skew (smaller = more skew)

    [model]      image-size, fusion, model-size, labels
    [training]   rounds, local-epochs, batch-size, lr, central-epochs, run-config = {...}
    [resources]  client-cpus, client-gpus, central-threads, timeout

    [[experiment]]
    name = "fedavg-dp"
    kind = "federated"               # pooled | local | federated
    strategy = "fedavg"              # any of the ServerApp's strategies
    dp = true
    epsilons = [1.0, 2.0, 4.0, 8.0]  # expands to fedavg-dp-eps1 ... (privacy-utility curve)
    modalities = ["image", "text"]   # expands to ...-image, ...-text (ablation)

Every federated experiment becomes one flat Flower run config (pyproject defaults, then
the harness's keys, then the experiment's `run-config`), validated here with the
ServerApp's own `RunConfig`, so a bad strategy setting fails before the first run too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from client.site import sim_node_config_text
from shared_model.config import DEFAULT_LABELS, Fusion, Modality, ModelConfig, ModelSize
from shared_model.run_config import (
    RunConfig,
    RunConfigError,
    StrategyName,
    device_name,
    model_config_for,
    pyproject_defaults,
)
from shared_model.synth import Difficulty, Labeller
from shared_model.validation import describe, messages

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.toml"
DEFAULT_OUT = Path("runs/simulate")
LEDGER_DIR = "ledgers"  # each federated experiment's own ledger store, beside its outputs

Kind = Literal["pooled", "local", "public", "federated"]
Partition = Literal["natural", "iid", "dirichlet", "quantity"]
Scalar = bool | int | float | str

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# Run-config keys the harness sets itself; an experiment's `run-config` may not set them.
HARNESS_KEYS: dict[str, str] = {
    "num-server-rounds": "[training] rounds or the experiment's rounds",
    "strategy": "the experiment's strategy",
    "dp": "the experiment's dp",
    "epsilon": "the experiment's epsilon / epsilons",
    "modality": "the experiment's modality / modalities",
    "seed": "seeds",
    "sites-dir": "[sites]",
    "output-dir": "the --out folder",
    "local-epochs": "[training] local-epochs",
    "batch-size": "[training] batch-size",
    "lr": "[training] lr",
    "image-size": "[model] image-size",
    "fusion": "[model] fusion",
    "model-size": "[model] model-size",
    "labels": "[model] labels",
    "min-available-nodes": "(derived from the number of hospitals)",
    "min-train-nodes": "(derived from the number of hospitals and fraction-train)",
    "min-evaluate-nodes": "(derived from the number of hospitals and fraction-evaluate)",
    "resume": "(an unfinished experiment is run again from the start)",
    "initial-model": "[public] (the federation starts from the public model)",
}


class ConfigError(ValueError):
    """A simulation config that cannot be used; the message names every bad key."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_kebab, populate_by_name=True
    )


def _run_default(key: str) -> Any:
    """A default taken from `[tool.flwr.app.config]`: the run config's one place."""
    return pyproject_defaults()[key]


# keys that describe synthetic data only: dropped when real folders replace it
SYNTHETIC_SITE_KEYS = ("count", "cases-per-site", "label-skew", "difficulty")
SYNTHETIC_PUBLIC_KEYS = ("difficulty", "labeller")


class SitesConfig(_Section):
    """Where the hospitals come from and how the cases are split between them."""

    source: Literal["synthetic", "folders"] = "synthetic"
    folders: tuple[Path, ...] = Field((), description="site folders (format v1), one each")
    count: int = Field(5, ge=1, le=1000, description="synthetic hospitals to write")
    cases_per_site: int = Field(200, ge=10, le=100_000, description="synthetic, mean")
    label_skew: float = Field(
        0.5, ge=0.0, description="synthetic: Dirichlet alpha of each site's label mix; 0 = none"
    )
    difficulty: Difficulty = Field(
        "standard", description="synthetic: standard, or hard (fainter findings, more "
        "clutter, fewer informative reports)")
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


class ModelSection(_Section):
    image_size: int = Field(default_factory=lambda: int(_run_default("image-size")), ge=16, le=1024)
    fusion: Fusion = "gated"
    model_size: ModelSize = "small"
    labels: str = ",".join(DEFAULT_LABELS)

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        labels = [x.strip() for x in self.labels.split(",") if x.strip()]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels={self.labels!r}: need at least two distinct labels")
        preset = ModelConfig.large if self.model_size == "large" else ModelConfig.small
        try:
            preset(image_size=self.image_size, fusion=self.fusion, num_classes=len(labels))
        except ValidationError as exc:
            raise ValueError("; ".join(messages(exc))) from None
        return self


class PublicSection(_Section):
    """The public data the federation starts from (`medfuse pretrain`), built once.

    synthetic: the project's SYNTHETIC stand-in for a public archive (its own seeds,
    scanners, report style and label noise: never a federation's data); folders: public
    datasets converted to format v1; none: federations start from random weights."""

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


class TrainingSection(_Section):
    rounds: int = Field(5, ge=1, le=10_000, description="federated rounds")
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(default_factory=lambda: int(_run_default("batch-size")), ge=1, le=4096)
    lr: float = Field(default_factory=lambda: float(_run_default("lr")), gt=0.0, le=1.0)
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


class ResourcesSection(_Section):
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


class ExperimentSpec(_Section):
    """One `[[experiment]]` table; `epsilons` and `modalities` expand it into several."""

    name: str = Field(min_length=1, max_length=80)
    kind: Kind
    modality: Modality = "fused"
    modalities: tuple[Modality, ...] | None = Field(None, min_length=1)
    strategy: StrategyName = "fedavg"
    dp: bool = False
    epsilon: float | None = Field(None, gt=0.0)
    epsilons: tuple[float, ...] | None = Field(None, min_length=1)
    rounds: int | None = Field(None, ge=1, le=10_000)
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
        return f"{self.strategy}" + (
            f" DP eps={self.epsilon:g}" if self.dp and self.epsilon else " DP" if self.dp else ""
        )


class SimulationConfig(_Section):
    """The whole simulation: sites, model, training, resources, experiments, seeds."""

    name: str = Field("medfuse simulation", min_length=1, max_length=200)
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    out: Path | None = Field(None, description="output folder; --out overrides")
    sites: SitesConfig = Field(default_factory=SitesConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    public: PublicSection = Field(default_factory=PublicSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    experiment: tuple[ExperimentSpec, ...] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in value):
            raise ValueError(f"seeds={list(value)}: seeds are non-negative integers")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds={list(value)} repeats a seed")
        return value

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
        names: dict[str, str] = {}
        for spec in self.experiment:
            for exp in spec.expand():
                if exp.name in names:
                    raise ValueError(
                        f"experiment name {exp.name!r} is used twice (by [[experiment]] "
                        f"{names[exp.name]!r} and {spec.name!r}); names must be unique"
                    )
                names[exp.name] = spec.name
        if any(e.kind == "public" for e in self.experiments) and not self.public.enabled:
            raise ValueError("a kind = \"public\" experiment needs [public] source = "
                             "\"synthetic\" or \"folders\"")
        n = self.sites.num_hospitals
        if n < 2 and any(e.kind == "federated" for e in self.experiments):
            raise ValueError(f"federated experiments need at least 2 hospitals; the sites give {n}")
        reserved = sorted(k for k in self.training.run_config if k in HARNESS_KEYS)
        if reserved:
            raise ValueError(
                "training.run-config may not set "
                + "; ".join(f"{k} (set {HARNESS_KEYS[k]})" for k in reserved)
            )
        # every experiment (baselines too: they build the same model) must make a valid
        # run config, with the ServerApp's own validation
        for exp in self.experiments:
            try:
                self.run_config(exp, self.seeds[0], Path("/sites"), Path("/out"))
            except RunConfigError as exc:
                lines = [
                    ln.strip().replace("Value error, ", "").removeprefix("(run config): ")
                    for ln in str(exc).splitlines()[1:]
                ]
                raise ValueError(
                    f"experiment {exp.name!r} makes a bad run config: " + "; ".join(lines)
                ) from None
        return self

    # ------------------------------------------------------------------ derived

    @property
    def experiments(self) -> list[Experiment]:
        return [e for spec in self.experiment for e in spec.expand()]

    @property
    def label_set(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.model.labels.split(",") if x.strip())

    def rounds_of(self, exp: Experiment) -> int:
        return exp.rounds or self.training.rounds

    def flower_run_config(
        self, exp: Experiment, *, seed: int, sites_dir: Path, output_dir: Path,
        initial_model: Path | None = None,
    ) -> dict[str, Scalar]:
        """The flat run config of one federated run: pyproject defaults, the harness's
        keys, then `[training] run-config`, then the experiment's `run-config`."""
        flat: dict[str, Any] = dict(pyproject_defaults())
        # The simulated hospitals are the researcher's own: each experiment is a world of
        # its own (a fresh ledger store beside its outputs), evaluation metrics are exact
        # (the tables need them), the nodes' compute times are sent (the round-time plots
        # and the bench need them), and a dp=false experiment may train. `run-config` may
        # set sim-node-config to simulate what deployed hospitals release instead.
        node: dict[str, Any] = {"allow-non-private": True, "evaluation": "exact",
                                "release-compute-time": True,
                                "state-dir": str(Path(output_dir) / LEDGER_DIR)}
        if exp.personalise_epsilon is not None:
            node["epsilon-reserve"] = exp.personalise_epsilon
        flat["sim-node-config"] = sim_node_config_text(node)
        flat.update(self.training.run_config)
        flat.update(exp.run_config)
        n = self.sites.num_hospitals
        frac_train = float(flat.get("fraction-train", 1.0))
        frac_eval = float(flat.get("fraction-evaluate", 1.0))
        flat.update(
            {
                "num-server-rounds": self.rounds_of(exp),
                "strategy": exp.strategy,
                "dp": exp.dp,
                "modality": exp.modality,
                "seed": seed,
                "sites-dir": str(sites_dir),
                "output-dir": str(output_dir),
                "local-epochs": self.training.local_epochs,
                "batch-size": self.training.batch_size,
                "lr": self.training.lr,
                "image-size": self.model.image_size,
                "fusion": self.model.fusion,
                "model-size": self.model.model_size,
                "labels": self.model.labels,
                "min-available-nodes": n,
                "min-train-nodes": max(1, int(n * frac_train)),
                "min-evaluate-nodes": max(1, int(n * frac_eval)) if frac_eval > 0 else 0,
                "resume": False,
            }
        )
        if exp.dp and exp.epsilon is not None:
            flat["epsilon"] = exp.epsilon
        if initial_model is not None:
            flat["initial-model"] = str(initial_model)
        return flat

    def run_config(
        self, exp: Experiment, seed: int, sites_dir: Path, output_dir: Path
    ) -> RunConfig:
        """The validated run config (also gives the ModelConfig the baselines use)."""
        flat = self.flower_run_config(exp, seed=seed, sites_dir=sites_dir, output_dir=output_dir)
        return RunConfig.parse(flat)

    def model_for(self, exp: Experiment) -> ModelConfig:
        """The model `exp` trains: its run config's `model()`. The model's keys are the
        harness's own (HARNESS_KEYS), so no run config (and none of its paths) is needed."""
        m = self.model
        return model_config_for(m.model_size, m.image_size, m.fusion, exp.modality,
                                len(self.label_set))

    def epsilon_budget(self, exp: Experiment) -> float:
        """The most `exp` lets a site spend: its epsilon, else the run config's default
        (`epsilon` is a harness key: no run-config table sets it); inf without DP."""
        if not exp.dp:
            return math.inf
        return exp.epsilon if exp.epsilon is not None else float(_run_default("epsilon"))

    def describe(self, exp: Experiment) -> dict[str, Any]:
        """What `exp` is, as one row of experiments.csv (`report.META_COLUMNS`...)."""
        federated = exp.kind == "federated"
        return {"experiment": exp.name, "series": exp.series, "kind": exp.kind,
                "strategy": exp.strategy if federated else "", "modality": exp.modality,
                "dp": exp.dp, "epsilon_budget": self.epsilon_budget(exp),
                "rounds": self.rounds_of(exp) if federated else self.training.epochs,
                "label": exp.label}

    def uses_public(self, exp: Experiment) -> bool:
        """Whether `exp` starts from (or is) the public model: every experiment but local-only
        without DP (what a hospital gets alone, with nothing public), so that pooled stays
        the upper reference of the federations that start from it."""
        return self.public.enabled and (exp.kind in ("federated", "public", "pooled")
                                        or (exp.kind == "local" and exp.dp))

    def fingerprint(self, exp: Experiment, seed: int) -> str:
        """What decides one experiment's result: same fingerprint, same experiment, so a
        finished one is not run again; anything else changed and it runs afresh."""
        payload: dict[str, Any] = {
            # `audit` and `personalise_epsilon` count only when on: turning one on runs the
            # experiment again, and experiments finished before they existed stay finished
            "experiment": exp.model_dump(mode="json", exclude={
                k for k in ("audit", "personalise_epsilon") if not getattr(exp, k)}),
            "seed": seed,
            "sites": self.sites.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json"),
        }
        if self.public.enabled and self.uses_public(exp):
            payload["public"] = self.public.model_dump(mode="json")
        if exp.kind == "federated":
            # "-" for both paths: where the sites and outputs are does not decide a result
            # (and fingerprints of finished experiments stay what they were)
            payload["run-config"] = self.flower_run_config(
                exp, seed=seed, sites_dir=Path("-"), output_dir=Path("-")
            )
        else:
            t = self.training
            payload["central"] = {"epochs": t.epochs, "batch-size": t.batch_size, "lr": t.lr}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        """The resolved config as TOML (defaults filled in, paths absolute)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.sites.source == "folders":
            for key in SYNTHETIC_SITE_KEYS:
                data["sites"].pop(key, None)
        if self.public.source != "synthetic":
            for key in SYNTHETIC_PUBLIC_KEYS:
                data["public"].pop(key, None)
        for table in data["experiment"]:
            if "modalities" in table:
                table.pop("modality", None)
            if table["kind"] != "federated":
                for key in ("strategy", "rounds", "run-config"):
                    table.pop(key, None)
                if not (table["kind"] == "local" and table.get("dp")):
                    table.pop("dp", None)
        return tomli_w.dumps(data)


# ---------------------------------------------------------------------- loading


def _format_errors(exc: ValidationError, raw: Mapping[str, Any], source: str) -> str:
    experiments = raw.get("experiment") if isinstance(raw, Mapping) else None
    names = [e.get("name") if isinstance(e, Mapping) else None
             for e in experiments] if isinstance(experiments, list) else []
    return describe(exc, f"simulation config ({source})", {"experiment": names})


def parse_config(raw: Mapping[str, Any], source: str = "config") -> SimulationConfig:
    """Validate a config table; ConfigError names every bad key."""
    try:
        return SimulationConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw, source)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw table of a TOML (or JSON) config file; relative paths in it are taken from
    the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the simulation config {str(path)!r}: {exc}") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{str(path)!r} is not valid TOML: {exc}") from None
    base = path.resolve().parent
    sites = raw.get("sites")
    if isinstance(sites, dict) and isinstance(sites.get("folders"), list):
        sites["folders"] = [
            str((base / f).resolve()) if isinstance(f, str) else f for f in sites["folders"]
        ]
    if isinstance(raw.get("out"), str):
        raw["out"] = str((base / raw["out"]).resolve())
    return raw


def load_config(
    path: Path | None = None,
    *,
    sites: Sequence[Path] | None = None,
    out: Path | None = None,
    rounds: int | None = None,
    seeds: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
    ray_address: str | None = None,
) -> SimulationConfig:
    """The config from `path` (default: the built-in one), with command-line overrides.

    `sites` replaces the hospitals with those folders (one hospital per folder unless the
    config re-partitions them); `only` keeps the named experiments (after expansion, or
    whole `[[experiment]]` tables by their name).
    """
    source = str(path) if path is not None else "built-in default"
    raw = read_config_file(path or DEFAULT_CONFIG)
    if sites:
        table = dict(raw.get("sites") or {})
        for key in SYNTHETIC_SITE_KEYS:
            table.pop(key, None)
        table["source"] = "folders"
        table["folders"] = [str(Path(s).expanduser().resolve()) for s in sites]
        raw["sites"] = table
    if out is not None:
        raw["out"] = str(Path(out).expanduser().resolve())
    if rounds is not None:
        raw["training"] = {**(raw.get("training") or {}), "rounds": rounds}
    if seeds:
        raw["seeds"] = list(seeds)
    if ray_address is not None:
        raw["resources"] = {**(raw.get("resources") or {}), "ray-address": ray_address}
    cfg = parse_config(raw, source)
    if only:
        cfg = select_experiments(cfg, only)
    if cfg.out is None:
        cfg = cfg.model_copy(update={"out": DEFAULT_OUT.resolve()})
    return cfg


def select_experiments(cfg: SimulationConfig, names: Sequence[str]) -> SimulationConfig:
    """Keep only the named experiments (expanded names or `[[experiment]]` names)."""
    wanted = set(names)
    known = {e.name for e in cfg.experiments} | {s.name for s in cfg.experiment}
    unknown = sorted(wanted - known)
    if unknown:
        raise ConfigError(
            f"--only {', '.join(unknown)}: no such experiment; known: {', '.join(sorted(known))}"
        )
    kept = []
    for spec in cfg.experiment:
        if spec.name in wanted:
            kept.append(spec)
            continue
        exps = [e for e in spec.expand() if e.name in wanted]
        if not exps:
            continue
        update: dict[str, Any] = {}
        if spec.epsilons is not None:
            update["epsilons"] = tuple(dict.fromkeys(e.epsilon for e in exps))
        if spec.modalities is not None:
            update["modalities"] = tuple(dict.fromkeys(e.modality for e in exps))
        kept.append(spec.model_copy(update=update))
    return cfg.model_copy(update={"experiment": tuple(kept)})
