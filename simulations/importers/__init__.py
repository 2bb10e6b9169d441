"""Public chest X-ray archives into format-v1 site folders (`medfuse data import`).

Each importer is a function from the archive's own layout to `Imported` (usable cases and
skipped studies with their reasons): `openi_cases` (OpenI / NLMCXR report XMLs),
`mimic_cases` (MIMIC-CXR-JPG), `chexpert_cases` (CheXpert), `csv_cases` (any one-row-per-
study CSV). `write_import` then cuts the pool into simulated hospitals with the existing
partitioners and writes one site folder per hospital, `skipped.csv` and `README.txt`.

The label rule (uncertain labels, several findings, "normal") is one function,
`common.decide_label`; the tables from each archive's vocabulary to the label set are
`openi.MESH_TO_LABEL` and `common.CHEXPERT_TO_LABEL`.
"""

from simulations.importers.chexpert import chexpert_cases, mimic_cases
from simulations.importers.common import (
    ArchiveError,
    Case,
    Imported,
    ImportOptions,
    Skip,
    decide_label,
)
from simulations.importers.generic import CsvColumns, csv_cases, parse_value_map
from simulations.importers.openi import iter_archive, openi_cases, read_views
from simulations.importers.writer import ImportSummary, write_import

__all__ = [
    "ArchiveError", "Case", "CsvColumns", "ImportOptions", "ImportSummary", "Imported", "Skip",
    "chexpert_cases", "csv_cases", "decide_label", "iter_archive", "mimic_cases",
    "openi_cases", "parse_value_map", "read_views", "write_import",
]
