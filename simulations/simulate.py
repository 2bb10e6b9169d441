"""`medfuse simulate`: many hospitals on one machine, experiments, tables, plots, report.

    medfuse simulate                                  # the built-in demo (default.toml)
    medfuse simulate my-study.toml                    # your own experiments
    medfuse simulate --sites data/a data/b data/c     # the demo's experiments on your sites
    medfuse simulate my-study.toml --sites data/a data/b --out runs/study

Registered in `simulations/cli.py` as `app.command("simulate")(simulate)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from shared_model.tooling.cli_opts import err, fail, sigterm_as_interrupt

CONFIG_SUFFIXES = (".toml", ".json")


def _split_paths(paths: list[Path], sites_flag: bool) -> tuple[Path | None, list[Path]]:
    """(config file, site folders) from the positional arguments."""
    if not sites_flag:
        if len(paths) > 1:
            raise typer.BadParameter(
                f"one config file expected, got {len(paths)} paths; to run on site folders "
                "use --sites: medfuse simulate [CONFIG.toml] --sites DIR DIR ..."
            )
        if paths and paths[0].is_dir():
            raise typer.BadParameter(
                f"{paths[0]} is a folder: to run on site folders use "
                f"medfuse simulate --sites {paths[0]} ..."
            )
        return (paths[0] if paths else None), []
    configs = [p for p in paths if p.suffix.lower() in CONFIG_SUFFIXES and not p.is_dir()]
    if len(configs) > 1:
        raise typer.BadParameter(f"more than one config file: {', '.join(map(str, configs))}")
    sites = [p for p in paths if p not in configs]
    if not sites:
        raise typer.BadParameter("--sites needs at least one site folder")
    return (configs[0] if configs else None), sites


def simulate(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="CONFIG.toml (default: the built-in demo); with --sites, also the site folders",
            show_default=False,
            metavar="[CONFIG.toml] [DIR]...",
        ),
    ] = None,
    sites: Annotated[
        bool,
        typer.Option(
            "--sites",
            help="the folder arguments are site folders (format v1), one simulated hospital "
            "each; bad rows are reported and skipped",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="output folder (default: the config's `out`, else runs/simulate)"),
    ] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="federated rounds")] = None,
    seed: Annotated[
        list[int] | None, typer.Option("--seed", help="seed; repeat for several")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run only this experiment; repeatable")
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="print the resolved config and stop")
    ] = False,
    progress: Annotated[bool, typer.Option(help="progress bars in a terminal")] = True,
    ray_address: Annotated[str | None, typer.Option(
        help="run the simulated hospitals on this existing Ray cluster (`ray start --head` "
        "prints its address); the config's [resources] ray-address")] = None,
    dashboard: Annotated[bool, typer.Option(
        help="serve a live page on 127.0.0.1 that follows the federated experiment running "
        "(`medfuse dashboard OUT` shows it later)")] = False,
) -> None:
    """Run pooled, local-only and federated experiments on simulated hospitals; write
    results.csv, summary.md, plots and report.html.

    An experiment already finished in the output folder (same settings) is not run again.
    """
    # `medfuse --help` imports this module: what the command runs is imported here
    # lazy: the config, runner and experiment kinds load torch and pandas (seconds)
    from simulations.config import DEFAULT_CONFIG, ConfigError, load_config
    from simulations.experiments.context import SimulationError  # lazy: loads torch (--help)
    from simulations.runner import Runner  # lazy: loads torch and pandas (--help)

    console = Console()
    config, site_dirs = _split_paths(list(paths or []), sites)
    try:
        cfg = load_config(config, sites=site_dirs or None, out=out, rounds=rounds,
                          seeds=seed or None, only=only or None, ray_address=ray_address)
    except ConfigError as exc:
        fail(exc)
    if print_config:
        console.print(cfg.to_toml(), markup=False, highlight=False)
        return
    console.print(
        f"[bold]{escape(cfg.name)}[/bold]: {len(cfg.experiments)} experiment(s) x "
        f"{len(cfg.seeds)} seed(s) on {cfg.sites.num_hospitals} hospitals; config "
        f"{config or DEFAULT_CONFIG}; output {cfg.out}",
        highlight=False, soft_wrap=True,
    )
    if dashboard:
        from server.ops.dashboard import serve_in_background  # lazy: loads torch (--help)

        cfg.out.mkdir(parents=True, exist_ok=True)
        _, url = serve_in_background(cfg.out.resolve())
        console.print(f"dashboard: {url}", highlight=False)
    try:
        with sigterm_as_interrupt():
            outcome = Runner(cfg, console=console, progress=progress).run()
    except KeyboardInterrupt:
        err.print(f"interrupted: every Flower process was stopped; finished experiments "
                  f"are kept in {cfg.out} and are not run again next time",
                  highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except SimulationError as exc:
        fail(exc, 1)
    _print_outcome(console, outcome)
    if outcome.failed:
        raise typer.Exit(1)


def _print_outcome(console: Console, outcome) -> None:
    """The summary tables, where the files are, and what failed (on stderr)."""
    from simulations.report import terminal_tables  # lazy: loads pandas (--help)

    assert outcome.files is not None
    console.print()
    for table in terminal_tables(outcome.files.summary):
        console.print(table)
    ran = f"{len(outcome.ran)} run, {len(outcome.skipped)} already finished"
    console.print(f"{ran}; {outcome.seconds:.0f} s. Long table: {outcome.results_csv}; "
                  f"summary: {outcome.files.summary_md}", highlight=False, soft_wrap=True)
    for name, why in outcome.failed.items():
        err.print(f"[red]failed:[/red] {escape(name)}: {escape(why)}", highlight=False,
                  soft_wrap=True)
    console.print(f"report: {outcome.files.report_html}", highlight=False, soft_wrap=True)
