"""The recorder: what every reply said and what the server did with it, written down.

`Recorder` wraps a `ReplyGuard` (`server/guard.py`) the way Flower's DP wrappers wrap a
strategy, and after each of its aggregate calls writes down, per reply the guard judged,

- the site's scalar metrics as result rows (`server/results.py`), and the guard's verdict
  on a train update (`update-accepted`, `update-norm`);
- the array bytes each way (`bytes-sent`, `bytes-received`);
- the evaluation a train reply carries for the previous round's model
  (evaluate-with-train), as that round's evaluate rows;
- one audit-log entry (`shared_model/audit_log.py`): what the node sent and the verdict;

and per round the federation's epsilon after a client-level DP release and the round's
wall time at the server (`round-seconds`). At the end of each round (its evaluation) it
hands the round's rows, with the global model they describe, to `on_round_end`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.guard import ReplyGuard
from server.replies import Judged, array_bytes, scalars
from server.results import (
    EVALUATE,
    FEDERATION,
    M_UPDATE_ACCEPTED,
    M_UPDATE_NORM,
    TRAIN,
    Phase,
    Row,
)
from shared_model import audit_log
from shared_model.contract import wire

ROUND_SECONDS = "round-seconds"  # wall time of a round at the server (site `federation`)
BYTES_SENT = "bytes-sent"  # array bytes the server sent a site in a phase (the model)
BYTES_RECEIVED = "bytes-received"  # array bytes of the site's reply (its update)
RoundHook = Callable[[int, ArrayRecord, list[Row]], None]
"""Called after each round's evaluation: (global round, new global arrays, its rows)."""
Epsilon = Callable[[], Any]
"""The inner DP strategy's `privacy_spent` (a PrivacySpent with `.epsilon`, or None)."""


def received_summary(reply: Judged) -> dict[str, Any] | None:
    """`audit_log.arrays_summary` of the first array record a reply carries, as the node
    sent it (None: an error reply, or no arrays). For a train reply's `wire.ARRAYS` that
    is the guard's (`Judged.received`, from the one reading its verdict used); any other
    record is read here. Arrays that cannot be read (a node's bytes are not a NumPy array
    of the dtype and shape it names) are entered as such: the guard left the reply out,
    and a crafted reply must not stop the ServerApp."""
    msg = reply.message
    if msg.has_error() or not msg.content.array_records:
        return None
    name, record = next(iter(msg.content.array_records.items()))
    if name == wire.ARRAYS and reply.received is not None:
        return reply.received
    try:
        return audit_log.arrays_summary({k: v.numpy() for k, v in record.items()})
    except (TypeError, ValueError) as exc:
        return {"unreadable": str(exc)[:200]}


