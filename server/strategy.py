"""Strategy composition for the ServerApp: Flower's own strategies, wrapped, never copied.

`STRATEGIES` names every strategy a run config may ask for, each with a builder that takes
the run config; `build_strategy(run)` builds one (in Flower's client-level DP wrapper when
`central-dp` is on). `GuardedStrategy` puts medfuse's wrappers around it, one concern
each, the way Flower's DP wrappers compose (`flwr/serverapp/strategy/dp_fixed_clipping.py`):

    RoundClock     server/clock.py     global round numbers, the round's config keys, the
                                       lr schedule, evaluate-with-train
      Recorder     server/recorder.py  result rows, audit log, traffic bytes, round time
        ReplyGuard server/guard.py     decoding, update checks, verdicts, what is left out
          Flower's strategy            (FedAvg, FedAdam, ... or its DP wrapper)

`Strategy.start()` (inherited, unchanged) runs the rounds. Checkpoints are not a strategy
concern: the ServerApp writes them from `start()`'s per-round `evaluate_fn` hook, with
`state_for_checkpoint()` (the inner strategy's state, the site names, the sampling RNG).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from server.averaging import ParameterAverage
from server.clock import RoundClock
from server.download import ModelDownload
from server.grid import DelegatingGrid, WireGrid
from server.guard import ReplyGuard
from server.recorder import BYTES_RECEIVED, BYTES_SENT, ROUND_SECONDS, Recorder, RoundHook
from server.results import FEDERATION, Row
from server.secure import SecAggSettings, SecureAggregationGrid
from shared_model.contract import packing, wire
from shared_model.contract.run_config import RunConfig

__all__ = [
    "BYTES_RECEIVED", "BYTES_SENT", "CENTRAL_DP", "FEDERATION", "ROUND_SECONDS", "STRATEGIES",
    "GuardedStrategy", "RoundHook", "SharedPackingGrid", "build_strategy", "central_dp",
    "shared_packed", "train_config", "training_grid", "weight_key",
]

Builder = Callable[[RunConfig], Strategy]

# Inner-strategy attributes that carry state from one round to the next: FedAdam/FedYogi's
# dicts of arrays, FedAvgM's list (its `current_arrays`, an ArrayRecord, is not saved:
# its first configure_train takes it from the global model the resumed run starts from).
_STATEFUL_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
CENTRAL_DP: dict[str, type[DifferentialPrivacyServerSideFixedClipping]
                 | type[DifferentialPrivacyClientSideFixedClipping]] = {
    "server": DifferentialPrivacyServerSideFixedClipping,  # the server clips each update
    "client": DifferentialPrivacyClientSideFixedClipping,  # each node clips its own
}
"""Flower's client-level DP wrapper of each `central-dp` mode other than off."""


def _arrays_state(value: dict | list) -> dict[str, Any]:
    """A strategy's dict or list of arrays as a dict (a list by position, in order)."""
    return dict(value) if isinstance(value, dict) else {str(i): a for i, a in enumerate(value)}


def weight_key(run: RunConfig) -> str:
    """The reply metric the mean is weighted by: the site sizes, except that client-level
    DP needs FedAvg's plain mean (equal weights)."""
    return wire.M_UNIT_WEIGHT if run.central_dp != "off" else wire.M_NUM_EXAMPLES


def _common(run: RunConfig) -> dict[str, Any]:
    """The settings every Flower strategy takes from the run config."""
    return dict(
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_train_nodes,
        min_evaluate_nodes=run.min_evaluate_nodes,
        min_available_nodes=run.min_available_nodes,
        weighted_by_key=weight_key(run),
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
    )


def _byzantine(cls: type[Krum] | type[Bulyan], per_attacker: int) -> Builder:
    """Krum or Bulyan: they need `per_attacker * f + 3` updates a round against f
    attackers; a run that asks for fewer is warned at start-up."""

    def build(run: RunConfig) -> Strategy:
        need = per_attacker * run.byzantine_nodes + 3
        if run.min_train_nodes < need:
            log(
                WARNING,
                "strategy=%s with byzantine-nodes=%d needs at least %d updates per round; "
                "min-train-nodes=%d: rounds with fewer usable updates keep the global model",
                run.strategy, run.byzantine_nodes, need, run.min_train_nodes,
            )
        return cls(**_common(run), num_malicious_nodes=run.byzantine_nodes)

    return build


