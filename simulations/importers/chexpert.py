"""CheXpert (Stanford) and MIMIC-CXR (MIT / Beth Israel): their label tables to cases.

Both label studies with CheXpert's 14 observations (1 positive, 0 negative, -1 uncertain,
blank not mentioned), read by `CHEXPERT_TO_LABEL` and the shared rule.

* CheXpert: `train.csv` / `valid.csv`, one row per image, `Path` relative to the folder
  above `CheXpert-v1.0(-small)/`, `Frontal/Lateral` and `AP/PA`; no reports (the released
  archive has none: the report column is left empty, which format v1 allows).
* MIMIC-CXR-JPG: `mimic-cxr-2.0.0-chexpert.csv(.gz)` (subject_id, study_id, the 14),
  `mimic-cxr-2.0.0-metadata.csv(.gz)` (dicom_id, subject_id, study_id, ViewPosition),
  images at `files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`; the reports (from MIMIC-CXR)
  at `files/pNN/pNNNNNNNN/sNNNNNNNN.txt`, under the same root or another (`reports`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path, PurePosixPath

import pandas as pd

from simulations.importers.common import (
    CHEXPERT_OBSERVATIONS,
    CHEXPERT_TO_LABEL,
    ArchiveError,
    Case,
    Imported,
    ImportOptions,
    Skip,
    choose_frontal,
    decide_from_observations,
    find_file,
    read_table,
    tidy,
)

CHEXPERT_TABLES = ("train.csv", "valid.csv")
MIMIC_LABELS = ("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv")
MIMIC_META = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")


# ---------------------------------------------------------------------- CheXpert


def chexpert_study(path: str) -> str:
    """The study a CheXpert image belongs to: ".../train/patient00001/study1/view1_frontal
    .jpg" -> "patient00001_study1" (patients are distinct between train and valid)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return "_".join(parts[-3:-1]) if len(parts) >= 3 else path


def chexpert_image_base(root: Path, first_path: str) -> Path:
    """The folder `Path` is relative to: the one above `CheXpert-v1.0-small/` (as
    released), or `root` itself where the paths start inside it."""
    for base in (root.parent, root):
        if (base / first_path).is_file():
            return base
    raise ArchiveError(f"{root}: image {first_path!r} (first row's Path) found neither in "
                       f"{root.parent} nor in {root}")


def chexpert_cases(root: Path, opts: ImportOptions, tables: tuple[str, ...] = CHEXPERT_TABLES
                   ) -> Imported:
    """One case per study of train.csv then valid.csv: its frontal image (PA, else AP,
    else any frontal), labels from that image's row."""
    frames = [(name, read_table(root / name, ("Path", "Frontal/Lateral",
                                              *CHEXPERT_OBSERVATIONS)))
              for name in tables if (root / name).is_file()]
    if not frames:
        raise ArchiveError(f"{root}: expected {' and/or '.join(tables)} (CheXpert layout)")
    first = next((f["Path"].iloc[0] for _, f in frames if len(f)), None)
    if first is None:
        raise ArchiveError(f"{root}: {', '.join(n for n, _ in frames)} hold no rows")
    base = chexpert_image_base(root, first)
    out = Imported(name="chexpert", image_root=base)
    for name, frame in frames:
        studies: dict[str, list[int]] = defaultdict(list)
        for i, path in enumerate(frame["Path"]):
            studies[chexpert_study(path)].append(i)
        for study, rows in studies.items():
            out.add(_chexpert_case(study, name, frame, rows, base, opts))
    return out


def _chexpert_view(row: pd.Series) -> str:
    """PA / AP for a frontal image (AP where the AP/PA column is missing or odd)."""
    if row["Frontal/Lateral"].strip().lower() != "frontal":
        return "LATERAL"
    view = str(row.get("AP/PA", "")).strip().upper()
    return view if view in ("PA", "AP") else "AP"


