"""`medfuse`: the command line of every role.

Researcher:   medfuse simulate        pooled, local-only and federated runs, tables, plots
              medfuse train-pooled    pooled (centralised) baseline on the union of sites
              medfuse data synth      write synthetic hospitals (format v1)
Hospital IT:  medfuse data check      check a site folder before it joins a federation
              medfuse privacy show    the site's privacy ledger: epsilon spent and left
Coordinator:  medfuse provision       CA, TLS identity and SuperNode keys for a federation
              medfuse deploy local    SuperLink + SuperNodes over TLS on this machine
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared_model.config import DEFAULT_LABELS, ModelConfig
from simulations.deploy import deploy_app, provision_cmd
from simulations.simulate import simulate

app = typer.Typer(
    name="medfuse",
    help="Federated multimodal disease analysis with differential privacy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Site data: synthesise and check.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(deploy_app, name="deploy")
app.command("provision")(provision_cmd)
app.command("simulate")(simulate)
privacy_app = typer.Typer(help="A site's privacy budget.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")

console = Console()
err = Console(stderr=True)

LabelsOpt = Annotated[
    str,
    typer.Option("--labels", help="the federation's label set, comma separated"),
]
METRIC_COLUMNS = ("accuracy", "macro-f1", "auroc", "iou", "bleu4", "rouge-l")


def parse_labels(text: str) -> tuple[str, ...]:
    labels = tuple(x.strip() for x in text.split(",") if x.strip())
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise typer.BadParameter(f"need at least two distinct labels, got {text!r}")
    return labels


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="folder to write site-00, site-01, ... into")],
    sites: Annotated[int, typer.Option(min=1, help="number of hospitals")] = 5,
    cases_per_site: Annotated[int, typer.Option(min=10, help="mean cases per hospital")] = 400,
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
    label_skew: Annotated[
        float | None,
        typer.Option(help="Dirichlet alpha of each site's label mix (smaller = more skew)"),
    ] = None,
    image_size: Annotated[int, typer.Option(min=16, help="image side in pixels")] = 64,
    overwrite: Annotated[bool, typer.Option(help="replace existing site folders")] = False,
) -> None:
    """Write synthetic hospitals in dataset format v1."""
    from pydantic import ValidationError

    from simulations.synth import SynthConfig, write_federation

    try:
        cfg = SynthConfig(
            sites=sites,
            cases_per_site=cases_per_site,
            seed=seed,
            label_skew=label_skew,
            image_size=image_size,
        )
        paths = write_federation(out, cfg, overwrite=overwrite)
    except (ValidationError, FileExistsError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    for p in paths:
        console.print(f"wrote {p}")


@data_app.command("synth-public")
def data_synth_public(
    out: Annotated[Path, typer.Option(help="folder to write the corpus into (one site folder)")],
    cases: Annotated[int, typer.Option(min=50, help="cases in the archive")] = 2000,
    seed: Annotated[int, typer.Option(help="same seed, same bytes (streams of its own)")] = 0,
    image_size: Annotated[int, typer.Option(min=16, help="image side in pixels")] = 64,
) -> None:
    """Write a SYNTHETIC stand-in for a public archive (NIH ChestX-ray14, OpenI, ...):
    several source hospitals of its own, an archive's report style, 8% label noise.
    For a real public dataset, convert it to format v1 and pass its folder to pretrain."""
    from pydantic import ValidationError

    from simulations.synth import PublicConfig, write_public

    try:
        path = write_public(out, PublicConfig(cases=cases, seed=seed, image_size=image_size))
    except (ValidationError, FileExistsError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"wrote {path} ({cases} cases; synthetic, not a real public dataset)")


@app.command("pretrain")
def pretrain_cmd(
    public: Annotated[list[Path], typer.Option("--public", help="public folders (format v1)")],
    out: Annotated[Path, typer.Option(help="the model file to write (e.g. public.pt)")],
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option()] = 2e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 1,
    model_size: Annotated[str, typer.Option(help="small or large, as the run's")] = "small",
    fusion: Annotated[str, typer.Option(help="concat, gated or bilinear, as the run's")] = "gated",
    modality: Annotated[str, typer.Option(help="fused, image or text, as the run's")] = "fused",
    image_size: Annotated[int, typer.Option(help="as the run's")] = 64,
    labels: LabelsOpt = ",".join(DEFAULT_LABELS),
) -> None:
    """Train the model centrally (no DP) on public data; a federation starts from the file
    with run config initial-model=FILE. The model settings must be the run's."""
    import torch
    from pydantic import ValidationError

    from shared_model.dataset import SiteError, open_site
    from shared_model.run_config import model_config_for
    from shared_model.tokenizer import Tokenizer
    from simulations.pooled import CentralConfig
    from simulations.pretrain import pretrain

    label_set = parse_labels(labels)
    try:
        central = CentralConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                device=device)
        model = model_config_for(model_size, image_size, fusion, modality, len(label_set))
        opened = [open_site(p, labels=label_set, model=model,
                            tokenizer=Tokenizer(model.vocab_size)) for p in public]
    except (ValidationError, SiteError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    torch.set_num_threads(threads)
    console.print(f"pretraining on {sum(len(s.train) for s in opened)} public cases")
    result = pretrain(opened, model, central, out,
                      on_epoch=lambda e, loss: console.print(f"epoch {e}: train loss {loss:.4f}"))
    acc = result.overall.get("accuracy", float("nan"))
    console.print(f"wrote {out} (public test accuracy {acc:.3f}, {result.seconds:.0f} s); "
                  f"start a federation from it with -c \"initial-model='{out.resolve()}'\"")


@data_app.command("check")
def data_check(
    site_dirs: Annotated[list[Path], typer.Argument(help="one or more site folders")],
    strict: Annotated[bool, typer.Option(help="any bad row makes the site unusable")] = False,
    labels: LabelsOpt = ",".join(DEFAULT_LABELS),
    image_size: Annotated[int, typer.Option(help="model input size")] = 64,
) -> None:
    """Check site folders: counts per label and split, formats, and every unusable row.

    Exit code 0 when every site is usable, 1 otherwise (under --strict, any bad row).
    """
    from shared_model.dataset import check_site
    from shared_model.tokenizer import Tokenizer
    from simulations.data_check import exit_code, render_summary

    model = ModelConfig(image_size=image_size, num_classes=len(parse_labels(labels)))
    tokenizer = Tokenizer(model.vocab_size)
    summaries = []
    for site in site_dirs:
        summary = check_site(
            site, labels=parse_labels(labels), model=model, tokenizer=tokenizer, strict=strict
        )
        render_summary(summary, console)
        summaries.append(summary)
    raise typer.Exit(exit_code(summaries, strict))


Modality = Literal["fused", "image", "text"]


@app.command("train-pooled")
def train_pooled(
    sites: Annotated[list[Path], typer.Option("--sites", help="site folders (repeat the option)")],
    modality: Annotated[
        list[str] | None, typer.Option(help="fused, image or text; repeat to compare")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option()] = 2e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    threads: Annotated[
        int, typer.Option(min=1, help="torch CPU threads; >1 thrashes on a busy 2-core machine")
    ] = 1,
    fusion: Annotated[str, typer.Option(help="concat, gated or bilinear")] = "gated",
    image_size: Annotated[int, typer.Option()] = 64,
    labels: LabelsOpt = ",".join(DEFAULT_LABELS),
    out: Annotated[Path, typer.Option(help="JSON file for the metrics")] = Path(
        "pooled-results.json"
    ),
) -> None:
    """Pooled baseline: train on the union of the sites' train splits, test per site."""
    import torch
    from pydantic import ValidationError

    from shared_model.dataset import SiteError, open_site
    from shared_model.tokenizer import Tokenizer
    from simulations.pooled import CentralConfig, train_central

    modality = modality or ["fused"]
    label_set = parse_labels(labels)
    try:
        central = CentralConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device
        )
        models = {
            m: ModelConfig(
                image_size=image_size,
                num_classes=len(label_set),
                modality=m,  # type: ignore[arg-type]
                fusion=fusion,  # type: ignore[arg-type]
                generation=m != "text",
            )
            for m in modality
        }
    except ValidationError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    torch.set_num_threads(threads)
    tokenizer = Tokenizer(next(iter(models.values())).vocab_size)
    opened = []
    for path in sites:
        try:
            site = open_site(
                path, labels=label_set, model=next(iter(models.values())), tokenizer=tokenizer
            )
        except SiteError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        bad = len(site.summary.bad_rows)
        console.print(
            f"{site.name}: {len(site.train)} train / {len(site.val)} val / {len(site.test)} test"
            + (f", {bad} bad rows skipped" if bad else "")
        )
        opened.append(site)

    results = {}
    for name, model_cfg in models.items():
        with Progress(
            TextColumn(f"[bold]{name}[/bold] epoch {{task.completed}}/{{task.total}}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(name, total=central.epochs, loss=float("nan"))
            _, res = train_central(
                opened,
                model_cfg,
                central,
                tokenizer,
                on_epoch=lambda e, loss, t=task, m=name: _epoch_done(progress, t, m, e, loss),
            )
        results[name] = {
            "model": model_cfg.model_dump(),
            "train": central.model_dump(),
            "train_examples": res.train_examples,
            "seconds": res.seconds,
            "overall": res.overall,
            "per_site": res.per_site,
            "history": res.history,
        }
        console.print(metrics_table(f"pooled {name} - test", res.per_site, res.overall))
        console.print(f"{name}: trained in {res.seconds:.0f} s")
    if len(results) > 1:
        console.print(
            metrics_table(
                "pooled - modalities compared (all test cases)",
                {k: v["overall"] for k, v in results.items()},
                None,
            )
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, allow_nan=True))
    console.print(f"metrics written to {out}")


@privacy_app.command("show")
def privacy_show(
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="a node's ledger store (its state-dir), or a folder of stores (default "
            "$MEDFUSE_PRIVACY_STORE or ~/.medfuse/privacy; a simulation keeps one per "
            "experiment in OUTPUT/experiments/NAME/seed-N/ledgers)"
        ),
    ] = None,
) -> None:
    """Print each ledger: every release from the site's data (training rounds, the count,
    evaluations, non-private releases), epsilon spent and left per budget."""
    from client.privacy import LedgerError, default_store_root, find_stores, render_ledger

    root = state_dir or default_store_root()
    stores = find_stores(root)
    if not stores:
        err.print(f"no privacy ledger store under {Path(root).expanduser()}")
        raise typer.Exit(1)
    failed = False
    for store in stores:
        for key in store.keys():
            try:
                console.print(render_ledger(store.load(key)))
            except LedgerError as exc:
                err.print(f"[red]error:[/red] {exc}")
                failed = True
    raise typer.Exit(1 if failed else 0)


def metrics_table(
    title: str, rows: dict[str, dict[str, float]], overall: dict[str, float] | None
) -> Table:
    table = Table(title=title)
    table.add_column("")
    for col in METRIC_COLUMNS:
        table.add_column(col, justify="right")

    def cells(m: dict[str, float]) -> list[str]:
        return [f"{m[c]:.3f}" if c in m and m[c] == m[c] else "-" for c in METRIC_COLUMNS]

    for name, m in rows.items():
        table.add_row(name, *cells(m))
    if overall is not None:
        table.add_row("[bold]all sites[/bold]", *cells(overall))
    return table


def _epoch_done(progress: Progress, task: object, name: str, epoch: int, loss: float) -> None:
    progress.update(task, completed=epoch, loss=loss)  # type: ignore[arg-type]
    if not progress.console.is_terminal:  # logs and CI: a line per epoch instead of a bar
        progress.console.print(f"{name} epoch {epoch}: train loss {loss:.4f}")


def main() -> None:
    # a line at a time also when stdout is a file or a pipe (logs of long runs)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    app()


if __name__ == "__main__":
    main()
