"""Synthetic hospitals: determinism, format v1, per-site formats and styles, label skew."""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydantic import ValidationError

from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import BOX_COLUMNS, REQUIRED_COLUMNS, open_site
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.box_stats import BOX_STATS, LABEL_SHARE, QUANTILES
from shared_model.tooling.synth import (
    BORDERLINE_SHARE,
    FORMATS,
    PUBLIC_REPORT_STYLES,
    PUBLIC_SCANNERS,
    REPORT_STYLES,
    UNSEEN_REPORT_STYLES,
    VOCABULARY,
    PublicConfig,
    SynthConfig,
    public_style,
    render_case,
    render_image,
    sample_anatomy,
    sample_finding,
    site_labels,
    site_style,
    write_federation,
    write_public,
)

SMALL = SynthConfig(sites=2, cases_per_site=30, seed=3, image_size=32)


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_federation(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def every_format(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    cfg = SynthConfig(sites=len(FORMATS), cases_per_site=10, seed=1, image_size=32)
    return write_federation(tmp_path_factory.mktemp("formats"), cfg)


# --------------------------------------------------------------------------- config


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="cases_per_site"):
        SynthConfig(sites=2, cases_per_site=5, seed=0)
    with pytest.raises(ValidationError, match="extra"):
        SynthConfig(sites=2, cases_per_site=10, seed=0, colour="blue")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="default label set"):
        SynthConfig(sites=2, cases_per_site=10, seed=0, labels=("normal", "tumour"))
    with pytest.raises(ValidationError, match="label_skew"):
        SynthConfig(sites=2, cases_per_site=10, seed=0, label_skew=0.0)


# --------------------------------------------------------------------------- determinism


def test_same_config_writes_the_same_bytes(tmp_path: Path, small: list[Path]) -> None:
    # Prepare / Execute
    again = write_federation(tmp_path / "again", SMALL)
    # Assert
    assert [p.name for p in again] == [p.name for p in small] == ["site-00", "site-01"]
    first, second = _files(small[0].parent), _files(again[0].parent)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)


def test_another_seed_writes_other_data(tmp_path: Path, small: list[Path]) -> None:
    other = write_federation(tmp_path / "other", SMALL.model_copy(update={"seed": 4}))
    for a, b in zip(small, other, strict=True):
        assert (a / "manifest.csv").read_bytes() != (b / "manifest.csv").read_bytes()
        first = _rows(a)[0]["image"]
        assert (a / first).read_bytes() != (b / _rows(b)[0]["image"]).read_bytes()


def test_render_case_is_pure() -> None:
    style = site_style(0, 0)
    one = render_case(np.random.default_rng(5), "nodule", style, 32)
    two = render_case(np.random.default_rng(5), "nodule", style, 32)
    assert np.array_equal(one.image, two.image)
    assert one.box == two.box and one.report == two.report
    assert one.image.shape == (32, 32) and one.image.dtype == np.float32
    assert 0.0 <= one.image.min() and one.image.max() <= 1.0


def test_hard_films_show_fainter_findings_and_fewer_informative_reports() -> None:
    # Prepare: the same draws at both difficulties
    style = site_style(0, 0)

    def cases(difficulty: str) -> list:
        return [render_case(np.random.default_rng(k), label, style, 32, difficulty)
                for k in range(60) for label in ("nodule", "pneumonia", "effusion", "normal")]

    standard, hard = cases("standard"), cases("hard")

    def clear_amounts(cs: list, label: str) -> list[float]:
        return [c.finding.amount for c in cs if c.finding.label == label
                and not c.finding.ambiguous]

    def informative(cs: list) -> float:
        clear = [c for c in cs if not c.finding.ambiguous]
        return sum(c.report_mode == "informative" for c in clear) / len(clear)

    # Assert
    for label in ("nodule", "pneumonia", "effusion"):
        assert max(clear_amounts(hard, label)) < min(clear_amounts(standard, label)) + 0.01
    assert informative(hard) < informative(standard) - 0.15
    with pytest.raises(KeyError):
        render_case(np.random.default_rng(0), "nodule", style, 32, "extreme")  # type: ignore[arg-type]


