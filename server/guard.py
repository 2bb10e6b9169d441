"""The reply guard: which replies the inner strategy aggregates, and why the others not.

`ReplyGuard` wraps a Flower strategy the way Flower's DP wrappers do
(`flwr/serverapp/strategy/dp_fixed_clipping.py`). On the way in it

- decodes a compressed update (the round's global model added back:
  `shared_model/contract/compression.py`);
- leaves out train replies that carry an error, no arrays, a budget-spent, data-error or
  refused flag, or an update failing `server.checks` against the global model, and
  evaluate replies that failed or evaluated nothing, logging each with its node id, site
  name and reason; the nodes that never replied are named too;
- hands the inner strategy the rest in a fixed order (by site and node: the same sums on
  resume), each holding only the metric keys they all share;
- keeps the global model when nothing is left or the inner strategy cannot aggregate, and
  the aggregate in the global model's dtypes (FedAdam/FedYogi compute in float64).

What it decided about each reply stays in `judged` (and `aggregated`) for the recorder.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from server.checks import inspect_update
from server.replies import Judged, Roster, scalars
from server.results import EVALUATE, TRAIN, Phase
from shared_model.contract import wire
from shared_model.contract.compression import decode


def in_dtypes(arrays: ArrayRecord, dtypes: dict[str, np.dtype] | None) -> ArrayRecord:
    """The aggregate in the global model's names order and dtypes."""
    if dtypes is None:
        return arrays
    out = {}
    for name, dtype in dtypes.items():
        a = arrays[name].numpy()
        if a.dtype != dtype:
            a = np.rint(a) if dtype.kind in "iu" else a
            a = a.astype(dtype)
        out[name] = Array(np.ascontiguousarray(a))
    return ArrayRecord(out)


def _with(error: str) -> str:
    return f": {error}" if error else ""


def train_verdict(content: RecordDict, error: str, reference: dict[str, np.ndarray],
                  max_norm: float) -> tuple[str | None, float | None]:
    """(why a decoded train reply is left out or None, its update norm or None)."""
    metrics = content.metric_records.get(wire.METRICS)
    if metrics is None:
        return f"no '{wire.METRICS}' record in the reply", None
    values = scalars(metrics)
    if values.get(wire.M_BUDGET_SPENT, 0.0) >= 0.5:
        return f"privacy budget spent{_with(error)}", None
    if values.get(wire.M_DATA_ERROR, 0.0) >= 0.5:
        return f"data error{_with(error)}", None
    if values.get(wire.M_REFUSED, 0.0) >= 0.5:
        return f"refused by the site{_with(error)}", None
    n = values.get(wire.M_NUM_EXAMPLES)
    if n is None or not np.isfinite(n) or n <= 0:
        return f"{wire.M_NUM_EXAMPLES}={n} (need a positive count)", None
    arrays = content.array_records.get(wire.ARRAYS)
    if arrays is None:
        return f"no arrays{_with(error)}", None
    try:
        update = {k: v.numpy() for k, v in arrays.items()}
    except (TypeError, ValueError) as exc:
        return f"arrays cannot be read: {exc}", None
    check = inspect_update(update, reference, max_norm)
    return check.reason, check.norm


def common_metrics(kept: list[Message], rnd: int, phase: Phase) -> list[Message]:
    """The kept replies as new messages holding exactly the records Flower's aggregation
    expects: the arrays (train) and one MetricRecord of the scalar keys all of them share
    (the replies themselves stay as they came, for the recorder)."""
    values = [scalars(m.content.metric_records.get(wire.METRICS)) for m in kept]
    common = set.intersection(*(set(s) for s in values)) if values else set()
    dropped = set.union(*(set(s) for s in values)) - common if values else set()
    if dropped:
        log(WARNING, "round %d %s: metrics not reported by every site are not "
            "averaged: %s", rnd, phase, ", ".join(sorted(dropped)))
    out = []
    for msg, scalar in zip(kept, values, strict=True):
        records: dict[str, Any] = {
            wire.METRICS: MetricRecord({k: v for k, v in scalar.items() if k in common})
        }
        if phase == TRAIN:
            records[wire.ARRAYS] = msg.content.array_records[wire.ARRAYS]
        out.append(Message(content=RecordDict(records), metadata=msg.metadata))
    return out


