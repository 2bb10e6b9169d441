"""Imported cases to simulated hospitals: format-v1 site folders, skipped.csv, README.txt.

The pool is cut with the partitioners of `simulations/partition.py` (iid, or Dirichlet
label skew) and written by its `write_partitioned_sites`, so an imported federation is
laid out exactly like a re-partitioned synthetic one: `<archive>:<case id>`, images
hard-linked (copied where a link is impossible) under `images/<archive>/`, a fresh
70/15/15 split per hospital.

Where a case has no image (`--synthetic-films`), a synthetic film of its label is drawn by
`shared_model/tooling/synth.py` (the public archive's scanners): the site is then
SEMI-SYNTHETIC, a real report beside a film that is not the patient's, and the README.txt
written into the output and into every site says so. With `text_only` no film is drawn:
the image cell stays empty and the sites serve a text-only model (modality "text"), the
report branch on real reports with nothing synthetic in them.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from shared_model.tooling.synth import (
    PublicConfig,
    public_style,
    render_image,
    sample_anatomy,
    sample_finding,
)
from simulations.importers.common import ArchiveError, Imported, ImportOptions
from simulations.partition import (
    BOX_COLUMNS,
    PoolCase,
    label_counts,
    partition,
    site_folder_names,
    write_partitioned_sites,
)

FILM_TAG = 0xF11A  # first key of every synthetic film's random stream
FILM_SCANNERS = 12  # films cycle through this many of the public archive's scanners
FILMS = ".films"  # staging folder of the films, removed once the sites are written
SKIPPED = "skipped.csv"
README = "README.txt"
TEXT_ONLY = (
    "TEXT-ONLY: real reports and no films (the image column is empty). These sites are "
    "for the report branch alone: a simulation or federation with modality \"text\"; a "
    "model that reads films refuses every row."
)
SEMI_SYNTHETIC = (
    "SEMI-SYNTHETIC: the reports are real, the films are NOT the patients' - each is a "
    "synthetic film of the report's label drawn by medfuse's generator. Results on these "
    "sites say how the method behaves with real report text, not how a model would do on "
    "real radiographs."
)


@dataclass(frozen=True)
class ImportSummary:
    """What was written: the site folders, cases per site and label, skips by reason."""

    folders: list[Path]
    per_site: pd.DataFrame  # sites x labels
    skipped: Counter  # reason kind -> studies
    read: int
    semi_synthetic: bool
    text_only: bool = False

    def lines(self) -> list[str]:
        """A line per site ("site-00: 212 cases (normal 120, effusion 40, ...)"), then
        the totals and the skips."""
        out = []
        for name, row in self.per_site.iterrows():
            mix = ", ".join(f"{lab} {int(n)}" for lab, n in row.items() if n)
            out.append(f"{name}: {int(row.sum())} cases ({mix})")
        total = self.per_site.sum(0)
        out.append(f"imported {int(total.sum())} of {self.read} studies: "
                   + ", ".join(f"{lab} {int(n)}" for lab, n in total.items()))
        if self.skipped:
            out.append(f"skipped {sum(self.skipped.values())} (listed in {SKIPPED}): "
                       + "; ".join(f"{r} {n}" for r, n in self.skipped.most_common()))
        if self.semi_synthetic:
            out.append(SEMI_SYNTHETIC)
        if self.text_only:
            out.append(TEXT_ONLY)
        return out


def reason_kind(reason: str) -> str:
    """A skip reason without its particulars, for counting: "image missing: x.png" ->
    "image missing"; "several labels: a, b (--multi-label skip)" -> "several labels"."""
    return re.split(r":| \(", reason, maxsplit=1)[0].strip()


def draw_film(label: str, index: int, opts: ImportOptions
              ) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """A synthetic 8-bit film of `label` and its lesion box; the same (seed, index, label)
    draws the same pixels."""
    rng = np.random.default_rng([FILM_TAG, opts.seed, index])
    scanner = public_style(PublicConfig(seed=opts.seed), index % FILM_SCANNERS).scanner
    anatomy = sample_anatomy(rng)
    finding = sample_finding(rng, label, anatomy)
    image, box = render_image(rng, anatomy, finding, scanner, opts.film_size)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), box


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding anything unless `overwrite`, which removes only what an
    import writes (site folders, skipped.csv, README.txt, the film staging)."""
    out.mkdir(parents=True, exist_ok=True)
    ours = [out / SKIPPED, out / README, out / FILMS,
            *(p for p in out.glob("site-*") if (p / "manifest.csv").exists())]
    if any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace "
                              "an earlier import there, or choose another folder")
    for p in ours:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def pool_of(imp: Imported, out: Path, opts: ImportOptions, *,
            text_only: bool = False) -> list[PoolCase]:
    """The cases as a pool for `write_partitioned_sites`: images relative to the
    archive's image root, or (no image) a synthetic film staged under out/.films, or
    (`text_only`) no image at all: an empty image cell, which a text-only model reads."""
    films = out / FILMS
    pool = []
    for k, case in enumerate(imp.cases):
        record = {"case_id": case.case_id, "report": case.report, "label": case.label}
        record.update({c: "" for c in BOX_COLUMNS})
        if text_only:
            record["image"] = ""
            source = out
        elif case.image is None:
            films.mkdir(parents=True, exist_ok=True)
            pixels, box = draw_film(case.label, k, opts)
            record["image"] = f"film-{k:06d}.png"
            Image.fromarray(pixels).save(films / record["image"], format="PNG")
            if box is not None:
                record.update({c: f"{v:.4f}" for c, v in zip(BOX_COLUMNS, box, strict=True)})
            source = films
        else:
            if imp.image_root is None:
                raise ValueError("a case with an image needs Imported.image_root")
            record["image"] = case.image.relative_to(imp.image_root).as_posix()
            source = imp.image_root
        pool.append(PoolCase(source=source.resolve(), source_name=imp.name, record=record))
    return pool


