"""kind = "pooled": one model trained here on the union of the hospitals' train splits
(plain PyTorch, `shared_model.central`), tested on each hospital's test split; the upper
reference of the federations (from the public model where they start from it)."""

from __future__ import annotations

import math

from shared_model.central import train_central
from shared_model.model_file import load_model_file
from shared_model.tokenizer import Tokenizer
from simulations import report
from simulations.experiments.attention import write_attention
from simulations.experiments.audit import audit_rows
from simulations.experiments.context import Context, ResultRow, SimulationError, Unit
from simulations.experiments.public import public_model


def run(unit: Unit, ctx: Context) -> list[ResultRow]:
    model, central = ctx.cfg.model_for(unit.experiment), ctx.central(unit)
    rows: list[ResultRow] = []
    start = (load_model_file(public_model(unit, ctx)).state
             if ctx.cfg.uses_public(unit.experiment) else None)
    with ctx.bar(unit, central.epochs) as update:

        def on_epoch(epoch: int, loss: float) -> None:
            rows.append(unit.row(epoch, report.ALL_SITES, report.TRAIN_LOSS, loss))
            update(epoch, f"epoch {epoch}: loss {loss:.3f}")
            ctx.say(f"  {unit.experiment.name} epoch {epoch}/{central.epochs}: "
                    f"train loss {loss:.3f}")

        try:
            with ctx.threads():
                trained, res = train_central(ctx.opened, model, central,
                                             Tokenizer(model.vocab_size), on_epoch=on_epoch,
                                             initial_state=start)
        except (ValueError, RuntimeError) as exc:
            raise SimulationError(f"pooled training failed: {exc}") from exc
    for site, metrics in res.per_site.items():
        rows += unit.metric_rows(central.epochs, site, metrics)
        rows.append(unit.row(central.epochs, site, report.EPSILON, math.inf))
    with ctx.threads():
        write_attention(unit.folder(ctx.out), model, trained.state_dict(), ctx.opened)
    if unit.experiment.audit:
        rows += audit_rows(unit, ctx, model, trained.state_dict(), central.epochs)
    return rows
