"""The hospital's ClientApp: the only client module that imports Flower.

Each message: read the run config and the server's round config, decide which data this
node trains on and what it accepts (`client.site`), open the data
(`shared_model.dataset`), train or evaluate in plain PyTorch/Opacus (`client.local`),
charge the release to the data's ledger (`client.privacy`) and pack the reply.

What a reply holds: arrays, scalar metrics and the site's name (plus a message for a
person when the node does not take part). Under DP the arrays are a DP-SGD release, the
number of examples a noised count, and the training loss is not sent; evaluation metrics
are noised and charged to the evaluation budget (or exact and recorded as infinite
epsilon, where the node says so). `docs/privacy.md` lists every release. A node whose
data cannot be opened, whose budget is spent, or that refuses what the round asks,
replies so and never raises: the server logs it with the node id and carries on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local import DPSettings, DPSetupError, TrainOutcome, local_cases, local_train
from client.privacy import (
    BudgetError,
    Ledger,
    LedgerError,
    LedgerStore,
    at_most,
    data_identity,
    noise_for_budget,
)
from client.release import private_metrics
from client.secure import secure_aggregation_mod
from client.site import (
    NodeConfig,
    RoundAsk,
    SiteChoice,
    SiteConfigError,
    resolve_site,
    round_refusal,
)
from shared_model import compression, packing, wire
from shared_model.dataset import SiteData, SiteError, open_site
from shared_model.run_config import RunConfig, RunConfigError
from shared_model.tokenizer import Tokenizer
from shared_model.train import CaseResults, pick_device, summarise

# Opacus calls logging.basicConfig(); without this every flwr line is printed twice.
logging.getLogger("flwr").propagate = False
log = logging.getLogger(__name__)



def central_clipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` when the server runs client-level DP with client-side
    clipping (its wrapper sends the clipping norm in the round's config); otherwise the
    message passes untouched. A reply without an update (a refusal, a data error) passes
    as it is: there is nothing to clip."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if not any(KEY_CLIPPING_NORM in c for c in msg.content.config_records.values()):
        return call_next(msg, ctxt)
    inner: dict[str, Message] = {}

    def capture(m: Message, c: Context) -> Message:
        inner["reply"] = call_next(m, c)
        return inner["reply"]

    out = fixedclipping_mod(msg, ctxt, capture)
    reply = inner.get("reply")
    if reply is not None and not reply.has_error() and not reply.content.array_records:
        return reply
    return out


def packed_arrays_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """The model arrays travel packed into one array (`shared_model/packing.py`: Flower
    moves every array as an object of its own, one remote call each): unpack what comes
    in, pack what goes out. Outermost, so that every other mod and the handler see the
    arrays by name."""
    return packing.packed(call_next(packing.unpacked(msg), ctxt))


def _epsilon_now(choice: SiteChoice) -> float | None:
    """The training epsilon already spent on this data (None before its first release);
    read from the store without hashing the data again (the ledger notes its folders)."""
    folder = str(choice.data_path.resolve())
    try:
        for ledger in LedgerStore(choice.state_dir).ledgers():
            if folder in ledger.data_paths:
                return ledger.epsilon("train")
    except (LedgerError, OSError):
        return None
    return None


def audit_log_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Append to the node's audit log (beside its ledger store) what this message brought
    and what the node sent back: array names, shapes, dtypes, bytes and a digest, every
    metric, the epsilon before and after. Written before the reply leaves the node."""
    from shared_model import audit_log

    try:
        choice = resolve_site(ctxt.node_config, RunConfig.parse(ctxt.run_config))
    except (SiteConfigError, RunConfigError):
        return call_next(msg, ctxt)  # the handler answers with the reason
    before = _epsilon_now(choice)
    reply = call_next(msg, ctxt)

    def arrays(m: Message) -> dict | None:
        records = list(m.content.array_records.values()) if not m.has_error() else []
        return audit_log.arrays_summary(
            {k: v.numpy() for k, v in records[0].items()}) if records else None

    metrics = {} if reply.has_error() else {
        k: v for rec in reply.content.metric_records.values() for k, v in rec.items()}
    audit_log.append(choice.state_dir / audit_log.LOG_FILE, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "who": choice.site_name,
        "what": f"{msg.metadata.message_type} run {ctxt.run_id}",
        "received": {"arrays": arrays(msg), "config": _config_summary(msg)},
        "arrays": arrays(reply), "metrics": metrics,
        "config": {} if reply.has_error() else _config_summary(reply),
        "error": reply.error.reason if reply.has_error() else "",
        "epsilon_before": before, "epsilon_after": metrics.get(wire.M_EPSILON),
    })
    return reply


