"""Dataset format v1: one site folder in, three in-memory splits out (or a clear refusal)."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import (
    PIXEL_MEAN,
    PIXEL_STD,
    BadRow,
    SiteError,
    _states_finding,
    check_site,
    decode_pixels,
    equalise,
    hash_split,
    load_image,
    mask_border,
    open_site,
)

W, H = 24, 20  # tiny originals, deliberately not square
MODEL = ModelConfig(image_size=16)
LABELS = DEFAULT_LABELS


class StubTokenizer:
    """Stands in for `shared_model.tokenizer.Tokenizer`: one id per word, PAD=0."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode_padded(self, text: str, max_len: int) -> torch.Tensor:
        self.seen.append(text)
        ids = [3 + len(w) for w in text.split()][:max_len] or [1]
        return torch.tensor(ids + [0] * (max_len - len(ids)), dtype=torch.int64)

    def encode_target(self, text: str, max_len: int) -> torch.Tensor:
        ids = [1] + [3 + len(w) for w in text.split()][: max_len - 2] + [2]
        return torch.tensor(ids + [0] * (max_len - len(ids)), dtype=torch.int64)


def grey8(path: Path, value: int = 128) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W), value, dtype=np.uint8)).save(path)
    return path.name


def grey16(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W), value, dtype=np.uint16)).save(path)


def dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
) -> None:
    """A real DICOM file (explicit VR little endian, 16 bits allocated, unsigned)."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)


def write_manifest(site: Path, rows: list[dict[str, str]]) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    with (site / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return site


def good_rows(site: Path, n: int, split: str = "train", value: int = 128, prefix: str = "ok"):
    rows = []
    for i in range(n):
        grey8(site / "img" / f"{prefix}{i}.png", value)
        rows.append(
            {
                "case_id": f"{prefix}-{i}",
                "image": f"img/{prefix}{i}.png",
                "report": f"report {i}",
                "label": LABELS[i % len(LABELS)],
                "split": split,
            }
        )
    return rows


def open_(site: Path, **kw):
    return open_site(
        site, labels=LABELS, model=kw.pop("model", MODEL), tokenizer=StubTokenizer(), **kw
    )


# --------------------------------------------------------------------------- pixel scaling


def test_png_16bit_is_scaled_by_65535_not_255(tmp_path: Path) -> None:
    # Prepare
    grey16(tmp_path / "full.png", 65535)
    grey16(tmp_path / "low.png", 4096)

    # Execute
    model_input, fmt, size = load_image(tmp_path / "full.png", MODEL)
    full, _ = decode_pixels(tmp_path / "full.png")
    low, _ = decode_pixels(tmp_path / "low.png")

    # Assert
    assert fmt == "png 16-bit grey"
    assert size == (W, H)
    assert model_input.shape == (1, 16, 16) and model_input.dtype == np.float32
    np.testing.assert_allclose(full, 1.0, atol=1e-6)
    np.testing.assert_allclose(low, 4096 / 65535, atol=1e-6)


def test_png_8bit_grey(tmp_path: Path) -> None:
    grey8(tmp_path / "a.png", 51)

    pixels, fmt = decode_pixels(tmp_path / "a.png")

    assert fmt == "png 8-bit grey"
    np.testing.assert_allclose(pixels, 51 / 255, atol=1e-6)


def test_dicom_12bit_is_scaled_by_4095(tmp_path: Path) -> None:
    # Prepare
    dicom(tmp_path / "full.dcm", np.full((H, W), 4095))
    dicom(tmp_path / "half.dcm", np.full((H, W), 2048))

    # Execute
    _, fmt, size = load_image(tmp_path / "full.dcm", MODEL)
    full, _ = decode_pixels(tmp_path / "full.dcm")
    half, _ = decode_pixels(tmp_path / "half.dcm")

    # Assert
    assert fmt == "dicom 12-bit grey"
    assert size == (W, H)
    np.testing.assert_allclose(full, 1.0, atol=1e-6)
    np.testing.assert_allclose(half, 2048 / 4095, atol=1e-6)


def test_dicom_monochrome1_inverted_rescale_and_first_frame(tmp_path: Path) -> None:
    # Prepare: MONOCHROME1 means low values are white
    dicom(tmp_path / "m1.dcm", np.full((H, W), 1000), photometric="MONOCHROME1")
    # a linear rescale maps values and the stored range alike; a negative slope flips them
    dicom(tmp_path / "neg.dcm", np.full((H, W), 1000), slope=-1.0, intercept=100.0)
    frames = np.stack([np.full((H, W), 4095), np.zeros((H, W))])
    dicom(tmp_path / "multi.dcm", frames)

    # Execute
    m1, fmt = decode_pixels(tmp_path / "m1.dcm")
    neg, _ = decode_pixels(tmp_path / "neg.dcm")
    multi, _ = decode_pixels(tmp_path / "multi.dcm")

    # Assert
    assert "monochrome1" in fmt
    np.testing.assert_allclose(m1, 1 - 1000 / 4095, atol=1e-6)
    np.testing.assert_allclose(neg, 1 - 1000 / 4095, atol=1e-6)
    np.testing.assert_allclose(multi, 1.0, atol=1e-6)


def test_rgb_png_and_jpeg_grey_and_three_channels(tmp_path: Path) -> None:
    # Prepare
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    grey8(tmp_path / "g.png", 51)
    three = ModelConfig(image_size=16, in_channels=3)
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255

    # Execute: the model's input, before its per-film equalisation
    def raw(path: Path, model: ModelConfig) -> np.ndarray:
        with mock.patch("shared_model.dataset.equalise", lambda c: c):
            return load_image(path, model)[0]

    png_grey, png_rgb = raw(tmp_path / "c.png", MODEL), raw(tmp_path / "c.png", three)
    jpg_grey, grey_as_rgb = raw(tmp_path / "c.jpg", MODEL), raw(tmp_path / "g.png", three)
    png_fmt, jpg_fmt = decode_pixels(tmp_path / "c.png")[1], decode_pixels(tmp_path / "c.jpg")[1]

    # Assert
    assert png_fmt == "png 8-bit rgb" and jpg_fmt == "jpeg rgb"
    np.testing.assert_allclose(png_grey, luma, atol=1e-5)
    np.testing.assert_allclose(png_rgb[:, 0, 0], [200 / 255, 100 / 255, 50 / 255], atol=1e-6)
    np.testing.assert_allclose(jpg_grey, luma, atol=0.03)  # lossy
    assert grey_as_rgb.shape == (3, 16, 16)
    np.testing.assert_allclose(grey_as_rgb, 51 / 255, atol=1e-6)


# --------------------------------------------------------------------------- opening a site


def test_open_site_builds_splits_with_the_sample_contract(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "site-a"
    rows = (
        good_rows(site, 4)
        + good_rows(site, 2, "val", prefix="v")
        + good_rows(site, 1, "test", prefix="t")
    )
    rows[0] |= {"bbox_x0": "0.1", "bbox_y0": "0.2", "bbox_x1": "0.5", "bbox_y1": "0.6"}
    write_manifest(site, rows)

    # Execute
    data = open_(site)

    # Assert
    assert data.name == "site-a"
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 1)
    image, tokens, gen, label, has_box, box, describes = data.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert tokens.shape == (MODEL.max_report_tokens,) and tokens.dtype == torch.int64
    assert gen.shape == (MODEL.max_gen_tokens,) and gen.dtype == torch.int64
    assert label.dtype == torch.int64 and int(label) == 0
    assert has_box.dtype == torch.float32 and float(has_box) == 1.0
    assert box.tolist() == pytest.approx([0.1, 0.2, 0.5, 0.6])
    assert describes.dtype == torch.float32 and float(describes) in (0.0, 1.0)
    assert float(data.train[1][4]) == 0.0 and data.train[1][5].tolist() == [0.0] * 4
    assert data.train.case_ids == ("ok-0", "ok-1", "ok-2", "ok-3")
    assert data.val.reports == ("report 0", "report 1")
    assert data.summary.usable and data.summary.bad_rows == ()
    assert data.summary.counts["train"]["normal"] == 1
    assert data.summary.counts_frame().loc["pneumonia", "val"] == 1
    assert data.summary.formats == {"png 8-bit grey": 7}
    assert data.summary.sizes == {(W, H): 7}


def test_every_kind_of_bad_row_is_reported_and_skipped(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "site"
    rows = good_rows(site, 3)
    grey8(site / "img" / "x.png")
    noise = np.random.default_rng(0).integers(0, 255, (H, W), dtype=np.uint8)
    Image.fromarray(noise).save(site / "img" / "noise.png")  # noise: pixel data fills the file
    (site / "img" / "trunc.png").write_bytes((site / "img" / "noise.png").read_bytes()[:200])
    (site / "img" / "junk.dcm").write_bytes(b"not a dicom file at all")
    (site / "img" / "a.bmp").write_bytes(b"BM")
    grey8(tmp_path / "other-site" / "secret.png")
    good = {"report": "r", "label": "normal", "image": "img/x.png", "split": "train"}
    box = dict(
        zip(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"), ("0.1", "0.1", "0.5", "0.5"), strict=True)
    )
    bad = [
        # (row dict, expected reason fragment)
        ({"case_id": "b-empty-path", "image": ""}, "empty image path"),
        ({"case_id": "b-missing", "image": "img/nope.png"}, "missing image file"),
        ({"case_id": "b-trunc", "image": "img/trunc.png"}, "unreadable or truncated"),
        ({"case_id": "b-junk", "image": "img/junk.dcm"}, "unreadable or truncated"),
        ({"case_id": "b-ext", "image": "img/a.bmp"}, "unsupported image extension '.bmp'"),
        ({"case_id": "b-label", "label": "flu"}, "unknown label 'flu' (allowed: normal,"),
        ({"case_id": "b-partial", **box, "bbox_y1": ""}, "box partially given: bbox_y1"),
        ({"case_id": "b-nan", **box, "bbox_x0": "abc"}, "bbox_x0='abc' is not a number"),
        ({"case_id": "b-outside", **box, "bbox_x1": "1.5"}, "box outside [0, 1]"),
        ({"case_id": "b-inverted", **box, "bbox_x0": "0.6"}, "inverted box"),
        ({"case_id": "ok-0"}, "duplicate case_id 'ok-0' (first used in row 2)"),
        ({"case_id": ""}, "empty case_id"),
        ({"case_id": "b-split", "split": "training"}, "unknown split 'training'"),
        ({"case_id": "b-escape", "image": "../other-site/secret.png"}, "outside the site folder"),
        (
            {"case_id": "b-absolute", "image": str(tmp_path / "other-site" / "secret.png")},
            "is absolute",
        ),
    ]
    write_manifest(site, rows + [good | r for r, _ in bad])

    # Execute
    data = open_(site)

    # Assert
    found = data.summary.bad_rows
    assert [b.row for b in found] == list(range(5, 5 + len(bad)))  # header row 1, 3 good rows
    for b, (row, reason) in zip(found, bad, strict=True):
        assert b.case_id == row["case_id"]
        assert reason in b.reason, (b, reason)
    assert all(isinstance(b, BadRow) for b in found)
    assert data.train.case_ids == ("ok-0", "ok-1", "ok-2")
    assert (data.summary.total_rows, data.summary.usable_rows) == (3 + len(bad), 3)


def test_strict_mode_refuses_the_site_listing_every_bad_row(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "site"
    rows = good_rows(site, 3)
    rows += [
        {"case_id": "b1", "image": "img/nope.png", "report": "", "label": "normal"},
        {"case_id": "b2", "image": "img/ok0.png", "report": "", "label": "flu"},
        {"case_id": "b3", "image": "", "report": "", "label": "normal"},
    ]
    write_manifest(site, rows)

    # Execute
    with pytest.raises(SiteError) as caught:
        open_(site, strict=True)
    summary = check_site(site, labels=LABELS, model=MODEL, tokenizer=None, strict=True)

    # Assert
    message = str(caught.value)
    assert "strict" in message and "3 unusable row(s)" in message
    for fragment in ("row 5 (b1)", "row 6 (b2)", "unknown label 'flu'", "row 7 (b3)"):
        assert fragment in message
    assert [b.case_id for b in caught.value.bad_rows] == ["b1", "b2", "b3"]
    assert not summary.usable and "strict" in summary.error


@pytest.mark.parametrize(
    ("setup", "fragments"),
    [
        ("no-folder", ["does not exist"]),
        ("no-manifest", ["has no manifest.csv", "case_id, image, report, label"]),
        ("columns", ["lacks the required column(s) image, label", "found are: case_id, img"]),
        ("unreadable", ["could not be read as CSV"]),
        ("no-train", ["no usable training rows", "3 row(s)", "2 unusable", "medfuse data check"]),
    ],
)
def test_site_errors_are_one_clear_paragraph(tmp_path: Path, setup: str, fragments) -> None:
    # Prepare
    site = tmp_path / "site"
    if setup != "no-folder":
        site.mkdir()
    if setup == "columns":
        (site / "manifest.csv").write_text("case_id,img,report,diagnosis\nc1,a.png,,normal\n")
    elif setup == "unreadable":
        (site / "manifest.csv").write_bytes(b'case_id,image,report,label\n"a,\xff\xfe\x00')
    elif setup == "no-train":
        rows = good_rows(site, 1, "val")
        rows += [{"case_id": "x", "image": "", "label": "normal", "report": "", "split": "train"}]
        rows += [{"case_id": "y", "image": "img/ok0.png", "label": "?", "report": ""}]
        write_manifest(site, rows)

    # Execute
    with pytest.raises(SiteError) as caught:
        open_(site)
    summary = check_site(site, labels=LABELS, model=MODEL, tokenizer=None)

    # Assert
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message and "Traceback" not in message
    assert not summary.usable and summary.error == message


def test_hash_split_is_stable_and_about_70_15_15() -> None:
    # Prepare
    ids = [f"case-{i}" for i in range(1000)]

    # Execute
    splits = [hash_split(c) for c in ids]

    # Assert: fixed values (sha256, not the per-process salted hash()) and proportions
    assert splits[:8] == ["train", "val", "train", "train", "train", "val", "train", "test"]
    u = int.from_bytes(hashlib.sha256(b"case-7").digest()[:8], "big") / 2**64
    assert u >= 0.85
    counts = Counter(splits)
    assert 650 <= counts["train"] <= 750
    assert 110 <= counts["val"] <= 190 and 110 <= counts["test"] <= 190


def test_rows_without_split_are_split_by_hash(tmp_path: Path) -> None:
    site = tmp_path / "site"
    rows = good_rows(site, 8)
    for r in rows:
        r["split"] = ""
    write_manifest(site, rows)

    data = open_(site)

    expected = [c for c in (f"ok-{i}" for i in range(8)) if hash_split(c) == "train"]
    assert list(data.train.case_ids) == expected
    assert data.summary.hash_split_rows == 8


def test_normalisation_is_a_constant_not_a_statistic_of_the_records(tmp_path: Path) -> None:
    # Prepare: the same site with and without one bright training record
    rows = good_rows(tmp_path / "a", 2, value=51, prefix="a") + good_rows(
        tmp_path / "a", 1, value=255, prefix="z")
    write_manifest(tmp_path / "a", rows)
    write_manifest(tmp_path / "b", good_rows(tmp_path / "b", 2, value=51, prefix="a"))

    # Execute
    with_it, without = open_(tmp_path / "a"), open_(tmp_path / "b")

    # Assert: the other records' inputs do not move (a train-split statistic would)
    same = [i for i, c in enumerate(with_it.train.case_ids) if c in without.train.case_ids]
    assert len(same) == 2
    torch.testing.assert_close(with_it.train.images[same], without.train.images)
    assert with_it.norm_mean == without.norm_mean == (PIXEL_MEAN,)
    # a flat film equalises to white, then the constant normalisation
    assert float(without.train.images.mean()) == pytest.approx((1.0 - PIXEL_MEAN) / PIXEL_STD,
                                                               abs=1e-3)

def test_reports_spanning_lines_survive(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "site"
    rows = good_rows(site, 2)
    report = 'Line one, with a comma.\nLine two "quoted".\n\nImpression: normal.'
    rows[1]["report"] = report
    write_manifest(site, rows)
    tokenizer = StubTokenizer()

    # Execute
    data = open_site(site, labels=LABELS, model=MODEL, tokenizer=tokenizer)

    # Assert
    assert data.train.reports[1] == report
    assert report in tokenizer.seen
    assert data.summary.total_rows == 2 and data.summary.bad_rows == ()


def test_header_with_bom_and_capitals_and_extra_columns(tmp_path: Path) -> None:
    site = tmp_path / "site"
    grey8(site / "a.png")
    (site / "manifest.csv").write_text(
        "\ufeffCase_ID, Image ,Report,LABEL,ward\nc1,a.png,,nodule,3\n", encoding="utf-8"
    )

    summary = check_site(site, labels=LABELS, model=MODEL, tokenizer=None)

    assert summary.total_rows == 1 and summary.usable_rows == 1
    assert sum(summary.counts[s]["nodule"] for s in summary.counts) == 1


def test_mixed_formats_are_counted(tmp_path: Path) -> None:
    site = tmp_path / "site"
    grey16(site / "a.png", 1000)
    dicom(site / "b.dcm", np.full((H, W), 7))
    grey8(site / "c.png")
    rows = [
        {"case_id": c, "image": p, "report": "", "label": "normal", "split": "train"}
        for c, p in (("a", "a.png"), ("b", "b.dcm"), ("c", "c.png"))
    ]
    write_manifest(site, rows)

    data = open_(site)

    assert data.summary.formats == {
        "png 16-bit grey": 1,
        "dicom 12-bit grey": 1,
        "png 8-bit grey": 1,
    }


def test_real_tokenizer_if_present(tmp_path: Path) -> None:
    tokenizer_mod = pytest.importorskip("shared_model.tokenizer")
    site = tmp_path / "site"
    write_manifest(site, good_rows(site, 2))

    data = open_site(
        site, labels=LABELS, model=MODEL, tokenizer=tokenizer_mod.Tokenizer(MODEL.vocab_size)
    )

    assert data.train.tokens.shape == (2, MODEL.max_report_tokens)
    assert data.train.gen_tokens.shape == (2, MODEL.max_gen_tokens)


def test_symlink_leading_out_of_the_site_is_a_bad_row(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "site"
    rows = good_rows(site, 2)
    grey8(tmp_path / "other-site" / "secret.png")
    (site / "img" / "link.png").symlink_to(tmp_path / "other-site" / "secret.png")
    rows.append({"case_id": "l", "image": "img/link.png", "report": "", "label": "normal"})
    write_manifest(site, rows)

    # Execute
    data = open_(site)

    # Assert
    assert [(b.row, b.case_id) for b in data.summary.bad_rows] == [(4, "l")]
    assert "link leading outside the site folder" in data.summary.bad_rows[0].reason


def test_blank_lines_are_ignored_but_keep_row_numbers_true(tmp_path: Path) -> None:
    # Prepare: row 3 of the spreadsheet is blank, row 4 is bad
    site = tmp_path / "site"
    grey8(site / "a.png")
    (site / "manifest.csv").write_text(
        "case_id,image,report,label,split\nc1,a.png,,normal,train\n\nc2,,,normal,train\n,,,,\n"
    )

    # Execute
    summary = check_site(site, labels=LABELS, model=MODEL, tokenizer=None)

    # Assert
    assert [(b.row, b.case_id) for b in summary.bad_rows] == [(4, "c2")]
    assert (summary.total_rows, summary.usable_rows) == (2, 1)


def _latin1_report_site(site: Path) -> Path:
    """Three good cases, the second with a report saved as Latin-1 ("caf\\xe9")."""
    write_manifest(site, good_rows(site, 3))
    manifest = site / "manifest.csv"
    manifest.write_bytes(manifest.read_bytes().replace(b"report 1", b"caf\xe9 report"))
    return site


def test_a_report_that_is_not_utf8_makes_its_row_bad_not_the_site(tmp_path: Path) -> None:
    # Prepare
    site = _latin1_report_site(tmp_path / "site")

    # Execute
    opened = open_(site)
    summary = check_site(site, labels=LABELS, model=MODEL, tokenizer=None)

    # Assert: row 3 (case ok-1) is named with the reason, the other two are cases
    expected = BadRow(row=3, case_id="ok-1", reason="report is not UTF-8 text (byte 0xE9 at "
                      "character 4); save the manifest as UTF-8")
    assert opened.summary.bad_rows == (expected,)
    assert len(opened.train) == 2
    assert summary.usable and summary.bad_rows == (expected,)


def test_strict_mode_refuses_a_site_with_a_report_that_is_not_utf8(tmp_path: Path) -> None:
    # Prepare
    site = _latin1_report_site(tmp_path / "site")

    # Execute
    with pytest.raises(SiteError) as caught:
        open_(site, strict=True)

    # Assert: one paragraph naming the row, case and reason
    message = str(caught.value)
    assert "row 3" in message and "ok-1" in message and "not UTF-8" in message, message
    assert "\n" not in message


def test_a_case_id_that_is_not_utf8_is_shown_escaped(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "site"
    write_manifest(site, good_rows(site, 3))
    manifest = site / "manifest.csv"
    manifest.write_bytes(manifest.read_bytes().replace(b"ok-2,", b"caf\xe9,"))

    # Execute
    summary = check_site(site, labels=LABELS, model=MODEL, tokenizer=None)

    # Assert: printable, and the reason names the column
    (bad,) = summary.bad_rows
    assert bad.row == 4 and bad.case_id == "caf\\xe9"
    assert bad.reason.startswith("case_id is not UTF-8 text (byte 0xE9 at character 4)")


def test_a_header_that_is_not_utf8_names_the_manifest_and_row_1(tmp_path: Path) -> None:
    # Prepare: a UTF-16 manifest, as some spreadsheet programs save "Unicode text"
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.csv").write_bytes("case_id,image,report,label\n".encode("utf-16"))

    # Execute
    with pytest.raises(SiteError) as caught:
        open_(site)

    # Assert
    message = str(caught.value)
    assert "manifest.csv" in message and str(site) in message and "row 1" in message
    assert "not UTF-8" in message and "\n" not in message


@pytest.mark.parametrize(("report", "label", "describes"), [
    ("Findings: patchy consolidation in the right lower zone.", "pneumonia", True),
    ("Findings: limited study. Heart size cannot be assessed.", "pneumonia", False),
    ("Lungs clear. No effusion.", "normal", True),
    ("Hx: pneumonia. Heart size cannot be assessed.", "normal", True),
    ("Right pleural effusion.", "normal", False),
    ("Anything at all.", "atelectasis", True),  # a label the labeller has no terms for
])
def test_the_decoder_learns_only_from_reports_that_state_the_finding(
        report: str, label: str, describes: bool) -> None:
    labels = (*DEFAULT_LABELS, "atelectasis")
    assert _states_finding(report, labels.index(label), labels) is describes


def _film(rng: np.random.Generator, h: int = 60, w: int = 50) -> np.ndarray:
    """A noisy film: no line of it is flat."""
    return np.clip(0.4 + 0.2 * rng.standard_normal((h, w)), 0.0, 1.0).astype(np.float32)


def test_a_burnt_in_frame_is_blacked_out_and_the_film_kept() -> None:
    film = _film(np.random.default_rng(0))
    framed = film.copy()
    framed[:4], framed[-5:], framed[:, :3], framed[:, -4:] = 1.0, 0.9, 1.0, 0.95

    out = mask_border(framed)

    # every frame line is black, plus one line for a codec's ringing; the rest untouched
    assert (out[:5] == 0).all() and (out[-6:] == 0).all()
    assert (out[:, :4] == 0).all() and (out[:, -5:] == 0).all()
    np.testing.assert_array_equal(out[5:-6, 4:-5], framed[5:-6, 4:-5])
    assert out.shape == framed.shape  # the geometry, and so every box, is unchanged


def test_a_jpeg_frame_is_found_and_a_frameless_or_flat_film_is_left_alone(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    framed = _film(rng)
    framed[:5] = framed[-5:] = framed[:, :5] = framed[:, -5:] = 1.0
    Image.fromarray((framed * 255).astype(np.uint8)).save(tmp_path / "f.jpg", quality=55)
    jpeg = np.asarray(Image.open(tmp_path / "f.jpg"), dtype=np.float32) / 255

    assert (mask_border(jpeg)[:5] == 0).all() and (mask_border(jpeg)[:, -5:] == 0).all()
    film = _film(rng)
    np.testing.assert_array_equal(mask_border(film), film)
    flat = np.full((20, 24), 0.7, dtype=np.float32)
    np.testing.assert_array_equal(mask_border(flat), flat)  # no frame ends inside it
    rgb = np.repeat(framed[..., None], 3, axis=2)
    assert (mask_border(rgb)[:5] == 0).all() and mask_border(rgb).shape == rgb.shape


# --------------------------------------------------------------------------- text-only rows

TEXT_MODEL = ModelConfig(image_size=16, modality="text", generation=False)


def _text_only_rows(n: int, split: str = "train") -> list[dict[str, str]]:
    return [{"case_id": f"t-{split}-{i}", "image": "", "report": f"no effusion {i}",
             "label": LABELS[i % len(LABELS)], "split": split} for i in range(n)]


def test_rows_without_an_image_open_for_a_text_only_model(tmp_path: Path) -> None:
    # Prepare: a site of real-report rows with empty image cells, and one film beside them
    site = write_manifest(tmp_path / "s", _text_only_rows(6) + _text_only_rows(2, "test")
                          + good_rows(tmp_path / "s", 1, prefix="film"))

    # Execute
    data = open_(site, model=TEXT_MODEL)

    # Assert: every row is usable, an image-less row's tensor is finite (zero before
    # normalisation), and the check counts the rows without an image
    assert (len(data.train), len(data.test)) == (7, 2)
    assert not data.summary.bad_rows and data.summary.text_only_rows == 8
    assert not data.summary.text_only  # one row has a film
    assert torch.isfinite(data.train.images).all()
    assert torch.equal(data.train.images[0], torch.full_like(data.train.images[0],
                                                             -PIXEL_MEAN / PIXEL_STD))
    assert sum(data.summary.formats.values()) == 1 and len(data.summary.sizes) == 1


def test_a_text_only_site_is_refused_for_a_model_that_reads_films(tmp_path: Path) -> None:
    # Prepare
    site = write_manifest(tmp_path / "s", _text_only_rows(4))

    # Execute
    with pytest.raises(SiteError) as exc:
        open_(site)
    summary = check_site(site, labels=LABELS, model=TEXT_MODEL, tokenizer=StubTokenizer())

    # Assert: each row is bad with a reason that names the text-only model; the same
    # site checked for that model is TEXT-ONLY
    assert "no usable training rows" in str(exc.value)
    assert [b.reason for b in exc.value.bad_rows] == [
        'empty image path (a row without an image is usable only by a text-only model, '
        'modality "text")'] * 4
    assert summary.usable and summary.text_only and summary.usable_rows == 4


def test_a_broken_image_path_stays_a_bad_row_for_a_text_only_model(tmp_path: Path) -> None:
    # Prepare: a non-empty image cell must still be a file of the site
    rows = _text_only_rows(2)
    rows[1]["image"] = "img/missing.png"
    site = write_manifest(tmp_path / "s", rows)

    # Execute
    data = open_(site, model=TEXT_MODEL)

    # Assert
    assert [b.reason for b in data.summary.bad_rows] == ["missing image file 'img/missing.png'"]


def test_equalised_films_do_not_depend_on_the_scanners_tone_curve() -> None:
    film = _film(np.random.default_rng(2))
    film[:3] = 0.0  # a masked border stays black and is not ranked

    curves = [film, film**0.6, (0.8 * film) ** 1.5, np.sqrt(film)]  # black stays black

    outs = [equalise(c.astype(np.float32)) for c in curves]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-6)
    assert (outs[0][:3] == 0).all() and outs[0].max() == 1.0
