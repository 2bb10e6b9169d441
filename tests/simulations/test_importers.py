"""Public-archive importers on small fixtures written here in each archive's published
layout (no real report, image or table is read): label tables, uncertain and multi-label
policies, skip reasons, the frontal-view choice, the partition into hospitals, and that
the written sites open."""

from __future__ import annotations

import csv
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfuse import app
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import SiteError, open_site
from shared_model.tokenizer import Tokenizer
from simulations.importers import (
    CsvColumns,
    ImportOptions,
    chexpert_cases,
    csv_cases,
    decide_label,
    iter_archive,
    mimic_cases,
    openi_cases,
    read_views,
    write_import,
)
from simulations.importers.common import CHEXPERT_OBSERVATIONS, ArchiveError, choose_frontal
from simulations.importers.openi import parse_report, report_text
from simulations.importers.writer import SEMI_SYNTHETIC, TEXT_ONLY
from tests.conftest import TINY_IMAGE

# ---------------------------------------------------------------------- fixtures: OpenI


def _openi_xml(n: int, majors: list[str], images: list[str], findings: str = "Lungs clear.",
               impression: str = "No acute disease.", indication: str = "Cough.") -> bytes:
    """An OpenI-style report (hand-written text, the published element names)."""
    texts = {"COMPARISON": "None.", "INDICATION": indication, "FINDINGS": findings,
             "IMPRESSION": impression}
    abstract = "".join(f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in texts.items())
    mesh = "".join(f"<major>{m}</major>" for m in majors)
    imgs = "".join(f'<parentImage id="{i}"><caption>Xray Chest PA and Lateral</caption>'
                   f"<panel><url>/x/{i}.jpg</url></panel></parentImage>" for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{n}"/>'
            f"<MedlineCitation><Article><Abstract>{abstract}</Abstract></Article>"
            f"</MedlineCitation><MeSH>{mesh}</MeSH>{imgs}</eCitation>").encode()