STRATEGIES: dict[str, Builder] = {
    "fedavg": lambda run: FedAvg(**_common(run)),
    # a step of 1 along the round's mean update plus momentum: under DP the sites' noise
    # averages over rounds too (post-processing of the sites' releases, no privacy cost)
    "fedavgm": lambda run: FedAvgM(**_common(run), server_learning_rate=1.0,
                                   server_momentum=run.server_momentum),
    "fedprox": lambda run: FedProx(**_common(run), proximal_mu=run.proximal_mu),
    # eta_l (Flower only logs it): the rate the sites are asked to train with, the recipe's
    "fedadam": lambda run: FedAdam(**_common(run), eta=run.server_lr, eta_l=run.recipe().lr),
    "fedyogi": lambda run: FedYogi(**_common(run), eta=run.server_lr, eta_l=run.recipe().lr),
    "fedmedian": lambda run: FedMedian(**_common(run)),
    "fedtrimmedavg": lambda run: FedTrimmedAvg(**_common(run), beta=run.trimmed_beta),
    "krum": _byzantine(Krum, 2),
    "bulyan": _byzantine(Bulyan, 4),
}
"""Every strategy a run config may name (`run_config.StrategyName`), with its builder."""


def build_strategy(run: RunConfig, rounds_done: int = 0) -> Strategy:
    """Flower's strategy named by `run.strategy`, with the run config's sampling settings;
    wrapped in Flower's client-level DP when `central-dp` is on."""
    inner = STRATEGIES[run.strategy](run)
    return inner if run.central_dp == "off" else central_dp(run, inner, rounds_done)


def central_dp(run: RunConfig, inner: Strategy, rounds_done: int = 0) -> Strategy:
    """Flower's fixed-clipping DP wrapper (the server clips, or each node does) with
    Flower's RDP accountant: every round a Gaussian release by each hospital, no
    amplification by sampling. A resumed run composes the rounds already released."""
    # Flower draws the central noise from numpy's global generator, which the ServerApp
    # seeded with the run seed for the initial model: anyone who knows the run config could
    # replay the noise and subtract it from the model. Reseed it from the OS (256 bits).
    np.random.seed(np.random.SeedSequence().generate_state(8))
    m = run.central_sample
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=run.delta, population_size=m,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    ))
    if rounds_done:
        accountant.compose(GaussianPrivacyEvent(run.central_noise, m, m), rounds_done)
    return CENTRAL_DP[run.central_dp](
        inner, noise_multiplier=run.central_noise, clipping_norm=run.central_clip,
        num_sampled_clients=m, accountant=accountant)


def shared_packed(messages: Iterable[Message]) -> list[Message]:
    """The messages with their model arrays packed (`packing.packed`), those that carry
    the same ArrayRecord object sharing one packed buffer.

    Flower's strategies send every sampled node the same RecordDict (FedAvg's
    `_construct_messages`), but packing each message on its own gives each a copy of the
    model: 200 nodes, 200 copies of 3.76 MB held by the ServerApp for the whole round.
    Packed here, the first message of each ArrayRecord is packed and the others carry the
    same packed ArrayRecord (and a copy of its layout): the same bytes on the wire."""
    first: dict[int, tuple[ArrayRecord, Message]] = {}  # id -> (the record, kept alive)
    out: list[Message] = []
    for msg in messages:
        arrays = None if msg.has_error() else msg.content.array_records.get(wire.ARRAYS)
        seen = first.get(id(arrays)) if arrays else None
        if not arrays:
            out.append(msg)
        elif seen is None:
            first[id(arrays)] = (arrays, packing.packed(msg))
            out.append(msg)
        else:
            done = seen[1].content
            content = RecordDict({k: v for k, v in msg.content.items() if k != wire.ARRAYS})
            content[wire.PACKED] = done.array_records[wire.PACKED]
            content[wire.PACKED_LAYOUT] = ConfigRecord(
                dict(done.config_records[wire.PACKED_LAYOUT]))
            msg.content = content
            out.append(msg)
    return out


class SharedPackingGrid(DelegatingGrid):
    """A Grid that packs the model arrays of what it sends once per model
    (`shared_packed`) before the Grid below (`WireGrid`, which leaves packed messages
    as they are) sends them."""

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(shared_packed(messages), timeout=timeout)


def training_grid(grid: Grid, run: RunConfig) -> Grid:
    """The Grid the strategy trains through: Flower's own, with the model arrays packed
    (once per model, whatever the number of nodes: `SharedPackingGrid`) and replies
    pulled promptly (server/grid.py), and with secure-aggregation=true each round's
    training under Flower's SecAgg+ (server/secure.py)."""
    wire_grid = SharedPackingGrid(WireGrid(grid))
    if not run.secure_aggregation:
        return wire_grid
    return SecureAggregationGrid(wire_grid, SecAggSettings.of(run), weight_key(run))


def train_config(run: RunConfig) -> ConfigRecord:
    """The ConfigRecord every train message carries (server-round is added per round, and
    evaluate-first from round 2 when the run evaluates inside train messages)."""
    return ConfigRecord(
        {
            wire.CFG_LOCAL_EPOCHS: run.local_epochs,
            wire.CFG_LR: run.recipe().lr,
            # the proximal term is FedProx's; FedProx itself sets it from its proximal_mu
            wire.CFG_PROXIMAL_MU: run.proximal_mu if run.strategy == "fedprox" else 0.0,
            wire.CFG_TOTAL_ROUNDS: run.num_server_rounds,
            wire.CFG_EVAL_SPLIT: run.eval_split,
        }
    )




