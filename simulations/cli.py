"""The researcher's commands: synthetic hospitals, a synthetic public archive, the
pooled baseline (`medfuse simulate` lives in `simulations/simulate.py`).

    medfuse data synth          synthetic hospitals in format v1
    medfuse data synth-public   a synthetic stand-in for a public archive
    medfuse data import ...     a public archive (OpenI, MIMIC-CXR, CheXpert, a CSV) as
                                simulated hospitals in format v1
    medfuse train-pooled        pooled (centralised) baseline on the union of sites
    medfuse bench               what DP and the federation cost, measured here
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared_model.config import CENTRAL, CentralConfig, ModelConfig
from shared_model.contract.metric_registry import View, shown_in
from shared_model.files import atomic_write_text
from shared_model.tooling.cli_opts import (
    DEFAULT_LABELS_TEXT,
    LabelsOpt,
    console,
    fail,
    parse_labels,
)
from shared_model.tooling.synth import PublicConfig, SynthConfig, write_federation, write_public

# Modules that load torch (torch itself, the dataset, tokenizer and training code, the
# bench) are imported inside the commands that use them, marked `# lazy:`: `medfuse --help`
# imports this module and should not wait for torch. "(--help)" in those comments means that.

METRIC_COLUMNS = tuple(m.name for m in shown_in(View.TABLES))


def _synth_option_error(exc: ValidationError) -> str:
    """A bad `data synth` option as one line: `--label-skew -1.0: should be greater than 0`
    (pydantic's own text names SynthConfig's fields, not the options a person typed)."""
    parts = []
    for e in exc.errors():
        option = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else "data synth"
        msg = str(e["msg"]).removeprefix("Value error, ").removeprefix("Input ")
        parts.append(f"{option} {e['input']!r}: {msg}")
    return "; ".join(parts)


def data_synth(
    out: Annotated[Path, typer.Option(help="folder to write site-00, site-01, ... into")],
    sites: Annotated[int, typer.Option(min=1, help="number of hospitals")] = 5,
    cases_per_site: Annotated[int, typer.Option(min=10, help="mean cases per hospital")] = 400,
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
    label_skew: Annotated[
        float | None,
        typer.Option(help="Dirichlet alpha of each site's label mix (smaller = more skew)"),
    ] = None,
    label_mix: Annotated[str, typer.Option(
        help="balanced, or nih: the labels' shares in NIH ChestX-ray14 (88% normal, "
        "pneumonia 0.5%)")] = "balanced",
    image_size: Annotated[int, typer.Option(min=16, help="image side in pixels")] = 64,
    difficulty: Annotated[str, typer.Option(
        help="standard, or hard: fainter findings, more clutter, fewer informative "
        "reports")] = "standard",
    style: Annotated[str, typer.Option(
        help="house, or unseen: scanners and report styles the synthetic public corpus "
        "never uses (a test of how a public start transfers)")] = "house",
    overwrite: Annotated[bool, typer.Option(help="replace existing site folders")] = False,
) -> None:
    """Write synthetic hospitals in dataset format v1."""
    try:
        cfg = SynthConfig(
            sites=sites,
            cases_per_site=cases_per_site,
            seed=seed,
            label_skew=label_skew,
            label_mix=label_mix,
            image_size=image_size,
            difficulty=difficulty,
            style=style,
        )
        paths = write_federation(out, cfg, overwrite=overwrite)
    except ValidationError as exc:
        fail(_synth_option_error(exc))
    except (FileExistsError, ValueError) as exc:
        fail(exc)
    for p in paths:
        console.print(f"wrote {p}")


def data_synth_public(
    out: Annotated[Path, typer.Option(help="folder to write the corpus into (one site folder)")],
    cases: Annotated[int, typer.Option(min=50, help="cases in the archive")] = 2000,
    seed: Annotated[int, typer.Option(help="same seed, same bytes (streams of its own)")] = 0,
    sources: Annotated[int, typer.Option(
        min=1, max=64, help="source hospitals pooled in the archive, each with its own "
        "scanner and one of the archive's report styles")] = 12,
    image_size: Annotated[int, typer.Option(min=16, help="image side in pixels")] = 64,
    difficulty: Annotated[str, typer.Option(
        help="standard, or hard: fainter findings, more clutter, fewer informative "
        "reports")] = "standard",
    labeller: Annotated[str, typer.Option(
        help="noisy (true labels, 8% replaced at random) or mined: read off the reports as "
        "report-mining labellers do (nothing said = normal, uncertain = positive, half "
        "the resolved-disease remarks misread), then 8% replaced")] = "noisy",
) -> None:
    """Write a SYNTHETIC stand-in for a pooled public archive (NIH ChestX-ray14, CheXpert,
    MIMIC-CXR, PadChest): many source hospitals of its own, each with its own scanner
    (tone curve, bit depth, noise, blur, resolution, aspect ratio, frames and side
    markers) and one of several report styles, 8% label noise. For a real public dataset,
    convert it to format v1 and pass its folder to pretrain."""
    try:
        path = write_public(out, PublicConfig(cases=cases, seed=seed, sources=sources,
                                              image_size=image_size, difficulty=difficulty,
                                              labeller=labeller))
    except (ValidationError, FileExistsError, ValueError) as exc:
        fail(exc)
    console.print(f"wrote {path} ({cases} cases; synthetic, not a real public dataset)")


def train_pooled(
    sites: Annotated[list[Path], typer.Option("--sites", help="site folders (repeat the option)")],
    modality: Annotated[
        list[str] | None, typer.Option(help="fused, image or text; repeat to compare")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = CENTRAL.epochs,
    batch_size: Annotated[int, typer.Option(min=1)] = CENTRAL.batch_size,
    lr: Annotated[float, typer.Option()] = CENTRAL.lr,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = CENTRAL.device,
    threads: Annotated[
        int, typer.Option(min=1, help="torch CPU threads; >1 thrashes on a busy 2-core machine")
    ] = 1,
    fusion: Annotated[str, typer.Option(help="concat, gated or bilinear")] = "gated",
    image_size: Annotated[int, typer.Option()] = 64,
    labels: LabelsOpt = DEFAULT_LABELS_TEXT,
    out: Annotated[Path, typer.Option(help="JSON file for the metrics")] = Path(
        "pooled-results.json"
    ),
) -> None:
    """Pooled baseline: train on the union of the sites' train splits, test per site."""
    import torch  # lazy: keeps `medfuse --help` fast (torch)

    label_set = parse_labels(labels)
    try:
        central = CentralConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                device=device)
        models = {m: ModelConfig(image_size=image_size, num_classes=len(label_set),
                                 modality=m, fusion=fusion,  # type: ignore[arg-type]
                                 generation=m != "text")
                  for m in modality or ["fused"]}
    except ValidationError as exc:
        fail(exc)
    torch.set_num_threads(threads)
    opened = _open_sites(sites, label_set, next(iter(models.values())))
    results = {name: _pooled_one(name, cfg, central, opened) for name, cfg in models.items()}
    if len(results) > 1:
        console.print(metrics_table("pooled - modalities compared (all test cases)",
                                    {k: v["overall"] for k, v in results.items()}, None))
    atomic_write_text(out, json.dumps(results, indent=2, allow_nan=True))
    console.print(f"metrics written to {out}")


