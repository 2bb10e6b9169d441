"""Reading the replies of a round: who sent each one, from which site, with what metrics.

Plain helpers and one small class, shared by the reply guard (`server/guard.py`), which
judges the replies, and the recorder (`server/recorder.py`), which writes them down:

- `Roster` remembers the messages a round sent and the site names nodes gave, to name the
  node behind every reply (also behind Flower's own "Node Unavailable" error replies) and
  the nodes that never replied;
- `Judged` is one reply with the guard's decision on it, what the recorder records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common import log

from shared_model.contract import wire


def scalars(metrics: MetricRecord | None) -> dict[str, float]:
    """The scalar metrics of a record (lists are not results rows)."""
    if metrics is None:
        return {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def site_of(content: RecordDict) -> tuple[str | None, str]:
    """(site name or None, why the site takes no part or '') from a reply's SITE record:
    the sentence of its error code (`wire.site_error_text`), not words of the node's."""
    site = content.config_records.get(wire.SITE)
    if site is None:
        return None, ""
    name = site.get(wire.SITE_NAME)
    error = wire.site_error_text(str(site.get(wire.SITE_ERROR, "") or ""),
                                 str(site.get(wire.SITE_DETAIL, "") or ""))
    return (str(name) if name else None), error


def array_bytes(msg: Message) -> int:
    """The array bytes a message carries, from shapes and dtypes (nothing deserialised;
    `math.prod` of a shape: `np.prod` cost more than the rest, per array of every reply)."""
    if msg.has_error():
        return 0
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
               for rec in msg.content.array_records.values() for a in rec.values())


@dataclass(frozen=True)
class Judged:
    """One reply and what the guard made of it.

    values : its scalar metrics, None for an error reply.
    error : the site's own error sentence, or the error reply's reason ('' if none).
    kept : whether it went on to the inner strategy.
    verdict : what the server did with it, in words ("accepted", "received", or why not).
    norm : the L2 norm of a train update that was checked, else None.
    received : `audit_log.arrays_summary` of the `wire.ARRAYS` the node sent, as it sent
        them (a compressed update's 16-bit arrays, not the weights decoded from them);
        made by the guard from the one reading of them its verdict uses, so the recorder's
        audit entry needs no second (a summary, not the arrays: nothing held per reply).
        None where the guard read none.
    """

    node: int
    site: str
    message: Message
    values: dict[str, float] | None
    error: str
    kept: bool
    verdict: str
    norm: float | None = None
    received: dict[str, Any] | None = field(default=None, repr=False)


class Roster:
    """The messages a round sent, and the site name each node gave in its replies."""

    def __init__(self) -> None:
        self.site_names: dict[int, str] = {}
        self.sent: list[Message] = []  # the last configure_* messages

    def site(self, node_id: int) -> str:
        return self.site_names.get(node_id, f"node-{node_id}")

    def sender(self, reply: Message) -> int:
        """The node a reply is about. A "Node Unavailable" error reply comes from the
        SuperLink itself (src_node_id 1), so map it back through the message it answers:
        the grid sets message_id on the very objects configure_* returned."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        sent.pop("", None)  # messages never sent through a grid have no id
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def read(self, reply: Message) -> tuple[int, str, dict[str, float] | None, str]:
        """(node, site, scalars or None for an error reply, the site's error or the error
        reply's reason); a site name the reply gives is remembered for its node."""
        node = self.sender(reply)
        if reply.has_error():
            return (node, self.site(node), None,
                    f"error reply: {reply.error.reason} (code {reply.error.code})")
        name, error = site_of(reply.content)
        if name:
            self.site_names[node] = name
        return node, self.site(node), scalars(reply.content.metric_records.get(wire.METRICS)), error

    def log_silent(self, rnd: int, replied: Iterable[int]) -> None:
        """Name the nodes that were sent work but neither replied nor errored: Flower gives
        up on them at the round timeout without an error reply (e.g. a SuperNode killed
        mid-round and restarted under the same id before the SuperLink saw it offline)."""
        for node in sorted({m.metadata.dst_node_id for m in self.sent} - set(replied)):
            log(WARNING, "round %d: no reply from node %d (%s) by the round timeout; the "
                "round goes on without it", rnd, node, self.site(node))
