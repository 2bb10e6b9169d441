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

What it decided about each reply stays in `judged` (and `aggregated`) for the recorder,
with the audit summary of the arrays each node sent. A reply's arrays are deserialised
once here (each `Array.numpy()` is an `np.load` of its bytes) and that one reading serves
the decoding, the checks and the audit digest; Flower's aggregation reads the kept ones
again from their own records.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from server.checks import as_float64, inspect_update
from server.replies import Judged, Roster, scalars
from server.results import EVALUATE, TRAIN, Phase
from shared_model import audit_log
from shared_model.contract import wire
from shared_model.contract.compression import decode
from shared_model.contract.packing import array_record

Arrays = dict[str, np.ndarray]


def in_dtypes(arrays: ArrayRecord, dtypes: dict[str, np.dtype] | None) -> ArrayRecord:
    """The aggregate in the global model's names order and dtypes. An array already in its
    dtype is kept as it is (deserialising and serialising it again gave the same array)."""
    if dtypes is None:
        return arrays
    kept = {n: arrays[n] for n, d in dtypes.items() if np.dtype(arrays[n].dtype) == d}
    cast = array_record({n: _as_dtype(arrays[n].numpy(), d) for n, d in dtypes.items()
                         if n not in kept})
    return ArrayRecord({n: kept[n] if n in kept else cast[n] for n in dtypes})


def _as_dtype(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`a` in `dtype`, rounded first into an integer one (an averaged counter)."""
    return (np.rint(a) if dtype.kind in "iu" else a).astype(dtype)


def received_arrays(reply: Message) -> tuple[Arrays | None, str]:
    """(the reply's `wire.ARRAYS` as NumPy, or None when it has none or they cannot be
    read; '' or why not). Read once a reply: the decoding, the checks and the audit digest
    all use this one reading (each `Array.numpy()` deserialises the bytes anew)."""
    arrays = None if reply.has_error() else reply.content.array_records.get(wire.ARRAYS)
    if arrays is None:
        return None, ""
    try:
        return {k: v.numpy() for k, v in arrays.items()}, ""
    except (TypeError, ValueError) as exc:
        return None, str(exc)


def _with(error: str) -> str:
    return f": {error}" if error else ""


def train_verdict(content: RecordDict, error: str, weights: Arrays | None, unreadable: str,
                  reference: Arrays, max_norm: float, *, reference64: Arrays | None = None
                  ) -> tuple[str | None, float | None]:
    """(why a decoded train reply is left out or None, its update norm or None).

    weights : its trained weights as NumPy (`received_arrays`, decoded), None when it
        carries no arrays or they cannot be read (`unreadable` says why).
    reference64 : `as_float64(reference)`, made once a round (`ReplyGuard._set_global`).
    """
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
    if unreadable:
        return f"arrays cannot be read: {unreadable}", None
    if weights is None:
        return f"no arrays{_with(error)}", None
    check = inspect_update(weights, reference, max_norm, reference64=reference64)
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
        self._reference: Arrays | None = None
        self._reference64: Arrays | None = None  # the same in float64, for update norms
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
        self._reference64 = as_float64(self._reference)
        if self._dtypes is None:
            self._dtypes = {k: v.dtype for k, v in self._reference.items()}

    def _decoded(self, reply: Message, received: Arrays | None, unreadable: str
                 ) -> tuple[Message, Arrays | None, str]:
        """(the reply with its trained weights, those weights, why it cannot be decoded
        or ''), from `received_arrays(reply)`. A reply that carries a compressed update
        gets the global model of this round added back
        (shared_model/contract/compression.py); any other is as it came, its weights the
        arrays it sent."""
        if reply.has_error() or self._reference is None:
            return reply, received, ""
        site = reply.content.config_records.get(wire.SITE)
        encoding = str(site.get(wire.SITE_UPDATE, "")) if site is not None else ""
        if not encoding or (received is None and not unreadable):
            return reply, received, ""
        if unreadable:
            return reply, None, f"update cannot be decoded: {unreadable}"
        try:
            decoded = decode(received, self._reference, encoding)
        except (KeyError, TypeError, ValueError) as exc:
            return reply, None, f"update cannot be decoded: {exc}"
        weights = {k: np.asarray(v, order="C") for k, v in decoded.items()}
        content = RecordDict(dict(reply.content.items()))
        content.array_records[wire.ARRAYS] = array_record(weights)  # the inner strategy's
        return Message(content=content, metadata=reply.metadata), weights, ""

    def _judge_train(self, rnd: int, reply: Message) -> tuple[Judged, Message]:
        """The guard's decision on one train reply, and the reply as decoded."""
        node, site, values, error = self.roster.read(reply)
        msg, norm, summary = reply, None, None
        reason: str | None = error  # an error reply's reason; else why it is left out
        if values is not None:
            received, unreadable = received_arrays(reply)
            summary = None if received is None else audit_log.arrays_summary(received)
            msg, weights, reason = self._decoded(reply, received, unreadable)
            if not reason:
                if self._reference is None:  # pragma: no cover - configure_train runs first
                    reason = "no global model to compare with"
                else:
                    reason, norm = train_verdict(msg.content, error, weights, unreadable,
                                                 self._reference, self.max_norm,
                                                 reference64=self._reference64)
        if reason:
            log(WARNING, "round %d: update from node %d (%s) left out: %s",
                rnd, node, site, reason)
        return Judged(node, site, reply, values, error, kept=not reason,
                      verdict=reason or "accepted", norm=norm, received=summary), msg

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