def _config_summary(msg: Message) -> dict:
    """A message's config values for the audit log; bytes (keys, ciphertexts, masked
    vectors of secure aggregation) as their size and digest."""
    from shared_model import audit_log

    return {k: audit_log.scalar_or_digest(v)
            for rec in msg.content.config_records.values() for k, v in rec.items()}


# Flower mods that touch updates (clipping, masking) belong on @app.train only: on
# @app.evaluate they error or hang the run. Outermost, the arrays are unpacked on the way
# in and packed on the way out (the same bytes). The audit log sees every message next,
# first and last, so it records what leaves: the update after clipping, or under secure
# aggregation the masked vector. Clipping sits inside the masking: a node clips its own
# update, then masks it.
TRAIN_MODS: list = [packed_arrays_mod, audit_log_mod, secure_aggregation_mod,
                    central_clipping_mod]
EVALUATE_MODS: list = [packed_arrays_mod, audit_log_mod]

app = ClientApp()

# What every message starts with (`_begin`): run config, round config, the site chosen, its
# opened data, the device, the server round and the rounds planned.
_Begun = tuple[RunConfig, ConfigRecord, SiteChoice, SiteData, torch.device, int, int]


class _Unusable(Exception):
    """This node cannot take part in this message; `str()` is the message for a person."""

    def __init__(self, site_name: str, message: str) -> None:
        super().__init__(message)
        self.site_name = site_name