OPENI = {  # number -> (majors, images, findings, impression)
    1: (["normal"], ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"], "Lungs clear.", "Normal."),
    2: (["Pleural Effusion/right/mild", "Calcified Granuloma/lung"], ["CXR2_IM-0002-1001"],
        "Blunted right angle.", "Small effusion."),
    3: (["Cardiomegaly/mild", "Pneumonia/lower lobe/left"], ["CXR3_IM-0003-1001"],
        "Large heart. Left basal airspace opacity.", "Cardiomegaly and pneumonia."),
    4: (["Calcified Granuloma/lung/upper lobe/right"], ["CXR4_IM-0004-1001"],
        "Calcified granuloma.", "No acute disease."),
    5: (["normal"], ["CXR5_IM-0005-1001"], "", ""),
    6: (["Mass/lung/left"], ["CXR6_IM-0006-1001"], "Left mass.", "Mass, see CT."),
    7: (["Consolidation/lung/right"], ["CXR7_IM-0007-2001"], "Right consolidation.", ""),
    8: (["No Indexing"], ["CXR8_IM-0008-1001"], "Findings.", "Impression."),
}
EXPECTED_OPENI = {"CXR1": "normal", "CXR2": "effusion", "CXR6": "nodule", "CXR7": "pneumonia"}
EXPECTED_OPENI_SKIPS = {
    "CXR3": "several labels: pneumonia, cardiomegaly (--multi-label skip)",
    "CXR4": "no label of the set (other findings: Calcified Granuloma)",
    "CXR5": "no FINDINGS or IMPRESSION text",
    "CXR8": "not indexed (MeSH No Indexing)",
}


def _write_tgz(path: Path, xmls: dict[int, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for n, data in xmls.items():
            info = tarfile.TarInfo(f"ecgen-radiology/{n}.xml")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _extra_cases(first: int, count: int, majors: list[str]) -> dict[int, bytes]:
    return {n: _openi_xml(n, majors, [f"CXR{n}_IM-{n:04d}-1001"])
            for n in range(first, first + count)}


@pytest.fixture
def openi_tgz(tmp_path: Path) -> Path:
    xmls = {n: _openi_xml(n, m, i, f, p) for n, (m, i, f, p) in OPENI.items()}
    return _write_tgz(tmp_path / "NLMCXR_reports.tgz", xmls)


def _write_openi_views(folder: Path) -> Path:
    """The DICOM view table (ids without the film number) and the t-SNE table."""
    dicom = folder / "nlmcxr_dicom_metadata.csv.gz"
    rows = [("CXR1_IM-0001-3001", "LL"), ("CXR1_IM-0001-4001", ""),  # 4001: t-SNE says PA
            ("CXR2_IM-0002-1001", "PA"), ("CXR3_IM-0003-1001", "AP"),
            ("CXR6_IM-0006-1001", "PA"), ("CXR7_IM-0007-2001", "LATERAL")]
    with gzip.open(dicom, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["imageid", "Modality", "View Position"])
        w.writerows((i, "CR", v) for i, v in rows)
    with gzip.open(folder / "nlmcxr_tsne_pa.csv.gz", "wt", newline="") as fh:
        fh.write("imageid,tsne-view\nCXR1_1_IM-0001-4001,PA\nCXR1_1_IM-0001-3001,PA\n")
    return dicom


def _png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(value).integers(0, 255, (24, 24), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _jpg(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(value).integers(0, 255, (24, 24), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG")


def _open(site: Path, labels: tuple[str, ...] = DEFAULT_LABELS):
    model = ModelConfig(image_size=TINY_IMAGE, num_classes=len(labels))
    return open_site(site, labels=labels, model=model, tokenizer=Tokenizer(model.vocab_size))


def _manifest(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------- the label rule


@pytest.mark.parametrize(("uncertain", "expected"), [
    ("skip", (None, "uncertain: pneumonia (--uncertain skip)")),
    ("negative", ("effusion", "")),
    ("positive", (None, "several labels: pneumonia, effusion (--multi-label skip)")),
])
def test_uncertain_policy_decides_a_study_with_an_uncertain_label(uncertain, expected):
    opts = ImportOptions(uncertain=uncertain)
    assert decide_label({"effusion"}, {"pneumonia"}, False, opts) == expected


def test_several_diseases_are_skipped_or_given_the_first_in_label_set_order():
    both = {"cardiomegaly", "nodule"}
    assert decide_label(both, (), False, ImportOptions())[0] is None
    assert decide_label(both, (), False, ImportOptions(multi_label="priority")) == ("nodule", "")


def test_normal_beside_a_disease_and_nothing_of_the_set_are_skipped_not_guessed():
    opts = ImportOptions()
    assert decide_label({"effusion"}, (), True, opts) == (None, "normal and effusion both stated")
    assert decide_label((), (), False, opts, ["Edema"]) == (
        None, "no label of the set (other findings: Edema)")
    assert decide_label((), (), True, opts) == ("normal", "")


def test_frontal_choice_prefers_pa_then_ap_and_never_a_lateral():
    assert choose_frontal([("a", "LL"), ("b", "AP"), ("c", "PA")]) == "c"
    assert choose_frontal([("a", "LATERAL"), ("b", "ap")]) == "b"
    assert choose_frontal([("a", "LATERAL"), ("b", "")]) is None


# ---------------------------------------------------------------------- OpenI


def test_openi_report_keeps_its_sections_in_order_with_headings():
    rep = parse_report(_openi_xml(9, ["normal"], [], "Clear.", "Normal chest."), "9.xml")
    assert report_text(rep) == ("COMPARISON: None. INDICATION: Cough. FINDINGS: Clear. "
                                "IMPRESSION: Normal chest.")


def test_openi_maps_mesh_majors_and_names_every_skip(openi_tgz: Path):
    imp = openi_cases(iter_archive(openi_tgz), ImportOptions())
    assert {c.case_id: c.label for c in imp.cases} == EXPECTED_OPENI
    assert {s.case_id: s.reason for s in imp.skipped} == EXPECTED_OPENI_SKIPS
    assert all(c.image is None for c in imp.cases)  # no images: films to be drawn


def test_openi_priority_gives_a_multi_finding_report_its_first_label(openi_tgz: Path):
    imp = openi_cases(iter_archive(openi_tgz), ImportOptions(multi_label="priority"))
    assert {c.case_id: c.label for c in imp.cases}["CXR3"] == "pneumonia"


def test_openi_with_images_uses_the_frontal_film_and_names_what_is_missing(
        openi_tgz: Path, tmp_path: Path):
    images = tmp_path / "NLMCXR_png"
    for name in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0002-1001",
                 "CXR7_IM-0007-2001"):  # CXR6's film is missing
        _png(images / f"{name}.png")
    views = read_views(_write_openi_views(tmp_path))

    imp = openi_cases(iter_archive(openi_tgz), ImportOptions(), images=images, views=views)

    assert {c.case_id: c.image.name for c in imp.cases} == {  # type: ignore[union-attr]
        "CXR1": "CXR1_1_IM-0001-4001.png", "CXR2": "CXR2_IM-0002-1001.png"}
    reasons = {s.case_id: s.reason for s in imp.skipped}
    assert reasons["CXR6"] == "image missing: CXR6_IM-0006-1001.png"
    assert reasons["CXR7"] == "no frontal (PA/AP) image: CXR7_IM-0007-2001=LATERAL"


def test_openi_archive_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ArchiveError, match="no such file"):
        list(iter_archive(tmp_path / "nope.tgz"))
    empty = _write_tgz(tmp_path / "empty.tgz", {})
    with pytest.raises(ArchiveError, match=r"empty\.tgz: no OpenI XML"):
        list(iter_archive(empty))


def test_semi_synthetic_openi_partitions_into_sites_that_open(tmp_path: Path):
    xmls = {n: _openi_xml(n, m, i, f, p) for n, (m, i, f, p) in OPENI.items()}
    xmls |= _extra_cases(20, 14, ["normal"]) | _extra_cases(40, 8, ["Cardiomegaly"])
    tgz = _write_tgz(tmp_path / "NLMCXR_reports.tgz", xmls)
    imp = openi_cases(iter_archive(tgz), ImportOptions())
    opts = ImportOptions(sites=3, label_skew=0.5, seed=1, min_cases=3)

    summary = write_import(imp, tmp_path / "out", opts)

    rows = {s.name: _manifest(s) for s in summary.folders}
    ids = sorted(r["case_id"] for site in rows.values() for r in site)
    assert ids == sorted(f"openi:{c.case_id}" for c in imp.cases)  # each in exactly one
    assert len(rows) == 3 and min(len(r) for r in rows.values()) >= 3
    assert summary.per_site.to_numpy().sum() == len(imp.cases)
    with (tmp_path / "out" / "skipped.csv").open(encoding="utf-8") as fh:
        assert {r["case_id"]: r["reason"] for r in csv.DictReader(fh)} == EXPECTED_OPENI_SKIPS
    readme = (tmp_path / "out" / "README.txt").read_text(encoding="utf-8")
    assert readme.index(SEMI_SYNTHETIC) < readme.index("Policies")  # said first, up top
    assert not (tmp_path / "out" / ".films").exists()
    for site in summary.folders:
        assert SEMI_SYNTHETIC in (site / "README.txt").read_text(encoding="utf-8")
        opened = _open(site)
        assert opened.summary.bad_rows == () and len(opened.train) > 0


TEXT_MODEL = ModelConfig(image_size=TINY_IMAGE, modality="text", generation=False)
REAL_OPENI = Path.home() / ".cache" / "medfuse" / "public-tables" / "NLMCXR_reports.tgz"


def _open_text(site: Path):
    return open_site(site, labels=DEFAULT_LABELS, model=TEXT_MODEL,
                     tokenizer=Tokenizer(TEXT_MODEL.vocab_size))


def test_text_only_openi_writes_reports_without_films_for_a_text_model(tmp_path: Path):
    # Prepare
    xmls = {n: _openi_xml(n, m, i, f, p) for n, (m, i, f, p) in OPENI.items()}
    xmls |= _extra_cases(20, 14, ["normal"]) | _extra_cases(40, 8, ["Cardiomegaly"])
    tgz = _write_tgz(tmp_path / "NLMCXR_reports.tgz", xmls)
    imp = openi_cases(iter_archive(tgz), ImportOptions())
    opts = ImportOptions(sites=2, label_skew=0.5, seed=1, min_cases=3)

    # Execute
    summary = write_import(imp, tmp_path / "out", opts, text_only=True)

    # Assert: no film anywhere, every image cell empty, said TEXT-ONLY (not
    # semi-synthetic); the sites open for a text model, and are refused for a fused one
    assert not summary.semi_synthetic and TEXT_ONLY in summary.lines()
    assert not list((tmp_path / "out").rglob("*.png"))
    for site in summary.folders:
        assert {r["image"] for r in _manifest(site)} == {""}
        assert TEXT_ONLY in (site / "README.txt").read_text(encoding="utf-8")
        opened = _open_text(site)
        assert opened.summary.text_only and opened.summary.bad_rows == ()
        with pytest.raises(SiteError, match="no usable training rows"):
            _open(site)


def test_import_openi_text_only_of_the_real_reports(tmp_path: Path):
    """The 3,955 real OpenI report XMLs, where the cache holds them: no traceback, the
    reports alone, and sites a text model opens. The real text stays under tmp_path."""
    if not REAL_OPENI.is_file():
        pytest.skip(f"no {REAL_OPENI.name} in {REAL_OPENI.parent} "
                    "(scripts/fetch-public-tables.sh fetches it)")
    # Execute
    out = tmp_path / "openi-text"
    result = CliRunner().invoke(app, ["data", "import", "openi", str(REAL_OPENI),
                                      "--text-only", "--sites", "5", "--label-skew", "0.5",
                                      "--out", str(out)])

    # Assert
    assert result.exit_code == 0, result.output
    assert "imported 1931 of 3955 studies" in result.stdout
    assert "TEXT-ONLY" in result.stdout and "SEMI-SYNTHETIC" not in result.stdout
    sites = sorted(out.glob("site-*"))
    assert len(sites) == 5 and not list(out.rglob("*.png"))
    opened = [_open_text(s) for s in sites]
    assert sum(s.summary.usable_rows for s in opened) == 1931
    assert all(s.summary.text_only and not s.summary.bad_rows for s in opened)


def test_import_openi_takes_one_image_source(openi_tgz: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["data", "import", "openi", str(openi_tgz),
                                      "--text-only", "--synthetic-films", "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2 and "one of them" in result.stderr


# ---------------------------------------------------------------------- MIMIC-CXR


def _mimic_tree(root: Path) -> Path:
    """Three studies (+ one only in the metadata) in the published MIMIC-CXR-JPG layout."""
    studies = {  # study -> (subject, observations, [(dicom, view)])
        "50000001": ("10000001", {"Pleural Effusion": "1.0", "Atelectasis": "1.0"},
                     [("d1a", "LATERAL"), ("d1b", "AP"), ("d1c", "PA")]),
        "50000002": ("10000002", {"Cardiomegaly": "1.0", "Pneumonia": "-1.0"},
                     [("d2a", "AP")]),
        "50000003": ("11000003", {"No Finding": "1.0"}, [("d3a", "LL")]),
    }
    label_rows, meta_rows = [], []
    for study, (subject, obs, views) in studies.items():
        label_rows.append([subject, study, *(obs.get(c, "") for c in CHEXPERT_OBSERVATIONS)])
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        (folder / f"s{study}.txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"s{study}.txt").write_text(
            f"                                 FINAL REPORT\n EXAMINATION:  CHEST\n\n "
            f"FINDINGS: made-up text for study {study}.\n", encoding="utf-8")
        for k, (dicom, view) in enumerate(views):
            meta_rows.append([dicom, subject, study, view])
            _jpg(folder / f"s{study}" / f"{dicom}.jpg", k)
    meta_rows.append(["d9a", "10000009", "50000009", "PA"])
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt", newline="") as fh:
        csv.writer(fh).writerows([["subject_id", "study_id", *CHEXPERT_OBSERVATIONS],
                                  *label_rows])
    with (root / "mimic-cxr-2.0.0-metadata.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["dicom_id", "subject_id", "study_id", "ViewPosition"],
                                  *meta_rows])
    return root


@pytest.mark.parametrize(("uncertain", "s2"), [
    ("skip", "uncertain: pneumonia (--uncertain skip)"),
    ("negative", "cardiomegaly"),
    ("positive", "several labels: pneumonia, cardiomegaly (--multi-label skip)"),
])
def test_mimic_labels_views_and_uncertain_policy(tmp_path: Path, uncertain: str, s2: str):
    imp = mimic_cases(_mimic_tree(tmp_path), ImportOptions(uncertain=uncertain))

    got = {c.case_id: c.label for c in imp.cases} | {s.case_id: s.reason for s in imp.skipped}
    assert got == {"s50000001": "effusion", "s50000002": s2,
                   "s50000003": "no frontal (PA/AP) image: LL",
                   "s50000009": "no row in the chexpert table"}
    first = next(c for c in imp.cases if c.case_id == "s50000001")
    assert first.image is not None and first.image.name == "d1c.jpg"  # PA over AP
    assert first.report == "EXAMINATION: CHEST FINDINGS: made-up text for study 50000001."


def test_mimic_written_site_opens(tmp_path: Path):
    imp = mimic_cases(_mimic_tree(tmp_path / "mimic"), ImportOptions(uncertain="negative"))
    summary = write_import(imp, tmp_path / "out", ImportOptions(min_cases=1))
    opened = _open(summary.folders[0])
    assert opened.summary.bad_rows == ()
    assert sorted(r["label"] for r in _manifest(summary.folders[0])) == [
        "cardiomegaly", "effusion"]
    assert "SEMI-SYNTHETIC" not in (tmp_path / "out" / "README.txt").read_text()


def test_mimic_wrong_layout_names_what_was_expected(tmp_path: Path):
    with pytest.raises(ArchiveError, match="expected mimic-cxr-2.0.0-chexpert.csv.gz or"):
        mimic_cases(tmp_path, ImportOptions())


# ---------------------------------------------------------------------- CheXpert


def _chexpert_tree(root: Path) -> Path:
    base = root / "CheXpert-v1.0-small"
    head = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    rows = {"train.csv": [
        ("patient00001/study1/view1_frontal.jpg", "Frontal", "AP", {"Pleural Effusion": "1.0"}),
        ("patient00001/study1/view2_frontal.jpg", "Frontal", "PA", {"Pleural Effusion": "1.0"}),
        ("patient00001/study1/view3_lateral.jpg", "Lateral", "", {"Pleural Effusion": "1.0"}),
        ("patient00002/study1/view1_lateral.jpg", "Lateral", "", {"No Finding": "1.0"}),
        ("patient00003/study2/view1_frontal.jpg", "Frontal", "AP", {"Lung Lesion": "-1.0"}),
    ], "valid.csv": [
        ("patient64541/study1/view1_frontal.jpg", "Frontal", "PA", {"No Finding": "1.0"}),
    ]}
    for table, items in rows.items():
        split = table.removesuffix(".csv")
        lines = []
        for k, (path, fl, appa, obs) in enumerate(items):
            rel = f"CheXpert-v1.0-small/{split}/{path}"
            _jpg(root / rel, k)
            lines.append([rel, "Female", "60", fl, appa, *(obs.get(c, "") for c in
                                                            CHEXPERT_OBSERVATIONS)])
        with (base / table).open("w", newline="") as fh:
            csv.writer(fh).writerows([head, *lines])
    return base


def test_chexpert_studies_frontal_choice_and_uncertain(tmp_path: Path):
    base = _chexpert_tree(tmp_path)
    skip = chexpert_cases(base, ImportOptions())
    ones = chexpert_cases(base, ImportOptions(uncertain="positive"))

    assert {c.case_id: c.label for c in skip.cases} == {
        "patient00001_study1": "effusion", "patient64541_study1": "normal"}
    assert {s.case_id: s.reason for s in skip.skipped} == {
        "patient00002_study1": "no frontal image",
        "patient00003_study2": "uncertain: nodule (--uncertain skip)"}
    assert {c.case_id: c.label for c in ones.cases}["patient00003_study2"] == "nodule"
    pa = next(c for c in skip.cases if c.case_id == "patient00001_study1")
    assert pa.image is not None and pa.image.name == "view2_frontal.jpg"
    assert pa.report == ""
    opened = _open(write_import(ones, tmp_path / "out", ImportOptions(min_cases=1)).folders[0])
    assert len(opened.summary.bad_rows) == 0


# ---------------------------------------------------------------------- generic CSV


def test_generic_csv_maps_values_and_skips_bad_rows(tmp_path: Path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "img" / name)
    (tmp_path / "table.csv").write_text(
        "id,file,finding,text\n"
        "1,img/a.png,Effusion,fluid at the base\n"
        "2,img/b.png,No Finding,clear\n"
        "2,img/c.png,Effusion,again\n"
        "3,img/c.png,Hernia,hernia\n"
        "4,img/zz.png,Effusion,gone\n"
        "5,../a.png,Effusion,escape\n", encoding="utf-8")
    cols = CsvColumns(case_id="id", image="file", label="finding", report="text",
                      value_map={"Effusion": "effusion", "No Finding": "normal"})

    imp = csv_cases(tmp_path / "table.csv", cols, ImportOptions())

    assert [(c.case_id, c.label, c.report) for c in imp.cases] == [
        ("1", "effusion", "fluid at the base"), ("2", "normal", "clear")]
    assert [(s.source, s.reason) for s in imp.skipped] == [
        ("table.csv row 4", "duplicate case id (first at row 3)"),
        ("table.csv row 5", "label 'Hernia' is not in the label set nor in --label-map"),
        ("table.csv row 6", "image missing: img/zz.png"),
        ("table.csv row 7", "image '../a.png' is not a path inside the images folder"),
    ]
    with pytest.raises(ArchiveError, match=r"table\.csv: no column 'label'"):
        csv_cases(tmp_path / "table.csv", cols.model_copy(update={"label": "label"}),
                  ImportOptions())


# ---------------------------------------------------------------------- command line


def test_import_commands_fail_in_one_line_naming_the_problem(tmp_path: Path):
    runner = CliRunner()
    cases = [
        (["openi", str(tmp_path / "missing.tgz"), "--synthetic-films"], "missing.tgz: no such"),
        (["openi", str(tmp_path / "missing.tgz")], "--images DIR"),
        (["mimic-cxr", str(tmp_path)], "expected mimic-cxr-2.0.0-chexpert.csv.gz"),
        (["chexpert", str(tmp_path)], "expected train.csv and/or valid.csv"),
        (["openi", "--synthetic-films", "--label-skew", "-1"], "--label-skew -1.0"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, ["data", "import", *args, "--out", str(tmp_path / "o")])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, (args, result.output)
        assert len(lines) == 1 and needle in lines[0], (args, lines)


def test_import_openi_command_writes_and_says_semi_synthetic(openi_tgz: Path, tmp_path: Path):
    out = tmp_path / "sites"
    result = CliRunner().invoke(app, ["data", "import", "openi", str(openi_tgz),
                                      "--synthetic-films", "--min-cases", "1", "--out",
                                      str(out)])
    assert result.exit_code == 0, result.output
    assert "SEMI-SYNTHETIC" in result.stdout
    assert "site-00: 4 cases" in result.stdout
    again = CliRunner().invoke(app, ["data", "import", "openi", str(openi_tgz),
                                     "--synthetic-films", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
