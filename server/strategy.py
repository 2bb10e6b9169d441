"""Strategy composition for the ServerApp: Flower's own strategies, wrapped, never copied.

`build_strategy(run)` picks one of Flower's strategies by the run config's name.
`GuardedStrategy` wraps it the way Flower's DP wrappers do
(`flwr/serverapp/strategy/dp_fixed_clipping.py`): every Strategy method delegates to the
inner strategy, and `Strategy.start()` (inherited, unchanged) runs the rounds. Around the
delegation the wrapper

- numbers rounds globally: a resumed run continues at round last+1, for the config the
  clients see and for the inner strategy (FedAdam's bias correction uses the round);
- adds the ConfigRecord keys the clients expect (`wire.CFG_*`);
- leaves out train replies that carry an error, no arrays, a budget-spent or data-error
  flag, or an update failing `server.checks` against the global model, logging each with
  its node id, site name and reason; the inner strategy aggregates the rest, and when
  nothing is left the global model stays as it was;
- records every site's train and evaluate metrics as results rows and, after each round's
  evaluation, hands them with the new global arrays to a per-round hook (results file +
  checkpoint);
- keeps the aggregate in the global model's dtypes (FedAdam/FedYogi compute in float64).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from server.checks import inspect_update
from server.results import EVALUATE, FEDERATION, M_UPDATE_ACCEPTED, M_UPDATE_NORM, TRAIN, Row
from shared_model import wire
from shared_model.compression import decode
from shared_model.run_config import RunConfig

ROUND_SECONDS = "round-seconds"  # wall time of a round at the server (site `federation`)
BYTES_SENT = "bytes-sent"  # array bytes the server sent a site in a phase (the model)
BYTES_RECEIVED = "bytes-received"  # array bytes of the site's reply (its update)
RoundHook = Callable[[int, ArrayRecord, list[Row]], None]
"""Called after each round's evaluation: (global round, new global arrays, its rows)."""

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "bulyan": Bulyan,
}

# Inner-strategy attributes that carry state from one round to the next.
_STATEFUL_ATTRS = ("current_arrays", "m_t", "v_t")


def build_strategy(run: RunConfig, rounds_done: int = 0) -> Strategy:
    """Flower's strategy named by `run.strategy`, with the run config's sampling settings;
    wrapped in Flower's client-level DP when `central-dp` is on."""
    inner = _flower_strategy(run)
    return inner if run.central_dp == "off" else central_dp(run, inner, rounds_done)


def central_dp(run: RunConfig, inner: Strategy, rounds_done: int = 0) -> Strategy:
    """Flower's fixed-clipping DP wrapper (the server clips, or each node does) with
    Flower's RDP accountant: every round a Gaussian release by each hospital, no
    amplification by sampling. A resumed run composes the rounds already released."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

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
    cls = (DifferentialPrivacyServerSideFixedClipping if run.central_dp == "server"
           else DifferentialPrivacyClientSideFixedClipping)
    return cls(inner, noise_multiplier=run.central_noise, clipping_norm=run.central_clip,
               num_sampled_clients=m, accountant=accountant)


def weight_key(run: RunConfig) -> str:
    """The reply metric the mean is weighted by: the site sizes, except that client-level
    DP needs FedAvg's plain mean (equal weights)."""
    return wire.M_UNIT_WEIGHT if run.central_dp != "off" else wire.M_NUM_EXAMPLES


def training_grid(grid: Grid, run: RunConfig) -> Grid:
    """The Grid the strategy trains through: Flower's own, with the model arrays packed
    and replies pulled promptly (server/grid.py), and with secure-aggregation=true each
    round's training under Flower's SecAgg+ (server/secure.py)."""
    from server.grid import WireGrid

    wire_grid = WireGrid(grid)
    if not run.secure_aggregation:
        return wire_grid
    from server.secure import SecAggSettings, SecureAggregationGrid

    return SecureAggregationGrid(wire_grid, SecAggSettings.of(run), weight_key(run))


