"""WireGrid: Flower's send_and_receive semantics, with replies pulled every PULL_INTERVAL
(0.02 s) and the model arrays packed into one array both ways."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from server.grid import PULL_INTERVAL, WireGrid
from shared_model.contract.packing import packed, unpacked
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
    replies = list(WireGrid(grid).send_and_receive(_messages([7, 8]), timeout=60))
    # Assert: both, found at the third look (every PULL_INTERVAL s, not Flower's 3 s)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["fake-1", "fake-2"]
    assert grid.pulls == 3 and PULL_INTERVAL <= 0.02


def test_a_silent_node_is_left_out_at_the_timeout():
    # Prepare
    grid = SlowGrid(ready=1)
    # Execute
    replies = list(WireGrid(grid).send_and_receive(_messages([7, 9]), timeout=0.5))
    # Assert: the reply that came, none for the node that never answered
    assert [r.metadata.reply_to_message_id for r in replies] == ["fake-1"]
    assert grid.pulls >= 2


def test_a_message_crosses_with_one_array_and_comes_back_by_name():
    # Prepare
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from shared_model.contract import wire

    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b.count": np.array(7, dtype=np.int64)}
    msg = Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    # Execute
    on_wire = packed(msg)
    # Assert: one array on the wire, the same ones by name after unpacking
    assert list(on_wire.content.array_records) == [wire.PACKED]
    assert len(on_wire.content.array_records[wire.PACKED]) == 1
    back = unpacked(on_wire).content.array_records[wire.ARRAYS]
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].numpy().dtype == a.dtype and (back[name].numpy() == a).all()


def test_a_reply_whose_packing_does_not_add_up_loses_its_arrays():
    # Prepare: a node claims one more float than it sent
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from shared_model.contract import wire

    content = RecordDict({
        wire.PACKED: ArrayRecord({wire.PACKED: Array(np.zeros(8, dtype=np.uint8))}),
        wire.PACKED_LAYOUT: ConfigRecord({"names": ["w"], "dtypes": ["<f4"], "shapes": ["3"]}),
        "site": ConfigRecord({"site-name": "x"}),
    })
    # Execute
    out = unpacked(Message(content, dst_node_id=0, message_type="train"))
    # Assert: no arrays (the strategy leaves such a reply out), the rest kept
    assert not out.content.array_records and "site" in out.content.config_records


def test_the_serverapp_asks_promptly_for_a_replys_arrays(monkeypatch):
    # Prepare: Flower's deployed Grid's pull as Flower defines it, restored after the test
    from server import grid as grid_module
    from shared_model.contract import pulls

    monkeypatch.setattr(grid_module.flower_http_grid, "pull_objects",
                        grid_module.FLOWER_PULL_OBJECTS)
    # Execute: twice, as a second ServerApp in the same process would
    grid_module.prompt_object_pulls()
    grid_module.prompt_object_pulls()
    # Assert: Flower's function with medfuse's waits, wrapped once
    pull = grid_module.flower_http_grid.pull_objects
    assert pull.func is grid_module.FLOWER_PULL_OBJECTS
    assert pull.keywords == {"initial_backoff": pulls.FIRST_WAIT_S,
                             "backoff_cap": pulls.LONGEST_WAIT_S,
                             "max_tries_per_object": None}
