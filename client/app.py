"""The hospital's ClientApp: the only client module that imports Flower.

Flower glue only: each message reads the run config and the server's round config,
opens this node's data (`client.site`), calls plain functions that train
(`client.local.private_round`) or evaluate (`client.evaluation.evaluation_release`)
against the data's ledger (`client.privacy`), and packs their values into the reply
(`client.replies`).

What a reply holds, and why nothing but the DP releases in it may depend on the data
(keys, compute time, error codes), is `client.replies`; `docs/privacy.md` lists every
release. A node whose data cannot be opened, whose budget is spent, or that refuses what
the round asks, replies so and never raises: the server logs it with the node id and
carries on. An exception a handler did not expect becomes the code `internal`, never
its text (`failure_code_mod`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.evaluation import EvaluationAsk, NoEvaluation, evaluation_release, is_private
from client.local import (
    Budget,
    DPSettings,
    DPSetupError,
    LocalSteps,
    NonFiniteUpdate,
    TrainOutcome,
    non_finite_model,
    private_round,
    training_refusal,
)
from client.privacy import LedgerError, LedgerStore, at_most
from client.replies import (
    compute_time_released,
    is_data_error,
    no_part_values,
    released,
    shown_detail,
    site_fields,
    update_values,
)
from client.secure import failure_error, in_secure_round, secure_aggregation_mod
from client.site import (
    OpenedSites,
    RoundAsk,
    SiteChoice,
    SiteConfigError,
    Unusable,
    name_hint,
    open_node_site,
    resolve_site,
)
from shared_model import audit_log, chain_key
from shared_model.contract import compression, packing, wire
from shared_model.contract.run_config import RunConfig, RunConfigError
from shared_model.dataset import SiteData

# Opacus calls logging.basicConfig(); without this every flwr line is printed twice.
logging.getLogger("flwr").propagate = False
log = logging.getLogger(__name__)


def central_clipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` when the server runs client-level DP with client-side
    clipping (its wrapper sends the clipping norm in the round's config); otherwise the
    message passes untouched. A reply without an update (a refusal, a data error) passes
    as it is: there is nothing to clip."""
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
    """The model arrays travel packed into one array (`shared_model/contract/packing.py`: Flower
    moves every array as an object of its own, one remote call each): unpack what comes
    in, pack what goes out. Outermost, so that every other mod and the handler see the
    arrays by name."""
    return packing.packed(call_next(packing.unpacked(msg), ctxt))


def _epsilon_now(choice: SiteChoice) -> float | None:
    """The training epsilon already spent on this data (None before its first release);
    read from the store without hashing the data again (the ledger notes its folders).

    Only a ledger whose file names this folder is loaded (verified: every entry's epsilon
    recomputed, some 0.2-0.4 s a ledger on 2 shared cores); the others are only read for
    their folders: a node install whose data-path changed keeps the ledgers of its
    earlier folders in the same store, and loading them all for every message made the
    audit log the dearest part of a round outside the node's own work."""
    folder = str(choice.data_path.resolve())
    store = _store(choice)
    try:
        for key in store.keys():
            if _names_folder(store.ledger_path(key), folder):
                ledger = store.load(key)
                if folder in ledger.data_paths:
                    return ledger.epsilon("train")
    except (LedgerError, OSError):
        return None
    return None


def _names_folder(path: Path, folder: str) -> bool:
    """Whether the ledger file at `path` may be the one of `folder`: its unverified
    `data_paths` name it, or it cannot be read that way (then the verified load decides)."""
    try:
        paths = json.loads(path.read_text(encoding="utf-8")).get("data_paths")
    except (OSError, ValueError, AttributeError):
        return True
    return not isinstance(paths, list) or folder in paths