def _flower_strategy(run: RunConfig) -> Strategy:
    common: dict[str, Any] = dict(
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_train_nodes,
        min_evaluate_nodes=run.min_evaluate_nodes,
        min_available_nodes=run.min_available_nodes,
        weighted_by_key=weight_key(run),
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
    )
    name = run.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=run.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=run.server_lr, eta_l=run.lr)
    if name == "fedyogi":
        return FedYogi(**common, eta=run.server_lr, eta_l=run.lr)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=run.trimmed_beta)
    if name in ("krum", "bulyan"):
        need = 4 * run.byzantine_nodes + 3 if name == "bulyan" else 2 * run.byzantine_nodes + 3
        if run.min_train_nodes < need:
            log(
                WARNING,
                "strategy=%s with byzantine-nodes=%d needs at least %d updates per round; "
                "min-train-nodes=%d: rounds with fewer usable updates keep the global model",
                name, run.byzantine_nodes, need, run.min_train_nodes,
            )
        cls = Krum if name == "krum" else Bulyan
        return cls(**common, num_malicious_nodes=run.byzantine_nodes)
    raise ValueError(f"strategy={name!r}: not one of {sorted(STRATEGIES)}")  # pragma: no cover


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


def _site_name(content: RecordDict, node_id: int) -> tuple[str | None, str]:
    """(site name or None, why the site takes no part or '') from a reply's SITE record:
    the sentence of its error code (`wire.site_error_text`), not words of the node's."""
    site = content.config_records.get(wire.SITE)
    if site is None:
        return None, ""
    name = site.get(wire.SITE_NAME)
    error = wire.site_error_text(str(site.get(wire.SITE_ERROR, "") or ""),
                                 str(site.get(wire.SITE_DETAIL, "") or ""))
    return (str(name) if name else None), error


def _array_bytes(msg: Message) -> int:
    """The array bytes a message carries, from shapes and dtypes (nothing deserialised)."""
    if msg.has_error():
        return 0
    return int(sum(np.prod(a.shape, dtype=np.int64) * np.dtype(a.dtype).itemsize
                   for rec in msg.content.array_records.values() for a in rec.values()))


