"""How the ServerApp's messages travel: Flower's Grid, packed and answered promptly.

Three costs of Flower 1.42's deployed path that medfuse removes at its own edge:

- Flower's deployed Grid (`flwr/superlink/grid/http_grid.py`) waits 3 s between two looks
  for replies. `WireGrid.send_and_receive` pushes the same messages and pulls the
  replies every `PULL_INTERVAL` seconds through the Grid's public `push_messages` /
  `pull_messages`.
- Flower moves each array of a message as an object of its own (one remote call per
  array at every hand-off); the model has 69. `WireGrid` sends a message's model arrays
  packed into one and unpacks the replies (`shared_model/contract/packing.py`), which the
  ClientApp packs the same way (`client/app.py`, `packed_arrays_mod`).
- The SuperLink hands over a reply before its arrays have arrived, and Flower's Grid then
  waits 1 s before it asks for them again. `prompt_object_pulls` (called once by the
  ServerApp) makes it ask again within 20-250 ms (`shared_model/contract/pulls.py`).

The strategy sees Flower's Grid semantics unchanged (all replies, or those in by
`timeout`), with the arrays by name. Flower's SecAgg+ workflow (`server/secure.py`) sends
through the same `send_and_receive`: its messages carry no model arrays, only the prompt
pulls apply.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from shared_model.contract import pulls
from shared_model.contract.packing import packed, unpacked

# seconds between two looks for replies (Flower's deployed Grid: 3). A look is one small
# call to the SuperLink (~0.2 ms here; a simulation's ServerApp pulls through the same
# Grid), and a round waits on average half of this after its last reply: 0.02 s costs
# the ServerApp some 1% of a core while it waits, 0.1 s cost a round ~0.05 s.
PULL_INTERVAL = 0.02

# the module of Flower's deployed Grid (its `pull_messages` pulls a reply's arrays with
# the module's `pull_objects`) and that function as Flower defines it
flower_http_grid = importlib.import_module("flwr.superlink.grid.http_grid")
FLOWER_PULL_OBJECTS = flower_http_grid.pull_objects


def prompt_object_pulls() -> None:
    """The deployed Grid asks again for a reply's arrays that have not arrived within
    20-250 ms, not after 1 s (`shared_model/contract/pulls.py`). For this process: the
    ServerApp calls it once, before any round."""
    flower_http_grid.pull_objects = pulls.prompt(FLOWER_PULL_OBJECTS)


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
