"""kind = "public": the public model alone on every hospital's test split (the federation's
start), and the public model itself, built once under OUT/public/ for every experiment
that starts from it."""

from __future__ import annotations

from pathlib import Path

from server.ops.pretrain import cached_public_model
from shared_model.model_file import load_model_file
from simulations import report
from simulations.experiments.context import Context, ResultRow, Unit

PUBLIC_DIR = "public"


def public_model(unit: Unit, ctx: Context) -> Path:
    """The public model for this experiment's model config (built once, under OUT/public/)."""
    pub = ctx.cfg.public
    with ctx.threads():
        return cached_public_model(
            ctx.out / PUBLIC_DIR, ctx.cfg.model_for(unit.experiment), ctx.cfg.label_set,
            folders=pub.folders if pub.source == "folders" else (), cases=pub.cases,
            seed=pub.seed, difficulty=pub.difficulty, labeller=pub.labeller, views=pub.views,
            epochs=pub.epochs, batch_size=ctx.cfg.training.batch_size,
            device=ctx.cfg.resources.device, echo=ctx.echo,
        )


def run(unit: Unit, ctx: Context) -> list[ResultRow]:
    start = load_model_file(public_model(unit, ctx))
    rows: list[ResultRow] = []
    for site in ctx.opened:
        metrics, n = ctx.test(start.model_config, site, start.state)
        if n:
            rows += unit.metric_rows(0, site.name, metrics)
            rows.append(unit.row(0, site.name, report.EPSILON, 0.0))
    return rows