def _scalars(metrics: MetricRecord | None) -> dict[str, float]:
    """The scalar metrics of a record (lists are not results rows)."""
    if metrics is None:
        return {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class GuardedStrategy(Strategy):
    """Checks, numbering, records and checkpoints around an inner Flower strategy.

    Parameters
    ----------
    strategy : the inner Flower strategy (from `build_strategy`).
    max_norm : L2 bound of an update (new - global) over all arrays; larger is left out.
    total_rounds : the run's planned rounds (sent to clients as num-server-rounds).
    round_offset : rounds finished before this start (a resumed run's checkpoint round).
    on_round_end : called at the end of each round with its rows.
    round_lr : the learning rate each round's train messages ask for (the run's schedule);
        None keeps the train config's.
    evaluate_in_train : ask each train message of round r+1 to evaluate the model it
        carries (round r's) first; its metrics are recorded as round r's evaluation, and
        only the final round sends evaluate messages.
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
    ) -> None:
        super().__init__()
        if max_norm <= 0:
            raise ValueError(f"max_norm={max_norm}: must be positive")
        self.strategy = strategy
        self.max_norm = max_norm
        self.total_rounds = total_rounds
        self.round_offset = round_offset
        self.on_round_end = on_round_end
        self.audit_log = audit_log  # the coordinator's audit log of every reply
        # round r+1's train message evaluates round r's model; only the last round's model
        # gets an evaluate message of its own
        self.evaluate_in_train = evaluate_in_train
        self.round_lr = round_lr  # the run's learning-rate schedule, by global round
        self._sent: list[Message] = []  # the last configure_* messages, to name dropped nodes
        self._traffic: dict[int, dict[str, int]] = {}  # node -> array bytes of this phase
        self.global_arrays: ArrayRecord | None = None
        self.last_round = round_offset
        self.site_names: dict[int, str] = {}
        self._reference: dict[str, np.ndarray] | None = None
        self._dtypes: dict[str, np.dtype] | None = None
        self._rows: list[Row] = []

    def __repr__(self) -> str:
        return f"GuardedStrategy({self.strategy!r})"

    @property
    def pending_rows(self) -> list[Row]:
        """Rows recorded so far in the current round (handed to the hook at its end)."""
        return list(self._rows)

    # ------------------------------------------------------------ bookkeeping

    def _global_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _site(self, node_id: int) -> str:
        return self.site_names.get(node_id, f"node-{node_id}")

    def _set_global(self, arrays: ArrayRecord) -> None:
        self.global_arrays = arrays
        self._reference = {k: v.numpy() for k, v in arrays.items()}
        if self._dtypes is None:
            self._dtypes = {k: v.dtype for k, v in self._reference.items()}

    def _in_global_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the global model's names order and dtypes."""
        if self._dtypes is None:
            return arrays
        out = {}
        for name, dtype in self._dtypes.items():
            a = arrays[name].numpy()
            if a.dtype != dtype:
                a = np.rint(a) if dtype.kind in "iu" else a
                a = a.astype(dtype)
            out[name] = Array(np.ascontiguousarray(a))
        return ArrayRecord(out)

    def _record(self, rnd: int, site: str, node: int, phase: str, values: Mapping[str, float]):
        self._rows.extend(
            Row(rnd, site, node, phase, metric, value)  # type: ignore[arg-type]
            for metric, value in values.items()
        )

    def state_for_checkpoint(self) -> dict[str, Any]:
        """What a resumed run needs: the inner strategy's state (FedAdam/FedYogi
        `m_t`, `v_t`, `current_arrays`), the site names seen, the node-sampling RNG."""
        inner = {
            attr: dict(getattr(self.strategy, attr))
            for attr in _STATEFUL_ATTRS
            if getattr(self.strategy, attr, None) is not None
        }
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
            if attr in _STATEFUL_ATTRS and hasattr(self.strategy, attr):
                setattr(
                    self.strategy, attr, {k: np.asarray(v).copy() for k, v in value.items()}
                )
        self.site_names.update({int(k): str(v) for k, v in state.get("site_names", {}).items()})
        rs = state.get("random_state")
        if rs is not None:
            version, internal, gauss = rs
            random.setstate((int(version), tuple(int(x) for x in internal), gauss))

    # ------------------------------------------------------------ Strategy API

    def summary(self) -> None:
        log(INFO, "\t├──> Update checks: L2 norm of (update - global) <= %g", self.max_norm)
        if self.round_offset:
            log(INFO, "\t├──> Resumed after round %d of %d", self.round_offset, self.total_rounds)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._global_round(server_round)
        log(INFO, "medfuse: global round %d/%d (train)", rnd, self.total_rounds)
        self._round_started = time.monotonic()
        self._set_global(arrays)
        self._rows = []
        cfg = ConfigRecord(dict(config))
        cfg[wire.CFG_SERVER_ROUND] = rnd
        cfg[wire.CFG_TOTAL_ROUNDS] = self.total_rounds
        if self.round_lr is not None:
            cfg[wire.CFG_LR] = self.round_lr(rnd)
        if self.evaluate_in_train and rnd > 1:  # the arrays are round rnd-1's model
            cfg[wire.CFG_EVALUATE_FIRST] = 1
        self._sent = list(self.strategy.configure_train(rnd, arrays, cfg, grid))
        return self._sent

    def _sender(self, reply: Message) -> int:
        """The node a reply is about. A "Node Unavailable" error reply comes from the
        SuperLink itself (src_node_id 1), so map it back through the message it answers:
        the grid sets message_id on the very objects configure_* returned."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        sent.pop("", None)  # messages never sent through a grid have no id
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _log_silent(self, rnd: int, replied: set[int]) -> None:
        """Name the nodes that were sent work but neither replied nor errored: Flower gives
        up on them at the round timeout without an error reply (e.g. a SuperNode killed
        mid-round and restarted under the same id before the SuperLink saw it offline)."""
        for node in sorted({m.metadata.dst_node_id for m in self._sent} - replied):
            log(WARNING, "round %d: no reply from node %d (%s) by the round timeout; the "
                "round goes on without it", rnd, node, self._site(node))

    def _decoded(self, reply: Message) -> tuple[Message, str]:
        """The reply with its trained weights, when it carries a compressed update (the
        global model of this round added back: shared_model/compression.py); or the reply
        as it is and why it cannot be decoded."""
        if reply.has_error() or self._reference is None:
            return reply, ""
        site = reply.content.config_records.get(wire.SITE)
        encoding = str(site.get(wire.SITE_UPDATE, "")) if site is not None else ""
        arrays = reply.content.array_records.get(wire.ARRAYS)
        if not encoding or arrays is None:
            return reply, ""
        try:
            weights = decode({k: v.numpy() for k, v in arrays.items()}, self._reference,
                             encoding)
        except (KeyError, TypeError, ValueError) as exc:
            return reply, f"update cannot be decoded: {exc}"
        content = RecordDict(dict(reply.content.items()))
        content.array_records[wire.ARRAYS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
        return Message(content=content, metadata=reply.metadata), ""

    def _train_verdict(self, content: RecordDict, error: str) -> tuple[str | None, float | None]:
        """(why this reply is left out or None, update norm or None)."""
        metrics = content.metric_records.get(wire.METRICS)
        if metrics is None:
            return f"no '{wire.METRICS}' record in the reply", None
        scalars = _scalars(metrics)
        if scalars.get(wire.M_BUDGET_SPENT, 0.0) >= 0.5:
            return f"privacy budget spent{': ' + error if error else ''}", None
        if scalars.get(wire.M_DATA_ERROR, 0.0) >= 0.5:
            return f"data error{': ' + error if error else ''}", None
        if scalars.get(wire.M_REFUSED, 0.0) >= 0.5:
            return f"refused by the site{': ' + error if error else ''}", None
        n = scalars.get(wire.M_NUM_EXAMPLES)
        if n is None or not np.isfinite(n) or n <= 0:
            return f"{wire.M_NUM_EXAMPLES}={n} (need a positive count)", None
        arrays = content.array_records.get(wire.ARRAYS)
        if arrays is None:
            return f"no arrays{': ' + error if error else ''}", None
        if self._reference is None:  # pragma: no cover - configure_train always runs first
            return "no global model to compare with", None
        try:
            update = {k: v.numpy() for k, v in arrays.items()}
        except (TypeError, ValueError) as exc:
            return f"arrays cannot be read: {exc}", None
        check = inspect_update(update, self._reference, self.max_norm)
        return check.reason, check.norm

    def _keep_common_metrics(self, kept: list[Message], rnd: int, phase: str) -> None:
        """Give each kept reply exactly the records Flower's aggregation expects: the arrays
        (train) and one MetricRecord holding the scalar keys all kept replies share."""
        scalars = [_scalars(m.content.metric_records.get(wire.METRICS)) for m in kept]
        common = set.intersection(*(set(s) for s in scalars)) if scalars else set()
        dropped = set.union(*(set(s) for s in scalars)) - common if scalars else set()
        if dropped:
            log(WARNING, "round %d %s: metrics not reported by every site are not "
                "averaged: %s", rnd, phase, ", ".join(sorted(dropped)))
        for msg, values in zip(kept, scalars, strict=True):
            records: dict[str, Any] = {
                wire.METRICS: MetricRecord({k: v for k, v in values.items() if k in common})
            }
            if phase == TRAIN:
                records[wire.ARRAYS] = msg.content.array_records[wire.ARRAYS]
            msg.content = RecordDict(records)

    def _each_reply(
        self, rnd: int, phase: str, replies: Iterable[Message], replied: set[int]
    ) -> Iterator[tuple[int, str, Message, dict[str, float] | None, str]]:
        """(node, site, reply, its scalars or None for an error reply, the site's error or
        the error reply's reason) per reply; the site's name and its metric rows recorded,
        with the array bytes each way (under SecAgg+ the reply's are the aggregate's)."""
        sent = {m.metadata.dst_node_id: _array_bytes(m) for m in self._sent}
        for msg in replies:
            node = self._sender(msg)
            replied.add(node)
            self._traffic[node] = {BYTES_SENT: sent.get(node, 0),
                                   BYTES_RECEIVED: _array_bytes(msg)}
            if msg.has_error():
                yield (node, self._site(node), msg, None,
                       f"error reply: {msg.error.reason} (code {msg.error.code})")
                continue
            name, error = _site_name(msg.content, node)
            if name:
                self.site_names[node] = name
            site = self._site(node)
            values = _scalars(msg.content.metric_records.get(wire.METRICS))
            self._record(rnd, site, node, phase, {**values, **self._traffic.pop(node)})
            yield node, site, msg, values, error
        for node, traffic in self._traffic.items():  # error replies: the bytes all the same
            self._record(rnd, self._site(node), node, phase, traffic)
        self._traffic = {}

    def _audit(self, rnd: int, phase: str, node: int, site: str, msg: Message,
               values: dict[str, float] | None, verdict: str, *,
               with_arrays: bool = True) -> None:
        """One entry per reply in the coordinator's audit log: what the node sent (array
        names, shapes, bytes, digest; every metric) and what the server did with it."""
        if self.audit_log is None:
            return
        from shared_model import audit_log

        records = ([] if msg.has_error() or not with_arrays
                   else list(msg.content.array_records.values()))
        audit_log.append(self.audit_log, {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "who": f"{site} (node {node})",
            "what": f"{phase} round {rnd}",
            "arrays": audit_log.arrays_summary({k: v.numpy() for k, v in records[0].items()})
            if records else None,
            "metrics": values or {}, "verdict": verdict,
        })

    def _in_fixed_order(self, kept: list[tuple[str, int, Message]], rnd: int,
                        phase: str) -> list[Message]:
        """The kept replies by site and node (the same sums on resume), holding only the
        metric keys they all have (Flower's aggregation needs the same keys)."""
        kept.sort(key=lambda t: (t[0], t[1]))
        messages = [m for _, _, m in kept]
        self._keep_common_metrics(messages, rnd, phase)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self._global_round(server_round)
        kept: list[tuple[str, int, Message]] = []
        replied: set[int] = set()
        for node, site, reply, values, error in self._each_reply(rnd, TRAIN, replies, replied):
            if values is not None:
                self._evaluation_in(rnd - 1, node, site, reply)
            msg, undecodable = self._decoded(reply)
            reason, norm = (error, None) if values is None else (
                (undecodable, None) if undecodable else self._train_verdict(msg.content, error))
            verdict = {M_UPDATE_ACCEPTED: 0.0 if reason else 1.0}
            if norm is not None:
                verdict[M_UPDATE_NORM] = norm
            self._record(rnd, site, node, TRAIN, verdict)
            self._audit(rnd, TRAIN, node, site, reply, values, reason or "accepted")
            if reason:
                log(WARNING, "round %d: update from node %d (%s) left out: %s",
                    rnd, node, site, reason)
            else:
                kept.append((site, node, msg))

        self._log_silent(rnd, replied)
        if not kept:
            log(WARNING, "round %d: no usable update; the global model stays as it was", rnd)
            return self.global_arrays, None
        messages = self._in_fixed_order(kept, rnd, TRAIN)
        log(INFO, "round %d: aggregating %d update(s) from %s", rnd, len(messages),
            ", ".join(s for s, _, _ in kept))
        try:
            arrays, metrics = self.strategy.aggregate_train(rnd, messages)
        except (AggregationError, InconsistentMessageReplies) as exc:
            log(WARNING, "round %d: aggregation failed (%s); the global model stays as it "
                "was", rnd, exc)
            return self.global_arrays, None
        if arrays is None:
            log(WARNING, "round %d: %s produced no aggregate; the global model stays as it "
                "was", rnd, type(self.strategy).__name__)
            return self.global_arrays, metrics
        self._record_central_epsilon(rnd)
        return self._in_global_dtypes(arrays), metrics

    def _evaluation_in(self, rnd: int, node: int, site: str, reply: Message) -> None:
        """Record the evaluation of round `rnd`'s model a train reply carries (asked with
        `evaluate-first`), or log why the site released none."""
        metrics = reply.content.metric_records.get(wire.EVALUATION)
        if metrics is not None:
            values = _scalars(metrics)
            self._record(rnd, site, node, EVALUATE, values)
            self._audit(rnd, EVALUATE, node, site, reply, values,
                        "received with the next round's train reply", with_arrays=False)
            return
        record = reply.content.config_records.get(wire.SITE)
        why = "" if record is None else wire.site_error_text(
            str(record.get(wire.SITE_EVALUATION_ERROR, "") or ""),
            str(record.get(wire.SITE_EVALUATION_DETAIL, "") or ""))
        if why:
            log(WARNING, "round %d: evaluation on node %d (%s) not released: %s",
                rnd, node, site, why)

    def _record_central_epsilon(self, rnd: int) -> None:
        """With client-level DP on: the federation's epsilon after this round's release."""
        spent = getattr(self.strategy, "privacy_spent", lambda: None)()
        if spent is not None:
            self._record(rnd, FEDERATION, 0, TRAIN, {wire.M_CENTRAL_EPSILON: spent.epsilon})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._global_round(server_round)
        self.global_arrays = arrays
        if self.evaluate_in_train and rnd < self.total_rounds:
            self._sent = []  # the next round's train messages evaluate this model
            return []
        cfg = ConfigRecord(dict(config))
        cfg[wire.CFG_SERVER_ROUND] = rnd
        cfg[wire.CFG_TOTAL_ROUNDS] = self.total_rounds
        self._sent = list(self.strategy.configure_evaluate(rnd, arrays, cfg, grid))
        return self._sent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = self._global_round(server_round)
        kept: list[tuple[str, int, Message]] = []
        replied: set[int] = set()
        for node, site, msg, values, error in self._each_reply(rnd, EVALUATE, replies,
                                                               replied):
            self._audit(rnd, EVALUATE, node, site, msg, values, error or "received")
            if values is None:
                log(WARNING, "round %d: evaluation on node %d (%s) failed: %s",
                    rnd, node, site, msg.error.reason)
                continue
            n = values.get(wire.M_NUM_EXAMPLES, 0.0)
            if values.get(wire.M_DATA_ERROR, 0.0) >= 0.5 or not n > 0:
                log(WARNING, "round %d: evaluation on node %d (%s) left out: %s", rnd, node,
                    site, error or f"{wire.M_NUM_EXAMPLES}={n}")
                continue
            kept.append((site, node, msg))

        metrics = None
        if kept:
            messages = self._in_fixed_order(kept, rnd, EVALUATE)
            try:
                metrics = self.strategy.aggregate_evaluate(rnd, messages)
            except InconsistentMessageReplies as exc:  # pragma: no cover - keys made common
                log(WARNING, "round %d: evaluation metrics not aggregated: %s", rnd, exc)

        self.last_round = rnd
        started = getattr(self, "_round_started", None)
        if started is not None:  # train to evaluated, as the server saw it
            self._record(rnd, FEDERATION, 0, EVALUATE, {ROUND_SECONDS: time.monotonic() - started})
        # replies arrive in any order: rows go out by phase, site and node (stable sort)
        rows = sorted(self._rows, key=lambda r: (r.phase != TRAIN, r.site, r.node_id))
        self._rows = []
        if self.on_round_end is not None and self.global_arrays is not None:
            self.on_round_end(rnd, self.global_arrays, rows)
        return metrics
