"""`personalise-epsilon`: after a DP federation, each hospital fine-tunes the final model on
its own train split with DP-SGD (`medfuse personalise`'s step and recipe,
`client.local.PERSONALISE`), spending the epsilon its node kept out of the federation,
charged to the experiment's ledger store."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from client.local import PERSONALISE, DPSettings
from shared_model.contract.metric_registry import HEADLINE
from simulations import report
from simulations.experiments.context import Context, ResultRow, Unit
from simulations.experiments.local_dp import run_config, train_privately


def personalised_rows(unit: Unit, ctx: Context, state: Mapping[str, torch.Tensor],
                      rnd: int) -> list[ResultRow]:
    """personalised/* rows: each hospital's test metrics and its total epsilon."""
    exp, run = unit.experiment, run_config(unit, ctx)
    dp = DPSettings(max_grad_norm=run.max_grad_norm, accountant=run.accountant)
    rows: list[ResultRow] = []
    for site in ctx.opened:
        # run_id None: a fresh secret id, as `medfuse personalise` releases outside any run
        out = train_privately(unit, ctx, run, site, state, epochs=PERSONALISE.epochs, dp=dp,
                              run_id=None, steps=PERSONALISE)
        if out.refused or out.state is None:
            ctx.echo(f"  {exp.name} {site.name}: personalisation refused: {out.reason}")
            continue
        metrics, _ = ctx.test(run.model(), site, out.state)
        rows += unit.metric_rows(rnd, site.name, metrics, prefix=report.PERSONALISED)
        rows.append(unit.row(rnd, site.name, report.PERSONALISED + "epsilon", out.epsilon))
        ctx.echo(f"  {exp.name} {site.name}: personalised test accuracy "
                 f"{metrics.get(HEADLINE.name, math.nan):.3f}, epsilon {out.epsilon:.2f}")
    return rows
