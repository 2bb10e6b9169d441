"""The node's half of secure aggregation: Flower's `secaggplus_mod`, and the bridge between
its legacy FitIns/FitRes messages and medfuse's train handler.

Flower's mod masks what the handler replies in legacy form (FitRes parameters); medfuse's
handler speaks the Message API (named arrays in, named arrays out). The bridge turns the
FitIns back into the train message the handler knows, and its reply into a FitRes whose
parameters are the update (trained - global) and whose weight is the metric the server
weighs the mean by, capped at the protocol's `max-weight`. The handler, its policy checks
and its privacy ledger are the same on both paths. The masks' randomness is the node's own
(Flower draws the seeds and key pairs from `os.urandom` and `cryptography`).

Flower's mod trusts the coordinator in two places where a lie unmasks one hospital, so the
node checks both before the mod sees the message (`secagg_refusal`) and answers a lie with
an error, never with key material:

- The unmask stage lists which neighbours are alive (the node sends its share of their
  mask seed) and which dropped (its share of their mask key). Flower checks only that
  enough are alive. A coordinator that lists a hospital as both collects both of its
  secrets from every honest node and reads that hospital's own update. A node refuses a
  list that names anyone twice that way, or itself as dropped (it is answering).
- The setup stage sets how many parts each key is split into and how many rebuild it.
  With a threshold of at most half the parts, a coordinator can still ask half the
  holders for a live node's seed and the other half for its key, each request looking
  honest on its own (Bell et al. 2020: SecAgg+ needs t > n/2 against a malicious
  server); with one part, the node's own part is the key. The node's config sets the
  floor (`secagg-min-threshold`, `secagg-min-shares`).

On a refusal the node also forgets the round's keys and shares (the mod's state), so that
no later message of that round can draw them out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat

from client.site import NodeConfig, SiteConfigError, node_settings
from shared_model.contract import wire
from shared_model.contract.run_config import RunConfig, RunConfigError

log = logging.getLogger(__name__)


def in_secure_round(msg: Message) -> bool:
    """Whether `msg` is one of the SecAgg+ protocol's messages (it carries its config)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def failure_error(msg: Message, code: str) -> Message:
    """The protocol's way to say a node failed: an error reply, whose reason is a code of
    `wire.SITE_ERRORS` only (the server's workflow counts the node as dropped)."""
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, code), reply_to=msg)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the messages of a secure-aggregation round (they carry
    its config record), unless the node refuses what the coordinator asks (an error reply,
    the round's keys forgotten); every other message passes untouched."""
    if not in_secure_round(msg):
        return call_next(msg, ctxt)
    try:
        node = node_settings(ctxt.node_config, RunConfig.parse(ctxt.run_config))
    except (SiteConfigError, RunConfigError) as exc:
        log.error("secure aggregation: %s", exc)  # the details (paths) stay in the log
        why = "this node cannot read its own settings (the node's log says why)"
    else:
        why = secagg_refusal(msg.content.config_records[RECORD_KEY_CONFIGS],
                             msg.metadata.dst_node_id, node)
    if not why:
        return secaggplus_mod(msg, ctxt, _bridge(call_next))
    if RECORD_KEY_STATE in ctxt.state.config_records:
        del ctxt.state.config_records[RECORD_KEY_STATE]
    log.error("secure aggregation refused: %s", why)
    return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, why), reply_to=msg)


def secagg_refusal(configs: Mapping[str, object], node_id: int, node: NodeConfig) -> str:
    """'' when this node answers the SecAgg+ message whose config record is `configs`,
    else why not: a setup whose key splitting a lying coordinator could undo, or an
    unmask request that asks for both secrets of one node (the module's docstring)."""
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        return _setup_refusal(configs, node)
    if stage == Stage.UNMASK:
        return _unmask_refusal(configs, node_id)
    return ""


def _setup_refusal(configs: Mapping[str, object], node: NodeConfig) -> str:
    shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
    if type(shares) is not int or type(threshold) is not int:
        return (f"SecAgg+ setup: {Key.SHARE_NUMBER}={shares!r} and {Key.THRESHOLD}="
                f"{threshold!r} must be integers")
    if shares < node.secagg_min_shares:
        return (f"SecAgg+ setup: {Key.SHARE_NUMBER}={shares} is below this node's "
                f"secagg-min-shares={node.secagg_min_shares} (node config): with fewer "
                "parts, this node's own part of its mask seed is all it takes")
    if threshold <= node.secagg_min_threshold * shares:
        return (f"SecAgg+ setup: {Key.THRESHOLD}={threshold} of {shares} parts is not more "
                f"than this node's secagg-min-threshold={node.secagg_min_threshold:g} of "
                "them (node config): a coordinator could then ask some nodes for a live "
                "node's mask seed and the others for its key, and unmask it")
    return ""


def _unmask_refusal(configs: Mapping[str, object], node_id: int) -> str:
    active = _node_ids(configs.get(Key.ACTIVE_NODE_ID_LIST))
    dropped = _node_ids(configs.get(Key.DEAD_NODE_ID_LIST))
    if active is None or dropped is None:
        return (f"SecAgg+ unmask: {Key.ACTIVE_NODE_ID_LIST} and {Key.DEAD_NODE_ID_LIST} must "
                "be lists of node ids")
    both = sorted(set(active) & set(dropped))
    if both:
        return (f"SecAgg+ unmask: node(s) {', '.join(map(str, both))} listed both as active "
                "and as dropped: answering would hand the coordinator both the mask seed "
                "and the mask key of each, and with them its update")
    if node_id in dropped:
        return (f"SecAgg+ unmask: this node ({node_id}) is listed as dropped while it is "
                "asked to answer: its own part of its mask key is not sent")
    return ""


def _node_ids(value: object) -> list[int] | None:
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        return None
    return value


def _bridge(call_next):  # type: ignore[no-untyped-def]
    def handle(msg: Message, ctxt: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        keys = str(config.pop(wire.CFG_ARRAY_KEYS)).split(",")
        weight_key = str(config.pop(wire.CFG_WEIGHT_KEY))
        max_weight = int(config.pop(wire.CFG_MAX_WEIGHT))  # type: ignore[arg-type]
        start = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
        inner = Message(RecordDict({
            wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in start.items()}),
            wire.CONFIG: ConfigRecord(config),  # type: ignore[arg-type]
        }), metadata=msg.metadata)
        reply = call_next(inner, ctxt)
        if reply.has_error():
            raise RuntimeError(f"the train handler failed: {reply.error.reason}")
        return Message(fitres_content(reply.content, start, weight_key, max_weight),
                       reply_to=msg)

    return handle


def fitres_content(content: RecordDict, start: dict[str, np.ndarray], weight_key: str,
                   max_weight: int) -> RecordDict:
    """The handler's reply as the FitRes Flower's mod masks: the update and its weight; a
    reply without arrays (a refusal, a data error) weighs 0 and adds nothing to the sum."""
    metrics: dict = dict(content.metric_records[wire.METRICS])
    metrics.update(content.config_records[wire.SITE])  # site name and error, in clear
    if wire.ARRAYS in content.array_records:
        trained = content.array_records[wire.ARRAYS]
        update = [trained[k].numpy().astype(np.float32) - start[k].astype(np.float32)
                  for k in start]
        weight = int(metrics[weight_key])
    else:
        update = [np.zeros(v.shape, np.float32) for v in start.values()]
        weight = 0
    if weight > max_weight:
        log.warning("this update weighs %d examples; secure aggregation caps it at %d "
                    "(run config secagg-max-weight)", weight, max_weight)
        weight = max_weight
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                    num_examples=weight, metrics=metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)
