"""The run config: one flat table that the coordinator writes and every node reads.

Flower hands it to the ServerApp and to every ClientApp as `context.run_config`, filled
from `[tool.flwr.app.config]` in pyproject.toml (the one place where the defaults live)
and overridden with `flwr run ... -c "key=value"`. Both sides validate the same table
with `RunConfig`, so a bad key or value stops the run at start with a message naming it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared_model.config import (
    Fusion,
    Modality,
    ModelConfig,
    ModelSize,
    TrainLayers,
    UpdateDtype,
    parse_label_set,
)
from shared_model.contract.validation import describe

StrategyName = Literal[
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg",
    "krum", "bulyan",
]

# What the global model goes down to the nodes in: float32, or each float array in float16
# (server/download.py). Not bfloat16: its 8 mantissa bits round a weight by 2^-9 of itself,
# more than a round's update moves it.
ModelDtype = Literal["float32", "float16"]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


# Upper bounds of the run config's numbers. Every float is finite and every number bounded:
# the run config is the coordinator's, and a node must not hang or overflow on what it asks
# (noise-multiplier=inf once kept a node busy for over 30 s holding its ledger store's lock).
# Above this noise multiplier an update carries no useful signal; the privacy ledger
# (`client.privacy`) holds no entry above it either, so it is the ledger's bound too.
MAX_NOISE_MULTIPLIER = 50.0
# The largest epsilon a run config may name. It bounds what a run may ask, not what a node
# spends: each node's own `epsilon-budget` caps its training, and the run can only lower it.
MAX_EPSILON = 1000.0
# A node's training budget when its node config names none: the hospital's, never the
# federation's (`docs/privacy.md`). 8 is the budget the project's DP recipes are tuned to
# (simulations/*.toml), a common ceiling for DP-SGD on medical data. Here because both the
# node (client.site) and the coordinator's provisioning (server.ops.handouts) state it.
DEFAULT_NODE_EPSILON_BUDGET = 8.0
MAX_NODES = 100_000  # node counts: far above any federation this project serves
MAX_NORM = 1e6  # L2 bounds of a whole update (update-max-norm, central-clip)
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0  # seconds: a week
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32 bits


class LocalRecipe(NamedTuple):
    optimizer: Literal["adam", "sgd"]
    lr: float
    momentum: float
    train_layers: TrainLayers
    augmult: int = 1



class RunConfigError(ValueError):
    """A run config that cannot be used; the message names every bad key."""


# ------------------------------------------------------------------------------ sections
# `RunConfig` is one flat table on the wire, typed here in sections, one per concern. Each
# section holds its keys and the checks that need only them; a check that needs keys of
# other sections is a method of the section it concerns, called by `RunConfig._check`.
# No defaults anywhere: they live in pyproject.


class _Section(BaseModel):
    """What every section shares: frozen, unknown keys refused, kebab-case keys, and no
    float may be inf or NaN (`allow_inf_nan`): a value the coordinator writes reaches
    every node, which must refuse it at start rather than loop, overflow or hang on it."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_kebab, populate_by_name=True,
        allow_inf_nan=False,
    )


class Rounds(_Section):
    """Rounds and strategy: how many rounds, which hospitals take part, how the server
    aggregates their updates, and what an update may be (its norm, its dtype)."""

    num_server_rounds: int = Field(ge=1, le=10_000)
    strategy: StrategyName
    fraction_train: float = Field(gt=0.0, le=1.0)
    fraction_evaluate: float = Field(ge=0.0, le=1.0)
    min_train_nodes: int = Field(ge=1, le=MAX_NODES)
    min_evaluate_nodes: int = Field(ge=0, le=MAX_NODES)
    min_available_nodes: int = Field(ge=1, le=MAX_NODES)
    round_timeout: float = Field(gt=0, le=MAX_ROUND_TIMEOUT,
                                 description="seconds the server waits for replies")
    proximal_mu: float = Field(ge=0.0, le=1000.0,
                               description="FedProx mu (used by fedprox only)")
    server_lr: float = Field(gt=0.0, le=10.0,
                             description="server learning rate of fedadam / fedyogi")
    server_momentum: float = Field(
        ge=0.0, lt=1.0, description="fedavgm: momentum of the server's step along the "
        "round's mean update (a step of 1 along the mean at 0: FedAvg)")
    ema_decay: float = Field(
        ge=0.0, lt=1.0, description="> 0: the final model is an exponential moving average "
        "of the rounds' models with this decay (post-processing, no privacy cost); 0: the "
        "last round's model")
    trimmed_beta: float = Field(gt=0.0, lt=0.5, description="fedtrimmedavg cut fraction")
    byzantine_nodes: int = Field(ge=0, le=MAX_NODES,
                                 description="krum / bulyan: tolerated malicious nodes")
    update_max_norm: float = Field(gt=0.0, le=MAX_NORM,
                                   description="L2 bound of an update; larger is dropped")
    update_dtype: UpdateDtype = Field(
        description="what a train reply carries: float32 weights, or the update in 16 bits")
    model_dtype: ModelDtype = Field(
        description="what the global model goes down in: float32, or float16 (the server "
        "keeps its float32 copy; each node casts back to float32 before training)")

    @model_validator(mode="after")
    def _check_rounds(self) -> Rounds:
        if self.min_available_nodes < self.min_train_nodes:
            raise ValueError(
                f"min-available-nodes={self.min_available_nodes} is below "
                f"min-train-nodes={self.min_train_nodes}"
            )
        if self.strategy == "fedprox" and self.proximal_mu == 0.0:
            raise ValueError("strategy='fedprox' needs proximal-mu > 0 (0 is plain FedAvg)")
        return self