def _open_sites(paths: list[Path], labels: tuple[str, ...], model: ModelConfig) -> list:
    """Open every site (exit 1 naming the first that cannot be used), a line each."""
    from shared_model.dataset import SiteError, open_site  # lazy: loads torch (--help)
    from shared_model.tokenizer import Tokenizer  # lazy: loads torch (--help)

    tokenizer = Tokenizer(model.vocab_size)
    opened = []
    for path in paths:
        try:
            site = open_site(path, labels=labels, model=model, tokenizer=tokenizer)
        except SiteError as exc:
            fail(exc, 1)
        bad = len(site.summary.bad_rows)
        console.print(
            f"{site.name}: {len(site.train)} train / {len(site.val)} val / {len(site.test)} test"
            + (f", {bad} bad rows skipped" if bad else "")
        )
        opened.append(site)
    return opened


def _pooled_one(name: str, model_cfg: ModelConfig, central, opened: list) -> dict:
    """Train one modality on the pooled train splits, with a progress bar; its metrics."""
    from shared_model.central import train_central  # lazy: loads torch and opacus (--help)
    from shared_model.tokenizer import Tokenizer  # lazy: loads torch (--help)

    with Progress(
        TextColumn(f"[bold]{name}[/bold] epoch {{task.completed}}/{{task.total}}"),
        BarColumn(), TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(name, total=central.epochs, loss=float("nan"))
        _, res = train_central(
            opened, model_cfg, central, Tokenizer(model_cfg.vocab_size),
            on_epoch=lambda e, loss: _epoch_done(progress, task, name, e, loss),
        )
    console.print(metrics_table(f"pooled {name} - test", res.per_site, res.overall))
    console.print(f"{name}: trained in {res.seconds:.0f} s")
    return {"model": model_cfg.model_dump(), "train": central.model_dump(),
            "train_examples": res.train_examples, "seconds": res.seconds,
            "overall": res.overall, "per_site": res.per_site, "history": res.history}


def bench(
    out: Annotated[Path, typer.Option(help="bench.json and the data it measured on")] = Path(
        "runs/bench"),
    quick: Annotated[bool, typer.Option(help="fewer repeats (noisier)")] = False,
) -> None:
    """Measure what privacy and the federation cost on this machine: DP-SGD step time over
    a plain step (all layers and fewer), array bytes per round over 2 x the model; print
    each figure beside its goal and write bench.json."""
    # lazy: the bench loads torch, opacus, pandas and Flower; `medfuse --help` imports this
    from simulations.bench import run_bench

    run_bench(out, quick=quick, echo=lambda line: console.print(line, highlight=False))


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


# ---------------------------------------------------------------------- data import

data_import = typer.Typer(
    help="A public archive (OpenI, MIMIC-CXR, CheXpert, any CSV) as simulated hospitals in "
    "format v1: one site folder per hospital, skipped.csv (every study left out, and why).",
    no_args_is_help=True)

PUBLIC_TABLES = Path(os.environ.get("MEDFUSE_PUBLIC_TABLES",
                                    Path.home() / ".cache" / "medfuse" / "public-tables"))
OutOpt = Annotated[Path, typer.Option(help="folder to write site-00, site-01, ... into")]
SitesOpt = Annotated[int, typer.Option(min=1, help="simulated hospitals")]
SkewOpt = Annotated[float | None, typer.Option(
    help="Dirichlet alpha of the label skew across hospitals (smaller = more skew); "
    "left out: iid")]
SeedOpt = Annotated[int, typer.Option(help="same seed, same hospitals")]
MinCasesOpt = Annotated[int, typer.Option(min=1, help="fewest cases a hospital may get")]
UncertainOpt = Annotated[str, typer.Option(
    help="an uncertain (-1) label: positive (U-Ones), negative (U-Zeros) or skip the study")]
MultiOpt = Annotated[str, typer.Option(
    help="a study positive for several labels: skip, or priority (the first in label-set "
    "order: pneumonia, nodule, effusion, cardiomegaly)")]
OverwriteOpt = Annotated[bool, typer.Option(help="replace an earlier import in --out")]
LinkOpt = Annotated[str, typer.Option(help="hardlink (copy where impossible) or copy images")]


def _import_options(**fields: object):
    """ImportOptions from the command's options, a bad one as one line."""
    from simulations.importers import ImportOptions  # lazy: pandas, partitioners (--help)

    try:
        return ImportOptions(**fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        fail(_synth_option_error(exc))


def _write_sites(read, out: Path, opts, *, notice: str, overwrite: bool, link: str,
                 started: float, text_only: bool = False) -> None:
    """Read the archive (`read()`), write the hospitals, print a line per site."""
    from simulations.importers import ArchiveError, write_import  # lazy: pandas (--help)
    from simulations.partition import PartitionError  # lazy: pandas (--help)

    if link not in ("hardlink", "copy"):
        fail(f"--link {link!r}: allowed are hardlink, copy")
    try:
        summary = write_import(read(), out, opts, notice=notice, overwrite=overwrite,
                               link=link, text_only=text_only)  # type: ignore[arg-type]
    except (ArchiveError, PartitionError, FileExistsError) as exc:
        fail(exc)
    for line in summary.lines():
        console.print(line, highlight=False, soft_wrap=True)  # a line each: logs are grepped
    console.print(f"wrote {len(summary.folders)} site folder(s) under {out} in "
                  f"{time.monotonic() - started:.1f} s", highlight=False, soft_wrap=True)


@data_import.command("openi")
def import_openi(
    out: OutOpt,
    archive: Annotated[Path, typer.Argument(
        help="NLMCXR_reports.tgz (scripts/fetch-public-tables.sh puts it in the cache)")
    ] = PUBLIC_TABLES / "NLMCXR_reports.tgz",
    images: Annotated[Path | None, typer.Option(
        help="folder of the NLMCXR PNGs (<image id>.png): each report with its frontal film")
    ] = None,
    synthetic_films: Annotated[bool, typer.Option(
        help="no images: pair each real report with a SYNTHETIC film of its label "
        "(a semi-synthetic site)")] = False,
    text_only: Annotated[bool, typer.Option(
        help="no images: the real reports alone, image cells empty, for a text-only model "
        "(modality \"text\"); nothing synthetic")] = False,
    views: Annotated[Path | None, typer.Option(
        help="the DICOM view table (default: nlmcxr_dicom_metadata.csv.gz beside ARCHIVE)")
    ] = None,
    sites: SitesOpt = 1, label_skew: SkewOpt = None, seed: SeedOpt = 0,
    min_cases: MinCasesOpt = 10, multi_label: MultiOpt = "skip",
    film_size: Annotated[int, typer.Option(help="synthetic film side in pixels")] = 64,
    overwrite: OverwriteOpt = False, link: LinkOpt = "hardlink",
) -> None:
    """OpenI (Indiana University, CC BY-NC-ND 4.0): report XMLs, labels from MeSH majors."""
    from simulations.importers import iter_archive, openi_cases, read_views  # lazy: (--help)
    from simulations.importers.common import ArchiveError  # lazy: pandas (--help)
    from simulations.importers.openi import VIEW_TABLE  # lazy: pandas (--help)

    started = time.monotonic()
    if (images is not None) + synthetic_films + text_only != 1:
        fail("openi: give --images DIR (the NLMCXR PNGs), --synthetic-films or --text-only, "
             "one of them")
    if images is not None and not images.is_dir():
        fail(f"--images {images}: no such folder")
    opts = _import_options(sites=sites, label_skew=label_skew, seed=seed, min_cases=min_cases,
                           multi_label=multi_label, film_size=film_size)
    try:
        table = views or archive.with_name(VIEW_TABLE)
        view_map = read_views(table) if images is not None else None
    except ArchiveError as exc:
        fail(f"{exc} (--images needs the view table: pass --views)")

    def read():
        return openi_cases(iter_archive(archive), opts, images=images, views=view_map)

    notice = ("Reports: OpenI, Indiana University chest X-ray collection, CC BY-NC-ND 4.0 "
              "(non-commercial, no derivatives): do not redistribute or commit these sites.")
    _write_sites(read, out, opts, notice=notice, overwrite=overwrite, link=link,
                 started=started, text_only=text_only)


@data_import.command("mimic-cxr")
def import_mimic(
    out: OutOpt,
    root: Annotated[Path, typer.Argument(
        help="MIMIC-CXR-JPG root: files/, mimic-cxr-2.0.0-chexpert.csv(.gz), "
        "mimic-cxr-2.0.0-metadata.csv(.gz)")],
    reports: Annotated[Path | None, typer.Option(
        help="root of the reports files/pNN/pNNNNNNNN/sNNNNNNNN.txt (default: ROOT)")] = None,
    sites: SitesOpt = 1, label_skew: SkewOpt = None, seed: SeedOpt = 0,
    min_cases: MinCasesOpt = 10, uncertain: UncertainOpt = "skip",
    multi_label: MultiOpt = "skip", overwrite: OverwriteOpt = False,
    link: LinkOpt = "hardlink",
) -> None:
    """MIMIC-CXR-JPG (PhysioNet credentialed): CheXpert labels, a PA (else AP) film."""
    from simulations.importers import mimic_cases  # lazy: pandas (--help)

    started = time.monotonic()
    if not root.is_dir():
        fail(f"{root}: no such folder (expected the MIMIC-CXR-JPG root)")
    opts = _import_options(sites=sites, label_skew=label_skew, seed=seed, min_cases=min_cases,
                           uncertain=uncertain, multi_label=multi_label)
    _write_sites(lambda: mimic_cases(root, opts, reports), out, opts,
                 notice="Source: MIMIC-CXR-JPG (PhysioNet credentialed licence): keep these "
                 "sites where the licence allows.", overwrite=overwrite, link=link,
                 started=started)


@data_import.command("chexpert")
def import_chexpert(
    out: OutOpt,
    root: Annotated[Path, typer.Argument(
        help="the CheXpert folder holding train.csv / valid.csv (CheXpert-v1.0-small)")],
    sites: SitesOpt = 1, label_skew: SkewOpt = None, seed: SeedOpt = 0,
    min_cases: MinCasesOpt = 10, uncertain: UncertainOpt = "skip",
    multi_label: MultiOpt = "skip", overwrite: OverwriteOpt = False,
    link: LinkOpt = "hardlink",
) -> None:
    """CheXpert (Stanford): labels per study, a PA (else AP) frontal film, no reports."""
    from simulations.importers import chexpert_cases  # lazy: pandas (--help)

    started = time.monotonic()
    if not root.is_dir():
        fail(f"{root}: no such folder (expected the CheXpert folder with train.csv)")
    opts = _import_options(sites=sites, label_skew=label_skew, seed=seed, min_cases=min_cases,
                           uncertain=uncertain, multi_label=multi_label)
    _write_sites(lambda: chexpert_cases(root, opts), out, opts,
                 notice="Source: CheXpert (Stanford research use agreement); no reports: "
                 "the report column is empty.", overwrite=overwrite, link=link,
                 started=started)


@data_import.command("csv")
def import_csv(
    out: OutOpt,
    table: Annotated[Path, typer.Argument(help="a CSV with one row per study")],
    id_col: Annotated[str, typer.Option(help="column of the study id")],
    image_col: Annotated[str, typer.Option(help="column of the image path (under --images)")],
    label_col: Annotated[str, typer.Option(help="column of the label")],
    report_col: Annotated[str, typer.Option(help="column of the report (none: empty)")] = "",
    label_map: Annotated[str, typer.Option(
        help="label values to the label set: 'No Finding=normal,Effusion=effusion'")] = "",
    images: Annotated[Path | None, typer.Option(
        help="folder the image paths are relative to (default: the CSV's folder)")] = None,
    labels: LabelsOpt = DEFAULT_LABELS_TEXT,
    sites: SitesOpt = 1, label_skew: SkewOpt = None, seed: SeedOpt = 0,
    min_cases: MinCasesOpt = 10, overwrite: OverwriteOpt = False, link: LinkOpt = "hardlink",
) -> None:
    """Any archive with one row per study: name its columns."""
    from simulations.importers import CsvColumns, csv_cases, parse_value_map  # lazy: (--help)

    started = time.monotonic()
    try:
        columns = CsvColumns(case_id=id_col, image=image_col, label=label_col,
                             report=report_col, value_map=parse_value_map(label_map))
    except ValueError as exc:
        fail(exc)
    opts = _import_options(labels=parse_labels(labels), sites=sites, label_skew=label_skew,
                           seed=seed, min_cases=min_cases)
    _write_sites(lambda: csv_cases(table, columns, opts, images), out, opts,
                 notice=f"Source: {table.name}.", overwrite=overwrite, link=link,
                 started=started)