def audit_log_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Append to the node's audit log (beside its ledger store) what this message brought
    and what the node sent back: array names, shapes, dtypes, bytes and a digest, every
    metric, the epsilon before and after. Written before the reply leaves the node."""
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


def build_app(sites: OpenedSites) -> ClientApp:
    """The ClientApp, whose messages open their data through `sites`: created once per
    process (`app` below, which Flower loads), so the opened sites live as long as the
    process and no longer; a test builds its own with an empty `OpenedSites`."""
    client_app = ClientApp()

    @client_app.train(mods=TRAIN_MODS)
    def train(msg: Message, context: Context) -> Message:
        return train_message(msg, context, sites)

    @client_app.evaluate(mods=EVALUATE_MODS)
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_message(msg, context, sites)

    return client_app


app = build_app(OpenedSites())  # what Flower loads (client.app:app), once per process


@dataclass(frozen=True)
class _Begun:
    """What every message starts with (`_begin`)."""

    run: RunConfig
    round_config: ConfigRecord
    choice: SiteChoice
    site: SiteData  # opened, named as the node config says
    device: torch.device
    server_round: int
    total_rounds: int  # the rounds planned


# ----------------------------------------------------------------- handlers


def train_message(msg: Message, context: Context, sites: OpenedSites) -> Message:
    """Check the round against the node's policy, train (privately unless the node allows
    otherwise) with the ledger charged first, and reply with the update or the reason.
    When the server asks (`evaluate-first`), the model the message carries is evaluated
    first, exactly as an evaluate message would, and the reply holds both."""
    t0 = time.perf_counter()
    begun = _begin(msg, context, sites)
    if isinstance(begun, Message):
        return begun
    evaluation: dict[str, float | int] | NoEvaluation | None = None
    # one message a round
    evaluates = bool(int(begun.round_config.get(wire.CFG_EVALUATE_FIRST, 0)))
    if evaluates:
        try:
            evaluation = _evaluation(begun, int(context.run_id), _state(msg), in_train=True)
        except NoEvaluation as exc:
            log.warning("%s", exc)
            evaluation = exc
    timed = compute_time_released(begun.run, begun.choice.node, trains=True,
                                  evaluates=evaluates)
    return _with_evaluation(_train(msg, context, begun, t0 if timed else None), evaluation)


def _train(msg: Message, context: Context, begun: _Begun, t0: float | None) -> Message:
    """The training part of a train message (after any evaluation of its arrays); timed
    from `t0` when the reply may say how long it took (None: it may not)."""
    run, cfg, choice = begun.run, begun.round_config, begun.choice
    ask = RoundAsk(
        lr=float(cfg.get(wire.CFG_LR, run.recipe().lr)),
        local_epochs=int(cfg.get(wire.CFG_LOCAL_EPOCHS, run.local_epochs)),
        batch_size=run.batch_size,
        proximal_mu=float(cfg.get(wire.CFG_PROXIMAL_MU, run.proximal_mu)),
    )
    why = training_refusal(choice.node, ask, run)
    if why:
        return _no_part(msg, choice.site_name, wire.ERR_POLICY,
                        log_text=f"{choice.site_name}: {why}", detail=why)
    start = _state(msg)
    why = non_finite_model(start)
    if why:  # decided from what the server sent alone: nothing is charged
        return _no_part(msg, choice.site_name, wire.ERR_POLICY,
                        log_text=f"{choice.site_name}: {why}", detail=why)
    try:
        outcome = private_round(
            _store(choice), run.model(), begun.site, start,
            LocalSteps.of(run.recipe(), epochs=ask.local_epochs, batch_size=ask.batch_size,
                          lr=ask.lr, proximal_mu=ask.proximal_mu),
            _budget(choice, run), device=begun.device,
            dp=DPSettings.of(run, reserve=choice.node.epsilon_reserve),
            run_id=int(context.run_id), server_round=begun.server_round,
            rounds_left=max(begun.total_rounds - begun.server_round + 1, 1), seed=run.seed)
    except (LedgerError, DPSetupError, NonFiniteUpdate) as exc:
        return _no_part(msg, choice.site_name, _TRAIN_FAILURES[type(exc)],
                        log_text=f"{choice.site_name}: {exc}")
    if outcome.refused:  # worked out from the ledger's figures: `training_refusal`'s note
        return _no_part(msg, choice.site_name, wire.ERR_BUDGET_SPENT, log_text=outcome.reason,
                        detail=outcome.reason,
                        privacy=(outcome.epsilon, outcome.delta, outcome.epsilon_left))
    log.info(
        "%s round %d: %d examples (released), loss %.4f (not released under DP), epsilon %.4g "
        "(delta %g, %.4g left)", choice.site_name, begun.server_round, outcome.num_examples,
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


def _update_reply(msg: Message, site_name: str, outcome: TrainOutcome, *, private: bool,
                  seconds: float | None, arrays: dict[str, torch.Tensor],
                  encoding: str) -> Message:
    """The update (`arrays`, in `encoding`) and what is released with it
    (`update_values`)."""
    assert outcome.state is not None
    site = _site_record(site_name)
    site[wire.SITE_UPDATE] = encoding
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(arrays),
        wire.METRICS: MetricRecord(update_values(outcome, private=private, seconds=seconds)),
        wire.SITE: site,
    })
    return Message(content, reply_to=msg)


def evaluate_message(msg: Message, context: Context, sites: OpenedSites) -> Message:
    """Evaluate the global model on the asked split and release what the node's policy
    allows (`client.evaluation`: noised and charged, exact, or nothing). Only an exact
    release says how long it took (`compute_time_released`)."""
    t0 = time.perf_counter()
    begun = _begin(msg, context, sites)
    if isinstance(begun, Message):
        return begun
    site_name = begun.choice.site_name
    try:
        values = _evaluation(begun, int(context.run_id), _state(msg))
    except NoEvaluation as exc:
        return _no_part(msg, site_name, exc.code, log_text=str(exc), detail=exc.detail)
    if compute_time_released(begun.run, begun.choice.node, trains=False, evaluates=True):
        values[wire.M_SECONDS] = time.perf_counter() - t0
    content = RecordDict({
        wire.METRICS: MetricRecord(released(values, private=is_private(values))),
        wire.SITE: _site_record(site_name),
    })
    return Message(content, reply_to=msg)


def _evaluation(begun: _Begun, run_id: int, state: dict[str, torch.Tensor], *,
                in_train: bool = False) -> dict[str, float | int]:
    """`evaluation_release` of `state` for what this message asks: its split, run and
    round (`in_train`: inside a train message, of the model it starts from)."""
    ask = EvaluationAsk(split=str(begun.round_config.get(wire.CFG_EVAL_SPLIT, "val")),
                        run_id=run_id, server_round=begun.server_round,
                        total_rounds=begun.total_rounds, in_train=in_train)
    return evaluation_release(ask, node=begun.choice.node, run=begun.run, site=begun.site,
                              state=state, device=begun.device, store=_store(begun.choice),
                              budget=_budget(begun.choice, begun.run))


def _with_evaluation(reply: Message,
                     evaluation: dict[str, float | int] | NoEvaluation | None) -> Message:
    """A train reply with the evaluation of the model it started from (its own record),
    or why there is none (a code and its detail, in the site record)."""
    if evaluation is None:
        return reply
    if isinstance(evaluation, NoEvaluation):
        site = reply.content.config_records[wire.SITE]
        site[wire.SITE_EVALUATION_ERROR] = evaluation.code
        site[wire.SITE_EVALUATION_DETAIL] = shown_detail(evaluation.code, evaluation.detail)
    else:
        reply.content.metric_records[wire.EVALUATION] = MetricRecord(
            released(evaluation, private=is_private(evaluation)))
    return reply


def _store(choice: SiteChoice) -> LedgerStore:
    """The node's ledger store, under the chain key the node chose (`node-key`: derived
    from the SuperNode's private key; by default the store's own key file)."""
    return LedgerStore(choice.state_dir, key=_chain_key(choice))


def _chain_key(choice: SiteChoice) -> bytes | None:
    """The chain key of the ledgers and the audit log; None: the store's key file."""
    if choice.node.node_key is None:
        return None
    return chain_key.key_from_node_key(Path(choice.node.node_key).expanduser())


