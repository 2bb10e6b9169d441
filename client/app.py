"""The hospital's ClientApp: the only client module that imports Flower.

Each message: read the run config and the server's round config, decide which data this
node trains on and what it accepts (`client.site`), open the data
(`shared_model.dataset`), train or evaluate in plain PyTorch/Opacus (`client.local`),
charge the release to the data's ledger (`client.privacy`) and pack the reply.

What a reply holds: arrays, scalar metrics and the site's name (plus a code saying why,
when the node does not take part). Under DP the arrays are a DP-SGD release, the number
of examples a noised count, and the training loss is not sent; evaluation metrics are
noised and charged to the evaluation budget (or exact and recorded as infinite epsilon,
where the node says so). `docs/privacy.md` lists every release. A node whose data cannot
be opened, whose budget is spent, or that refuses what the round asks, replies so and
never raises: the server logs it with the node id and carries on.

The server may have crafted the model it sends, so nothing in a reply other than the
DP releases themselves may depend on the data:

- **Keys.** Each kind of reply (update, evaluation, refusal, error) holds a set of metric
  keys fixed by the node's policy, the run config, the model config and what the message
  asks, never by the data (`_released`): a key dropped because a crafted model made its
  value NaN for one case would say whether that case is in the split.
- **Time.** `seconds` is sent only where everything it timed is a non-private release
  already (`_compute_time_released`): a crafted model can make its running time tell
  one case apart, and a clock reading carries no noise.
- **Errors.** A reply names what went wrong with a code (`wire.SITE_ERRORS`), never with
  the node's own text, which may quote row counts, case ids or the data's folder; that
  text goes to the node's log. Only a refusal worked out from the node's config, the
  server's request and the ledger's figures carries its words (`wire.DETAILED_ERRORS`).
  An exception a handler did not expect is such a code too (`internal`), never its text.
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

from client.local import (
    DPSettings,
    DPSetupError,
    NonFiniteUpdate,
    TrainOutcome,
    local_cases,
    local_train,
)
from client.privacy import (
    BudgetError,
    Ledger,
    LedgerError,
    LedgerStore,
    at_most,
    noise_for_budget,
)
from client.release import private_metrics
from client.secure import failure_error, in_secure_round, secure_aggregation_mod
from client.site import (
    NodeConfig,
    RoundAsk,
    SiteChoice,
    SiteConfigError,
    resolve_site,
    round_refusal,
)
from shared_model import chain_key, compression, packing, wire
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
        for ledger in _store(choice).ledgers():
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
    }, key=_chain_key(choice))
    return reply


def _config_summary(msg: Message) -> dict:
    """A message's config values for the audit log; bytes (keys, ciphertexts, masked
    vectors of secure aggregation) as their size and digest."""
    from shared_model import audit_log

    return {k: audit_log.scalar_or_digest(v)
            for rec in msg.content.config_records.values() for k, v in rec.items()}


def failure_code_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Outermost: an exception that no mod or handler expected becomes a reply with the
    code `internal` and nothing else, the traceback in the node's log. Left to Flower, the
    exception's text would reach the server, and it may quote the data (a case id, a row,
    a file name)."""
    try:
        return call_next(msg, ctxt)
    except Exception:
        log.exception("%s message failed: the server gets the code %r only",
                      msg.metadata.message_type, wire.ERR_INTERNAL)
        if in_secure_round(msg):  # the protocol's own form of a failed node
            return failure_error(msg, wire.ERR_INTERNAL)
        return _no_part(msg, _site_name_of(ctxt), wire.ERR_INTERNAL)


# Flower mods that touch updates (clipping, masking) belong on @app.train only: on
# @app.evaluate they error or hang the run. Outermost, a failure anywhere becomes a code
# (`failure_code_mod`). Next, the arrays are unpacked on the way
# in and packed on the way out (the same bytes). The audit log sees every message next,
# first and last, so it records what leaves: the update after clipping, or under secure
# aggregation the masked vector. Clipping sits inside the masking: a node clips its own
# update, then masks it.
TRAIN_MODS: list = [failure_code_mod, packed_arrays_mod, audit_log_mod,
                    secure_aggregation_mod, central_clipping_mod]
EVALUATE_MODS: list = [failure_code_mod, packed_arrays_mod, audit_log_mod]

app = ClientApp()

# What every message starts with (`_begin`): run config, round config, the site chosen, its
# opened data, the device, the server round and the rounds planned.
_Begun = tuple[RunConfig, ConfigRecord, SiteChoice, SiteData, torch.device, int, int]