# ----------------------------------------------------------------- handlers


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Check the round against the node's policy, train (privately unless the node allows
    otherwise) with the ledger charged first, and reply with the update or the reason.
    When the server asks (`evaluate-first`), the model the message carries is evaluated
    first, exactly as an evaluate message would, and the reply holds both."""
    t0 = time.perf_counter()
    begun = _begin(msg, context)
    if isinstance(begun, Message):
        return begun
    evaluation: dict[str, float | int] | str | None = None
    if int(begun[1].get(wire.CFG_EVALUATE_FIRST, 0)):  # one message a round
        try:
            evaluation = _evaluation(begun, int(context.run_id), _state(msg),
                                     in_train=True)
        except _NoEvaluation as exc:
            log.warning("%s", exc)
            evaluation = str(exc)
    return _with_evaluation(_train(msg, context, begun, t0), evaluation)


def _train(msg: Message, context: Context, begun: _Begun, t0: float) -> Message:
    """The training part of a train message (after any evaluation of its arrays)."""
    run, cfg, choice, site, device, server_round, total_rounds = begun
    recipe = run.recipe()
    ask = RoundAsk(
        lr=float(cfg.get(wire.CFG_LR, recipe.lr)),
        local_epochs=int(cfg.get(wire.CFG_LOCAL_EPOCHS, run.local_epochs)),
        batch_size=run.batch_size,
        proximal_mu=float(cfg.get(wire.CFG_PROXIMAL_MU, run.proximal_mu)),
    )
    why = _policy_refusal(choice.node, ask, run)
    if why:
        return _refused(msg, choice.site_name, f"{choice.site_name}: {why}")
    store = LedgerStore(choice.state_dir)
    start = _state(msg)
    try:
        with store.lock():
            outcome = local_train(
                run.model(), site, start, epochs=ask.local_epochs, lr=ask.lr,
                batch_size=ask.batch_size, proximal_mu=ask.proximal_mu,
                dp=_dp_settings(run, choice.node),
                ledger=_ledger(store, choice, run), save_ledger=store.save,
                run_id=int(context.run_id), server_round=server_round,
                rounds_left=max(total_rounds - server_round + 1, 1), device=device,
                seed=run.seed, optimizer=recipe.optimizer, momentum=recipe.momentum,
                train_layers=recipe.train_layers,
            )
    except LedgerError as exc:
        return _refused(msg, choice.site_name, f"{choice.site_name}: {exc}")
    except DPSetupError as exc:
        return _data_error(msg, choice.site_name, f"{choice.site_name}: {exc}")
    if outcome.refused:
        return _refused(msg, choice.site_name, outcome.reason, budget=True,
                        privacy=(outcome.epsilon, outcome.delta, outcome.epsilon_left))
    log.info(
        "%s round %d: %d examples (released), loss %.4f (not released under DP), epsilon %.4g "
        "(delta %g, %.4g left)", choice.site_name, server_round, outcome.num_examples,
        outcome.train_loss, outcome.epsilon, outcome.delta, outcome.epsilon_left,
    )
    return _update_reply(msg, choice.site_name, outcome, private=run.dp,
                         seconds=time.perf_counter() - t0,
                         arrays=compression.encode(outcome.state, start, run.update_dtype),
                         encoding=compression.encoding_of(run.update_dtype))


def _policy_refusal(node: NodeConfig, ask: RoundAsk, run: RunConfig) -> str:
    """Why this node refuses the round ('' when it does not)."""
    if not run.dp and not node.allow_non_private:
        return ("the run asks for training without differential privacy (dp=false) and this "
                "node does not allow it (node config allow-non-private=false)")
    return round_refusal(node, ask)


def _dp_settings(run: RunConfig, node: NodeConfig) -> DPSettings:
    return DPSettings(
        enabled=run.dp,
        noise_multiplier=run.noise_multiplier or None,  # 0 = derive from the budget
        max_grad_norm=run.max_grad_norm,
        accountant=run.accountant,
        secure_mode=run.secure_mode,
        reserve=node.epsilon_reserve,
    )


def _update_reply(msg: Message, site_name: str, outcome: TrainOutcome, *, private: bool,
                  seconds: float, arrays: dict[str, torch.Tensor], encoding: str) -> Message:
    """The update (`arrays`, in `encoding`) and what is released with it (no train loss
    under DP)."""
    assert outcome.state is not None
    values: dict[str, float | int] = {
        wire.M_NUM_EXAMPLES: outcome.num_examples,
        wire.M_UNIT_WEIGHT: 1,
        wire.M_EPSILON: outcome.epsilon,
        wire.M_DELTA: outcome.delta,
        wire.M_BUDGET_LEFT: outcome.epsilon_left,
        wire.M_BUDGET_SPENT: 0,
        wire.M_DATA_ERROR: 0,
        wire.M_REFUSED: 0,
        wire.M_SECONDS: seconds,
    }
    if not private:  # a non-private release already gives everything away
        values[wire.M_TRAIN_LOSS] = outcome.train_loss
    site = _site_record(site_name, "")
    site[wire.SITE_UPDATE] = encoding
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(arrays),
        wire.METRICS: MetricRecord(_finite(values)),
        wire.SITE: site,
    })
    return Message(content, reply_to=msg)


@app.evaluate(mods=EVALUATE_MODS)
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the asked split and release what the node's policy
    allows (noised and charged, exact, or nothing)."""
    t0 = time.perf_counter()
    begun = _begin(msg, context)
    if isinstance(begun, Message):
        return begun
    site_name = begun[2].site_name
    try:
        values = _evaluation(begun, int(context.run_id), _state(msg))
    except _NoEvaluation as exc:
        return (_data_error if exc.data_error else _refused)(msg, site_name, str(exc))
    values[wire.M_SECONDS] = time.perf_counter() - t0
    content = RecordDict({
        wire.METRICS: MetricRecord(_finite(values)),
        wire.SITE: _site_record(site_name, ""),
    })
    return Message(content, reply_to=msg)


class _NoEvaluation(Exception):
    """This node releases no evaluation for this message; `str()` is the reason for a
    person, `data_error` when the data (not the node's policy) is why."""

    def __init__(self, message: str, *, data_error: bool = False) -> None:
        super().__init__(message)
        self.data_error = data_error