def test_refuses_a_non_empty_site_folder_unless_overwrite(tmp_path: Path) -> None:
    cfg = SynthConfig(sites=1, cases_per_site=10, seed=0, image_size=16)
    (tmp_path / "site-00").mkdir()
    (tmp_path / "site-00" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_federation(tmp_path, cfg)
    assert (tmp_path / "site-00" / "keep.txt").read_text() == "mine"
    [site] = write_federation(tmp_path, cfg, overwrite=True)
    assert not (site / "keep.txt").exists() and (site / "manifest.csv").is_file()


# --------------------------------------------------------------------------- format v1


def test_manifest_rows_are_format_v1(small: list[Path]) -> None:
    for site in small:
        rows = _rows(site)
        assert rows, site
        assert set(REQUIRED_COLUMNS) | set(BOX_COLUMNS) <= set(rows[0])
        assert len({r["case_id"] for r in rows}) == len(rows)
        for r in rows:
            assert r["label"] in DEFAULT_LABELS
            assert r.get("split", "") in ("", "train", "val", "test")
            values = [r[c] for c in BOX_COLUMNS]
            if r["label"] == "normal":
                assert values == ["", "", "", ""], r
                continue
            x0, y0, x1, y1 = map(float, values)
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0, r


def test_every_image_exists_and_decodes(every_format: list[Path]) -> None:
    for site in every_format:
        for r in _rows(site):
            path = site / r["image"]
            assert path.is_file(), path
            if path.suffix == ".dcm":
                pixels = pydicom.dcmread(path).pixel_array
            else:
                with Image.open(path) as im:
                    pixels = np.asarray(im)
            assert pixels.shape[:2] == (32, 32)


def test_sites_write_different_formats(every_format: list[Path]) -> None:
    first = {site.name: site / _rows(site)[0]["image"] for site in every_format}
    # 8-bit grey PNG
    with Image.open(first["site-00"]) as im:
        assert (im.format, im.mode) == ("PNG", "L")
    # 12-bit DICOM in a 16-bit container
    ds = pydicom.dcmread(first["site-01"])
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert 255 < int(ds.pixel_array.max()) <= 4095
    assert "StudyDate" not in ds and "ContentTime" not in ds
    # 16-bit grey PNG: bit depth 16 in the header, values beyond 8 bits
    raw = first["site-02"].read_bytes()
    assert (raw[24], raw[25]) == (16, 0)
    with Image.open(first["site-02"]) as im:
        assert im.mode.startswith("I")
        assert int(np.asarray(im).max()) > 255
    # JPEG
    with Image.open(first["site-03"]) as im:
        assert im.format == "JPEG"
    # RGB PNG
    with Image.open(first["site-04"]) as im:
        assert (im.format, im.mode) == ("PNG", "RGB")


def test_sites_open_with_no_bad_rows(every_format: list[Path]) -> None:
    model = ModelConfig(image_size=32)
    tokenizer = Tokenizer(model.vocab_size)
    for site in every_format:
        data = open_site(site, labels=DEFAULT_LABELS, model=model, tokenizer=tokenizer, strict=True)
        assert data.summary.bad_rows == ()
        assert data.summary.usable_rows == len(_rows(site))


# --------------------------------------------------------------------------- heterogeneity


def test_label_skew_skews_the_site_mix() -> None:
    def spread(skew: float | None) -> float:
        """Mean total-variation distance of the sites' label mixes from uniform."""
        cfg = SynthConfig(sites=6, cases_per_site=200, seed=0, label_skew=skew)
        dists = []
        for i in range(cfg.sites):
            counts = Counter(site_labels(cfg, i))
            n = sum(counts.values())
            dists.append(0.5 * sum(abs(counts[lab] / n - 0.2) for lab in DEFAULT_LABELS))
        return float(np.mean(dists))

    balanced, skewed = spread(None), spread(0.2)
    assert balanced < 0.02
    assert skewed > 0.3


def test_the_nih_label_mix_follows_the_real_shares() -> None:
    cfg = SynthConfig(sites=4, cases_per_site=1000, seed=0, label_mix="nih")
    skewed = SynthConfig(sites=4, cases_per_site=1000, seed=0, label_mix="nih", label_skew=0.5)

    counts = Counter(lab for i in range(cfg.sites) for lab in site_labels(cfg, i))
    n = sum(counts.values())
    mixes = [Counter(site_labels(skewed, i))["normal"] / len(site_labels(skewed, i))
             for i in range(skewed.sites)]

    for label, share in LABEL_SHARE.items():
        assert abs(counts[label] / n - share) < 0.02, label
    assert max(mixes) - min(mixes) > 0.05  # skew draws each site's mix around the shares


def test_case_counts_vary_around_cases_per_site() -> None:
    cfg = SynthConfig(sites=8, cases_per_site=100, seed=0)
    counts = [len(site_labels(cfg, i)) for i in range(cfg.sites)]
    assert all(75 <= n <= 125 for n in counts)
    assert len(set(counts)) > 1


def test_reports_carry_their_site_style(small: list[Path]) -> None:
    markers = [site_style(SMALL.seed, i).report.marker for i in range(SMALL.sites)]
    assert len(set(markers)) == SMALL.sites
    for i, site in enumerate(small):
        reports = [r["report"] for r in _rows(site)]
        written = [t for t in reports if t]
        assert written and all(markers[i] in t for t in written)
        assert not any(markers[1 - i] in t for t in reports)


def test_report_location_agrees_with_the_box() -> None:
    verbose = replace(site_style(0, 0), report=REPORT_STYLES[0])  # "right lower zone"
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(200):
        label = str(rng.choice(["pneumonia", "nodule", "effusion"]))
        case = render_case(rng, label, verbose, 32)
        assert case.box is not None
        cx, cy = (case.box[0] + case.box[2]) / 2, (case.box[1] + case.box[3]) / 2
        side = "right" if cx < 0.5 else "left"  # the patient's right is the image's left
        assert case.finding.side == (0 if side == "right" else 1)
        zone = case.finding.zone
        if label == "nodule":
            assert {
                "apex": cy < 0.42,
                "upper": cy < 0.42,
                "middle": 0.33 < cy < 0.6,
                "lower": cy > 0.52,
            }[zone], (zone, case.box)
        elif case.finding.kind in ("effusion", "hazy_basal"):  # it fills the lung's base
            assert case.box[3] > 0.65, case.box
        if case.report_mode == "informative":
            finding = case.report.split("FINDINGS:")[1].split(".")[0].lower()
            assert side in finding, case.report
            checked += 1
    assert checked > 50


def test_boxes_follow_the_real_box_statistics() -> None:
    # Prepare: 150 films of each class with a box, at the demo's 64 px
    style = site_style(0, 0)
    mid = QUANTILES.index(0.5)

    for label, real in BOX_STATS.items():
        # Execute
        boxes = np.array([render_case(np.random.default_rng([7, k]), label, style, 64).box
                          for k in range(150)])
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        if real.folded:
            cx = np.minimum(cx, 1 - cx)

        # Assert: medians within a pixel or two of NIH's, the area within 25%
        assert np.median(w * h) == pytest.approx(real.area, rel=0.25), label
        assert np.median(w) == pytest.approx(real.w[mid], abs=0.03), label
        assert np.median(h) == pytest.approx(real.h[mid], abs=0.03), label
        assert np.median(cx) == pytest.approx(real.cx[mid], abs=0.04), label
        assert np.median(cy) == pytest.approx(real.cy[mid], abs=0.07), label


def test_borderline_hearts_are_the_smallest_enlarged_ones() -> None:
    # Prepare
    anatomy = sample_anatomy(np.random.default_rng(0))

    def hearts(label: str, ambiguous: bool) -> list[float]:
        findings = (sample_finding(np.random.default_rng([3, k]), label, anatomy)
                    for k in range(400))
        return [2 * f.heart[0] for f in findings if f.ambiguous == ambiguous]

    # Execute
    borderline = hearts("cardiomegaly", True) + hearts("normal", True)
    enlarged, normal = hearts("cardiomegaly", False), hearts("normal", False)

    # Assert: the real widths split at BORDERLINE_SHARE; normal hearts are smaller still
    split = float(np.interp(BORDERLINE_SHARE, QUANTILES, BOX_STATS["cardiomegaly"].w))
    assert max(normal) < min(borderline) and max(borderline) <= split <= min(enlarged)


def test_a_real_sized_nodule_still_shows_at_64_px() -> None:
    # Prepare: the smallest real nodule, on a site's scanner (blur, noise, resolution)
    style = site_style(0, 1)
    rng = np.random.default_rng(2)
    anatomy = sample_anatomy(rng)
    finding = replace(sample_finding(rng, "nodule", anatomy), ambiguous=False, amount=0.4)
    small = BOX_STATS["nodule"].w[0] / 2
    finding = replace(finding, geometry=(*finding.geometry[:2], small, small))

    # Execute: the same film with and without the nodule
    with_it, box = render_image(np.random.default_rng(5), anatomy, finding, style.scanner, 64)
    without, _ = render_image(np.random.default_rng(5), anatomy, replace(finding, amount=0.0),
                              style.scanner, 64)

    # Assert: the brightest change lies inside the box and is plainly visible
    assert box is not None
    diff = with_it - without
    row, col = np.unravel_index(int(np.argmax(diff)), diff.shape)
    x0, y0, x1, y1 = (round(v * 64) for v in box)
    assert x0 <= col < x1 and y0 <= row < y1 and diff.max() > 0.2


def test_normal_cases_have_no_box_and_the_others_one() -> None:
    style = site_style(2, 1)
    for k, label in enumerate(DEFAULT_LABELS * 4):
        case = render_case(np.random.default_rng(k), label, style, 32)
        assert (case.box is None) == (label == "normal")


# --------------------------------------------------------------------------- public and unseen


def _terms_in(text: str, terms: tuple[str, ...]) -> set[str]:
    """The terms that occur in `text` as whole words, case-insensitively."""
    return {t for t in terms
            if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text, flags=re.IGNORECASE)}


