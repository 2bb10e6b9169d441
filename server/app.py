"""medfuse ServerApp: validate the run config, run the rounds, write everything to disk.

    flwr run .                                     # local simulation, defaults from pyproject
    flwr run . -c "num-server-rounds=5 strategy='fedadam'"

What it writes (Flower returns nothing to the CLI), under the run config's `output-dir`:

    results.jsonl                    long table: round, site, node_id, phase, metric, value
    checkpoints/round-NNNN.pt        after every round (global model + strategy state + rows)
    checkpoints/latest               name of the newest checkpoint
    final/model.pt                   the final global model, self-describing
    final/model_card.json, .md       config, labels, sites, rounds, epsilon per site, metrics

A relative `output-dir` is resolved against the ServerApp process's working directory,
which Flower inherits from the SuperLink: the folder `flower-superlink` was started in
(for `flwr run .` with the auto-started `:local:` SuperLink, where the first `flwr run`
was typed), not the folder `flwr run` is typed in now. Seen on Flower 1.42: SuperLink
started in /tmp/a, `flwr run .` in the project -> outputs in /tmp/a/<output-dir>. The
absolute path is logged at the start and end of the run; an absolute `output-dir` does not
depend on any of this.

`resume=true` continues from the newest checkpoint in `output-dir` at round last+1, with
the saved strategy state; `resume=false` starts at round 1 and clears the earlier run's
results, checkpoints and final model in that folder (nothing else: privacy ledgers that
clients keep in the same folder are never touched).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    Checkpoint,
    build_model_card,
    code_version,
    load_latest,
    save_checkpoint,
    write_final,
)
from server.grid import prompt_object_pulls
from server.results import (
    EVALUATE,
    FEDERATION,
    RESULTS_FILE,
    ResultsWriter,
    Row,
    ledger_table,
    privacy_ledger,
    render,
    round_line,
    round_table,
)
from server.strategy import (
    GuardedStrategy,
    RoundHook,
    build_strategy,
    train_config,
    training_grid,
)
from shared_model.audit_log import LOG_FILE as AUDIT_LOG
from shared_model.config import ModelConfig
from shared_model.contract import wire
from shared_model.contract.metric_registry import HEADLINE
from shared_model.contract.packing import array_record
from shared_model.contract.run_config import RunConfig, RunConfigError
from shared_model.model import MedFuseModel
from shared_model.model_file import ModelFileError, check_matches, load_model_file
from shared_model.train import seed_everything

app = ServerApp()
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def quiet_flwr_logger() -> None:
    """Flower's logger has its own handler; Opacus' logging.basicConfig would print every
    line a second time through the root logger."""
    logging.getLogger("flwr").propagate = False


def resolve_output_dir(output_dir: str) -> Path:
    """Absolute path of `output-dir`; a relative one is taken from the working directory."""
    path = Path(output_dir).expanduser()
    if not path.is_absolute():
        path = Path(os.getcwd()) / path
    return path.resolve()


def initial_arrays(run: RunConfig) -> ArrayRecord:
    """The initial global model: every tensor of `MedFuseModel.state_dict()`, from the
    run's `initial-model` file (a public pretrained model) or seeded at random.

    A file of another model config or label set stops the run, naming both."""
    seed_everything(run.seed)
    model = MedFuseModel(run.model())
    if run.initial_model:
        try:
            start = load_model_file(Path(run.initial_model))
            check_matches(start, run.model(), run.label_set)
            model.load_state_dict(start.state, strict=True)
        except (ModelFileError, RuntimeError) as exc:
            raise RunConfigError(f"initial-model={run.initial_model!r}: {exc}") from None
        log(INFO, "medfuse: starting from %s", start.path)
    return ArrayRecord(model.state_dict())


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def _arrays(ndarrays: dict[str, np.ndarray]) -> ArrayRecord:
    return array_record(ndarrays)


def check_resumable(ck: Checkpoint, run: RunConfig, fresh: ArrayRecord) -> None:
    """Refuse a checkpoint of another model or strategy; log what else changed."""
    problems = []
    if ModelConfig(**ck.model_config) != run.model():
        problems.append("the model config differs (model-size, image-size, fusion, "
                        "modality or labels changed)")
    saved_strategy = ck.run_config.get("strategy")
    if saved_strategy != run.strategy:
        problems.append(f"strategy was {saved_strategy!r}, now {run.strategy!r}")
    template = _numpy(fresh)
    if list(ck.arrays) != list(template):
        problems.append("the model's array names differ")
    else:
        bad = [k for k, v in template.items()
               if ck.arrays[k].shape != v.shape or ck.arrays[k].dtype != v.dtype]
        if bad:
            problems.append(f"arrays with another shape or dtype: {', '.join(bad[:5])}")
    if problems:
        raise RunConfigError(
            f"resume=true: checkpoint {ck.path} cannot continue this run: "
            + "; ".join(problems)
        )
    now = run.flat()
    changed = {k: (v, now.get(k)) for k, v in ck.run_config.items()
               if k != "resume" and now.get(k) != v}
    for key, (old, new) in sorted(changed.items()):
        log(WARNING, "resume: run config %s changed since the checkpoint: %r -> %r "
            "(the result may differ from an uninterrupted run)", key, old, new)


def clear_previous_run(out: Path) -> None:
    """A fresh run (resume=false) replaces what an earlier run left in the same folder."""
    for name in (CHECKPOINT_DIR, FINAL_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    if (out / RESULTS_FILE).exists():
        (out / RESULTS_FILE).unlink()
        log(INFO, "resume=false: cleared the earlier run's outputs in %s", out)


@dataclass
class _Start:
    """Where a run starts: round 0 from the initial model, or a checkpoint's round."""

    arrays: ArrayRecord
    offset: int = 0
    rows: list[Row] = field(default_factory=list)
    strategy_state: dict | None = None


