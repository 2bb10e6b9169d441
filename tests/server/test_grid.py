"""PromptGrid: Flower's send_and_receive semantics, with replies pulled every 0.1 s."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from server.grid import PULL_INTERVAL, PromptGrid
from tests.server.fakes import FakeGrid


class SlowGrid(FakeGrid):
    """Replies become visible only from the `ready`-th pull on; node 9 never answers."""

    def __init__(self, ready: int) -> None:
        super().__init__({7: self._echo, 8: self._echo, 9: self._echo})
        self.ready, self.pulls = ready, 0

    @staticmethod
    def _echo(msg: Message) -> Message:
        return Message(RecordDict({"site": ConfigRecord({"site-name": "x"})}), reply_to=msg)

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls < self.ready:
            return []
        return [m for m in super().pull_messages(message_ids)
                if m.metadata.src_node_id != 9]  # node 9's reply never arrives


def _messages(nodes: list[int]) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=n, message_type="train") for n in nodes]


def test_all_replies_are_returned_after_as_many_pulls_as_they_take():
    # Prepare
    grid = SlowGrid(ready=3)
    # Execute
    replies = list(PromptGrid(grid).send_and_receive(_messages([7, 8]), timeout=60))
    # Assert: both, found at the third look (every PULL_INTERVAL s, not Flower's 3 s)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["fake-1", "fake-2"]
    assert grid.pulls == 3 and PULL_INTERVAL <= 0.1


def test_a_silent_node_is_left_out_at_the_timeout():
    # Prepare
    grid = SlowGrid(ready=1)
    # Execute
    replies = list(PromptGrid(grid).send_and_receive(_messages([7, 9]), timeout=0.5))
    # Assert: the reply that came, none for the node that never answered
    assert [r.metadata.reply_to_message_id for r in replies] == ["fake-1"]
    assert grid.pulls >= 2
