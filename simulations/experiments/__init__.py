"""The experiment kinds of `medfuse simulate`: one module each, one table.

Every kind is a function `run(unit, ctx) -> rows`: it trains and tests one experiment with
one seed (`Unit`) on the hospitals of the run (`Context`) and returns its rows of the long
table. A new kind is a module here and an entry in `KINDS` (and a `Kind` in
`simulations/sections.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from simulations.experiments import bow, federated, local, local_dp, pooled, public
from simulations.experiments.context import Context, ResultRow, Unit
from simulations.experiments.flower import check_outside_app
from simulations.sections import Experiment

RunKind = Callable[[Unit, Context], list[ResultRow]]

KINDS: dict[str, RunKind] = {
    "pooled": pooled.run,  # one model on the union of the hospitals' train splits
    "local": local.run,  # each hospital alone, from random weights
    "local-dp": local_dp.run,  # each hospital alone, DP-SGD from the public model
    "public": public.run,  # the public model alone
    "federated": federated.run,  # a Flower run in the simulation engine
    "bow": bow.run,  # bag-of-words logistic regression on the pooled train reports
}

# What a kind needs of the output folder before any experiment starts (a failed check
# stops the whole simulation, not one experiment).
CHECKS: dict[str, Callable[[Path], None]] = {
    "federated": check_outside_app,  # `flwr run` must not bundle the output folder
}


def kind_of(exp: Experiment) -> str:
    """The key of `exp` in KINDS: its kind, or KIND-dp where DP makes a kind of its own."""
    private = f"{exp.kind}-dp"
    return private if exp.dp and private in KINDS else exp.kind