class LocalTraining(_Section):
    """Local training: what each site does with the global model in a round (its epochs,
    batches, non-private learning rate and seed) and which split it evaluates on."""

    local_epochs: int = Field(ge=1, le=100)
    batch_size: int = Field(ge=1, le=4096)
    lr: float = Field(gt=0.0, le=1.0)
    seed: int = Field(ge=0, le=MAX_SEED)
    eval_split: Literal["val", "test"] = Field(
        description="split each site evaluates the global model on every round"
    )
    evaluate_with_train: bool = Field(
        description="evaluate round r's global model inside round r+1's train message "
        "(one message a round); the final model in an evaluate message of its own"
    )


class Privacy(_Section):
    """Differential privacy at sample level, at every site (DP-SGD): the run's budget and
    noise, the DP fine-tuning recipe of private rounds (non-private rounds use Adam at
    `lr`), the learning-rate schedule over the rounds, and the accountant."""

    dp: bool
    epsilon: float = Field(
        gt=0.0, le=MAX_EPSILON, description="the most a site may spend in this run: it only "
        "lowers each node's own epsilon-budget, never raises it")
    delta: float = Field(gt=0.0, lt=1.0)
    noise_multiplier: float = Field(
        ge=0.0, le=MAX_NOISE_MULTIPLIER,
        description="0 = derive it from the site's budget and the planned rounds"
    )
    max_grad_norm: float = Field(gt=0.0, le=1e4)
    # the DP fine-tuning recipe (private rounds only; non-private rounds use Adam at `lr`)
    dp_optimizer: Literal["adam", "sgd"] = Field(description="optimizer of private rounds")
    dp_lr: float = Field(gt=0.0, le=10.0, description="learning rate of private rounds")
    dp_momentum: float = Field(ge=0.0, lt=1.0, description="sgd momentum of private rounds")
    dp_train_layers: TrainLayers = Field(
        description="what private rounds train: all, or fewer, so that the noise spreads "
        "over fewer coordinates (the rest keep the initial model's values)"
    )
    dp_augmult: int = Field(
        ge=1, le=64, description="views of each example per private step (augmentation "
        "multiplicity): their gradients are averaged before clipping, so the privacy cost "
        "is one example's and each step costs k times the compute")
    lr_schedule: Literal["constant", "cosine"] = Field(
        description="the learning rate over the rounds: constant, or a cosine from the "
        "recipe's down towards 0 at the last round")
    accountant: Literal["rdp", "prv"]
    secure_mode: bool


class CentralDP(_Section):
    """Client-level central DP (Flower's wrappers) on top of the sites' sample-level DP:
    each hospital's update clipped (by the server or by the node) and the server's mean
    noised."""

    central_dp: Literal["off", "server", "client"] = Field(
        description="who clips each hospital's update before the server adds noise")
    central_noise: float = Field(gt=0.0, le=MAX_NOISE_MULTIPLIER,
                                 description="central Gaussian noise multiplier")
    central_clip: float = Field(gt=0.0, le=MAX_NORM,
                                description="L2 bound of one hospital's update")
    central_clients: int = Field(ge=0, le=MAX_NODES,
                                 description="hospitals per round; 0 = min-train-nodes")

    def check_central_dp(self, rounds: Rounds) -> None:
        """The strategy and sampling that Flower's accountant of client-level DP assumes;
        `ValueError` with the reason."""
        if self.central_dp == "off":
            return
        if rounds.strategy != "fedavg":
            raise ValueError(
                f"central-dp={self.central_dp!r} needs strategy='fedavg': Flower's accountant "
                f"of client-level DP assumes FedAvg's mean, and {rounds.strategy} is not it "
                "(a robust aggregator or a server optimizer changes the sensitivity)")
        if rounds.fraction_train < 1.0:
            raise ValueError(
                f"central-dp={self.central_dp!r} needs fraction-train=1.0: the accountant "
                "counts every round as a release by each hospital (no amplification by "
                "sampling, which a coordinator could fake)")


