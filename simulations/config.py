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
    label-mix = "balanced"           # or "nih": the shares of NIH ChestX-ray14 (88% normal)
    partition = "natural"            # natural | iid | dirichlet | quantity
    hospitals = 50                   # re-partitioned: how many hospitals (not natural)
    alpha = 0.5                      # dirichlet: label skew (smaller = more skew)

    [model]      image-size, fusion, model-size, labels
    [training]   rounds, local-epochs, batch-size, lr, central-epochs, run-config = {...}
    [resources]  client-cpus, client-gpus, central-threads, timeout

    [[experiment]]
    name = "fedavg-dp"
    kind = "federated"               # pooled | local | federated | public | bow
    strategy = "fedavg"              # any of the ServerApp's strategies
    dp = true
    epsilons = [1.0, 2.0, 4.0, 8.0]  # expands to fedavg-dp-eps1 ... (privacy-utility curve)
    modalities = ["image", "text"]   # expands to ...-image, ...-text (ablation)

Every federated experiment becomes one flat Flower run config (pyproject defaults, then
`[training] run-config` and the experiment's `run-config`, then the harness's keys: the
simulation keys of `sections.RUN_KEYS` and the derived ones), validated here with the
ServerApp's own `RunConfig`, so a bad strategy setting fails before the first run too.
The tables themselves are `simulations/sections.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import Field, ValidationError, field_validator, model_validator

from client.site import sim_node_config_text
from shared_model.config import ModelConfig, parse_label_set
from shared_model.contract.run_config import (
    RunConfig,
    RunConfigError,
    model_config_for,
    pyproject_defaults,
)
from shared_model.contract.validation import describe
from shared_model.dataset import PREPROCESSING
from shared_model.tooling.synth import FEDERATION_GENERATOR
from simulations.sections import (
    HARNESS_KEYS,
    RUN_KEYS,
    SYNTHETIC_PUBLIC_KEYS,
    SYNTHETIC_SITE_KEYS,
    Experiment,
    ExperimentSpec,
    ModelSection,
    PublicSection,
    ResourcesSection,
    Scalar,
    Section,
    SitesConfig,
    TrainingSection,
    later_defaults,
    run_default,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.toml"
DEFAULT_OUT = Path("runs/simulate")
LEDGER_DIR = "ledgers"  # each federated experiment's own ledger stores (one a hospital)


class ConfigError(ValueError):
    """A simulation config that cannot be used; the message names every bad key."""


class SimulationConfig(Section):
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
        return parse_label_set(self.model.labels)

    def rounds_of(self, exp: Experiment) -> int:
        return exp.rounds or self.training.rounds

    def flower_run_config(
        self, exp: Experiment, *, seed: int, sites_dir: Path, output_dir: Path,
        initial_model: Path | None = None,
    ) -> dict[str, Scalar]:
        """The flat run config of one federated run: pyproject defaults, `[training]
        run-config`, the experiment's `run-config`, then the harness's keys (`RUN_KEYS`
        and the keys derived from the sites, seed and folders)."""
        flat: dict[str, Any] = dict(pyproject_defaults())
        # The simulated hospitals are the researcher's own: each experiment is a world of
        # its own (fresh ledger stores beside its outputs), evaluation metrics are exact
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
        for sim_key, run_key in RUN_KEYS.items():
            value = self.value_of(sim_key, exp)
            if value is not None:  # unset in the experiment: the value before it stands
                flat[run_key] = value
        n = self.sites.num_hospitals
        frac_train = float(flat.get("fraction-train", 1.0))
        frac_eval = float(flat.get("fraction-evaluate", 1.0))
        flat.update(
            {
                "seed": seed,
                "sites-dir": str(sites_dir),
                "output-dir": str(output_dir),
                "min-available-nodes": n,
                "min-train-nodes": max(1, int(n * frac_train)),
                "min-evaluate-nodes": max(1, int(n * frac_eval)) if frac_eval > 0 else 0,
                "resume": False,
            }
        )
        if initial_model is not None:
            flat["initial-model"] = str(initial_model)
        return flat

    def value_of(self, sim_key: str, exp: Experiment) -> Any:
        """The value of a `RUN_KEYS` simulation key ("table.key") for `exp`."""
        table, key = sim_key.split(".", 1)
        holder = exp if table == "experiment" else getattr(self, table)
        return getattr(holder, key.replace("-", "_"))

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
        return exp.epsilon if exp.epsilon is not None else float(run_default("epsilon"))

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
            # sites.style, sites.label_mix and public.views count only when not the
            # default, as above
            "sites": self.sites.model_dump(mode="json", exclude=later_defaults(self.sites)),
            "model": self.model.model_dump(mode="json"),
        }
        if self.sites.source == "synthetic":  # results on an older generator's sites rerun
            payload["generator"] = FEDERATION_GENERATOR
        # and results on films read the way an older medfuse read them
        payload["preprocessing"] = PREPROCESSING
        if self.public.enabled and self.uses_public(exp):
            payload["public"] = self.public.model_dump(
                mode="json", exclude={"views"} if self.public.views == "none" else None)
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
    text = describe(exc, f"simulation config ({source})", {"experiment": names})
    if any(e["type"] == "missing" for e in exc.errors()):
        # a minimal or empty file: say where a complete one is rather than fill in the demo
        text += (f"\n  hint: copy {DEFAULT_CONFIG} (the demo: every section and an "
                 "[[experiment]] of each kind with its keys) and edit it")
    return text


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