class ReplyGuard(Strategy):
    """Decodes and checks every reply; the inner strategy aggregates only the kept ones.

    Parameters
    ----------
    strategy : the inner Flower strategy.
    max_norm : L2 bound of an update (new - global) over all arrays; larger is left out.
    """

    def __init__(self, strategy: Strategy, *, max_norm: float) -> None:
        super().__init__()
        if max_norm <= 0:
            raise ValueError(f"max_norm={max_norm}: must be positive")
        self.strategy = strategy
        self.max_norm = max_norm
        self.roster = Roster()
        self.judged: list[Judged] = []  # the last aggregate_* call's replies, as they came
        self.aggregated = False  # whether the last aggregate_train gave a new global model
        self._global: ArrayRecord | None = None
        self._reference: dict[str, np.ndarray] | None = None
        self._dtypes: dict[str, np.dtype] | None = None

    def __repr__(self) -> str:
        return f"ReplyGuard({self.strategy!r})"

    @property
    def site_names(self) -> dict[int, str]:
        return self.roster.site_names

    def summary(self) -> None:
        log(INFO, "\t├──> Update checks: L2 norm of (update - global) <= %g", self.max_norm)
        self.strategy.summary()

    def _set_global(self, arrays: ArrayRecord) -> None:
        self._global = arrays
        self._reference = {k: v.numpy() for k, v in arrays.items()}
        if self._dtypes is None:
            self._dtypes = {k: v.dtype for k, v in self._reference.items()}

    def _decoded(self, reply: Message) -> tuple[Message, str]:
        """The reply with its trained weights, when it carries a compressed update (the
        global model of this round added back: shared_model/contract/compression.py); or the reply
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

    def _judge_train(self, rnd: int, reply: Message) -> tuple[Judged, Message]:
        """The guard's decision on one train reply, and the reply as decoded."""
        node, site, values, error = self.roster.read(reply)
        msg, norm = reply, None
        reason: str | None = error  # an error reply's reason; else why it is left out
        if values is not None:
            msg, reason = self._decoded(reply)
            if not reason:
                if self._reference is None:  # pragma: no cover - configure_train runs first
                    reason = "no global model to compare with"
                else:
                    reason, norm = train_verdict(msg.content, error, self._reference,
                                                 self.max_norm)
        if reason:
            log(WARNING, "round %d: update from node %d (%s) left out: %s",
                rnd, node, site, reason)
        return Judged(node, site, reply, values, error, kept=not reason,
                      verdict=reason or "accepted", norm=norm), msg

    def _judge_evaluate(self, rnd: int, reply: Message) -> Judged:
        """The guard's decision on one evaluate reply."""
        node, site, values, error = self.roster.read(reply)
        kept = values is not None
        if values is None:
            log(WARNING, "round %d: evaluation on node %d (%s) failed: %s",
                rnd, node, site, reply.error.reason)
        else:
            n = values.get(wire.M_NUM_EXAMPLES, 0.0)
            if values.get(wire.M_DATA_ERROR, 0.0) >= 0.5 or not n > 0:
                log(WARNING, "round %d: evaluation on node %d (%s) left out: %s", rnd, node,
                    site, error or f"{wire.M_NUM_EXAMPLES}={n}")
                kept = False
        return Judged(node, site, reply, values, error, kept=kept,
                      verdict=error or "received")

    # ------------------------------------------------------------ Strategy API

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._set_global(arrays)
        self.roster.sent = list(self.strategy.configure_train(server_round, arrays, config,
                                                              grid))
        return self.roster.sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round
        self.judged, kept = [], []
        self.aggregated = False
        for reply in replies:
            judged, msg = self._judge_train(rnd, reply)
            self.judged.append(judged)
            if judged.kept:
                kept.append((judged.site, judged.node, msg))
        self.roster.log_silent(rnd, (j.node for j in self.judged))
        if not kept:
            log(WARNING, "round %d: no usable update; the global model stays as it was", rnd)
            return self._global, None
        kept.sort(key=lambda t: (t[0], t[1]))
        messages = common_metrics([m for _, _, m in kept], rnd, TRAIN)
        log(INFO, "round %d: aggregating %d update(s) from %s", rnd, len(messages),
            ", ".join(s for s, _, _ in kept))
        try:
            arrays, metrics = self.strategy.aggregate_train(rnd, messages)
        except (AggregationError, InconsistentMessageReplies) as exc:
            log(WARNING, "round %d: aggregation failed (%s); the global model stays as it "
                "was", rnd, exc)
            return self._global, None
        if arrays is None:
            log(WARNING, "round %d: %s produced no aggregate; the global model stays as it "
                "was", rnd, type(self.strategy).__name__)
            return self._global, metrics
        self.aggregated = True
        return in_dtypes(arrays, self._dtypes), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.roster.sent = list(self.strategy.configure_evaluate(server_round, arrays, config,
                                                                 grid))
        return self.roster.sent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = server_round
        self.judged = [self._judge_evaluate(rnd, reply) for reply in replies]
        kept = sorted(((j.site, j.node, j.message) for j in self.judged if j.kept),
                      key=lambda t: (t[0], t[1]))
        if not kept:
            return None
        messages = common_metrics([m for _, _, m in kept], rnd, EVALUATE)
        try:
            return self.strategy.aggregate_evaluate(rnd, messages)
        except InconsistentMessageReplies as exc:  # pragma: no cover - keys made common
            log(WARNING, "round %d: evaluation metrics not aggregated: %s", rnd, exc)
            return None