# Strategies that need each hospital's update on its own: under SecAgg+ the server has the sum.
NEEDS_EACH_UPDATE = ("fedmedian", "fedtrimmedavg", "krum", "bulyan")


class SecureAggregation(_Section):
    """Secure aggregation (Flower's SecAgg+): the server only ever sees the sum of the
    hospitals' masked, quantised updates; how the masks are shared and the updates
    quantised."""

    secure_aggregation: bool
    secagg_shares: float = Field(gt=0.0, le=1.0, description="share of the round's "
                                 "hospitals each hospital splits its keys among")
    secagg_threshold: float = Field(
        gt=0.5, le=1.0, description="share of the key parts that rebuilds a dropped "
        "hospital's mask: more than half, or the nodes refuse the round (a coordinator "
        "that lies about who dropped out could rebuild a live node's masks from fewer)")
    secagg_clip: float = Field(gt=0.0, le=1e4, description="update coordinates clipped to +-clip")
    secagg_bits: int = Field(ge=8, le=28, description="quantisation bits per coordinate")
    secagg_max_weight: int = Field(ge=1, le=10**9,
                                   description="the most examples an update weighs")

    def check_secure_aggregation(self, rounds: Rounds, central: CentralDP) -> None:
        """The combinations SecAgg+ cannot serve, refused before any round with the
        reason (`ValueError`); nothing to check when it is off."""
        if not self.secure_aggregation:
            return
        if rounds.strategy in NEEDS_EACH_UPDATE:
            raise ValueError(
                f"secure-aggregation=true cannot run strategy={rounds.strategy!r}: it ranks "
                "or trims the hospitals' updates one by one, and under SecAgg+ the server "
                "only ever has their sum (use fedavg, fedprox, fedadam or fedyogi)")
        if central.central_dp == "server":
            raise ValueError(
                "secure-aggregation=true cannot run central-dp='server': the server would "
                "clip each hospital's update, which it never sees; use central-dp='client' "
                "(each node clips its own update before masking it)")
        if rounds.min_train_nodes < 2:
            raise ValueError(
                f"secure-aggregation=true needs min-train-nodes >= 2 (it is "
                f"{rounds.min_train_nodes}): the sum of one hospital's update is that update")


class ModelPart(_Section):
    """The model: what every node builds (`model()`), so every node agrees on each array
    name, shape and dtype, and where the federation's weights start."""

    model_size: ModelSize
    image_size: int = Field(ge=16, le=1024)
    fusion: Fusion
    modality: Modality
    labels: str = Field(description="comma-separated label set every site must use")
    initial_model: str = Field(
        description="a medfuse model file the federation starts from ('' = random init)"
    )

    @model_validator(mode="after")
    def _check_model(self) -> ModelPart:
        parse_label_set(self.labels)  # ValueError naming the label
        self.model()  # the model part must make a valid ModelConfig too
        return self

    @property
    def label_set(self) -> tuple[str, ...]:
        return parse_label_set(self.labels)

    def model(self) -> ModelConfig:
        """The ModelConfig every node builds: same config, same array names and shapes."""
        return model_config_for(self.model_size, self.image_size, self.fusion, self.modality,
                                len(self.label_set))


class DataPart(_Section):
    """Data and outputs: the simulation's sites (folders or a synthetic federation), the
    server's output folder, and the node config of every simulated hospital."""

    sites_dir: str = Field(description="simulation: folder of site-NN folders; '' = synthetic")
    synth_sites: int = Field(ge=1, le=1000,
                             description="synthetic federation written when sites-dir=''")
    synth_cases_per_site: int = Field(ge=10, le=1_000_000)
    synth_label_skew: float = Field(ge=0.0, le=1000.0,
                                    description="Dirichlet alpha; 0 = balanced")
    output_dir: str = Field(min_length=1)
    resume: bool
    sim_node_config: str = Field(
        description="simulation only: the node config of every simulated hospital, as the "
        "body of a TOML inline table; deployed nodes never read it"
    )