class _Unusable(Exception):
    """This node cannot take part in this message: `code` (`wire.SITE_ERRORS`) is what the
    server gets; `str()` is the full text, for the node's own log only."""

    def __init__(self, site_name: str, code: str, message: str) -> None:
        super().__init__(message)
        self.site_name = site_name
        self.code = code


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
    evaluation: dict[str, float | int] | _NoEvaluation | None = None
    evaluates = bool(int(begun[1].get(wire.CFG_EVALUATE_FIRST, 0)))  # one message a round
    if evaluates:
        try:
            evaluation = _evaluation(begun, int(context.run_id), _state(msg),
                                     in_train=True)
        except _NoEvaluation as exc:
            log.warning("%s", exc)
            evaluation = exc
    timed = _compute_time_released(begun[0], begun[2].node, trains=True,
                                   evaluates=evaluates)
    return _with_evaluation(_train(msg, context, begun, t0 if timed else None), evaluation)


def _compute_time_released(run: RunConfig, node: NodeConfig, *, trains: bool,
                           evaluates: bool) -> bool:
    """Whether a reply may carry the node's compute time for the message (`seconds`).

    Only where everything the clock covered is a non-private release already: training
    with dp=false (which only a node that allows it runs) and exact evaluation (node
    config evaluation='exact'). Under DP, never: a crafted model can make its running
    time depend on one case (a decoder that runs on unless it reads the target's word),
    and a clock reading carries no noise. Decided from the node's policy, the run config
    and what the message asks, never from the data, so the key's presence says nothing
    either. A train message that also evaluates under DP is not timed: its clock covers
    the evaluation. A node that chose to release its compute time (node config
    release-compute-time, a researcher's simulated hospital) is always timed."""
    if node.release_compute_time:
        return True
    if evaluates and node.evaluation == "dp":
        return False
    return not run.dp if trains else node.evaluation == "exact"


def _train(msg: Message, context: Context, begun: _Begun, t0: float | None) -> Message:
    """The training part of a train message (after any evaluation of its arrays); timed
    from `t0` when the reply may say how long it took (None: it may not)."""
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
        return _no_part(msg, choice.site_name, wire.ERR_POLICY,
                        log_text=f"{choice.site_name}: {why}", detail=why)
    start = _state(msg)
    why = _non_finite_model(start)
    if why:  # decided from what the server sent alone: nothing is charged
        return _no_part(msg, choice.site_name, wire.ERR_POLICY,
                        log_text=f"{choice.site_name}: {why}", detail=why)
    store = _store(choice)
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
    except (LedgerError, DPSetupError, NonFiniteUpdate) as exc:
        return _no_part(msg, choice.site_name, _TRAIN_FAILURES[type(exc)],
                        log_text=f"{choice.site_name}: {exc}")
    if outcome.refused:  # worked out from the ledger's figures: `_policy_refusal`'s note
        return _no_part(msg, choice.site_name, wire.ERR_BUDGET_SPENT, log_text=outcome.reason,
                        detail=outcome.reason,
                        privacy=(outcome.epsilon, outcome.delta, outcome.epsilon_left))
    log.info(
        "%s round %d: %d examples (released), loss %.4f (not released under DP), epsilon %.4g "
        "(delta %g, %.4g left)", choice.site_name, server_round, outcome.num_examples,
        outcome.train_loss, outcome.epsilon, outcome.delta, outcome.epsilon_left,
    )
    return _update_reply(msg, choice.site_name, outcome, private=run.dp,
                         seconds=None if t0 is None else time.perf_counter() - t0,
                         arrays=compression.encode(outcome.state, start, run.update_dtype),
                         encoding=compression.encoding_of(run.update_dtype))


# what a train message that fails says to the server (the text goes to the node's log):
# the ledger unreadable, DP-SGD not possible as asked, or a noised update that is not
# finite (`local_train` charged the round before it found out)
_TRAIN_FAILURES: dict[type[Exception], str] = {
    LedgerError: wire.ERR_LEDGER,
    DPSetupError: wire.ERR_DP_SETUP,
    NonFiniteUpdate: wire.ERR_NON_FINITE_UPDATE,
}