def _accountant(strategy: Strategy) -> Callable[[], Any] | None:
    """The `privacy_spent` of Flower's client-level DP wrapper; None for any other."""
    if isinstance(strategy, tuple(CENTRAL_DP.values())):
        return strategy.privacy_spent  # type: ignore[attr-defined]
    return None


class GuardedStrategy(Strategy):
    """Flower's strategy inside medfuse's wrappers: clock, recorder and guard.

    Parameters
    ----------
    strategy : the inner Flower strategy (from `build_strategy`).
    max_norm : L2 bound of an update (new - global) over all arrays (the guard's).
    total_rounds, round_offset, round_lr, evaluate_in_train : the clock's (server/clock.py).
    on_round_end, audit_log : the recorder's (server/recorder.py).
    average_decay : > 0: the final model is an average of the rounds' models
        (server/averaging.py, ema-decay); 0: the last round's.
    model_dtype : "float16": the global model goes down in 16 bits, the server keeping
        its float32 copy (server/download.py, model-dtype); "float32": as it is.
    update_dtype : the run's update-dtype: what the train replies carry.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        max_norm: float,
        total_rounds: int,
        round_offset: int = 0,
        on_round_end: RoundHook | None = None,
        audit_log: Path | None = None,
        evaluate_in_train: bool = False,
        round_lr: Callable[[int], float] | None = None,
        average_decay: float = 0.0,
        model_dtype: str = "float32",
        update_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.average = (ParameterAverage(strategy, decay=average_decay,
                                         last_round=total_rounds) if average_decay else None)
        below_guard: Strategy = self.average or strategy
        if model_dtype == "float16":
            below_guard = ModelDownload(below_guard,
                                        replies_carry_weights=update_dtype == "float32")
        self.guard = ReplyGuard(below_guard, max_norm=max_norm)
        self.recorder = Recorder(self.guard, on_round_end=on_round_end, audit_log=audit_log,
                                 privacy_spent=_accountant(strategy))
        self.clock = RoundClock(self.recorder, total_rounds=total_rounds,
                                round_offset=round_offset, round_lr=round_lr,
                                evaluate_in_train=evaluate_in_train)

    def __repr__(self) -> str:
        return f"GuardedStrategy({self.strategy!r})"

    @property
    def pending_rows(self) -> list[Row]:
        """Rows recorded so far in the current round (handed to the hook at its end)."""
        return self.recorder.pending_rows

    @property
    def global_arrays(self) -> ArrayRecord | None:
        """The newest global model the rounds have seen (None before the first round)."""
        return self.recorder.global_arrays

    @property
    def last_round(self) -> int:
        """The last global round whose evaluation is done (the resume offset before)."""
        return self.clock.last_round

    @property
    def site_names(self) -> dict[int, str]:
        return self.guard.site_names

    def state_for_checkpoint(self) -> dict[str, Any]:
        """What a resumed run needs: the inner strategy's state (FedAdam/FedYogi
        `m_t`, `v_t`, `current_arrays`), the site names seen, the node-sampling RNG."""
        inner = {
            attr: _arrays_state(value)
            for attr in _STATEFUL_ATTRS
            if isinstance(value := getattr(self.strategy, attr, None), dict | list)
        }
        if self.average is not None and self.average.average is not None:
            inner["average"] = dict(self.average.average)
        return {
            "inner_class": type(self.strategy).__name__,
            "inner": inner,
            "site_names": {str(k): v for k, v in self.site_names.items()},
            "random_state": random.getstate(),
        }

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_for_checkpoint` saved (into a freshly built strategy)."""
        saved_class = state.get("inner_class")
        if saved_class and saved_class != type(self.strategy).__name__:
            raise ValueError(
                f"checkpoint was written by strategy {saved_class}, this run uses "
                f"{type(self.strategy).__name__}"
            )
        for attr, value in state.get("inner", {}).items():
            if attr == "average" and self.average is not None:
                self.average.average = {k: np.asarray(v).copy() for k, v in value.items()}
            elif attr in _STATEFUL_ATTRS and hasattr(self.strategy, attr):
                arrays = {k: np.asarray(v).copy() for k, v in value.items()}
                setattr(self.strategy, attr, list(arrays.values())
                        if attr == "momentum_vector" else arrays)
        self.site_names.update({int(k): str(v) for k, v in state.get("site_names", {}).items()})
        rs = state.get("random_state")
        if rs is not None:
            version, internal, gauss = rs
            random.setstate((int(version), tuple(int(x) for x in internal), gauss))

    # ------------------------------------------------------------ Strategy API: the clock's

    def summary(self) -> None:
        self.clock.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.clock.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.clock.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.clock.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.clock.aggregate_evaluate(server_round, replies)