# The bases are listed last section first: pydantic collects the fields (and runs the
# sections' validators) from the last base to the first, so this keeps the keys in the
# order of the sections above (Rounds' first), which is the order of `flat()` and of the
# messages that name several bad keys.
class RunConfig(DataPart, ModelPart, SecureAggregation, CentralDP, Privacy, LocalTraining,
                Rounds):
    """Every key of `[tool.flwr.app.config]`, typed: the sections above, flat, as Flower
    hands them. No defaults here: they live in pyproject.

    Every number has an upper bound and no float may be inf or NaN (`_Section`). Each
    section checks its own keys; `_check` the combinations across sections."""

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        self.check_central_dp(self)  # vs the strategy and the sampling
        self.check_secure_aggregation(self, self)  # vs the strategy, central DP, node count
        if self.update_dtype != "float32" and (self.secure_aggregation
                                               or self.central_dp != "off"):
            raise ValueError(
                f"update-dtype={self.update_dtype!r} needs secure-aggregation=false and "
                "central-dp='off': SecAgg+ quantises the update itself, and Flower's "
                "client-level DP clips the trained weights' difference as it leaves the node")
        if self.model_dtype != "float32" and self.secure_aggregation:
            raise ValueError(
                f"model-dtype={self.model_dtype!r} needs secure-aggregation=false: SecAgg+'s "
                "workflow sends the global model in its own messages and adds the unmasked "
                "mean onto the model it sent, which would make the rounded model the new "
                "global one (client-level DP is fine: the server moves each reply back onto "
                "its float32 model before the DP wrapper clips it)")
        return self

    def recipe(self) -> LocalRecipe:
        """How the sites train in this run: the DP recipe when private, else Adam at lr."""
        if self.dp:
            return LocalRecipe(self.dp_optimizer, self.dp_lr, self.dp_momentum,
                               self.dp_train_layers, self.dp_augmult)
        return LocalRecipe("adam", self.lr, 0.0, "all")

    def round_lr(self, server_round: int) -> float:
        """The learning rate the sites are asked to train round `server_round` with. A
        decaying rate lets the DP noise of the last rounds average out instead of keeping
        the model at a noise floor; the schedule is the server's, it costs no privacy."""
        lr = self.recipe().lr
        if self.lr_schedule == "constant":
            return lr
        done = (min(max(server_round, 1), self.num_server_rounds) - 1) / self.num_server_rounds
        return lr * 0.5 * (1.0 + math.cos(math.pi * done))

    @classmethod
    def parse(cls, flat: Mapping[str, object]) -> RunConfig:
        """Validate Flower's flat run config; raise RunConfigError naming each bad key."""
        try:
            return cls.model_validate(dict(flat))
        except ValidationError as exc:
            raise RunConfigError(describe(exc, "run config")) from None

    @property
    def evaluates_in_train(self) -> bool:
        """Whether round r+1's train message evaluates round r's model. Not under SecAgg+,
        whose four exchanges carry only the masked update: evaluation keeps its own
        message there."""
        return (self.evaluate_with_train and not self.secure_aggregation
                and self.fraction_evaluate > 0)

    @property
    def central_sample(self) -> int:
        """Hospitals in each round's central-DP mean (the noise is scaled to it)."""
        return self.central_clients or self.min_train_nodes

    def flat(self) -> dict[str, object]:
        """Back to Flower's flat form (kebab-case keys)."""
        return self.model_dump(by_alias=True)


def model_config_for(model_size: str, image_size: int, fusion: str, modality: str,
                     num_classes: int) -> ModelConfig:
    """The model a run of these settings trains (what `medfuse pretrain` must build too)."""
    preset = ModelConfig.large if model_size == "large" else ModelConfig.small
    return preset(image_size=image_size, fusion=fusion, modality=modality,
                  num_classes=num_classes, generation=modality != "text")


def pyproject_defaults(pyproject: Path | None = None) -> dict[str, object]:
    """`[tool.flwr.app.config]` from the project file: the defaults of every run."""
    path = pyproject or Path(__file__).resolve().parents[2] / "pyproject.toml"
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return dict(data["tool"]["flwr"]["app"]["config"])


def device_name(value: str) -> str:
    """A device a person wrote (node config, simulation config), normalised, or
    `ValueError`. Only the spelling is checked here: whether the GPU exists is
    `shared_model.train.pick_device`'s question, asked on the node that will use it."""
    v = value.strip().lower()
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(f"device={value!r}: allowed are auto, cpu, cuda, cuda:N")
