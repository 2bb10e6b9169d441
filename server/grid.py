"""The Grid the ServerApp's strategy talks through: Flower's own, answered promptly.

Flower 1.42's deployed Grid (`flwr/superlink/grid/http_grid.py`) waits 3 s between two
looks for replies; a round pays that once per message exchange, on top of the SuperNodes'
own polling. `PromptGrid` pushes the same messages and pulls the replies every
`PULL_INTERVAL` seconds instead, through the Grid's public `push_messages` /
`pull_messages`; everything else is Flower's Grid unchanged. Flower's SecAgg+ workflow
(`server/secure.py`) uses the same `send_and_receive`, so its four exchanges gain too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

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


class PromptGrid(DelegatingGrid):
    """Flower's Grid with replies pulled every `PULL_INTERVAL` s (the same semantics as
    Flower's `send_and_receive`: all replies, or those in by `timeout`)."""

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        pending.discard("")
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(PULL_INTERVAL)
        return replies
