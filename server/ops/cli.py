"""The coordinator's commands: keys for a federation, the public start, a local deployment.

    medfuse provision      CA, the SuperLink's TLS identity, one key per hospital
    medfuse pretrain       central training on public data: the model a federation starts from
    medfuse deploy local   a SuperLink and SuperNodes over TLS with node auth on 127.0.0.1
    medfuse dashboard DIR  a live page of a run on 127.0.0.1

`medfuse.py` imports this module for every `medfuse` call, `--help` included: what loads
torch (the training code behind `pretrain`, the tokenizer, the dashboard's checkpoint
reader) is imported by the command that uses it only, marked `# lazy:`.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from server.ops.deploy import DeployConfig, deploy_local
from server.ops.federation import PROJECT_DIR, DeployError
from server.ops.handouts import REGISTER_TXT
from server.ops.processes import FlowerError
from server.ops.provision import ProvisionError, provision
from shared_model.config import CENTRAL
from shared_model.contract.metric_registry import HEADLINE
from shared_model.contract.run_config import model_config_for
from shared_model.tooling.cli_opts import (
    DEFAULT_LABELS_TEXT,
    LabelsOpt,
    console,
    fail,
    parse_labels,
    sigterm_as_interrupt,
)

# ------------------------------------------------------------------ typer commands

deploy_app = typer.Typer(help="Run the real distributed path (SuperLink + SuperNodes).",
                         no_args_is_help=True)  # fmt: skip


@deploy_app.callback()
def _deploy_group() -> None:
    """Real Flower processes: a SuperLink and SuperNodes over TLS with node authentication."""


def _parse_overrides(items: Sequence[str]) -> dict[str, str | int | float | bool]:
    out: dict[str, str | int | float | bool] = {}
    for item in items:
        for m in re.finditer(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)", item):
            try:
                out[m.group(1)] = tomllib.loads(f"v = {m.group(2)}")["v"]
            except tomllib.TOMLDecodeError:
                raise typer.BadParameter(f"-c {m.group(0)!r}: the value is not TOML") from None
    return out


@deploy_app.command("local")
def deploy_local_cmd(
    hospitals: Annotated[int, typer.Option(min=1, max=32, help="number of SuperNodes")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="server rounds")] = 2,
    sites: Annotated[
        list[Path] | None, typer.Option("--sites", help="site folders (repeat); default synthetic")
    ] = None,
    out: Annotated[Path, typer.Option(help="results, final model and logs")] = Path(
        "runs/deploy-local"
    ),
    cases_per_site: Annotated[int, typer.Option(min=10, help="synthetic sites")] = 60,
    image_size: Annotated[int, typer.Option(min=16)] = 32,
    seed: Annotated[int, typer.Option()] = 0,
    min_nodes: Annotated[
        int | None, typer.Option(min=1, help="nodes a round needs (default: all but one)")
    ] = None,
    round_timeout: Annotated[float, typer.Option(help="seconds the server waits")] = 600.0,
    run_config: Annotated[
        list[str] | None, typer.Option("-c", "--run-config", help="'k=v ...' overrides")
    ] = None,
    keep_workdir: Annotated[bool, typer.Option(help="keep keys, database and state")] = False,
    app: Annotated[Path, typer.Option(help="the Flower app folder to submit")] = PROJECT_DIR,
    public: Annotated[
        bool, typer.Option(help="start from a public model (synthetic public corpus, cached)")
    ] = True,
    dashboard: Annotated[bool, typer.Option(help="serve the live dashboard of the run on "
                                                 "127.0.0.1 while it goes")] = False,
) -> None:
    """Provision, start a SuperLink and N SuperNodes on 127.0.0.1 (TLS + node auth),
    run the app with `flwr run`, print the per-site table, stop everything."""
    try:
        if sites:
            hospitals = len(sites)
        cfg = DeployConfig(
            hospitals=hospitals,
            rounds=rounds,
            public=public,
            sites=tuple(sites or ()),
            out=out,
            cases_per_site=cases_per_site,
            image_size=image_size,
            seed=seed,
            min_nodes=min_nodes,
            round_timeout=round_timeout,
            run_config=_parse_overrides(run_config or []),
            keep_workdir=keep_workdir,
            app_dir=app.resolve(),
        )
    except ValidationError as exc:
        fail(exc)

    if dashboard:
        from server.ops.dashboard import serve_in_background  # lazy: loads torch (--help)

        _, url = serve_in_background((cfg.out / "output").resolve())
        typer.echo(f"[deploy] dashboard: {url}")
    try:
        with sigterm_as_interrupt():
            deploy_local(cfg, echo=lambda line: typer.echo(line))
    except KeyboardInterrupt:
        typer.echo("[deploy] interrupted: every process was stopped", err=True)
        raise typer.Exit(130) from None
    except (DeployError, FlowerError) as exc:
        fail(exc, 1)


def provision_cmd(
    out: Annotated[Path, typer.Option(help="folder to write ca/, coordinator/, hospitals/")],
    hospitals: Annotated[str, typer.Option(help="hospital names, comma separated")],
    superlink_host: Annotated[
        list[str] | None,
        typer.Option("--superlink-host", help="name or IP the hospitals use (repeat)"),
    ] = None,
    superlink_port: Annotated[int, typer.Option(help="the SuperLink's one TCP port")] = 9092,
    epsilon_budget: Annotated[
        float, typer.Option(help="the epsilon-budget written into each hospital's command")
    ] = 8.0,
    force: Annotated[bool, typer.Option(help="replace existing keys")] = False,
) -> None:
    """Make the federation's CA, the SuperLink's TLS identity and one key per hospital."""
    try:
        p = provision(out, hospitals, superlink_host or [], superlink_port, force=force,
                      epsilon_budget=epsilon_budget)  # fmt: skip
    except ProvisionError as exc:
        fail(exc)
    typer.echo(f"CA (keep offline):  {p.ca_dir}")
    typer.echo(f"coordinator:        {p.coordinator_dir}  (see README.txt)")
    for name, folder in p.hospital_dirs.items():
        typer.echo(f"hospital {name + ':':<10} {folder}  (send this folder to {name} only)")
    typer.echo(f"register the hospitals: {p.coordinator_dir / REGISTER_TXT}")


def pretrain_cmd(
    public: Annotated[list[Path], typer.Option("--public", help="public folders (format v1)")],
    out: Annotated[Path, typer.Option(help="the model file to write (e.g. public.pt)")],
    epochs: Annotated[int, typer.Option(min=1)] = CENTRAL.epochs,
    batch_size: Annotated[int, typer.Option(min=1)] = CENTRAL.batch_size,
    lr: Annotated[float, typer.Option()] = CENTRAL.lr,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = CENTRAL.device,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 1,
    views: Annotated[str, typer.Option(
        help="none, mild or strong: random views of each batch (domain randomisation: "
        "tone, blur, noise, shifts, zoom, report word dropout), so the model sees more "
        "scanners than the corpus has")
    ] = "none",
    model_size: Annotated[str, typer.Option(help="small or large, as the run's")] = "small",
    fusion: Annotated[str, typer.Option(help="concat, gated or bilinear, as the run's")] = "gated",
    modality: Annotated[str, typer.Option(help="fused, image or text, as the run's")] = "fused",
    image_size: Annotated[int, typer.Option(help="as the run's")] = 64,
    labels: LabelsOpt = DEFAULT_LABELS_TEXT,
) -> None:
    """Train the model centrally (no DP) on public data; a federation starts from the file
    with run config initial-model=FILE. The model settings must be the run's."""
    import torch  # lazy: keeps `medfuse --help` fast (torch)

    # lazy: the training code loads torch and opacus, only when pretraining runs (--help)
    from server.ops.pretrain import pretrain
    from shared_model.central import CentralConfig  # lazy: loads torch and opacus (--help)
    from shared_model.dataset import SiteError, open_site  # lazy: loads torch and pandas
    from shared_model.tokenizer import Tokenizer  # lazy: loads torch (--help)

    label_set = parse_labels(labels)
    try:
        central = CentralConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                device=device, views=views)
        model = model_config_for(model_size, image_size, fusion, modality, len(label_set))
        opened = [open_site(p, labels=label_set, model=model,
                            tokenizer=Tokenizer(model.vocab_size)) for p in public]
    except (ValidationError, SiteError, OSError) as exc:
        fail(exc)
    torch.set_num_threads(threads)
    console.print(f"pretraining on {sum(len(s.train) for s in opened)} public cases")
    result = pretrain(opened, model, central, out,
                      on_epoch=lambda e, loss: console.print(f"epoch {e}: train loss {loss:.4f}"))
    acc = result.overall.get(HEADLINE.name, float("nan"))
    console.print(f"wrote {out} (public test {HEADLINE.label} {acc:.3f}, {result.seconds:.0f} s); "
                  f"start a federation from it with -c \"initial-model='{out.resolve()}'\"")


def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="a ServerApp output-dir (results.jsonl); "
                                                 "in a simulation: experiments/NAME/seed-S")],
    port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0: a free one)")] = 8765,
) -> None:
    """Serve a live page on 127.0.0.1 that follows the run: rounds done and planned,
    accuracy per site, epsilon against budget, updates accepted or left out and why."""
    # lazy: the dashboard reads checkpoints, which loads torch (--help)
    from server.ops.dashboard import serve_in_background, state, summary_line

    if not run_dir.is_dir():
        fail(f"{run_dir} is not a folder (give the run's output-dir)")
    try:
        server, url = serve_in_background(run_dir, port)
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port}: {exc}")
    console.print(f"dashboard of {run_dir}: {url}  (Ctrl-C to stop)")
    last = ""
    try:
        with sigterm_as_interrupt():
            while True:
                line = summary_line(state(run_dir))
                if line != last:
                    console.print(line)
                    last = line
                time.sleep(2)
    except KeyboardInterrupt:
        server.shutdown()
        raise typer.Exit(0) from None
