"""kind = "local", dp = true: each hospital alone, fine-tuning with DP-SGD (the client's own
`private_round`, charged to its ledger in the experiment's store of that hospital) from
the public model, or from random weights without one, for as many epochs as a federation
has rounds x epochs."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from client.local import Budget, DPSettings, LocalSteps, TrainOutcome, private_round
from client.privacy import LedgerStore
from client.site import simulated_store
from shared_model.contract.metric_registry import HEADLINE
from shared_model.contract.run_config import RunConfig
from shared_model.dataset import SiteData
from shared_model.model import MedFuseModel
from shared_model.model_file import load_model_file
from shared_model.train import seed_everything
from simulations import report
from simulations.config import LEDGER_DIR
from simulations.experiments.context import Context, ResultRow, SimulationError, Unit
from simulations.experiments.public import public_model


def run_config(unit: Unit, ctx: Context) -> RunConfig:
    """The unit's validated run config (its DP settings and recipe)."""
    return ctx.cfg.run_config(unit.experiment, unit.seed, ctx.sites.root, unit.folder(ctx.out))


def train_privately(unit: Unit, ctx: Context, run: RunConfig, site: SiteData,
                    start: Mapping[str, torch.Tensor], *, epochs: int, dp: DPSettings,
                    run_id: int | None, steps: LocalSteps | None = None) -> TrainOutcome:
    """One DP-SGD round of `site` alone, charged to its ledger in the experiment's store of
    that hospital, the one its simulated node uses (each experiment is a federation of
    its own: it spends its own budget); `steps`
    default: the run's recipe for `epochs` epochs."""
    store = LedgerStore(simulated_store(unit.folder(ctx.out) / LEDGER_DIR, site.path))
    steps = steps or LocalSteps.of(run.recipe(), epochs=epochs, batch_size=run.batch_size)
    with ctx.threads():
        return private_round(store, run.model(), site, start, steps,
                             Budget(epsilon=run.epsilon, delta=run.delta), device=ctx.device,
                             dp=dp, run_id=run_id, seed=unit.seed)


def run(unit: Unit, ctx: Context) -> list[ResultRow]:
    exp, epochs = unit.experiment, ctx.cfg.training.epochs
    run = run_config(unit, ctx)
    model = run.model()
    if ctx.cfg.uses_public(exp):
        state = load_model_file(public_model(unit, ctx)).state
    else:
        seed_everything(unit.seed)
        state = MedFuseModel(model).state_dict()
    dp = DPSettings(noise_multiplier=run.noise_multiplier or None,
                    max_grad_norm=run.max_grad_norm, accountant=run.accountant)
    rows: list[ResultRow] = []
    with ctx.bar(unit, len(ctx.opened)) as update:
        for k, site in enumerate(ctx.opened):
            out = train_privately(unit, ctx, run, site, state, epochs=epochs, dp=dp, run_id=0)
            if out.refused or out.state is None:
                raise SimulationError(f"local DP training at {site.name} refused: {out.reason}")
            metrics, n = ctx.test(model, site, out.state)
            if n:
                rows += unit.metric_rows(epochs, site.name, metrics)
            rows.append(unit.row(epochs, site.name, report.EPSILON, out.epsilon))
            update(k + 1, site.name)
            ctx.say(f"  {exp.name} {site.name}: test accuracy "
                    f"{metrics.get(HEADLINE.name, math.nan):.3f}, epsilon {out.epsilon:.2f}")
    return rows