@pytest.fixture(scope="module")
def public_and_unseen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("styles")
    corpus = write_public(root / "public", PublicConfig(cases=240, image_size=32))
    unseen = write_federation(root / "unseen", SynthConfig(sites=4, cases_per_site=40, seed=3,
                                                           image_size=32, style="unseen"))
    return corpus, unseen


def test_an_unseen_federation_shares_no_report_vocabulary_with_the_public_corpus(
    public_and_unseen: tuple[Path, list[Path]],
) -> None:
    # Prepare
    corpus, unseen = public_and_unseen
    public_reports = [r["report"] for r in _rows(corpus)]
    unseen_rows = [r for site in unseen for r in _rows(site)]
    unseen_reports = [r["report"] for r in unseen_rows]
    reserved = {part: tuple(t for kind in VOCABULARY.values() for t in kind[part])
                for part in ("public", "unseen")}
    # Assert: no unseen-only header, abbreviation or phrase in any public report ...
    for report in public_reports:
        assert not _terms_in(report, reserved["unseen"]), report
    # ... nor a public one in an unseen report, and both sides use their own part
    for report in unseen_reports:
        assert not _terms_in(report, reserved["public"]), report
    assert len(_terms_in("\n".join(public_reports), reserved["public"])) >= 20
    assert len(_terms_in("\n".join(unseen_reports), reserved["unseen"])) >= 15
    # every public report style is used, and the unseen sites write unseen styles only
    assert {s.name for s in PUBLIC_REPORT_STYLES} == {
        public_style(PublicConfig(), i).report.name for i in range(PublicConfig().sources)}
    unseen_names = {site_style(3, i, "unseen").report.name for i in range(4)}
    assert unseen_names <= {s.name for s in UNSEEN_REPORT_STYLES}
    assert not unseen_names & {s.name for s in (*PUBLIC_REPORT_STYLES, *REPORT_STYLES)}
    # Assert: an unseen informative report still names its finding, so it can be learnt
    named = sum(r["label"] in r["report"].lower() for r in unseen_rows
                if r["label"] != "normal")
    abnormal = sum(r["label"] != "normal" for r in unseen_rows)
    assert named / abnormal > 0.5


