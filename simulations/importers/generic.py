"""Any archive with one row per study: a CSV and the names of its columns.

The person names the id, image, report (optional) and label columns and, where the
archive's label values are not the label set's names, a value map ("Effusion=effusion,No
Finding=normal"). Image paths are relative to an images folder (default: the CSV's).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from simulations.importers.common import (
    ArchiveError,
    Case,
    Imported,
    ImportOptions,
    Skip,
    read_table,
    tidy,
)


class CsvColumns(BaseModel):
    """Which column holds what; `report` may be "" (no reports: empty report text)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    image: str
    label: str
    report: str = ""
    value_map: dict[str, str] = {}


def parse_value_map(text: str) -> dict[str, str]:
    """"A=a, B=b" -> {"A": "a", "B": "b"}; ValueError naming the bad pair."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in pair:
            raise ValueError(f"--label-map {pair!r}: expected VALUE=label")
        key, value = (s.strip() for s in pair.split("=", 1))
        out[key] = value
    return out


def map_label(value: str, value_map: Mapping[str, str], opts: ImportOptions
              ) -> tuple[str | None, str]:
    """The label of a cell: the map's entry where there is one, else the cell itself,
    which must then be a label of the set (compared ignoring case)."""
    raw = value.strip()
    mapped = value_map.get(raw, raw).strip()
    for label in opts.labels:
        if mapped.lower() == label.lower():
            return label, ""
    if not raw:
        return None, "empty label"
    return None, f"label {raw!r} is not in the label set nor in --label-map"


def image_path(root: Path, raw: str) -> tuple[Path | None, str]:
    """The image a cell names under `root`, or (None, reason): paths must be relative
    and stay inside the images folder (format v1 copies them into a site)."""
    text = raw.strip().replace("\\", "/")
    norm = posixpath.normpath(text) if text else ""
    if not text:
        return None, "empty image path"
    if text.startswith("/") or norm == ".." or norm.startswith("../"):
        return None, f"image {text!r} is not a path inside the images folder"
    path = root / norm
    if not path.is_file():
        return None, f"image missing: {text}"
    return path, ""


def csv_cases(table: Path, columns: CsvColumns, opts: ImportOptions,
              images: Path | None = None) -> Imported:
    """One case per row of `table`; duplicate ids, unknown labels, missing images are
    skipped with their row number."""
    need = [columns.case_id, columns.image, columns.label]
    need += [columns.report] if columns.report else []
    frame = read_table(table, need)
    root = images if images is not None else table.parent
    if not root.is_dir():
        raise ArchiveError(f"{root}: images folder not found")
    out = Imported(name=table.stem, image_root=root)
    first_row: dict[str, int] = {}
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{table.name} row {i + 2}"
        case_id = row[columns.case_id].strip()
        if not case_id:
            out.skipped.append(Skip("", where, "empty case id"))
            continue
        if case_id in first_row:
            out.skipped.append(Skip(case_id, where,
                                    f"duplicate case id (first at row {first_row[case_id]})"))
            continue
        first_row[case_id] = i + 2
        label, reason = map_label(row[columns.label], columns.value_map, opts)
        path, why = image_path(root, row[columns.image]) if label else (None, "")
        if label is None or path is None:
            out.skipped.append(Skip(case_id, where, reason or why))
            continue
        report = tidy(row[columns.report]) if columns.report else ""
        out.cases.append(Case(case_id, report, label, path, where))
    return out