def _evaluation(begun: _Begun, run_id: int, state: dict[str, torch.Tensor], *,
                in_train: bool = False) -> dict[str, float | int]:
    """Evaluate `state` on the asked split and return what the node's policy releases
    (noised and charged, or exact and recorded), the ledger saved first; `_NoEvaluation`
    with the reason when it releases nothing. Shared by the evaluate message and the
    evaluation inside a train message: the same policy, cap and ledger. Inside round r's
    train message the model is round r-1's (`in_train`): the final model's evaluation is
    still to come, so the noise is planned for it too. Under DP the last evaluation the
    cap allows is kept for the final model (a run longer than the cap would otherwise
    never evaluate its result)."""
    run, cfg, choice, site, device, server_round, total_rounds = begun
    evaluated_round = server_round - int(in_train)  # the round whose model this is
    split = str(cfg.get(wire.CFG_EVAL_SPLIT, "val"))
    if split not in ("val", "test"):
        raise _NoEvaluation(f"unknown {wire.CFG_EVAL_SPLIT}={split!r}", data_error=True)
    node = choice.node
    if node.evaluation == "off":
        raise _NoEvaluation(f"{choice.site_name}: this node releases no evaluation metrics "
                            "(node config evaluation='off')")
    data = site.val if split == "val" else site.test
    if len(data) == 0:
        raise _NoEvaluation(f"{choice.site_name}: no {split} rows", data_error=True)
    store = LedgerStore(choice.state_dir)
    try:
        with store.lock():
            ledger = _ledger(store, choice, run)
            done = sum(1 for e in ledger.entries if e.bucket == "evaluation"
                       and e.run_id == run_id and not e.note.startswith("inherited"))
            # the last evaluation a run may have is kept for its final model
            final = evaluated_round >= total_rounds
            cap = node.max_evaluations_per_run - (0 if final else 1)
            if node.evaluation == "dp" and done >= cap:
                raise _NoEvaluation(f"{choice.site_name}: this node answers at most "
                                    f"{node.max_evaluations_per_run} evaluations per run, "
                                    "the last for the final model (node config "
                                    "max-evaluations-per-run)")
            cases = local_cases(run.model(), site, state, device, split=split)
            rounds_left = max(total_rounds - evaluated_round + 1, 1)  # models to evaluate
            metrics = _charged_metrics(node, ledger, cases, run, split=split, run_id=run_id,
                                       server_round=server_round,
                                       planned=min(node.max_evaluations_per_run - done,
                                                   rounds_left))
            if isinstance(metrics, str):
                raise _NoEvaluation(f"{choice.site_name}: {metrics}")
            store.save(ledger)  # on disk before anything leaves the site
    except LedgerError as exc:
        raise _NoEvaluation(f"{choice.site_name}: {exc}") from None
    values: dict[str, float | int] = {wire.M_DATA_ERROR: 0, wire.M_REFUSED: 0,
                                     wire.M_UNIT_WEIGHT: 1, **metrics}
    return values | {
        wire.M_EPSILON: ledger.epsilon("train", run.accountant),
        wire.M_EVAL_EPSILON: ledger.epsilon("evaluation", run.accountant),
        wire.M_DELTA: ledger.delta,
    }


def _with_evaluation(reply: Message, evaluation: dict[str, float | int] | str | None
                     ) -> Message:
    """A train reply with the evaluation of the model it started from (its own record),
    or the reason there is none (in the site record)."""
    if evaluation is None:
        return reply
    if isinstance(evaluation, str):
        reply.content.config_records[wire.SITE][wire.SITE_EVALUATION_ERROR] = evaluation
    else:
        reply.content.metric_records[wire.EVALUATION] = MetricRecord(_finite(evaluation))
    return reply


def _charged_metrics(node: NodeConfig, ledger: Ledger, cases: CaseResults, run: RunConfig, *,
                     split: str, run_id: int, server_round: int,
                     planned: int) -> dict[str, float] | str:
    """The metrics this node releases, with their ledger entry appended (the caller saves
    it before replying); or why not (the evaluation budget is spent)."""
    num_classes = run.model().num_classes
    if node.evaluation == "exact":
        metrics = summarise(cases, num_classes)
        metrics[wire.M_NUM_EXAMPLES] = cases.n
        metrics[wire.M_PRIVATE_METRICS] = 0
        ledger.append("exact-evaluation", run_id=run_id, server_round=server_round,
                      noise_multiplier=0.0, note=f"exact metrics of the {split} split")
        return metrics
    try:
        z = noise_for_budget(ledger, 1.0, 1, planned, bucket="evaluation",
                             accountant=run.accountant)
    except BudgetError as exc:
        return f"evaluation budget spent: {exc}"
    metrics = private_metrics(cases, num_classes, z)
    metrics[wire.M_PRIVATE_METRICS] = 1
    ledger.append("evaluation", run_id=run_id, server_round=server_round,
                  noise_multiplier=z, accountant=run.accountant,
                  note=f"noised metrics of the {split} split")
    return metrics


def _ledger(store: LedgerStore, choice: SiteChoice, run: RunConfig) -> Ledger:
    """This data's ledger in the node's store; budgets capped by node, run and ledger."""
    return store.open(
        data_identity(choice.data_path),
        site_name=choice.site_name,
        data_path=choice.data_path,
        epsilon_budget=at_most("epsilon-budget", "epsilon", run.epsilon, choice.epsilon_budget),
        eval_epsilon_budget=choice.node.eval_epsilon_budget,
        delta=at_most("delta", "delta", run.delta, choice.delta),
    )


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
    try:
        site = _opened_site(choice.data_path, run)
    except (SiteError, OSError) as exc:
        raise _Unusable(choice.site_name, f"{choice.site_name}: {exc}") from None
    if len(site.train) == 0:
        raise _Unusable(choice.site_name, f"{choice.site_name}: no training rows")
    return choice, dataclasses.replace(site, name=choice.site_name), device