def write_import(
    imp: Imported, out: Path, opts: ImportOptions, *, notice: str = "",
    overwrite: bool = False, link: Literal["hardlink", "copy"] = "hardlink",
    text_only: bool = False,
) -> ImportSummary:
    """Partition the cases into `opts.sites` hospitals and write them under `out`, with
    skipped.csv (every study left out, and why) and README.txt (`notice`, the policies,
    the counts; the semi-synthetic warning where films were drawn, the text-only one
    where `text_only` left every image cell empty)."""
    if not imp.cases:
        raise ArchiveError(f"no usable study in {imp.read} read: every one was skipped "
                           f"({_top_reasons(imp)})")
    out = Path(out)
    prepare_out(out, overwrite)
    labels = [c.label for c in imp.cases]
    parts = partition("dirichlet" if opts.label_skew else "iid", labels, opts.sites,
                      seed=opts.seed, alpha=opts.label_skew or 1.0, min_size=opts.min_cases)
    pool = pool_of(imp, out, opts, text_only=text_only)
    folders = write_partitioned_sites(pool, parts, out, seed=opts.seed, link=link)
    shutil.rmtree(out / FILMS, ignore_errors=True)
    _write_skipped(out / SKIPPED, imp)
    counts = label_counts(labels, parts)
    counts.index = site_folder_names(len(parts))
    counts = counts[[lab for lab in opts.labels if lab in counts.columns]]
    summary = ImportSummary(folders, counts, Counter(reason_kind(s.reason) for s in imp.skipped),
                            imp.read, not text_only and any(c.image is None for c in imp.cases),
                            text_only=text_only)
    text = _readme(imp, opts, notice, summary)
    for folder in (out, *folders):
        (folder / README).write_text(text, encoding="utf-8")
    return summary


def _write_skipped(path: Path, imp: Imported) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["case_id", "source", "reason"])
        writer.writerows([s.case_id, s.source, s.reason] for s in imp.skipped)


def _top_reasons(imp: Imported) -> str:
    kinds = Counter(reason_kind(s.reason) for s in imp.skipped)
    return "; ".join(f"{r} {n}" for r, n in kinds.most_common(3)) or "nothing read"


def _readme(imp: Imported, opts: ImportOptions, notice: str, summary: ImportSummary) -> str:
    """README.txt: where the data came from, how it was labelled, what was written."""
    head = [f"Imported from {imp.name} by `medfuse data import` (dataset format v1)."]
    if summary.semi_synthetic:
        head.append(SEMI_SYNTHETIC)
    if summary.text_only:
        head.append(TEXT_ONLY)
    if notice:
        head.append(notice)
    policy = (f"Policies: uncertain (-1) = {opts.uncertain}; several labels = "
              f"{opts.multi_label}; hospitals = {opts.sites}, "
              + (f"Dirichlet label skew alpha {opts.label_skew}" if opts.label_skew else "iid")
              + f", seed {opts.seed}.")
    return "\n\n".join([*head, policy, "\n".join(summary.lines())]) + "\n"
