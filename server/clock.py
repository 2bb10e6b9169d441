"""The round clock: global round numbers and the round's config, around any strategy.

`RoundClock` wraps a strategy the way Flower's DP wrappers do
(`flwr/serverapp/strategy/dp_fixed_clipping.py`):

- it numbers rounds globally: a resumed run continues at round last+1, for the config the
  clients see and for every strategy inside (FedAdam's bias correction uses the round);
- it adds the ConfigRecord keys the clients expect (`wire.CFG_SERVER_ROUND`,
  `CFG_TOTAL_ROUNDS`, the learning rate of the run's schedule for the round);
- with evaluate-with-train, round r+1's train messages ask each node to evaluate the model
  they carry (round r's) first, and only the final round sends evaluate messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared_model.contract import wire


class RoundClock(Strategy):
    """Global round numbering, the round's config keys and evaluate-with-train.

    Parameters
    ----------
    strategy : the strategy it numbers the rounds of.
    total_rounds : the run's planned rounds (sent to clients as num-server-rounds).
    round_offset : rounds finished before this start (a resumed run's checkpoint round).
    round_lr : the learning rate each round's train messages ask for (the run's schedule);
        None keeps the train config's.
    evaluate_in_train : ask each train message of round r+1 to evaluate the model it
        carries (round r's) first; only the final round sends evaluate messages.
    """

    def __init__(self, strategy: Strategy, *, total_rounds: int, round_offset: int = 0,
                 round_lr: Callable[[int], float] | None = None,
                 evaluate_in_train: bool = False) -> None:
        super().__init__()
        self.strategy = strategy
        self.total_rounds = total_rounds
        self.round_offset = round_offset
        self.round_lr = round_lr
        self.evaluate_in_train = evaluate_in_train
        self.last_round = round_offset  # the last round whose evaluation is done

    def __repr__(self) -> str:
        return f"RoundClock({self.strategy!r})"

    def global_round(self, server_round: int) -> int:
        """The run's round number of Flower's round `server_round` of this start."""
        return server_round + self.round_offset

    def _config(self, config: ConfigRecord, rnd: int) -> ConfigRecord:
        """A copy of `config` (the caller's stays as it is) with the round's keys."""
        cfg = ConfigRecord(dict(config))
        cfg[wire.CFG_SERVER_ROUND] = rnd
        cfg[wire.CFG_TOTAL_ROUNDS] = self.total_rounds
        return cfg

    def summary(self) -> None:
        if self.round_offset:
            log(INFO, "\t├──> Resumed after round %d of %d", self.round_offset, self.total_rounds)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.global_round(server_round)
        log(INFO, "medfuse: global round %d/%d (train)", rnd, self.total_rounds)
        cfg = self._config(config, rnd)
        if self.round_lr is not None:
            cfg[wire.CFG_LR] = self.round_lr(rnd)
        if self.evaluate_in_train and rnd > 1:  # the arrays are round rnd-1's model
            cfg[wire.CFG_EVALUATE_FIRST] = 1
        return self.strategy.configure_train(rnd, arrays, cfg, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(self.global_round(server_round), replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.global_round(server_round)
        if self.evaluate_in_train and rnd < self.total_rounds:
            return []  # the next round's train messages evaluate this model
        return self.strategy.configure_evaluate(rnd, arrays, self._config(config, rnd), grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = self.global_round(server_round)
        metrics = self.strategy.aggregate_evaluate(rnd, replies)
        self.last_round = rnd
        return metrics