def _chexpert_case(study: str, table: str, frame: pd.DataFrame, rows: list[int], base: Path,
                   opts: ImportOptions) -> Case | Skip:
    where = f"{table} row {rows[0] + 2}"  # spreadsheet numbering: header is row 1
    chosen = choose_frontal((str(i), _chexpert_view(frame.iloc[i])) for i in rows)
    if chosen is None:
        return Skip(study, where, "no frontal image")
    row = frame.iloc[int(chosen)]
    where = f"{table} row {int(chosen) + 2}"
    label, reason = decide_from_observations(
        {c: row[c] for c in CHEXPERT_OBSERVATIONS}, CHEXPERT_TO_LABEL, opts)
    if label is None:
        return Skip(study, where, reason)
    image = base / row["Path"]
    if not image.is_file():
        return Skip(study, where, f"image missing: {row['Path']}")
    return Case(study, "", label, image, where)


# ---------------------------------------------------------------------- MIMIC-CXR


def mimic_study_dir(subject: str, study: str) -> PurePosixPath:
    """files/p10/p10000032/s50414267 for subject 10000032, study 50414267."""
    s = subject.strip().removeprefix("p")
    return PurePosixPath("files", f"p{s[:2]}", f"p{s}", f"s{study.strip().removeprefix('s')}")


def mimic_report(text: str) -> str:
    """A MIMIC-CXR report as one line, its "FINAL REPORT" banner dropped."""
    return tidy(text).removeprefix("FINAL REPORT").strip()


def mimic_cases(root: Path, opts: ImportOptions, reports: Path | None = None) -> Imported:
    """One case per study of the chexpert table: its report, its frontal JPG by
    ViewPosition (PA, else AP). Studies only in the metadata are listed as skipped."""
    labels = read_table(find_file(root, *MIMIC_LABELS),
                        ("subject_id", "study_id", *CHEXPERT_OBSERVATIONS))
    meta = read_table(find_file(root, *MIMIC_META),
                      ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    if not (root / "files").is_dir():
        raise ArchiveError(f"{root}: no files/ folder (expected files/pNN/pNNNNNNNN/"
                           "sNNNNNNNN/<dicom_id>.jpg)")
    reports = reports or root
    views: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for d, subj, stud, view in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"],
                                   meta["ViewPosition"], strict=True):
        views[(subj.strip(), stud.strip())].append((d.strip(), view))
    out = Imported(name="mimic-cxr", image_root=root)
    labelled = set()
    for i, row in enumerate(labels.to_dict("records")):
        key = (row["subject_id"].strip(), row["study_id"].strip())
        labelled.add(key)
        out.add(_mimic_case(key, row, i + 2, views.get(key, []), root, reports, opts))
    for key in sorted(set(views) - labelled):
        out.skipped.append(Skip(f"s{key[1]}", "metadata", "no row in the chexpert table"))
    return out


def _mimic_case(key: tuple[str, str], row: dict[str, str], row_no: int,
                views: list[tuple[str, str]], root: Path, reports: Path,
                opts: ImportOptions) -> Case | Skip:
    study = mimic_study_dir(*key)
    case_id, where = study.name, f"chexpert row {row_no}"
    label, reason = decide_from_observations(
        {c: row[c] for c in CHEXPERT_OBSERVATIONS}, CHEXPERT_TO_LABEL, opts)
    if label is None:
        return Skip(case_id, where, reason)
    report_file = reports / f"{study}.txt"
    if not report_file.is_file():
        return Skip(case_id, where, f"report missing: {study}.txt")
    report = mimic_report(report_file.read_text(encoding="utf-8", errors="replace"))
    if not report:
        return Skip(case_id, where, f"empty report: {study}.txt")
    if not views:
        return Skip(case_id, where, "no image in the metadata")
    chosen = choose_frontal(views)
    if chosen is None:
        seen = ", ".join(sorted({v or "?" for _, v in views}))
        return Skip(case_id, where, f"no frontal (PA/AP) image: {seen}")
    image = root / study / f"{chosen}.jpg"
    if not image.is_file():
        return Skip(case_id, where, f"image missing: {study}/{chosen}.jpg")
    return Case(case_id, report, label, image, f"{study}.txt")
