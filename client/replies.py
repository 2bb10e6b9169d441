"""What a node's reply says, as plain values (no Flower): `client/app.py` packs them.

A reply holds arrays, scalar metrics and the site's name (plus a code saying why, when
the node does not take part). The server may have crafted the model it sends, so nothing
in a reply other than the DP releases themselves may depend on the data:

- **Keys.** Each kind of reply (update, evaluation, refusal, error) holds a set of metric
  keys fixed by the node's policy, the run config, the model config and what the message
  asks, never by the data (`released`): a key dropped because a crafted model made its
  value NaN for one case would say whether that case is in the split.
- **Time.** `seconds` is sent only where everything it timed is a non-private release
  already (`compute_time_released`): a crafted model can make its running time tell
  one case apart, and a clock reading carries no noise.
- **Errors.** A reply names what went wrong with a code (`wire.SITE_ERRORS`), never with
  the node's own text, which may quote row counts, case ids or the data's folder; that
  text goes to the node's log. Only a refusal worked out from the node's config, the
  server's request and the ledger's figures carries its words (`wire.DETAILED_ERRORS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from client.local import TrainOutcome
from client.site import NodeConfig
from shared_model.contract import wire
from shared_model.contract.run_config import RunConfig

# Ledger figures, not data: epsilon is inf once a data has had a non-private release
LEDGER_FIGURES = frozenset({wire.M_EPSILON, wire.M_EVAL_EPSILON, wire.M_DELTA,
                            wire.M_BUDGET_LEFT})

# Which flag each code raises in a reply that takes no part: the node declines (its
# policy, its ledger, its evaluation budget), its training budget is spent, or it could
# not take part (every other code)
DECLINED: dict[str, str] = {
    wire.ERR_POLICY: wire.M_REFUSED,
    wire.ERR_LEDGER: wire.M_REFUSED,
    wire.ERR_EVALUATION_BUDGET_SPENT: wire.M_REFUSED,
    wire.ERR_BUDGET_SPENT: wire.M_BUDGET_SPENT,
}


class NonFiniteRelease(RuntimeError):
    """A DP release holds a value that is not a finite number: a bug, nothing is sent."""


def released(values: Mapping[str, float | int], *, private: bool) -> dict[str, float | int]:
    """The values a reply carries: every key kept, whatever the data. Which keys a reply
    holds must not depend on the data: a crafted model that makes one case's output NaN
    would otherwise tell, by a missing key, whether that case is in the split.

    A DP release is finite by construction (`client.release` makes each case's values
    finite before clipping), so a value that is not is a bug: `NonFiniteRelease`, and the
    server gets the code `internal`. An exact release (dp=false training, evaluation
    'exact') is infinite epsilon already: a value that is not finite (a loss that
    diverged, the AUROC of a split with one class, the IoU of one without lesions) goes
    out as NaN, the one 'no value' the server's tables already skip. A finite sentinel
    would be averaged into the federation's figures as if it were a measurement. Ledger
    figures (`LEDGER_FIGURES`) are not data and pass as they are."""
    data = {k: float(v) for k, v in values.items() if k not in LEDGER_FIGURES}
    bad = sorted(k for k, v in data.items() if not math.isfinite(v))
    if private and bad:
        raise NonFiniteRelease(f"a DP release holds non-finite {', '.join(bad)}")
    return {k: math.nan if k in bad else v for k, v in values.items()}


def compute_time_released(run: RunConfig, node: NodeConfig, *, trains: bool,
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


def shown_detail(code: str, detail: str) -> str:
    """`detail` where `code` may carry words (`wire.DETAILED_ERRORS`), else ''."""
    return detail if code in wire.DETAILED_ERRORS else ""


def site_fields(name: str, code: str = "", detail: str = "") -> dict[str, str]:
    """Who answered, and why it does not take part: a code and, for a code whose words
    are not worked out from the data, those words (`shown_detail`)."""
    return {wire.SITE_NAME: name, wire.SITE_ERROR: code,
            wire.SITE_DETAIL: shown_detail(code, detail)}


def is_data_error(code: str) -> bool:
    """Whether a code says the node could not take part (not that it declined)."""
    return code not in DECLINED


def no_part_values(code: str,
                   privacy: tuple[float, float, float] | None = None) -> dict[str, float | int]:
    """The metrics of a reply that takes no part: the same keys for every code, its flag
    raised (`DECLINED`), plus the ledger's figures (`privacy`: epsilon, delta, epsilon
    left) when the training budget refuses a round."""
    values: dict[str, float | int] = {
        wire.M_NUM_EXAMPLES: 0, wire.M_BUDGET_SPENT: 0, wire.M_REFUSED: 0,
        wire.M_DATA_ERROR: 0,
    }
    values[DECLINED.get(code, wire.M_DATA_ERROR)] = 1
    if privacy is not None:
        epsilon, delta, left = privacy
        values |= {wire.M_EPSILON: epsilon, wire.M_DELTA: delta, wire.M_BUDGET_LEFT: left}
    return values


def update_values(outcome: TrainOutcome, *, private: bool,
                  seconds: float | None) -> dict[str, float | int]:
    """The metrics released with an update: no train loss and no compute time under DP
    (`seconds` None); both when the round is non-private."""
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
    return released(values, private=private)