def _start(run: RunConfig, out: Path, results: ResultsWriter) -> _Start:
    """The initial model, or with resume=true the latest checkpoint (its rows restored
    into the results file); a fresh run clears what a previous one left."""
    arrays = initial_arrays(run)
    if not run.resume:
        clear_previous_run(out)
        return _Start(arrays)
    ck = load_latest(out)
    if ck is None:
        log(WARNING, "resume=true but no checkpoint in %s: starting at round 1", out)
        clear_previous_run(out)
        return _Start(arrays)
    check_resumable(ck, run, arrays)
    results.replace(ck.rows)
    log(INFO, "resume: continuing after round %d from %s", ck.round, ck.path)
    return _Start(_arrays(ck.arrays), ck.round, list(ck.rows), ck.strategy_state)


def show_round(run: RunConfig, results: ResultsWriter, rows: list[Row]) -> RoundHook:
    """The recorder's round-end hook: the round's rows appended to `rows` and to the
    results file, and shown in the log as a table."""

    def show(rnd: int, global_arrays: ArrayRecord, new_rows: list[Row]) -> None:
        rows.extend(new_rows)
        results.append(new_rows)
        # a round's evaluation may arrive with the next round's train replies
        # (evaluate-with-train): show each round whose evaluation came in, else this one
        shown = sorted({r.round for r in new_rows if r.phase == EVALUATE
                        and r.site != FEDERATION}) or [rnd]
        for k in shown:
            for line in render(round_table(k, run.num_server_rounds, rows)).splitlines():
                log(INFO, "%s", line)
            log(INFO, "%s", round_line(k, rows))

    return show


def checkpoint_each_round(out: Path, run: RunConfig, version: str, strategy: GuardedStrategy,
                          rows: list[Row]) -> EvaluateFn:
    """Flower's per-round `evaluate_fn` hook of `Strategy.start()`, which comes after each
    round's evaluation (its rows are in `rows` by then): a checkpoint of the round."""

    def save(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:  # Flower's call before round 1: the start model, saved already
            return None
        path = save_checkpoint(out, Checkpoint(
            round=strategy.last_round, arrays=_numpy(arrays),
            model_config=run.model().model_dump(), run_config=run.flat(),
            strategy_state=strategy.state_for_checkpoint(), rows=rows, code_version=version,
        ))
        log(INFO, "checkpoint: %s", path)
        return None

    return save


def run_federation(grid: Grid, run: RunConfig) -> Path:
    """The whole run on a validated config: start (or resume), the rounds with a
    checkpoint after each, the final model and its card; returns the output folder."""
    out = resolve_output_dir(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    version = code_version()
    log(INFO, "medfuse ServerApp (%s): strategy=%s, %d rounds; outputs in %s",
        version, run.strategy, run.num_server_rounds, out)
    random.seed(run.seed)  # Flower samples nodes with `random`: the same seed, the same picks
    results = ResultsWriter(out / RESULTS_FILE)
    start = _start(run, out, results)
    rows = start.rows
    guarded = GuardedStrategy(build_strategy(run, start.offset), max_norm=run.update_max_norm,
                              total_rounds=run.num_server_rounds, round_offset=start.offset,
                              on_round_end=show_round(run, results, rows),
                              audit_log=out / AUDIT_LOG, evaluate_in_train=run.evaluates_in_train,
                              round_lr=run.round_lr, average_decay=run.ema_decay,
                              model_dtype=run.model_dtype,
                              update_dtype=run.update_dtype)  # fmt: skip
    if start.strategy_state:
        guarded.load_checkpoint_state(start.strategy_state)
    remaining = run.num_server_rounds - start.offset
    if remaining > 0:
        guarded.start(training_grid(grid, run), start.arrays, num_rounds=remaining,
                      timeout=run.round_timeout, train_config=train_config(run),
                      evaluate_config=ConfigRecord({wire.CFG_EVAL_SPLIT: run.eval_split}),
                      evaluate_fn=checkpoint_each_round(out, run, version, guarded, rows))
    else:
        log(INFO, "resume: all %d rounds were already done", run.num_server_rounds)
    final = guarded.global_arrays if guarded.global_arrays is not None else start.arrays
    _finish(out, run, final, rows, max(guarded.last_round, start.offset), version)
    return out


def _finish(out: Path, run: RunConfig, final: ArrayRecord, rows: list[Row], rounds: int,
            version: str) -> None:
    """The final model and its card, the privacy ledger and the closing line in the log."""
    card = build_model_card(model_config=run.model().model_dump(), run_config=run.flat(),
                            labels=run.label_set, rounds=rounds, rows=rows,
                            strategy=run.strategy, version=version)  # fmt: skip
    folder = write_final(out, arrays=_numpy(final), card=card)
    if privacy_ledger(rows):
        for line in render(ledger_table(rows)).splitlines():
            log(INFO, "%s", line)
    mean_acc = card["final_metrics"].get("mean", {}).get(HEADLINE.name)
    log(INFO, "medfuse: done after %d rounds; mean %s %s; final model in %s; "
        "results in %s", card["rounds"], HEADLINE.label, HEADLINE.fmt(mean_acc),
        folder, out / RESULTS_FILE)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: a bad run config stops here, before any round."""
    quiet_flwr_logger()
    prompt_object_pulls()
    try:
        run = RunConfig.parse(context.run_config)
        initial_arrays(run)  # a bad initial-model stops the run here, before any round
    except RunConfigError as exc:
        log(ERROR, "medfuse: the run did not start: %s", exc)
        raise
    run_federation(grid, run)