def test_unseen_scanners_lie_outside_the_public_family() -> None:
    pub = [public_style(PublicConfig(seed=s), i).scanner for s in range(3) for i in range(12)]
    uns = [site_style(s, i, "unseen").scanner for s in range(3) for i in range(5)]

    def inside(value: float, bands: tuple[tuple[float, float], ...]) -> bool:
        return any(lo <= value <= hi for lo, hi in bands)

    fam = PUBLIC_SCANNERS
    for sc in uns:
        assert not inside(sc.contrast, fam.contrast) and not inside(sc.gamma, fam.gamma)
        assert not inside(sc.noise, fam.noise) and not inside(sc.blur, fam.blur)
        assert not inside(sc.aspect, fam.aspect) and sc.acquisition not in fam.acquisition
        assert sc.marker_corner not in fam.marker_corners
        assert not inside(sc.frame, (fam.frame_width,))
        assert not inside(sc.frame_level, fam.frame_level)
    assert not {sc.image_format for sc in pub} & {"dicom"}
    assert {sc.image_format for sc in uns} >= {"dicom"}
    assert all(sc.monochrome1 and sc.bits in (10, 14) for sc in uns if sc.image_format == "dicom")
    # the public family itself is wide: every format, framed and unframed, markers, aspects
    assert {sc.image_format for sc in pub} == set(FORMATS)
    assert {sc.frame > 0 for sc in pub} == {True, False}
    assert {sc.frame_level > 0 for sc in pub if sc.frame > 0} == {True, False}
    assert {sc.marker for sc in pub} == {"", "L", "R"}
    assert min(sc.aspect for sc in pub) < 0.95 and max(sc.aspect for sc in pub) > 1.05


def test_public_and_unseen_films_open_non_square_and_inverted(
    public_and_unseen: tuple[Path, list[Path]],
) -> None:
    corpus, unseen = public_and_unseen
    model = ModelConfig(image_size=32)
    for folder in (corpus, *unseen):
        site = open_site(folder, labels=DEFAULT_LABELS, model=model,
                         tokenizer=Tokenizer(model.vocab_size), strict=True)
        assert len(site.train) > 0
    sizes = {Image.open(corpus / r["image"]).size for r in _rows(corpus)[:24]
             if not r["image"].endswith(".dcm")}
    assert any(w != h for w, h in sizes)
    dcm = next(r["image"] for r in _rows(unseen[0]) if r["image"].endswith(".dcm"))
    ds = pydicom.dcmread(unseen[0] / dcm)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored in (10, 14)


def test_an_unseen_federation_repeats_no_house_case() -> None:
    house = SynthConfig(sites=2, cases_per_site=20, seed=3)
    unseen = house.model_copy(update={"style": "unseen"})
    assert site_labels(house, 0) != site_labels(unseen, 0)
    with pytest.raises(ValidationError, match="style"):
        SynthConfig(style="other")  # type: ignore[arg-type]
