"""How the ServerApp's messages travel: Flower's Grid, packed and answered promptly.

Two costs of Flower 1.42's deployed path that medfuse removes at its own edge:

- Flower's deployed Grid (`flwr/superlink/grid/http_grid.py`) waits 3 s between two looks
  for replies. `WireGrid.send_and_receive` pushes the same messages and pulls the
  replies every `PULL_INTERVAL` seconds through the Grid's public `push_messages` /
  `pull_messages`.
- Flower moves each array of a message as an object of its own (one remote call per
  array at every hand-off); the model has 69. `WireGrid` sends a message's model arrays
  packed into one (`shared_model/packing.py`) and unpacks the replies, which the
  ClientApp packs the same way (`client/app.py`, `packed_arrays_mod`).

The strategy sees Flower's Grid semantics unchanged (all replies, or those in by
`timeout`), with the arrays by name. Flower's SecAgg+ workflow (`server/secure.py`) sends
through the same `send_and_receive`: its messages carry no model arrays, only the prompt
pulls apply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from shared_model import packing, wire

PULL_INTERVAL = 0.1  # seconds between two looks for replies (Flower's deployed Grid: 3)


class DelegatingGrid(Grid):
    """A Grid that hands every call to another Grid; subclasses change one of them."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class WireGrid(DelegatingGrid):
    """Flower's Grid with the model arrays packed both ways and replies pulled every
    `PULL_INTERVAL` s."""

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        outgoing = [packed(m) for m in messages]  # a list: Flower's grid reads it twice
        pending = set(self.push_messages(outgoing))
        pending.discard("")
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies.extend(unpacked(m) for m in pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(PULL_INTERVAL)
        return replies


def packed(msg: Message) -> Message:
    """The message with its model arrays (record `wire.ARRAYS`) as one packed array."""
    if msg.has_error() or not msg.content.array_records.get(wire.ARRAYS):
        return msg
    buf, layout = packing.pack({k: v.numpy() for k, v in
                                msg.content.array_records[wire.ARRAYS].items()})
    content = RecordDict({k: v for k, v in msg.content.items() if k != wire.ARRAYS})
    content[wire.PACKED] = ArrayRecord({wire.PACKED: Array(buf)})
    content[wire.PACKED_LAYOUT] = ConfigRecord(layout)  # type: ignore[arg-type]
    msg.content = content
    return msg


def unpacked(msg: Message) -> Message:
    """The reply with its packed arrays back under `wire.ARRAYS`; a reply whose packing
    does not hold together loses its arrays (the strategy then leaves it out) and is
    logged with its node."""
    if msg.has_error() or wire.PACKED not in msg.content.array_records:
        return msg
    content = RecordDict({k: v for k, v in msg.content.items()
                          if k not in (wire.PACKED, wire.PACKED_LAYOUT)})
    try:
        layout = msg.content.config_records.get(wire.PACKED_LAYOUT) or {}
        arrays = packing.unpack(msg.content.array_records[wire.PACKED][wire.PACKED].numpy(),
                                layout)  # type: ignore[arg-type]
        content[wire.ARRAYS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    except (KeyError, TypeError, ValueError) as exc:
        log(WARNING, "reply from node %d: packed arrays cannot be read (%s); dropped",
            msg.metadata.src_node_id, exc)
    msg.content = content
    return msg
