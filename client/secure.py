"""The node's half of secure aggregation: Flower's `secaggplus_mod`, and the bridge between
its legacy FitIns/FitRes messages and medfuse's train handler.

Flower's mod masks what the handler replies in legacy form (FitRes parameters); medfuse's
handler speaks the Message API (named arrays in, named arrays out). The bridge turns the
FitIns back into the train message the handler knows, and its reply into a FitRes whose
parameters are the update (trained - global) and whose weight is the metric the server
weighs the mean by, capped at the protocol's `max-weight`. The handler, its policy checks
and its privacy ledger are the same on both paths. The masks' randomness is the node's own
(Flower draws the seeds and key pairs from `os.urandom` and `cryptography`).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from shared_model import wire

log = logging.getLogger(__name__)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the messages of a secure-aggregation round (they carry
    its config record); every other message passes untouched."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, _bridge(call_next))


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
