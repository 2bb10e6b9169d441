"""Parameter averaging: the final model is an average of the global models across rounds.

`ParameterAverage` wraps the inner Flower strategy, below the reply guard, the way Flower's
DP wrappers compose (`flwr/serverapp/strategy/dp_fixed_clipping.py`). Every round it
folds the round's aggregate into an exponential moving average (decay `ema-decay`); the
rounds keep training from the aggregate itself, and only the last round hands back the
average, which is what Flower's `start()` then evaluates, checkpoints and returns.

Why (De et al. 2022, Berrada et al. 2023): under DP each round's model carries the noise
of that round; averaging the models of the last rounds averages that noise out, which a
lower learning rate would do only by learning less. It is post-processing of what the
sites released (the round aggregates): no privacy cost, nothing new leaves a site.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared_model.contract.packing import array_record


class ParameterAverage(Strategy):
    """An exponential moving average of the round aggregates; the last round returns it.

    Parameters
    ----------
    strategy : the inner strategy whose aggregates are averaged.
    decay : weight of the average so far at each round (0 < decay < 1).
    last_round : the run's last global round (the inner strategy sees global rounds).
    """

    def __init__(self, strategy: Strategy, *, decay: float, last_round: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.decay = decay
        self.last_round = last_round
        self.average: dict[str, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"ParameterAverage({self.strategy!r}, decay={self.decay})"

    def fold(self, arrays: ArrayRecord) -> None:
        """Fold one round's aggregate into the average (the first one starts it)."""
        now = {k: a.numpy() for k, a in arrays.items()}
        if self.average is None:
            self.average = {k: v.astype(np.float64) for k, v in now.items()}
            return
        for k, v in now.items():
            self.average[k] = self.decay * self.average[k] + (1 - self.decay) * v

    def averaged(self, like: ArrayRecord) -> ArrayRecord:
        """The average in `like`'s names, order and dtypes."""
        assert self.average is not None
        return array_record({k: self.average[k].astype(a.numpy().dtype)
                             for k, a in like.items()})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        self.fold(arrays)
        return (self.averaged(arrays) if server_round >= self.last_round else arrays), metrics

    # ------------------------------------------------------------ the rest: the inner's

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
