"""What every importer shares: the case and skip records, the policies, the label rule.

An importer turns a public archive's own layout into `Imported`: one `Case` per study it
could use and one `Skip` (with its reason) per study it could not. Nothing here reads an
archive; `writer.py` turns the result into format-v1 site folders.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared_model.config import DEFAULT_LABELS

Uncertain = Literal["positive", "negative", "skip"]
MultiLabel = Literal["skip", "priority"]

# Views a film is taken frontally in, best first: PA is the standard erect film; AP (the
# bedside film) is used only where a study has no PA.
FRONTAL_VIEWS = ("PA", "AP")


class ArchiveError(ValueError):
    """The archive is not where, or not laid out as, expected: one line for a person,
    naming the file and what was expected there."""


@dataclass(frozen=True)
class Case:
    """One usable study: its report, its label and its image (None: a synthetic film is
    to be drawn for it)."""

    case_id: str
    report: str
    label: str
    image: Path | None = None
    source: str = ""  # where in the archive it came from (a file, a row)


@dataclass(frozen=True)
class Skip:
    """One study left out, and why (listed in skipped.csv)."""

    case_id: str
    source: str
    reason: str


@dataclass
class Imported:
    """What an importer read: the usable cases, the skipped studies, and the archive's
    name (the prefix of every case id: `openi:CXR12`)."""

    name: str
    image_root: Path | None = None  # every Case.image lies under it (None: no images)
    cases: list[Case] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def add(self, item: Case | Skip) -> None:
        if isinstance(item, Case):
            self.cases.append(item)
        else:
            self.skipped.append(item)

    @property
    def read(self) -> int:
        return len(self.cases) + len(self.skipped)


class ImportOptions(BaseModel):
    """How uncertain and multi-label studies are resolved, and how the pool is cut into
    simulated hospitals. Checked here so a bad option is one line, not a traceback."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: tuple[str, ...] = DEFAULT_LABELS
    uncertain: Uncertain = Field(
        "skip", description="-1 read as positive (U-Ones), negative (U-Zeros) or the "
        "study skipped (Irvin et al. 2019)")
    multi_label: MultiLabel = Field(
        "skip", description="a study positive for several labels: skipped, or given the "
        "first of them in label-set order")
    sites: int = Field(1, ge=1, le=1000)
    label_skew: float | None = Field(None, gt=0, description="Dirichlet alpha; None: iid")
    seed: int = Field(0, ge=0)
    min_cases: int = Field(10, ge=1, description="fewest cases a hospital may get")
    film_size: int = Field(64, ge=16, le=1024)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value) or len(value) < 2:
            raise ValueError("needs two or more distinct labels")
        return value


# ---------------------------------------------------------------------- the label rule


def decide_label(
    positive: Iterable[str], uncertain: Iterable[str], normal: bool, opts: ImportOptions,
    others: Sequence[str] = (),
) -> tuple[str | None, str]:
    """(label, "") or (None, reason): the one rule every importer applies once it has
    read which labels a study states as present, uncertain or normal.

    Uncertain labels follow `opts.uncertain`; several diseases follow `opts.multi_label`;
    "normal" beside a disease is a contradiction (skipped); nothing of the label set is
    skipped (naming the archive's other findings), never read as normal."""
    pos = set(positive)
    unc = set(uncertain) - pos
    if unc and opts.uncertain == "skip":
        return None, f"uncertain: {', '.join(_ordered(unc, opts))} (--uncertain skip)"
    if opts.uncertain == "positive":
        pos |= unc
    diseases = _ordered(pos - {"normal"}, opts)
    normal = normal or "normal" in pos
    if len(diseases) > 1 and opts.multi_label == "skip":
        return None, f"several labels: {', '.join(diseases)} (--multi-label skip)"
    if diseases and normal:
        return None, f"normal and {diseases[0]} both stated"
    found = diseases[0] if diseases else "normal" if normal else None
    if found is not None and found not in opts.labels:
        return None, f"{found} is not in the label set ({', '.join(opts.labels)})"
    if found is not None:
        return found, ""
    extra = f" (other findings: {', '.join(others)})" if others else ""
    return None, f"no label of the set{extra}"


def _ordered(labels: Iterable[str], opts: ImportOptions) -> list[str]:
    """Labels in label-set order: the priority `--multi-label priority` uses."""
    rank = {lab: i for i, lab in enumerate(opts.labels)}
    return sorted(labels, key=lambda lab: (rank.get(lab, len(rank)), lab))


def observation_value(raw: str) -> int | None:
    """A CheXpert-style cell: 1 positive, 0 negative, -1 uncertain, blank not mentioned
    (None). Raises ValueError on anything else (the caller names the row)."""
    text = str(raw).strip()
    if text == "" or text.lower() == "nan":
        return None
    value = float(text)
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"{text!r} is not 1, 0, -1 or blank")
    return int(value)


def decide_from_observations(
    row: Mapping[str, str], mapping: Mapping[str, str], opts: ImportOptions
) -> tuple[str | None, str]:
    """The label of a row of observation columns (CheXpert, MIMIC-CXR), `mapping` naming
    the column behind each label; columns not mapped are listed when nothing maps."""
    positive, uncertain, others = set(), set(), []
    for column, raw in row.items():
        try:
            value = observation_value(raw)
        except ValueError as exc:
            return None, f"column {column!r}: {exc}"
        label = mapping.get(column)
        if label is None:
            if value == 1 and column in CHEXPERT_OBSERVATIONS:
                others.append(column)
            continue
        if value == 1:
            positive.add(label)
        elif value == -1:
            uncertain.add(label)
    return decide_label(positive, uncertain, False, opts, others)


# ---------------------------------------------------------------------- views, tables


def choose_frontal(views: Iterable[tuple[str, str]]) -> str | None:
    """The image to use among (image id, view) pairs: a PA, else an AP, the smallest id
    among equals (the same choice on every machine); None where no view is frontal."""
    frontal = [(FRONTAL_VIEWS.index(v.strip().upper()), i) for i, v in views
               if v.strip().upper() in FRONTAL_VIEWS]
    return min(frontal)[1] if frontal else None


def read_table(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """A CSV (or .csv.gz) as text cells, or ArchiveError naming the file and the columns
    it lacks."""
    if not path.is_file():
        raise ArchiveError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False,
                            encoding="utf-8-sig")
    except Exception as exc:  # parser, decoding and IO errors alike
        raise ArchiveError(f"{path}: not a readable CSV ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ArchiveError(f"{path}: no column {', '.join(map(repr, missing))} "
                           f"(columns: {', '.join(frame.columns[:20])})")
    return frame


def find_file(folder: Path, *names: str) -> Path:
    """The first of `names` present in `folder`, or ArchiveError naming all of them."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ArchiveError(f"{folder}: expected {' or '.join(names)}")


def tidy(text: str) -> str:
    """Whitespace runs as one space: reports keep their words, not their layout."""
    return re.sub(r"\s+", " ", text).strip()


# CheXpert's 14 observations (Irvin et al. 2019), shared by MIMIC-CXR's chexpert.csv.
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
# Which observation stands for which label. Consolidation is read as pneumonia (as the
# OpenI table reads it); Lung Lesion is CheXpert's "nodule or mass". Enlarged
# Cardiomediastinum is NOT cardiomegaly (it includes the mediastinum) and maps to nothing.
CHEXPERT_TO_LABEL = {
    "No Finding": "normal",
    "Pneumonia": "pneumonia",
    "Consolidation": "pneumonia",
    "Lung Lesion": "nodule",
    "Pleural Effusion": "effusion",
    "Cardiomegaly": "cardiomegaly",
}