def _non_finite_model(state: Mapping[str, torch.Tensor]) -> str:
    """Why the node will not train the model a message carries ('' when it will): a
    weight that is not finite makes every update non-finite, whatever the data, so the
    round would be charged and never released. Decided from the message alone."""
    bad = [name for name, t in state.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return ""
    return (f"the model this round carries has weights that are not finite ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): not trained")


def _policy_refusal(node: NodeConfig, ask: RoundAsk, run: RunConfig) -> str:
    """Why this node refuses the round ('' when it does not). Worked out from the node's
    config and the server's request alone, never from the data, so the reply may carry
    these words (`wire.DETAILED_ERRORS`); a budget refusal likewise quotes only the
    ledger's figures, which are post-processing of DP releases."""
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
                  seconds: float | None, arrays: dict[str, torch.Tensor],
                  encoding: str) -> Message:
    """The update (`arrays`, in `encoding`) and what is released with it: no train loss
    and no compute time under DP (`seconds` None); both when the round is non-private."""
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
    }
    if not private:  # a non-private release already gives everything away
        values[wire.M_TRAIN_LOSS] = outcome.train_loss
    if seconds is not None:
        values[wire.M_SECONDS] = seconds
    site = _site_record(site_name)
    site[wire.SITE_UPDATE] = encoding
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(arrays),
        wire.METRICS: MetricRecord(_released(values, private=private)),
        wire.SITE: site,
    })
    return Message(content, reply_to=msg)


