"""The global model sent down in 16 bits (run config `model-dtype = "float16"`).

`ModelDownload` wraps the strategy below the reply guard, the way Flower's DP wrappers
compose (`flwr/serverapp/strategy/dp_fixed_clipping.py`): the messages the inner strategy
builds carry each float32 array of the global model as float16 (half the bytes down), and
the node casts them back to float32 before it trains (`client/app.py`).

The server's own float32 model stays the authoritative one, so the rounding of the
download never accumulates in it:

- a reply that carries an update (update-dtype float16/bfloat16: trained - what the node
  received) is added by the guard onto the float32 global model, as always;
- a reply that carries trained weights (update-dtype float32) was trained from the
  rounded model: it is moved onto the float32 model here, `weights + (global - rounded)`,
  before the inner strategy (and Flower's client-level DP wrapper, which clips
  `weights - global`) sees it. What a reply carries is the run's update-dtype, not the
  reply's own word: below the guard a reply holds its arrays and metrics only.

Either way the inner strategy gets `global + (trained - received)`: the node's own
change, nothing of the rounding. An array whose values do not fit float16 (|x| > 65504)
goes down in float32 (it would arrive as inf).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared_model.contract import wire
from shared_model.contract.packing import array_record

_FP16_MAX = float(np.finfo(np.float16).max)


def narrowed(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each float32 array as float16 where its values fit; every other array as it is."""
    out = {}
    for name, a in arrays.items():
        fits = a.dtype == np.float32 and (a.size == 0 or float(np.abs(a).max()) <= _FP16_MAX)
        out[name] = a.astype(np.float16) if fits else a
    return out


def rebased(weights: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
            reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights trained from `sent` (the rounded model) moved onto `reference` (the float32
    model): `weights + (reference - sent)` for each array that went down narrowed."""
    out = {}
    for name, w in weights.items():
        if name in sent and sent[name].dtype != reference[name].dtype:
            shift = reference[name].astype(np.float64) - sent[name].astype(np.float64)
            w = (np.asarray(w, dtype=np.float64) + shift).astype(reference[name].dtype)
        out[name] = w
    return out


def _with_arrays(content: RecordDict, arrays: Mapping[str, np.ndarray]) -> RecordDict:
    """A copy of `content` whose model arrays (`wire.ARRAYS`) are `arrays`."""
    out = RecordDict(dict(content.items()))
    out[wire.ARRAYS] = array_record(arrays)
    return out


class ModelDownload(Strategy):
    """The inner strategy with the global model sent down in float16 (module docstring).

    Parameters
    ----------
    strategy : the inner strategy (Flower's, its DP wrapper, or the parameter average).
    replies_carry_weights : whether train replies carry trained weights (update-dtype
        float32), which are moved onto the float32 model; else updates, which the guard
        has added onto it already.
    """

    def __init__(self, strategy: Strategy, *, replies_carry_weights: bool) -> None:
        super().__init__()
        self.strategy = strategy
        self.replies_carry_weights = replies_carry_weights
        self._reference: dict[str, np.ndarray] = {}  # the float32 model of this round
        self._sent: dict[str, np.ndarray] = {}  # what went down, as the node received it

    def __repr__(self) -> str:
        return f"ModelDownload({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def _narrow(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """The messages with the model in float16 (one narrowed copy, shared by all)."""
        self._reference = {k: v.numpy() for k, v in arrays.items()}
        self._sent = narrowed(self._reference)
        out = list(messages)
        shared: dict[int, RecordDict] = {}  # Flower's strategies share one RecordDict
        for msg in out:
            if msg.has_error() or wire.ARRAYS not in msg.content.array_records:
                continue
            key = id(msg.content)
            if key not in shared:
                shared[key] = _with_arrays(msg.content, self._sent)
            msg.content = shared[key]
        return out

    def _rebase(self, reply: Message) -> Message:
        """A weights reply moved onto the float32 model; an update (decoded by the guard
        onto the float32 model already) or a reply without arrays as it is."""
        arrays = reply.content.array_records.get(wire.ARRAYS)
        if (not self.replies_carry_weights or reply.has_error() or arrays is None
                or not self._sent):
            return reply
        weights = rebased({k: v.numpy() for k, v in arrays.items()}, self._sent,
                          self._reference)
        return Message(content=_with_arrays(reply.content, weights), metadata=reply.metadata)

    # ------------------------------------------------------------ Strategy API

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._narrow(self.strategy.configure_train(server_round, arrays, config, grid),
                            arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, [self._rebase(r) for r in replies])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        reference, sent = self._reference, self._sent  # an evaluation changes no weights
        out = self._narrow(messages, arrays)
        self._reference, self._sent = reference, sent
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
