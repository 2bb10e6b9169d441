"""The hospital's ClientApp: the only client module that imports Flower.

Each message: read the run config and the server's round config, decide which data this
node trains on (`client.site`), open it (`shared_model.dataset`), train or evaluate in
plain PyTorch/Opacus (`client.local`) and pack the reply. Only arrays, scalar metrics and
the site's name (plus a human-readable error) leave the node. A node whose data cannot be
opened, or whose privacy budget is spent, replies so and never raises: the server logs it
with the node id and carries on with the others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local import DPSettings, DPSetupError, local_evaluate, local_train
from client.privacy import (
    LedgerError,
    effective_budget,
    effective_delta,
    epsilon_spent,
    ledger_lock,
    load_ledger,
    open_ledger,
)
from client.site import SiteChoice, SiteConfigError, resolve_site
from shared_model import wire
from shared_model.dataset import SiteData, SiteError, open_site
from shared_model.run_config import RunConfig
from shared_model.tokenizer import Tokenizer
from shared_model.train import pick_device

# Opacus calls logging.basicConfig(); without this every flwr line is printed twice.
logging.getLogger("flwr").propagate = False
log = logging.getLogger(__name__)

# Flower mods that touch updates (clipping, local DP) belong on @app.train only: on
# @app.evaluate they error or hang the run.
TRAIN_MODS: list = []

app = ClientApp()


class _Unusable(Exception):
    """This node cannot take part in this message; `str()` is the message for a person."""

    def __init__(self, site_name: str, message: str) -> None:
        super().__init__(message)
        self.site_name = site_name


# ----------------------------------------------------------------- handlers


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    run = RunConfig.parse(context.run_config)
    cfg = _round_config(msg)
    server_round = int(cfg.get(wire.CFG_SERVER_ROUND, 1))
    total_rounds = int(cfg.get(wire.CFG_TOTAL_ROUNDS, run.num_server_rounds))
    try:
        choice, site, device = _open(context.node_config, run)
    except _Unusable as exc:
        return _data_error(msg, exc.site_name, str(exc))
    global_state = _state(msg)
    dp = DPSettings(
        enabled=run.dp,
        noise_multiplier=run.noise_multiplier or None,  # 0 = derive from the budget
        max_grad_norm=run.max_grad_norm,
        accountant=run.accountant,
        secure_mode=run.secure_mode,
    )
    kwargs = dict(
        epochs=int(cfg.get(wire.CFG_LOCAL_EPOCHS, run.local_epochs)),
        lr=float(cfg.get(wire.CFG_LR, run.lr)),
        batch_size=run.batch_size,
        proximal_mu=float(cfg.get(wire.CFG_PROXIMAL_MU, run.proximal_mu)),
        dp=dp,
        run_id=int(context.run_id),
        server_round=server_round,
        rounds_left=max(total_rounds - server_round + 1, 1),
        device=device,
        seed=run.seed,
    )
    model_cfg = run.model()
    try:
        if not run.dp:
            outcome = local_train(model_cfg, site, global_state, ledger=None, **kwargs)
        else:
            budget = effective_budget(run.epsilon, choice.epsilon_budget)
            delta = effective_delta(run.delta, choice.delta)
            with ledger_lock(choice.state_dir):
                try:
                    ledger = open_ledger(
                        choice.state_dir, site_name=choice.site_name,
                        data_path=choice.data_path, epsilon_budget=budget, delta=delta,
                    )
                except LedgerError as exc:
                    return _refused(msg, choice.site_name, f"{choice.site_name}: {exc}",
                                    math.nan, delta, math.nan)
                outcome = local_train(model_cfg, site, global_state, ledger=ledger, **kwargs)
    except DPSetupError as exc:
        return _data_error(msg, choice.site_name, f"{choice.site_name}: {exc}")

    if outcome.refused:
        return _refused(msg, choice.site_name, outcome.reason, outcome.epsilon, outcome.delta,
                        outcome.epsilon_left)
    assert outcome.state is not None
    log.info(
        "%s round %d: %d examples, loss %.4f, epsilon %.4g (delta %g, %.4g left)",
        choice.site_name, server_round, outcome.num_examples, outcome.train_loss,
        outcome.epsilon, outcome.delta, outcome.epsilon_left,
    )
    metrics = _finite({
        wire.M_NUM_EXAMPLES: outcome.num_examples,
        wire.M_TRAIN_LOSS: outcome.train_loss,
        wire.M_EPSILON: outcome.epsilon,
        wire.M_DELTA: outcome.delta,
        wire.M_BUDGET_LEFT: outcome.epsilon_left,
        wire.M_BUDGET_SPENT: 0,
        wire.M_DATA_ERROR: 0,
    })
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(outcome.state),
        wire.METRICS: MetricRecord(metrics),
        wire.SITE: _site_record(choice.site_name, ""),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    run = RunConfig.parse(context.run_config)
    try:
        choice, site, device = _open(context.node_config, run)
    except _Unusable as exc:
        return _data_error(msg, exc.site_name, str(exc))
    split = str(msg.content.config_records.get(wire.CONFIG, {}).get(wire.CFG_EVAL_SPLIT, "val"))
    if split not in ("val", "test"):
        return _data_error(msg, choice.site_name, f"unknown {wire.CFG_EVAL_SPLIT}={split!r}")
    metrics, n = local_evaluate(run.model(), site, _state(msg), device, split=split)
    epsilon, delta = _privacy_so_far(run, choice)
    values: dict[str, float | int] = {wire.M_NUM_EXAMPLES: n, wire.M_DATA_ERROR: 0}
    values |= metrics
    values |= {wire.M_EPSILON: epsilon, wire.M_DELTA: delta}
    content = RecordDict({
        wire.METRICS: MetricRecord(_finite(values)),
        wire.SITE: _site_record(choice.site_name, ""),
    })
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------- helpers


def _open(node_config: Mapping, run: RunConfig) -> tuple[SiteChoice, SiteData, torch.device]:
    """Which data, which device, and the opened site; `_Unusable` with a message if not."""
    try:
        choice = resolve_site(node_config, run)
    except SiteConfigError as exc:
        raise _Unusable(_name_hint(node_config), str(exc)) from None
    torch.set_num_threads(choice.threads)
    try:
        device = pick_device(choice.device)
    except (ValueError, RuntimeError) as exc:
        raise _Unusable(choice.site_name, f"{choice.site_name}: {exc}") from None
    model_cfg = run.model()
    try:
        site = open_site(
            choice.data_path, labels=run.label_set, model=model_cfg,
            tokenizer=Tokenizer(model_cfg.vocab_size),
        )
    except (SiteError, OSError) as exc:
        raise _Unusable(choice.site_name, f"{choice.site_name}: {exc}") from None
    if len(site.train) == 0:
        raise _Unusable(choice.site_name, f"{choice.site_name}: no training rows")
    return choice, dataclasses.replace(site, name=choice.site_name), device


def _round_config(msg: Message) -> ConfigRecord:
    records = msg.content.config_records
    return records[wire.CONFIG] if wire.CONFIG in records else ConfigRecord()


def _state(msg: Message) -> dict[str, torch.Tensor]:
    arrays = msg.content.array_records[wire.ARRAYS]
    # copies: Flower's arrays may be read-only NumPy buffers
    return {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}


def _privacy_so_far(run: RunConfig, choice: SiteChoice) -> tuple[float, float]:
    """(cumulative epsilon, delta) from the ledger, read only; nan when unreadable."""
    if not run.dp:
        return math.inf, 0.0
    delta = effective_delta(run.delta, choice.delta)
    try:
        ledger = load_ledger(choice.state_dir)
    except LedgerError as exc:
        if not (Path(choice.state_dir) / "privacy-ledger.json").exists():
            return 0.0, delta  # nothing trained on this data yet
        log.warning("%s: %s", choice.site_name, exc)
        return math.nan, delta
    return epsilon_spent(ledger, run.accountant), ledger.delta


def _finite(values: Mapping[str, float | int]) -> dict[str, float | int]:
    """Drop NaN-valued metrics rather than send NaN (inf is kept: 'no DP' is infinite)."""
    return {
        k: v for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))
    }


def _site_record(name: str, error: str) -> ConfigRecord:
    return ConfigRecord({wire.SITE_NAME: name, wire.SITE_ERROR: error})


def _data_error(msg: Message, site_name: str, error: str) -> Message:
    log.error("%s", error)
    metrics = MetricRecord({wire.M_NUM_EXAMPLES: 0, wire.M_DATA_ERROR: 1, wire.M_BUDGET_SPENT: 0})
    content = RecordDict({wire.METRICS: metrics, wire.SITE: _site_record(site_name, error)})
    return Message(content, reply_to=msg)


def _refused(
    msg: Message, site_name: str, reason: str, epsilon: float, delta: float, left: float
) -> Message:
    log.warning("%s", reason)
    metrics = _finite({
        wire.M_NUM_EXAMPLES: 0,
        wire.M_EPSILON: epsilon,
        wire.M_DELTA: delta,
        wire.M_BUDGET_LEFT: left,
        wire.M_BUDGET_SPENT: 1,
        wire.M_DATA_ERROR: 0,
    })
    content = RecordDict({
        wire.METRICS: MetricRecord(metrics), wire.SITE: _site_record(site_name, reason)
    })
    return Message(content, reply_to=msg)


def _name_hint(node_config: Mapping) -> str:
    """A name for a node whose config could not be used (for the server's log)."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"])).name or str(node_config["data-path"])
    if "partition-id" in node_config:
        return f"partition-{node_config['partition-id']}"
    return "unknown-site"