@app.evaluate(mods=EVALUATE_MODS)
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the asked split and release what the node's policy
    allows (noised and charged, exact, or nothing). Only an exact release says how long
    it took (`_compute_time_released`)."""
    t0 = time.perf_counter()
    begun = _begin(msg, context)
    if isinstance(begun, Message):
        return begun
    site_name = begun[2].site_name
    try:
        values = _evaluation(begun, int(context.run_id), _state(msg))
    except _NoEvaluation as exc:
        return _no_part(msg, site_name, exc.code, log_text=str(exc), detail=exc.detail)
    if _compute_time_released(begun[0], begun[2].node, trains=False, evaluates=True):
        values[wire.M_SECONDS] = time.perf_counter() - t0
    content = RecordDict({
        wire.METRICS: MetricRecord(_released(values, private=_dp_evaluation(values))),
        wire.SITE: _site_record(site_name),
    })
    return Message(content, reply_to=msg)


class _NoEvaluation(Exception):
    """This node releases no evaluation for this message: `code` (`wire.SITE_ERRORS`) for
    the server, `detail` the words it may see too (only for a code in
    `wire.DETAILED_ERRORS`), `str()` the full text for the node's log."""

    def __init__(self, code: str, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


def _dp_evaluation(values: Mapping[str, float | int]) -> bool:
    """Whether an evaluation's values are a DP release (noised), not an exact one."""
    return bool(values[wire.M_PRIVATE_METRICS])


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
        why = f"unknown {wire.CFG_EVAL_SPLIT}={split[:40]!r} (val or test)"
        raise _NoEvaluation(wire.ERR_CONFIG, f"{choice.site_name}: {why}", detail=why)
    node = choice.node
    if node.evaluation == "off":
        why = "this node releases no evaluation metrics (node config evaluation='off')"
        raise _NoEvaluation(wire.ERR_POLICY, f"{choice.site_name}: {why}", detail=why)
    data = site.val if split == "val" else site.test
    if len(data) == 0:
        raise _NoEvaluation(wire.ERR_NO_EVALUATION_ROWS, f"{choice.site_name}: no {split} rows")
    store = _store(choice)
    try:
        with store.lock():
            ledger = _ledger(store, choice, run)
            done = sum(1 for e in ledger.entries if e.bucket == "evaluation"
                       and e.run_id == run_id and not e.note.startswith("inherited"))
            # the last evaluation a run may have is kept for its final model
            final = evaluated_round >= total_rounds
            cap = node.max_evaluations_per_run - (0 if final else 1)
            if node.evaluation == "dp" and done >= cap:
                why = (f"this node answers at most {node.max_evaluations_per_run} "
                       "evaluations per run, the last for the final model (node config "
                       "max-evaluations-per-run)")
                raise _NoEvaluation(wire.ERR_POLICY, f"{choice.site_name}: {why}", detail=why)
            cases = local_cases(run.model(), site, state, device, split=split)
            rounds_left = max(total_rounds - evaluated_round + 1, 1)  # models to evaluate
            metrics = _charged_metrics(node, ledger, cases, run, split=split, run_id=run_id,
                                       server_round=server_round,
                                       planned=min(node.max_evaluations_per_run - done,
                                                   rounds_left))
            if isinstance(metrics, str):  # the ledger's figures: `_policy_refusal`'s note
                raise _NoEvaluation(wire.ERR_EVALUATION_BUDGET_SPENT,
                                    f"{choice.site_name}: {metrics}", detail=metrics)
            store.save(ledger)  # on disk before anything leaves the site
    except LedgerError as exc:
        raise _NoEvaluation(wire.ERR_LEDGER, f"{choice.site_name}: {exc}") from None
    values: dict[str, float | int] = {wire.M_DATA_ERROR: 0, wire.M_REFUSED: 0,
                                     wire.M_UNIT_WEIGHT: 1, **metrics}
    return values | {
        wire.M_EPSILON: ledger.epsilon("train", run.accountant),
        wire.M_EVAL_EPSILON: ledger.epsilon("evaluation", run.accountant),
        wire.M_DELTA: ledger.delta,
    }


def _with_evaluation(reply: Message,
                     evaluation: dict[str, float | int] | _NoEvaluation | None) -> Message:
    """A train reply with the evaluation of the model it started from (its own record),
    or why there is none (a code and its detail, in the site record)."""
    if evaluation is None:
        return reply
    if isinstance(evaluation, _NoEvaluation):
        site = reply.content.config_records[wire.SITE]
        site[wire.SITE_EVALUATION_ERROR] = evaluation.code
        site[wire.SITE_EVALUATION_DETAIL] = _detail(evaluation.code, evaluation.detail)
    else:
        reply.content.metric_records[wire.EVALUATION] = MetricRecord(
            _released(evaluation, private=_dp_evaluation(evaluation)))
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


def _store(choice: SiteChoice) -> LedgerStore:
    """The node's ledger store, under the chain key the node chose (`node-key`: derived
    from the SuperNode's private key; by default the store's own key file)."""
    return LedgerStore(choice.state_dir, key=_chain_key(choice))


def _chain_key(choice: SiteChoice) -> bytes | None:
    """The chain key of the ledgers and the audit log; None: the store's key file."""
    if choice.node.node_key is None:
        return None
    return chain_key.key_from_node_key(Path(choice.node.node_key).expanduser())


def _ledger(store: LedgerStore, choice: SiteChoice, run: RunConfig) -> Ledger:
    """This data's ledger in the node's store; budgets capped by node, run and ledger
    (`choice.epsilon_budget` is the node's own budget, already lowered by the run's)."""
    return store.open(
        store.identify(choice.data_path),
        site_name=choice.site_name,
        data_path=choice.data_path,
        epsilon_budget=choice.epsilon_budget,
        eval_epsilon_budget=choice.node.eval_epsilon_budget,
        delta=at_most("delta", "delta", run.delta, choice.delta),
    )


# ----------------------------------------------------------------- helpers


def _open(node_config: Mapping, run: RunConfig) -> tuple[SiteChoice, SiteData, torch.device]:
    """Which data, which device, and the opened site; `_Unusable` with a message if not."""
    try:
        choice = resolve_site(node_config, run)
    except SiteConfigError as exc:
        raise _Unusable(_name_hint(node_config), wire.ERR_NODE_CONFIG, str(exc)) from None
    torch.set_num_threads(choice.threads)
    try:
        device = pick_device(choice.device)
    except (ValueError, RuntimeError) as exc:
        raise _Unusable(choice.site_name, wire.ERR_DEVICE,
                        f"{choice.site_name}: {exc}") from None
    try:
        site = _opened_site(choice.data_path, run)
    except (SiteError, OSError) as exc:
        raise _Unusable(choice.site_name, wire.ERR_DATA_UNREADABLE,
                        f"{choice.site_name}: {exc}") from None
    if len(site.train) == 0:
        raise _Unusable(choice.site_name, wire.ERR_NO_TRAINING_ROWS,
                        f"{choice.site_name}: no training rows")
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
    try:
        run = RunConfig.parse(context.run_config)
    except RunConfigError as exc:
        return _no_part(msg, _name_hint(context.node_config), wire.ERR_CONFIG,
                        log_text=str(exc), detail=str(exc))
    try:
        choice, site, device = _open(context.node_config, run)
    except _Unusable as exc:
        return _no_part(msg, exc.site_name, exc.code, log_text=str(exc))
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


# Ledger figures, not data: epsilon is inf once a data has had a non-private release
_LEDGER_FIGURES = frozenset(
    {wire.M_EPSILON, wire.M_EVAL_EPSILON, wire.M_DELTA, wire.M_BUDGET_LEFT})


class _NonFiniteRelease(RuntimeError):
    """A DP release holds a value that is not a finite number: a bug, nothing is sent."""


def _released(values: Mapping[str, float | int], *, private: bool) -> dict[str, float | int]:
    """The values a reply carries: every key kept, whatever the data. Which keys a reply
    holds must not depend on the data: a crafted model that makes one case's output NaN
    would otherwise tell, by a missing key, whether that case is in the split.

    A DP release is finite by construction (`client.release` makes each case's values
    finite before clipping), so a value that is not is a bug: `_NonFiniteRelease`, and the
    server gets the code `internal`. An exact release (dp=false training, evaluation
    'exact') is infinite epsilon already: a value that is not finite (a loss that
    diverged, the AUROC of a split with one class, the IoU of one without lesions) goes
    out as NaN, the one 'no value' the server's tables already skip. A finite sentinel
    would be averaged into the federation's figures as if it were a measurement. Ledger
    figures (`_LEDGER_FIGURES`) are not data and pass as they are."""
    data = {k: float(v) for k, v in values.items() if k not in _LEDGER_FIGURES}
    bad = sorted(k for k, v in data.items() if not math.isfinite(v))
    if private and bad:
        raise _NonFiniteRelease(f"a DP release holds non-finite {', '.join(bad)}")
    return {k: math.nan if k in bad else v for k, v in values.items()}


def _site_record(name: str, code: str = "", detail: str = "") -> ConfigRecord:
    """Who answered, and why it does not take part: a code and, for a code whose words
    are not worked out from the data, those words (`_detail`)."""
    return ConfigRecord({wire.SITE_NAME: name, wire.SITE_ERROR: code,
                         wire.SITE_DETAIL: _detail(code, detail)})


def _detail(code: str, detail: str) -> str:
    """`detail` where `code` may carry words (`wire.DETAILED_ERRORS`), else ''."""
    return detail if code in wire.DETAILED_ERRORS else ""


# Which flag each code raises in a reply that takes no part: the node declines (its
# policy, its ledger, its evaluation budget), its training budget is spent, or it could
# not take part (every other code)
_DECLINED: dict[str, str] = {
    wire.ERR_POLICY: wire.M_REFUSED,
    wire.ERR_LEDGER: wire.M_REFUSED,
    wire.ERR_EVALUATION_BUDGET_SPENT: wire.M_REFUSED,
    wire.ERR_BUDGET_SPENT: wire.M_BUDGET_SPENT,
}


def _no_part(
    msg: Message,
    site_name: str,
    code: str,
    *,
    log_text: str = "",
    detail: str = "",
    privacy: tuple[float, float, float] | None = None,
) -> Message:
    """The node takes no part in what the message asks: a refusal or an error, by `code`.

    The server gets the code, the flags and, for a code in `wire.DETAILED_ERRORS`,
    `detail`; `log_text` (which may quote rows, case ids, the data's folder) goes only to
    the node's log. The metric keys are the same for every code, plus the ledger's figures
    (`privacy`) when the training budget refuses a round."""
    flag = _DECLINED.get(code, wire.M_DATA_ERROR)
    if log_text:
        log.log(logging.ERROR if flag == wire.M_DATA_ERROR else logging.WARNING, "%s",
                log_text)
    values: dict[str, float | int] = {
        wire.M_NUM_EXAMPLES: 0, wire.M_BUDGET_SPENT: 0, wire.M_REFUSED: 0,
        wire.M_DATA_ERROR: 0,
    }
    values[flag] = 1
    if privacy is not None:
        epsilon, delta, left = privacy
        values |= {wire.M_EPSILON: epsilon, wire.M_DELTA: delta, wire.M_BUDGET_LEFT: left}
    content = RecordDict({
        wire.METRICS: MetricRecord(values),
        wire.SITE: _site_record(site_name, code, detail),
    })
    return Message(content, reply_to=msg)


def _site_name_of(context: Context) -> str:
    """This node's site name when its config can say it, else `_name_hint`'s."""
    try:
        return resolve_site(context.node_config, RunConfig.parse(context.run_config)).site_name
    except Exception:  # the node is already answering a failure: any name will do
        return _name_hint(context.node_config)


def _name_hint(node_config: Mapping) -> str:
    """A name for a node whose config could not be used (for the server's log)."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"])).name or str(node_config["data-path"])
    if "partition-id" in node_config:
        return f"partition-{node_config['partition-id']}"
    return "unknown-site"
