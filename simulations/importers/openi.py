"""OpenI (Indiana University chest X-ray collection, NLMCXR): report XMLs to cases.

The archive is `NLMCXR_reports.tgz`: one `ecgen-radiology/<n>.xml` per report, with
`AbstractText Label="COMPARISON|INDICATION|FINDINGS|IMPRESSION"`, MeSH `<major>` terms
written by hand ("Pleural Effusion/right/mild": the heading before the first "/" is the
concept) and one `<parentImage id="CXR1_1_IM-0001-3001">` per film. The films' views are
not in the XML: they come from the DICOM headers (`nlmcxr_dicom_metadata.csv.gz`,
`View Position`), and, where a header leaves it blank, from the t-SNE view estimate
(`nlmcxr_tsne_pa.csv.gz`) that torchxrayvision ships beside it.

The reports are CC BY-NC-ND 4.0: nothing read here may be committed to the repository.
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from simulations.importers.common import (
    ArchiveError,
    Case,
    Imported,
    ImportOptions,
    Skip,
    choose_frontal,
    decide_label,
    read_table,
    tidy,
)

SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")  # their order in a report
# MeSH major heading -> label (compared ignoring case). Granulomas, opacities, airspace
# disease and atelectasis are left out on purpose: they are not one of our findings.
MESH_TO_LABEL = {
    "normal": "normal",
    "pneumonia": "pneumonia",
    "consolidation": "pneumonia",
    "infiltrate": "pneumonia",
    "nodule": "nodule",
    "mass": "nodule",
    "pleural effusion": "effusion",
    "cardiomegaly": "cardiomegaly",
}
NOT_INDEXED = "no indexing"
VIEW_TABLE = "nlmcxr_dicom_metadata.csv.gz"
TSNE_TABLE = "nlmcxr_tsne_pa.csv.gz"


@dataclass(frozen=True)
class OpenIReport:
    """One XML, as read: sections in report order, MeSH majors, image ids."""

    case_id: str
    member: str  # its name in the archive
    sections: tuple[tuple[str, str], ...]
    majors: tuple[str, ...]
    images: tuple[str, ...]


def parse_report(xml: bytes, member: str) -> OpenIReport:
    """One OpenI XML (raises ET.ParseError on a file that is not XML). The case id is its
    `uId` ("CXR12"), or the file's number where that is missing."""
    root = ET.fromstring(xml)
    uid = root.find("uId")
    stem = Path(member).stem
    case_id = (uid.get("id") if uid is not None else "") or f"CXR{stem}"
    sections = tuple(
        (str(a.get("Label", "")).upper(), tidy("".join(a.itertext())))
        for a in root.iter("AbstractText")
    )
    majors = tuple(tidy(m.text or "") for m in root.iter("major") if tidy(m.text or ""))
    images = tuple(p.get("id", "") for p in root.iter("parentImage") if p.get("id"))
    return OpenIReport(case_id, member, sections, majors, images)


def report_text(report: OpenIReport) -> str:
    """The sections that hold text, in the report's order, each after its heading:
    "COMPARISON: None. INDICATION: ... FINDINGS: ... IMPRESSION: ..."."""
    order = {name: i for i, name in enumerate(SECTIONS)}
    kept = sorted((s for s in report.sections if s[0] in order and s[1]),
                  key=lambda s: order[s[0]])
    return " ".join(f"{name}: {text}" for name, text in kept)


def mesh_label(report: OpenIReport, opts: ImportOptions) -> tuple[str | None, str]:
    """(label, "") or (None, reason) from the MeSH majors, by MESH_TO_LABEL and the shared
    rule (`decide_label`: several diseases follow --multi-label). "normal" counts only as
    the report's one major term; beside any other term the report is skipped."""
    heads = [m.split("/")[0].strip() for m in report.majors]
    if not heads:
        return None, "no MeSH major term"
    if any(h.lower() == NOT_INDEXED for h in heads):
        return None, "not indexed (MeSH No Indexing)"
    if any(h.lower() == "normal" for h in heads) and len(set(h.lower() for h in heads)) > 1:
        others = sorted({h for h in heads if h.lower() != "normal"})
        return None, f"MeSH normal beside other terms: {', '.join(others)}"
    mapped = {MESH_TO_LABEL[h.lower()] for h in heads if h.lower() in MESH_TO_LABEL}
    others = sorted({h for h in heads if h.lower() not in MESH_TO_LABEL})
    return decide_label(mapped - {"normal"}, (), "normal" in mapped, opts, others)