class Recorder(Strategy):
    """Result rows, audit log, traffic and round time around a reply guard.

    Parameters
    ----------
    guard : the reply guard around the inner Flower strategy.
    on_round_end : called at the end of each round (its evaluation) with its rows.
    audit_log : the coordinator's audit log of every reply (None: none kept).
    privacy_spent : the inner client-level DP strategy's accountant, if any.
    """

    def __init__(self, guard: ReplyGuard, *, on_round_end: RoundHook | None = None,
                 audit_log: Path | None = None, privacy_spent: Epsilon | None = None) -> None:
        super().__init__()
        self.guard = guard
        self.on_round_end = on_round_end
        self.audit_log = audit_log
        self.privacy_spent = privacy_spent
        self.global_arrays: ArrayRecord | None = None
        self._rows: list[Row] = []
        self._sent: list[Message] = []  # the last configure_* messages (their bytes)
        self._round_started: float | None = None

    def __repr__(self) -> str:
        return f"Recorder({self.guard!r})"

    @property
    def pending_rows(self) -> list[Row]:
        """Rows recorded so far in the current round (handed to the hook at its end)."""
        return list(self._rows)

    def _record(self, rnd: int, site: str, node: int, phase: Phase,
                values: Mapping[str, float]) -> None:
        self._rows.extend(Row(rnd, site, node, phase, metric, value)
                          for metric, value in values.items())

    def _audit(self, entries: list[dict], rnd: int, phase: Phase, reply: Judged,
               verdict: str, *, values: Mapping[str, float] | None,
               with_arrays: bool = True) -> None:
        """The coordinator's audit-log entry of one reply, added to `entries`: what the
        node sent (array names, shapes, bytes, digest; every metric) and what the server
        did with it."""
        if self.audit_log is None:
            return
        entries.append({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "who": f"{reply.site} (node {reply.node})", "what": f"{phase} round {rnd}",
            "arrays": received_summary(reply) if with_arrays else None,
            "metrics": dict(values or {}), "verdict": verdict,
        })

    def _evaluation_in(self, entries: list[dict], rnd: int, reply: Judged) -> None:
        """Record the evaluation of round `rnd`'s model a train reply carries (asked with
        `evaluate-first`; its audit entry added to `entries`), or log why the site
        released none."""
        content = reply.message.content
        metrics = content.metric_records.get(wire.EVALUATION)
        if metrics is not None:
            values = scalars(metrics)
            self._record(rnd, reply.site, reply.node, EVALUATE, values)
            self._audit(entries, rnd, EVALUATE, reply,
                        "received with the next round's train reply",
                        values=values, with_arrays=False)
            return
        record = content.config_records.get(wire.SITE)
        why = "" if record is None else wire.site_error_text(
            str(record.get(wire.SITE_EVALUATION_ERROR, "") or ""),
            str(record.get(wire.SITE_EVALUATION_DETAIL, "") or ""))
        if why:
            log(WARNING, "round %d: evaluation on node %d (%s) not released: %s",
                rnd, reply.node, reply.site, why)

    def _record_replies(self, rnd: int, phase: Phase) -> None:
        """Rows and an audit entry for each reply the guard judged in this phase, with the
        array bytes each way (under SecAgg+ the reply's are the aggregate's). The entries
        are written together (`audit_log.append_many`: one lock, write and fsync a phase,
        not one per reply)."""
        sent = {m.metadata.dst_node_id: array_bytes(m) for m in self._sent}
        entries: list[dict] = []
        for reply in self.guard.judged:
            traffic = {BYTES_SENT: sent.get(reply.node, 0),
                       BYTES_RECEIVED: array_bytes(reply.message)}
            if reply.values is not None:
                self._record(rnd, reply.site, reply.node, phase, {**reply.values, **traffic})
                if phase == TRAIN:
                    self._evaluation_in(entries, rnd - 1, reply)
            if phase == TRAIN:
                verdict = {M_UPDATE_ACCEPTED: 1.0 if reply.kept else 0.0}
                if reply.norm is not None:
                    verdict[M_UPDATE_NORM] = reply.norm
                self._record(rnd, reply.site, reply.node, TRAIN, verdict)
            if reply.values is None:  # an error reply: the bytes all the same
                self._record(rnd, reply.site, reply.node, phase, traffic)
            self._audit(entries, rnd, phase, reply, reply.verdict, values=reply.values)
        if self.audit_log is not None and entries:
            audit_log.append_many(self.audit_log, entries)

    # ------------------------------------------------------------ Strategy API

    def summary(self) -> None:
        self.guard.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.monotonic()
        self._rows = []
        self.global_arrays = arrays
        self._sent = list(self.guard.configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.guard.aggregate_train(server_round, replies)
        self._record_replies(server_round, TRAIN)
        spent = self.privacy_spent() if self.guard.aggregated and self.privacy_spent else None
        if spent is not None:  # client-level DP: the federation's epsilon after this release
            self._record(server_round, FEDERATION, 0, TRAIN,
                         {wire.M_CENTRAL_EPSILON: spent.epsilon})
        if arrays is not None:
            self.global_arrays = arrays
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        self._sent = list(self.guard.configure_evaluate(server_round, arrays, config, grid))
        return self._sent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = server_round
        metrics = self.guard.aggregate_evaluate(rnd, replies)
        self._record_replies(rnd, EVALUATE)
        if self._round_started is not None:  # train to evaluated, as the server saw it
            self._record(rnd, FEDERATION, 0, EVALUATE,
                         {ROUND_SECONDS: time.monotonic() - self._round_started})
        # replies arrive in any order: rows go out by phase, site and node (stable sort)
        rows = sorted(self._rows, key=lambda r: (r.phase != TRAIN, r.site, r.node_id))
        self._rows = []
        if self.on_round_end is not None and self.global_arrays is not None:
            self.on_round_end(rnd, self.global_arrays, rows)
        return metrics
