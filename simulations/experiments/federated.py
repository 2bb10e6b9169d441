"""kind = "federated": a real `flwr run` of this project's ServerApp and ClientApp in
Flower's simulation engine (Ray backend), on the harness's simulation SuperLink.

The experiment's folder gets its run config (run-config.toml), the ServerApp's results.jsonl,
checkpoints/, final/ and ledgers/SITE (each hospital's ledger store). Its rounds are shown
as the ServerApp writes them; afterwards the final global model (final/model.pt) is tested
here on each hospital's test split, so federated and baseline numbers are measured alike.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from server.checkpoint import FINAL_DIR
from server.ops.flower_commands import write_run_config
from server.ops.processes import FlowerError
from server.ops.supervisor import FINISHED, Submission, Supervisor
from server.results import EVALUATE, M_UPDATE_ACCEPTED, RESULTS_FILE, TRAIN, Row, read_rows
from shared_model.contract import wire
from shared_model.contract.metric_registry import HEADLINE
from shared_model.contract.run_config import RunConfig
from shared_model.model_file import load_model_file
from simulations import report
from simulations.experiments.attention import write_attention
from simulations.experiments.audit import audit_rows
from simulations.experiments.context import (
    Context,
    ResultRow,
    SimulationError,
    Unit,
    finite_mean,
)
from simulations.experiments.flower import federation_config
from simulations.experiments.personalise import personalised_rows
from simulations.experiments.public import public_model

RUN_CONFIG_FILE = "run-config.toml"
MODEL_FILE = "model.pt"
# ServerApp metrics that say nothing about the model (kept out of the long table)
_SKIP_EVAL = {"epsilon", "delta", "data-error"}


def run(unit: Unit, ctx: Context) -> list[ResultRow]:
    """Submit the experiment to the simulation SuperLink, show its rounds as the ServerApp
    writes them, and read its results and final model."""
    folder, rounds = unit.folder(ctx.out), ctx.cfg.rounds_of(unit.experiment)
    link, sub = _submit(unit, ctx)
    with ctx.bar(unit, rounds, f"run {sub.run_id}") as update:
        status = _follow(unit, ctx, link, sub, update)
    results_path, final = folder / RESULTS_FILE, folder / FINAL_DIR / MODEL_FILE
    server_rows = read_rows(results_path) if results_path.exists() else []
    last = max((r.round for r in server_rows), default=0)
    if not final.is_file() or last < rounds:
        raise SimulationError(
            f"Flower run {sub.run_id} ended {status or 'early'} after {last} of {rounds} "
            "round(s)" + ("" if final.is_file() else " without a final model")
            + f"; log: {sub.follower.log_path}\n" + "\n".join(sub.lines[-30:])
        )
    return _long_rows(unit, server_rows) + _final_test(unit, ctx, final)


def _submit(unit: Unit, ctx: Context) -> tuple[Supervisor, Submission]:
    """The experiment's run config as a file, and a run of the app on the SuperLink
    (started on first use, restarted if it died)."""
    exp, folder = unit.experiment, unit.folder(ctx.out)
    flat = ctx.cfg.flower_run_config(
        exp, seed=unit.seed, sites_dir=ctx.sites.root, output_dir=folder,
        initial_model=public_model(unit, ctx) if ctx.cfg.uses_public(exp) else None,
    )
    RunConfig.parse(flat)
    rc_file = write_run_config(folder / RUN_CONFIG_FILE, flat)
    try:
        link = ctx.link.get()
        return link, link.submit(
            rc_file, federation_config=federation_config(len(ctx.sites.dirs), ctx.cfg),
            show=False,
        )
    except FlowerError as exc:
        raise SimulationError(f"{exp.name} did not start: {exc}") from exc


def _follow(unit: Unit, ctx: Context, link: Supervisor, sub: Submission,
            update: Callable[[int, str], None]) -> str:
    """Until the run is finished (Flower's status), or the ServerApp has written every
    round and the final model; the run's status ('' when not asked)."""
    exp, folder = unit.experiment, unit.folder(ctx.out)
    rounds, timeout = ctx.cfg.rounds_of(exp), ctx.cfg.resources.timeout
    results_path, final = folder / RESULTS_FILE, folder / FINAL_DIR / MODEL_FILE
    deadline = time.monotonic() + timeout
    seen, size, status, next_check = 0, -1, "", 0.0
    while True:
        time.sleep(1.0)
        if results_path.exists() and results_path.stat().st_size != size:
            size = results_path.stat().st_size
            rows = read_rows(results_path)
            done = max((r.round for r in rows), default=0)
            for rnd in range(seen + 1, done + 1):
                info = round_progress(rows, rnd)
                update(rnd, info)
                ctx.say(f"  {exp.name} round {rnd}/{rounds}: " + info.split(": ", 1)[1])
            seen = max(seen, done)
        if final.is_file() and seen >= rounds:
            return status  # the ServerApp writes the final model last
        if time.monotonic() >= next_check:
            with contextlib.suppress(FlowerError):
                status = link.run_status(sub.run_id)
            if status.startswith(FINISHED):
                return status
            next_check = time.monotonic() + 5.0
        if not link.superlink_alive():
            raise SimulationError(
                f"the simulation SuperLink stopped during {exp.name}; its log: "
                f"{link.superlink.log_path if link.superlink else '?'}"
            )
        if time.monotonic() > deadline:
            link.stop_run(sub.run_id)
            raise SimulationError(f"{exp.name} did not finish within resources.timeout="
                                  f"{timeout:.0f} s; log: {sub.follower.log_path}")


def _long_rows(unit: Unit, rows: list[Row]) -> list[ResultRow]:
    """The ServerApp's results as long rows: train/<m> per site and round (train/loss,
    train/epsilon...), eval/<m> for the federated evaluation after each round."""
    out: list[ResultRow] = []
    for r in rows:
        if r.phase == TRAIN:
            metric = "loss" if r.metric == wire.M_TRAIN_LOSS else r.metric
            out.append(unit.row(r.round, r.site, f"train/{metric}", r.value))
        elif r.metric not in _SKIP_EVAL:
            out.append(unit.row(r.round, r.site, report.EVAL + r.metric, r.value))
    return out


def _final_test(unit: Unit, ctx: Context, final: Path) -> list[ResultRow]:
    """The final global model on every hospital's test split, here; its audit and the
    hospitals' personalisation where the experiment asks for them."""
    model = load_model_file(final)
    rnd = int(model.meta.get("round", ctx.cfg.rounds_of(unit.experiment)))
    rows: list[ResultRow] = []
    for site in ctx.opened:
        metrics, n = ctx.test(model.model_config, site, model.state)
        if n:
            rows += unit.metric_rows(rnd, site.name, metrics)
    with ctx.threads():
        write_attention(unit.folder(ctx.out), model.model_config, model.state, ctx.opened)
    if unit.experiment.audit:
        rows += audit_rows(unit, ctx, model.model_config, model.state, rnd)
    if unit.experiment.personalise_epsilon is not None:
        rows += personalised_rows(unit, ctx, model.state, rnd)
    return rows


def round_progress(rows: Sequence[Row], rnd: int) -> str:
    """What a researcher sees of round `rnd` from the ServerApp's rows: the latest model
    evaluated so far (with evaluate-with-train a round's model is evaluated inside the next
    round's train message), the most any site has spent, and updates left out (a node's
    refusal or a failed check: the ServerApp's log says why). Not `server.results.round_line`,
    the ServerApp's own log line (per-site accuracy and epsilon of one round)."""
    def of(phase: str, metric: str, k: int) -> list[float]:
        return [r.value for r in rows if r.round == k and r.phase == phase and r.metric == metric]

    evaluated = next((k for k in range(rnd, 0, -1) if of(EVALUATE, HEADLINE.name, k)), None)
    info = f"round {rnd}: {HEADLINE.label} " + (
        "-" if evaluated is None else f"{finite_mean(of(EVALUATE, HEADLINE.name, evaluated)):.3f}"
        + ("" if evaluated == rnd else f" (round {evaluated}'s model)"))
    eps = [v for v in of(TRAIN, wire.M_EPSILON, rnd) if math.isfinite(v)]
    if eps:
        info += f", epsilon {max(eps):.2f}"
    verdicts = of(TRAIN, M_UPDATE_ACCEPTED, rnd)
    if left_out := sum(v < 0.5 for v in verdicts):
        info += f", {left_out} of {len(verdicts)} updates left out"
    return info