_SITES: dict[tuple, SiteData] = {}  # this process's opened sites, newest last
_MAX_SITES = 8  # a simulation process serves several virtual nodes in turn


def _folder_stamp(folder: Path) -> tuple:
    """Every file's name, size and modification time: a changed folder, a new stamp."""
    stamp = []
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            stamp.append((os.path.relpath(os.path.join(root, name), folder), st.st_size,
                          st.st_mtime_ns))
    return tuple(sorted(stamp))


def _opened_site(path: Path, run: RunConfig) -> SiteData:
    """`open_site`, once per process for the same folder contents and model settings:
    decoding every image on every message would dominate a simulated round."""
    model_cfg = run.model()
    key = (str(Path(path).resolve()), run.label_set, model_cfg.model_dump_json(),
           _folder_stamp(Path(path)))
    site = _SITES.pop(key, None)
    if site is None:
        site = open_site(path, labels=run.label_set, model=model_cfg,
                         tokenizer=Tokenizer(model_cfg.vocab_size))
    _SITES[key] = site
    while len(_SITES) > _MAX_SITES:
        _SITES.pop(next(iter(_SITES)))
    return site


def _begin(msg: Message, context: Context) -> Message | _Begun:
    """What every message starts with: the run config, the round's config, this node's
    opened site and device, the round and the rounds planned; or the data-error reply
    when the site cannot be used."""
    run = RunConfig.parse(context.run_config)
    try:
        choice, site, device = _open(context.node_config, run)
    except _Unusable as exc:
        return _data_error(msg, exc.site_name, str(exc))
    cfg = _round_config(msg)
    return (run, cfg, choice, site, device, int(cfg.get(wire.CFG_SERVER_ROUND, 1)),
            int(cfg.get(wire.CFG_TOTAL_ROUNDS, run.num_server_rounds)))


def _round_config(msg: Message) -> ConfigRecord:
    records = msg.content.config_records
    return records[wire.CONFIG] if wire.CONFIG in records else ConfigRecord()


def _state(msg: Message) -> dict[str, torch.Tensor]:
    arrays = msg.content.array_records[wire.ARRAYS]
    # copies: Flower's arrays may be read-only NumPy buffers
    return {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}


def _finite(values: Mapping[str, float | int]) -> dict[str, float | int]:
    """Drop NaN-valued metrics rather than send NaN (inf is kept: 'no DP' is infinite)."""
    return {
        k: v for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))
    }


def _site_record(name: str, error: str) -> ConfigRecord:
    return ConfigRecord({wire.SITE_NAME: name, wire.SITE_ERROR: error})


def _data_error(msg: Message, site_name: str, error: str) -> Message:
    """The node cannot take part. The reply names the kind of problem, not the records:
    the details (rows, case ids) stay in the node's own log."""
    log.error("%s", error)
    public = error.splitlines()[0] if error else ""
    if len(public) > 300:
        public = public[:300] + "..."
    metrics = MetricRecord({wire.M_NUM_EXAMPLES: 0, wire.M_DATA_ERROR: 1, wire.M_BUDGET_SPENT: 0,
                            wire.M_REFUSED: 0})
    content = RecordDict({wire.METRICS: metrics, wire.SITE: _site_record(site_name, public)})
    return Message(content, reply_to=msg)


def _refused(
    msg: Message,
    site_name: str,
    reason: str,
    *,
    budget: bool = False,
    privacy: tuple[float, float, float] | None = None,
) -> Message:
    """The node declines what the message asks: budget spent (`budget`), or its policy."""
    log.warning("%s", reason)
    values: dict[str, float | int] = {
        wire.M_NUM_EXAMPLES: 0,
        wire.M_BUDGET_SPENT: 1 if budget else 0,
        wire.M_REFUSED: 0 if budget else 1,
        wire.M_DATA_ERROR: 0,
    }
    if privacy is not None:
        epsilon, delta, left = privacy
        values |= {wire.M_EPSILON: epsilon, wire.M_DELTA: delta, wire.M_BUDGET_LEFT: left}
    content = RecordDict({
        wire.METRICS: MetricRecord(_finite(values)), wire.SITE: _site_record(site_name, reason)
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
