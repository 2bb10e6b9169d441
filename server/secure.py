"""Secure aggregation: Flower's SecAgg+ under medfuse's Message-API strategies.

Flower 1.42 implements SecAgg+ only on its legacy path: `SecAggPlusWorkflow` drives a
legacy `Strategy` on a `LegacyContext`. medfuse's strategies are Message-API strategies
that send each node one train message and expect one reply. `SecureAggregationGrid` sits
between the two: it hands every other message to Flower's Grid unchanged, and for a
round's train messages runs Flower's workflow, which exchanges four messages with each
node (setup, share keys, collect masked vectors, unmask) and yields only the weighted mean
of the updates. The strategy then receives one reply per hospital that took part, each
carrying that mean in place of the hospital's own update, as Flower's workflow hands its
legacy strategies (its unmask stage sets every FitRes's parameters to the aggregate),
beside the hospital's metrics, which travel in clear.

What a node masks is its update (trained - global, per array), multiplied by its weight
over `max-weight` and quantised to `bits` bits within [-clip, clip]: updates are small, so
the quantisation step is too. The server adds the mean update to the global model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, FitRes, Parameters
from flwr.common import parameters_to_ndarrays as to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore import log

from server.grid import DelegatingGrid
from shared_model.contract import wire
from shared_model.contract.compression import apply_update
from shared_model.contract.packing import array_record
from shared_model.contract.run_config import RunConfig

MODULUS_BITS = 32  # Flower's modulus: every masked sum is taken mod 2**32


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol's settings (run config `secagg-*`)."""

    shares: float  # share of the round's nodes each node splits its keys among
    threshold: float  # share of those parts that rebuilds a dropped node's mask
    clip: float  # each weighted update coordinate is clipped to [-clip, clip]
    bits: int  # quantisation bits per coordinate
    max_weight: int  # an update's weight (examples) over this is the fraction masked

    @classmethod
    def of(cls, run: RunConfig) -> SecAggSettings:
        return cls(run.secagg_shares, run.secagg_threshold, run.secagg_clip,
                   run.secagg_bits, run.secagg_max_weight)

    def workflow(self, timeout: float) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(
            num_shares=self.shares, reconstruction_threshold=self.threshold,
            max_weight=float(self.max_weight), clipping_range=self.clip,
            quantization_range=2**self.bits, modulus_range=2**MODULUS_BITS, timeout=timeout,
        )


class SecureAggregationGrid(DelegatingGrid):
    """Flower's Grid, except that a round's train messages go through SecAgg+."""

    def __init__(self, grid: Grid, settings: SecAggSettings, weight_key: str) -> None:
        super().__init__(grid)
        self.settings = settings
        self.weight_key = weight_key

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        if not msgs or msgs[0].metadata.message_type != MessageType.TRAIN:
            return self._grid.send_and_receive(msgs, timeout=timeout)
        return secure_round(self._grid, msgs, self.settings, self.weight_key,
                            timeout=3600.0 if timeout is None else timeout)


@dataclass
class _OneRound(LegacyStrategy):
    """The legacy strategy Flower's workflow drives for one round: it hands out the FitIns
    built from the Message-API strategy's messages and keeps what the unmask stage gives."""

    fitins: dict[int, FitIns]
    results: list[tuple[GridClientProxy, FitRes]] | None = None
    failures: list = field(default_factory=list)

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        clients = client_manager.all()
        return [(clients[str(nid)], ins) for nid, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    # the rest of the legacy interface is unused: evaluation takes the plain path
    def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


def _fitins(msg: Message, keys: list[str], settings: SecAggSettings, weight_key: str) -> FitIns:
    """The legacy FitIns of one train message: its arrays in order, its config, and what
    the node needs to mask its update (the array names, the weight and its cap)."""
    content = msg.content
    config = dict(content.config_records[wire.CONFIG]) if wire.CONFIG in content else {}
    config.update({wire.CFG_ARRAY_KEYS: ",".join(keys), wire.CFG_WEIGHT_KEY: weight_key,
                   wire.CFG_MAX_WEIGHT: settings.max_weight})
    params = compat.arrayrecord_to_parameters(content.array_records[wire.ARRAYS],
                                              keep_input=True)
    return FitIns(parameters=params, config=config)  # type: ignore[arg-type]


def _legacy_context(grid: Grid, rnd: int, arrays: ArrayRecord, strategy: _OneRound,
                    nodes: Iterable[int]) -> LegacyContext:
    manager = SimpleClientManager()
    for nid in nodes:
        manager.register(GridClientProxy(nid, grid, grid.run.run_id))
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                run_config={}),
        config=ServerConfig(num_rounds=rnd), strategy=strategy, client_manager=manager,
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: rnd})
    return context


def mean_update_applied(global_arrays: ArrayRecord, update: Parameters) -> ArrayRecord:
    """global + the unmasked mean update, in the global's names order and dtypes."""
    names = list(global_arrays.keys())
    weights = apply_update({k: global_arrays[k].numpy() for k in names},
                           dict(zip(names, to_ndarrays(update), strict=True)))
    return array_record({k: weights[k] for k in names})


def _reply(msg: Message, fitres: FitRes, new_global: ArrayRecord) -> Message:
    """The strategy's reply for one hospital: the secure mean in place of its update (none
    when it contributed no weight: a refusal or a data error), its metrics, its name."""
    metrics = dict(fitres.metrics)
    site = {key: str(metrics.pop(key, ""))
            for key in (wire.SITE_NAME, wire.SITE_ERROR, wire.SITE_DETAIL)}
    scalars = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    content = RecordDict({wire.METRICS: MetricRecord(scalars), wire.SITE: ConfigRecord(site)})
    if fitres.num_examples > 0:
        content.array_records[wire.ARRAYS] = new_global
    return Message(content, reply_to=msg)


def secure_round(grid: Grid, msgs: list[Message], settings: SecAggSettings, weight_key: str,
                 *, timeout: float) -> list[Message]:
    """One round's training through Flower's SecAgg+: the replies the strategy aggregates."""
    first = msgs[0]
    rnd = int(first.content.config_records[wire.CONFIG][wire.CFG_SERVER_ROUND])
    if len(msgs) * 2**settings.bits >= 2**MODULUS_BITS:
        raise ValueError(
            f"round {rnd}: {len(msgs)} hospitals at secagg-bits={settings.bits} overflow "
            f"the 2**{MODULUS_BITS} modulus of the masked sum; use fewer bits")
    global_arrays = first.content.array_records[wire.ARRAYS]
    keys = list(global_arrays.keys())
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    strategy = _OneRound({nid: _fitins(m, keys, settings, weight_key)
                          for nid, m in by_node.items()})
    context = _legacy_context(grid, rnd, global_arrays, strategy, by_node)
    log(INFO, "round %d: secure aggregation (SecAgg+) with %d hospitals", rnd, len(msgs))
    try:
        settings.workflow(timeout)(grid, context)
    except ZeroDivisionError:  # every hospital sent weight 0: refusals, no update
        strategy.results = None
    if not strategy.results:
        log(WARNING, "round %d: secure aggregation halted (too few hospitals took part, "
            "or none sent an update); the global model stays", rnd)
        return []
    new_global = mean_update_applied(global_arrays, strategy.results[0][1].parameters)
    return [_reply(by_node[proxy.node_id], fitres, new_global)
            for proxy, fitres in strategy.results]
