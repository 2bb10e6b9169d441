"""Test doubles for the server: a Grid that calls plain functions instead of nodes, and
deterministic fake sites that answer train and evaluate messages like the real ClientApp
(same records, same keys from `shared_model.contract.wire`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from shared_model.contract import wire
from shared_model.contract.packing import packed, unpacked
from shared_model.contract.run_config import RunConfig, pyproject_defaults

Node = Callable[[Message], Message]

TRAIN_KEYS = (
    wire.M_NUM_EXAMPLES, wire.M_TRAIN_LOSS, wire.M_EPSILON, wire.M_DELTA, wire.M_BUDGET_LEFT,
    wire.M_BUDGET_SPENT, wire.M_DATA_ERROR,
)


class Crash(RuntimeError):
    """Raised by FakeGrid to stand for a coordinator that dies mid-run."""


class FakeGrid(Grid):
    """Delivers each message to `nodes[dst_node_id]` in-process and returns the replies."""

    def __init__(self, nodes: Mapping[int, Node], crash_before_round: int | None = None):
        self.nodes = dict(nodes)
        self.crash_before_round = crash_before_round
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}  # message id -> its reply, until pulled

    def set_run(self, run):  # pragma: no cover - not used by strategies
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver at once (each node answers in-process); the replies wait for a pull.
        A list, as Flower's deployed grid needs (it reads the messages twice)."""
        if not isinstance(messages, list):
            raise TypeError(f"push_messages got {type(messages).__name__}, not a list")
        for msg in messages:
            rnd = int(msg.content.config_records[wire.CONFIG][wire.CFG_SERVER_ROUND])
            if self.crash_before_round is not None and rnd >= self.crash_before_round:
                raise Crash(f"coordinator crashed before round {rnd}")
        ids = []
        for msg in messages:
            self.sent.append(msg)
            msg.metadata.__dict__["_message_id"] = f"fake-{len(self.sent)}"  # as Flower's grid
            # a packed message (through WireGrid) gets a packed reply, as the ClientApp's
            # packed_arrays_mod gives; a plain one (a strategy on this grid) a plain reply
            was_packed = wire.PACKED in msg.content.array_records
            reply = self.nodes[msg.metadata.dst_node_id](unpacked(msg))
            self._replies[msg.metadata.message_id] = packed(reply) if was_packed else reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return self.pull_messages(self.push_messages(messages))


def run_config(**overrides) -> RunConfig:
    """The pyproject defaults with `overrides` (snake_case keys), validated."""
    flat = pyproject_defaults()
    flat.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return RunConfig.parse(flat)


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def train_reply(
    instruction: Message,
    *,
    site: str,
    arrays: Mapping[str, np.ndarray] | None,
    num_examples: int,
    epsilon: float = 1.0,
    budget_exhausted: bool = False,
    data_error: bool = False,
    error: str = "",
) -> Message:
    """A train reply exactly as the ClientApp contract describes it."""
    metrics = MetricRecord({
        wire.M_NUM_EXAMPLES: num_examples,
        wire.M_UNIT_WEIGHT: 1,
        wire.M_TRAIN_LOSS: 0.5,
        wire.M_EPSILON: epsilon,
        wire.M_DELTA: 1e-5,
        wire.M_BUDGET_LEFT: 8.0 - epsilon,
        wire.M_BUDGET_SPENT: 1.0 if budget_exhausted else 0.0,
        wire.M_DATA_ERROR: 1.0 if data_error else 0.0,
    })
    content = RecordDict({
        wire.METRICS: metrics,
        wire.SITE: ConfigRecord({wire.SITE_NAME: site, wire.SITE_ERROR: error}),
    })
    if arrays is not None:
        content[wire.ARRAYS] = array_record(arrays)
    return Message(content, reply_to=instruction)


def evaluation_values(*, num_examples: int, accuracy: float, epsilon: float = 1.0,
                      data_error: bool = False) -> dict[str, float]:
    """The metrics an evaluation releases (an evaluate reply's, or a train reply's
    evaluation record)."""
    values = {
        wire.M_NUM_EXAMPLES: num_examples, wire.M_LOSS: 1.0 - accuracy,
        wire.M_ACCURACY: accuracy, wire.M_MACRO_F1: accuracy / 2, wire.M_AUROC: 0.5,
        wire.M_IOU: 0.1, wire.M_BLEU4: 0.0, wire.M_ROUGE_L: 0.2, wire.M_EPSILON: epsilon,
        wire.M_DELTA: 1e-5, wire.M_UNIT_WEIGHT: 1,
    }
    if data_error:
        values[wire.M_DATA_ERROR] = 1.0
    return values


def evaluate_reply(
    instruction: Message, *, site: str, num_examples: int, accuracy: float,
    epsilon: float = 1.0, data_error: bool = False,
) -> Message:
    values = evaluation_values(num_examples=num_examples, accuracy=accuracy, epsilon=epsilon,
                               data_error=data_error)
    content = RecordDict({
        wire.METRICS: MetricRecord(values),
        wire.SITE: ConfigRecord({wire.SITE_NAME: site, wire.SITE_ERROR: ""}),
    })
    return Message(content, reply_to=instruction)


def deterministic_site(index: int, num_examples: int) -> Node:
    """A fake hospital: its new state moves the global arrays towards a site-specific
    target plus a step that depends only on (site, round), so the same global model and
    round always give the same reply, whatever order or process the messages come in."""
    site = f"site-{index:02d}"

    def score(arrays: Mapping[str, np.ndarray]) -> float:
        return float(np.mean([np.tanh(np.abs(a).mean()) for a in arrays.values()]))

    def node(msg: Message) -> Message:
        cfg = msg.content.config_records[wire.CONFIG]
        rnd = int(cfg[wire.CFG_SERVER_ROUND])
        arrays = numpy_arrays(msg.content.array_records[wire.ARRAYS])
        if msg.metadata.message_type == MessageType.EVALUATE:
            return evaluate_reply(msg, site=site, num_examples=num_examples,
                                  accuracy=score(arrays), epsilon=0.5 * rnd)
        reply = train_step(msg, arrays, rnd)
        if int(cfg.get(wire.CFG_EVALUATE_FIRST, 0)):  # the incoming model: round rnd - 1's
            reply.content.metric_records[wire.EVALUATION] = MetricRecord(evaluation_values(
                num_examples=num_examples, accuracy=score(arrays), epsilon=0.5 * (rnd - 1)))
        return reply

    def train_step(msg: Message, arrays: dict[str, np.ndarray], rnd: int) -> Message:
        rng = np.random.default_rng([index, rnd])
        new = {}
        for name, a in arrays.items():
            if a.dtype.kind != "f":
                new[name] = a.copy()
                continue
            target = np.full_like(a, 0.1 * (index + 1))
            step = rng.standard_normal(a.shape).astype(a.dtype) * 0.01
            new[name] = (a + 0.3 * (target - a) + step).astype(a.dtype)
        return train_reply(msg, site=site, arrays=new, num_examples=num_examples,
                           epsilon=0.5 * rnd)

    return node
