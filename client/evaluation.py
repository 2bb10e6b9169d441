"""What a node releases when it evaluates a model (no Flower): the evaluation policy.

The node's policy (node config `evaluation`) says what leaves:

- **dp** (the default): noised metrics (`client.release`), charged to the data's
  evaluation budget. At most `max-evaluations-per-run` per run, the last kept for the
  run's final model: a run longer than the cap would otherwise never evaluate its
  result. The noise is planned over the evaluations the run may still ask for.
- **exact**: exact metrics, recorded in the ledger as infinite epsilon; not capped.
- **off**: nothing.

The ledger entry is on disk before anything is returned. Where the node releases nothing,
`NoEvaluation` says why: a code from `wire.SITE_ERRORS` for the server, words only where
they are worked out from the node's config, the server's request and the ledger's
figures (`wire.DETAILED_ERRORS`), the full text for the node's own log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from client.local import Budget, local_cases, open_ledger
from client.privacy import BudgetError, Ledger, LedgerError, LedgerStore, noise_for_budget
from client.release import private_metrics
from client.site import NodeConfig
from shared_model.contract import wire
from shared_model.contract.run_config import RunConfig
from shared_model.dataset import SiteData
from shared_model.train import CaseResults, summarise

SPLITS = ("val", "test")


class NoEvaluation(Exception):
    """This node releases no evaluation for this message: `code` (`wire.SITE_ERRORS`) for
    the server, `detail` the words it may see too (only for a code in
    `wire.DETAILED_ERRORS`), `str()` the full text for the node's log."""

    def __init__(self, code: str, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class EvaluationAsk:
    """What a message asks to evaluate: which split, in which run, at which round."""

    split: str  # as the server sent it: 'val' or 'test' is evaluated, anything else refused
    run_id: int
    server_round: int
    total_rounds: int
    # inside round r's train message the model is round r-1's: the final model's
    # evaluation is still to come
    in_train: bool = False

    @property
    def evaluated_round(self) -> int:
        """The round whose model this is."""
        return self.server_round - int(self.in_train)


def evaluation_release(
    ask: EvaluationAsk,
    *,
    node: NodeConfig,
    run: RunConfig,
    site: SiteData,
    state: Mapping[str, torch.Tensor],
    device: torch.device,
    store: LedgerStore,
    budget: Budget,
) -> dict[str, float | int]:
    """Evaluate `state` on the asked split of `site` and return what the node's policy
    releases (noised and charged, or exact and recorded), the ledger saved first, with
    the ledger's figures; `NoEvaluation` with the reason when it releases nothing. The
    evaluate message and the evaluation inside a train message both call it: the same
    policy, cap and ledger."""
    if ask.split not in SPLITS:
        why = f"unknown {wire.CFG_EVAL_SPLIT}={ask.split[:40]!r} (val or test)"
        raise NoEvaluation(wire.ERR_CONFIG, f"{site.name}: {why}", detail=why)
    if node.evaluation == "off":
        why = "this node releases no evaluation metrics (node config evaluation='off')"
        raise NoEvaluation(wire.ERR_POLICY, f"{site.name}: {why}", detail=why)
    data = site.val if ask.split == "val" else site.test
    if len(data) == 0:
        raise NoEvaluation(wire.ERR_NO_EVALUATION_ROWS, f"{site.name}: no {ask.split} rows")
    try:
        with store.lock():
            ledger = open_ledger(store, site, budget)
            done = evaluations_done(ledger, ask.run_id)
            why = cap_reached(node, done, final=ask.evaluated_round >= ask.total_rounds)
            if why:
                raise NoEvaluation(wire.ERR_POLICY, f"{site.name}: {why}", detail=why)
            cases = local_cases(run.model(), site, state, device, split=ask.split)
            rounds_left = max(ask.total_rounds - ask.evaluated_round + 1, 1)  # models to go
            metrics = charged_metrics(
                node, ledger, cases, run, split=ask.split, run_id=ask.run_id,
                server_round=ask.server_round,
                planned=min(node.max_evaluations_per_run - done, rounds_left))
            if isinstance(metrics, str):  # the ledger's figures: words the server may see
                raise NoEvaluation(wire.ERR_EVALUATION_BUDGET_SPENT,
                                   f"{site.name}: {metrics}", detail=metrics)
            store.save(ledger)  # on disk before anything leaves the site
    except LedgerError as exc:
        raise NoEvaluation(wire.ERR_LEDGER, f"{site.name}: {exc}") from None
    values: dict[str, float | int] = {wire.M_DATA_ERROR: 0, wire.M_REFUSED: 0,
                                     wire.M_UNIT_WEIGHT: 1, **metrics}
    return values | {
        wire.M_EPSILON: ledger.epsilon("train", run.accountant),
        wire.M_EVAL_EPSILON: ledger.epsilon("evaluation", run.accountant),
        wire.M_DELTA: ledger.delta,
    }


def evaluations_done(ledger: Ledger, run_id: int) -> int:
    """Noised evaluations this run has had of this data (not those inherited from
    overlapping data)."""
    return sum(1 for e in ledger.entries if e.bucket == "evaluation"
               and e.run_id == run_id and not e.note.startswith("inherited"))


def cap_reached(node: NodeConfig, done: int, *, final: bool) -> str:
    """Why the per-run cap refuses one more noised evaluation ('' when it does not): the
    last evaluation a run may have is kept for its final model. Exact evaluation is not
    capped (it is infinite epsilon already)."""
    cap = node.max_evaluations_per_run - (0 if final else 1)
    if node.evaluation != "dp" or done < cap:
        return ""
    return (f"this node answers at most {node.max_evaluations_per_run} evaluations per run, "
            "the last for the final model (node config max-evaluations-per-run)")


def charged_metrics(node: NodeConfig, ledger: Ledger, cases: CaseResults, run: RunConfig, *,
                    split: str, run_id: int, server_round: int,
                    planned: int) -> dict[str, float] | str:
    """The metrics this node releases, with their ledger entry appended (the caller saves
    it before replying); or why not (the evaluation budget is spent). `planned`: the
    evaluations the noise is planned over, this one included."""
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


def is_private(values: Mapping[str, float | int]) -> bool:
    """Whether an evaluation's values are a DP release (noised), not an exact one."""
    return bool(values[wire.M_PRIVATE_METRICS])
