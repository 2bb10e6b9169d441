"""What `medfuse data check` prints about a site, and the exit code it returns.

A hospital runs the check before its node joins a federation: it shows what the reader
found (cases per label and split, image formats and sizes) and every row it will skip,
with the spreadsheet row number, the case_id and the reason, so the data can be fixed
at the source. Nothing here opens files: it renders a `SiteSummary` from
`shared_model.dataset.check_site`.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from shared_model.dataset import NO_IMAGE_REASON, SPLITS, SiteSummary

# Distinct original sizes listed one by one before the rest are only counted.
MAX_SIZES_SHOWN = 5


def render_summary(
    summary: SiteSummary, console: Console, *, max_bad_rows: int | None = None
) -> None:
    """Print one site's check: counts, formats, sizes, bad rows and a one-line verdict.

    Text that comes from the manifest (case_ids, labels, reasons quoting cell values) is
    printed as plain `Text`, never as rich markup, so a "[" in a cell cannot garble the
    output. `max_bad_rows` caps the bad-row table (None lists every row).
    """
    console.rule(Text(f"site {summary.name}", style="bold"))
    console.print(Text(f"folder: {summary.path}"))
    if summary.total_rows or summary.usable_rows:
        console.print(_counts_table(summary))
        if summary.hash_split_rows:
            console.print(
                Text(
                    f"split: {summary.hash_split_rows} of {summary.usable_rows} usable rows "
                    "split by case_id hash (70/15/15)"
                )
            )
        console.print(Text("image formats: " + _formats_line(summary)))
        console.print(Text("original sizes (w x h): " + _sizes_line(summary)))
    line = text_only_line(summary)
    if line:
        console.print(Text(line))
    if summary.bad_rows:
        console.print(_bad_rows_table(summary, max_bad_rows))
    console.print(_verdict(summary))


def exit_code(summaries: Iterable[SiteSummary], strict: bool) -> int:
    """0 when every site is usable (under `strict`, also without a bad row), else 1."""
    ok = all(s.usable and not (strict and s.bad_rows) for s in summaries)
    return 0 if ok else 1


def text_only_line(summary: SiteSummary) -> str:
    """What the check says about rows without an image ('' when every row has one): a
    TEXT-ONLY site trains the report branch alone (modality "text"); checked for a model
    that reads films, its image-less rows are bad, and the line says how to check it as
    a text-only site instead."""
    if summary.text_only:
        return (f"TEXT-ONLY site: none of its {summary.usable_rows} usable rows has an image; "
                "usable by a text-only model (modality \"text\") only")
    if summary.text_only_rows:
        return (f"{summary.text_only_rows} of {summary.usable_rows} usable rows have no image "
                "(used by a text-only model only)")
    no_image = sum(b.reason.startswith(NO_IMAGE_REASON) for b in summary.bad_rows)
    if no_image:
        return (f"{no_image} row(s) have no image: a text-only site? `medfuse data check "
                "--modality text` checks it for the report branch alone")
    return ""


def _counts_table(summary: SiteSummary) -> Table:
    table = Table(title=f"usable cases per label and split ({summary.name})", title_justify="left")
    table.add_column("label")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    totals = dict.fromkeys(SPLITS, 0)
    for label in summary.labels:
        per = [summary.counts.get(s, {}).get(label, 0) for s in SPLITS]
        for s, n in zip(SPLITS, per, strict=True):
            totals[s] += n
        table.add_row(Text(label), *(str(n) for n in per), str(sum(per)))
    table.add_section()
    table.add_row(
        Text("all", style="bold"),
        *(str(totals[s]) for s in SPLITS),
        str(sum(totals.values())),
    )
    return table


def _formats_line(summary: SiteSummary) -> str:
    if not summary.formats:
        return "none"
    return ", ".join(f"{fmt} x {n}" for fmt, n in summary.formats.items())


def _sizes_line(summary: SiteSummary) -> str:
    if not summary.sizes:
        return "none"
    ranked = sorted(summary.sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{w}x{h} x {n}" for (w, h), n in ranked[:MAX_SIZES_SHOWN])
    rest = len(ranked) - MAX_SIZES_SHOWN
    if rest > 0:
        lo, hi = summary.min_size, summary.max_size
        assert lo is not None and hi is not None
        shown += f", {rest} other sizes (smallest {lo[0]}x{lo[1]}, largest {hi[0]}x{hi[1]})"
    return shown


def _bad_rows_table(summary: SiteSummary, max_rows: int | None) -> Table:
    bad = summary.bad_rows
    shown = bad if max_rows is None else bad[:max_rows]
    title = f"{len(bad)} unusable row(s), skipped"
    if len(shown) < len(bad):
        title += f" (first {len(shown)} shown)"
    table = Table(title=title, title_justify="left")
    table.add_column("row", justify="right")
    table.add_column("case_id")
    table.add_column("reason", overflow="fold")
    for b in shown:
        table.add_row(str(b.row), Text(b.case_id), Text(b.reason))
    return table


def _verdict(summary: SiteSummary) -> Text:
    if not summary.usable:
        verdict = Text("NOT USABLE: ", style="bold red")
        verdict.append(summary.error or "no usable training rows")
        return verdict
    bad = len(summary.bad_rows)
    verdict = Text("USABLE: ", style="bold green")
    verdict.append(
        f"{summary.usable_rows} of {summary.total_rows} rows usable"
        + (f", {bad} unusable row(s) will be skipped" if bad else ", no unusable rows")
    )
    return verdict
