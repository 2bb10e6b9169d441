"""`medfuse`: one command line, each role's commands from its own room.

Hospital IT (client/cli.py):       data check, privacy show, audit, predict,
                                   personalise, calibrate, audit-log
Coordinator (server/ops/cli.py):       provision, pretrain, deploy local, dashboard
Researcher  (simulations/):        simulate, train-pooled, bench, data synth, data synth-public

Only the command definitions are imported here; each command imports what it runs when it
runs, so a hospital's command never loads the simulation harness.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Annotated

import typer

from client import cli as hospital
from server.ops import cli as coordinator
from simulations import cli as research
from simulations.simulate import simulate

app = typer.Typer(
    name="medfuse",
    help="Federated multimodal disease analysis with differential privacy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("medfuse")
        except metadata.PackageNotFoundError:  # run from a source tree never installed
            version = "unknown (not installed: make install)"
        typer.echo(f"medfuse {version}")
        raise typer.Exit()


@app.callback()
def _medfuse(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the installed medfuse version (the "
                                               "same at every site) and exit")] = False,
) -> None:
    """Federated multimodal disease analysis with differential privacy."""


data = typer.Typer(help="Site data: check (hospital), synthesise (researcher).",
                   no_args_is_help=True)
data.command("check")(hospital.data_check)
data.command("synth")(research.data_synth)
data.command("synth-public")(research.data_synth_public)
data.add_typer(research.data_import, name="import")
app.add_typer(data, name="data")
privacy = typer.Typer(help="A site's privacy budget.", no_args_is_help=True)
privacy.command("show")(hospital.privacy_show)
app.add_typer(privacy, name="privacy")
app.command("audit")(hospital.audit)
app.command("predict")(hospital.predict)
app.command("personalise")(hospital.personalise)
app.command("calibrate")(hospital.calibrate)
audit_log = typer.Typer(help="What crossed the network: show or verify a node's or a run's "
                        "audit log.", no_args_is_help=True)
audit_log.command("show")(hospital.audit_log_show)
audit_log.command("verify")(hospital.audit_log_verify)
app.add_typer(audit_log, name="audit-log")

app.command("provision")(coordinator.provision_cmd)
app.command("pretrain")(coordinator.pretrain_cmd)
app.add_typer(coordinator.deploy_app, name="deploy")
app.command("dashboard")(coordinator.dashboard)

app.command("simulate")(simulate)
app.command("train-pooled")(research.train_pooled)
app.command("bench")(research.bench)


def main() -> None:
    # a line at a time also when stdout is a file or a pipe (logs of long runs)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    app()


if __name__ == "__main__":
    main()
