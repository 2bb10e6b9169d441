"""The hospital's commands: check a site folder, read the site's privacy ledger.

    medfuse data check SITE...     every unusable row, counts per label and split
    medfuse privacy show           epsilon spent and left, every release from the data
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared_model.cli_opts import DEFAULT_LABELS_TEXT, LabelsOpt, console, err, parse_labels


def data_check(
    site_dirs: Annotated[list[Path], typer.Argument(help="one or more site folders")],
    strict: Annotated[bool, typer.Option(help="any bad row makes the site unusable")] = False,
    labels: LabelsOpt = DEFAULT_LABELS_TEXT,
    image_size: Annotated[int, typer.Option(help="model input size")] = 64,
) -> None:
    """Check site folders: counts per label and split, formats, and every unusable row.

    Exit code 0 when every site is usable, 1 otherwise (under --strict, any bad row).
    """
    from client.data_check import exit_code, render_summary
    from shared_model.config import ModelConfig
    from shared_model.dataset import check_site
    from shared_model.tokenizer import Tokenizer

    label_set = parse_labels(labels)
    model = ModelConfig(image_size=image_size, num_classes=len(label_set))
    tokenizer = Tokenizer(model.vocab_size)
    summaries = []
    for site in site_dirs:
        summary = check_site(site, labels=label_set, model=model, tokenizer=tokenizer,
                             strict=strict)
        render_summary(summary, console)
        summaries.append(summary)
    raise typer.Exit(exit_code(summaries, strict))


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