def _budget(choice: SiteChoice, run: RunConfig) -> Budget:
    """The caps this data's ledger is opened with: node, run and ledger
    (`choice.epsilon_budget` is the node's own budget, already lowered by the run's)."""
    return Budget(epsilon=choice.epsilon_budget,
                  delta=at_most("delta", "delta", run.delta, choice.delta),
                  eval_epsilon=choice.node.eval_epsilon_budget)


# ----------------------------------------------------------------- helpers


def _begin(msg: Message, context: Context, sites: OpenedSites) -> Message | _Begun:
    """What every message starts with: the run config, the round's config, this node's
    opened site and device, the round and the rounds planned; or the data-error reply
    when the site cannot be used."""
    try:
        run = RunConfig.parse(context.run_config)
    except RunConfigError as exc:
        return _no_part(msg, name_hint(context.node_config), wire.ERR_CONFIG,
                        log_text=str(exc), detail=str(exc))
    try:
        choice, site, device = open_node_site(context.node_config, run, sites)
    except Unusable as exc:
        return _no_part(msg, exc.site_name, exc.code, log_text=str(exc))
    cfg = _round_config(msg)
    return _Begun(run=run, round_config=cfg, choice=choice, site=site, device=device,
                  server_round=int(cfg.get(wire.CFG_SERVER_ROUND, 1)),
                  total_rounds=int(cfg.get(wire.CFG_TOTAL_ROUNDS, run.num_server_rounds)))


def _round_config(msg: Message) -> ConfigRecord:
    records = msg.content.config_records
    return records[wire.CONFIG] if wire.CONFIG in records else ConfigRecord()


def _state(msg: Message) -> dict[str, torch.Tensor]:
    """The model the message carries, as the node trains and evaluates it: float32. A
    server with model-dtype float16 sends its float arrays in 16 bits (`server/download.py`);
    they are cast back here, so training, the update (trained - this) and every check see
    float32, and the audit log (a mod, outside) still records what arrived."""
    arrays = msg.content.array_records[wire.ARRAYS]
    # copies: Flower's arrays may be read-only NumPy buffers
    return {k: v.float() if v.dtype == torch.float16 else v.clone()
            for k, v in arrays.to_torch_state_dict().items()}


def _site_record(name: str, code: str = "", detail: str = "") -> ConfigRecord:
    """Who answered, and why it does not take part (`site_fields`)."""
    return ConfigRecord(site_fields(name, code, detail))


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
    if log_text:
        log.log(logging.ERROR if is_data_error(code) else logging.WARNING, "%s", log_text)
    content = RecordDict({
        wire.METRICS: MetricRecord(no_part_values(code, privacy)),
        wire.SITE: _site_record(site_name, code, detail),
    })
    return Message(content, reply_to=msg)


def _site_name_of(context: Context) -> str:
    """This node's site name when its config can say it, else `name_hint`'s."""
    try:
        return resolve_site(context.node_config, RunConfig.parse(context.run_config)).site_name
    except Exception:  # the node is already answering a failure: any name will do
        return name_hint(context.node_config)
