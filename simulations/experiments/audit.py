"""The membership-inference audit of a trained model (`audit = true`): pooled and federated."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from client.audit import audit_site, roc_plot, verdict
from shared_model.config import ModelConfig
from simulations import report
from simulations.experiments.context import Context, ResultRow, Unit


def audit_rows(unit: Unit, ctx: Context, model: ModelConfig,
               state: Mapping[str, torch.Tensor], rnd: int) -> list[ResultRow]:
    """The loss-threshold membership attack on every hospital (members: its train split;
    non-members: val and test), as audit/* rows, and its ROC plot."""
    results = []
    with ctx.threads():
        for site in ctx.opened:
            if len(site.train) >= 2 and len(site.val) + len(site.test) >= 2:
                results += audit_site(model, state, site, device=ctx.device)
    roc_plot(results, unit.folder(ctx.out) / "audit-roc.png",
             title=f"membership inference: {unit.experiment.name}")
    report.write_roc_points(results, unit.folder(ctx.out))  # report.html draws them
    ctx.echo(f"  {unit.experiment.name} audit: {verdict(results)}")
    return [unit.row(rnd, r.site, f"{report.AUDIT}{r.attack}-{key}", value)
            for r in results
            for key, value in (("auc", r.auc), ("auc-lo", r.auc_ci[0]), ("auc-hi", r.auc_ci[1]),
                               ("tpr@1%fpr", r.tpr_at_1), ("tpr@0.1%fpr", r.tpr_at_01))]
