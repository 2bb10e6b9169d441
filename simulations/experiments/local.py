"""kind = "local" (dp = false): each hospital alone, trained here from random weights on its
own train split (what a hospital gets with nothing shared and nothing public)."""

from __future__ import annotations

import math

from shared_model.central import train_central
from shared_model.contract.metric_registry import HEADLINE
from shared_model.tokenizer import Tokenizer
from simulations import report
from simulations.experiments.context import Context, ResultRow, SimulationError, Unit


def run(unit: Unit, ctx: Context) -> list[ResultRow]:
    name = unit.experiment.name
    model, central = ctx.cfg.model_for(unit.experiment), ctx.central(unit)
    tokenizer = Tokenizer(model.vocab_size)
    rows: list[ResultRow] = []
    with ctx.bar(unit, central.epochs * len(ctx.opened)) as update:
        for k, site in enumerate(ctx.opened):

            def on_epoch(epoch: int, loss: float, site_name: str = site.name, k: int = k) -> None:
                rows.append(unit.row(epoch, site_name, report.TRAIN_LOSS, loss))
                update(k * central.epochs + epoch, f"{site_name} epoch {epoch}: loss {loss:.3f}")

            try:
                with ctx.threads():
                    _, res = train_central([site], model, central, tokenizer, on_epoch=on_epoch)
            except (ValueError, RuntimeError) as exc:
                raise SimulationError(f"local training at {site.name} failed: {exc}") from exc
            for s, metrics in res.per_site.items():
                rows.extend(unit.metric_rows(central.epochs, s, metrics))
                rows.append(unit.row(central.epochs, s, report.EPSILON, math.inf))
            acc = res.per_site.get(site.name, {}).get(HEADLINE.name, math.nan)
            ctx.say(f"  {name} {site.name}: test {HEADLINE.label} {acc:.3f}")
    return rows