def view_key(image_id: str) -> str:
    """The DICOM table's id of an XML image id: "CXR1_1_IM-0001-3001" is listed there as
    "CXR1_IM-0001-3001" (the report's film number dropped)."""
    return re.sub(r"^(CXR\d+)_\d+_", r"\1_", image_id)


def views_from_tables(dicom: pd.DataFrame, tsne: pd.DataFrame | None) -> dict[str, str]:
    """image id (DICOM-table form) -> view: the DICOM header's View Position; where blank,
    the t-SNE estimate ("PA", or "L" read as LATERAL). A header beats the estimate."""
    views: dict[str, str] = {}
    if tsne is not None:
        for image, view in zip(tsne["imageid"], tsne["tsne-view"], strict=True):
            views[view_key(image)] = "PA" if view.strip().upper() == "PA" else "LATERAL"
    for image, view in zip(dicom["imageid"], dicom["View Position"], strict=True):
        if view.strip():
            views[view_key(image)] = view.strip().upper()
    return views


def read_views(dicom_csv: Path) -> dict[str, str]:
    """The view table (and the t-SNE table where it lies beside it)."""
    dicom = read_table(dicom_csv, ("imageid", "View Position"))
    tsne_path = dicom_csv.with_name(TSNE_TABLE)
    tsne = read_table(tsne_path, ("imageid", "tsne-view")) if tsne_path.is_file() else None
    return views_from_tables(dicom, tsne)


def iter_archive(tgz: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every XML in the archive, in name order; ArchiveError when
    the file is not a tar archive or holds no XML."""
    if not tgz.is_file():
        raise ArchiveError(f"{tgz}: no such file (expected NLMCXR_reports.tgz; "
                           "scripts/fetch-public-tables.sh fetches it)")
    try:
        with tarfile.open(tgz) as tf:
            members = sorted((m for m in tf.getmembers()
                              if m.isfile() and m.name.lower().endswith(".xml")),
                             key=lambda m: _natural(m.name))
            if not members:
                raise ArchiveError(f"{tgz}: no OpenI XML in it (expected "
                                   "ecgen-radiology/<n>.xml)")
            for m in members:
                fh = tf.extractfile(m)
                if fh is not None:
                    yield m.name, fh.read()
    except tarfile.TarError as exc:
        raise ArchiveError(f"{tgz}: not a tar archive ({exc})") from None


def _natural(name: str) -> tuple:
    """1.xml, 2.xml, 10.xml: numbers compared as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def openi_cases(
    files: Iterator[tuple[str, bytes]], opts: ImportOptions, *,
    images: Path | None = None, views: Mapping[str, str] | None = None,
) -> Imported:
    """Cases from the XMLs. With `images` (a folder of the NLMCXR PNGs, `<image id>.png`)
    each case uses its report's frontal film by `views`; without, `Case.image` is None and
    the writer draws a synthetic film. A report is skipped, named, when it has no FINDINGS
    or IMPRESSION text, no label by MESH_TO_LABEL, or (with images) no frontal film or a
    missing file."""
    out = Imported(name="openi", image_root=images)
    for member, xml in files:
        try:
            rep = parse_report(xml, member)
        except ET.ParseError as exc:
            out.skipped.append(Skip(Path(member).stem, member, f"not XML: {exc}"))
            continue
        out.add(_openi_case(rep, opts, images, views or {}))
    return out


def _openi_case(rep: OpenIReport, opts: ImportOptions, images: Path | None,
                views: Mapping[str, str]) -> Case | Skip:
    found = {name for name, text in rep.sections if text}
    if not found & {"FINDINGS", "IMPRESSION"}:
        return Skip(rep.case_id, rep.member, "no FINDINGS or IMPRESSION text")
    label, reason = mesh_label(rep, opts)
    if label is None:
        return Skip(rep.case_id, rep.member, reason)
    image = None
    if images is not None:
        if not rep.images:
            return Skip(rep.case_id, rep.member, "no image in the report")
        chosen = choose_frontal((i, views.get(view_key(i), "")) for i in rep.images)
        if chosen is None:
            seen = ", ".join(f"{i}={views.get(view_key(i), '?')}" for i in rep.images)
            return Skip(rep.case_id, rep.member, f"no frontal (PA/AP) image: {seen}")
        image = images / f"{chosen}.png"
        if not image.is_file():
            return Skip(rep.case_id, rep.member, f"image missing: {image.name}")
    return Case(rep.case_id, report_text(rep), label, image, rep.member)
