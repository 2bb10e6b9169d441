"""Opening one hospital's data (dataset format v1, docs/dataset-format.md).

A site is a folder holding `manifest.csv` and the images it names. `open_site` reads ONE
site folder, never another's: everything it returns (images, tokens) comes from that
folder alone, and the input normalisation is a fixed constant (no statistic of any
records), so one record's input never depends on the others.

Every image is decoded in full when the site is opened, so that a truncated or corrupt
file is reported up front as a bad row instead of crashing a training round halfway
through. A row that cannot be used is skipped and counted (or, with `strict=True`, the
whole site is refused); problems with the site as a whole (no folder, no manifest, missing
columns, no usable training rows) raise `SiteError` with a message meant for a person.

`open_for_inference` opens a folder to predict on, not to train on: it asks only for
`INFERENCE_COLUMNS` (a label, a split and a box are optional), keeps every row in manifest
order whatever its split, and applies the same row checks, so a row it cannot use is
listed with the same reason `medfuse data check` gives.

There are no module-level caches here. The ClientApp keeps the sites it opened, per
process, keyed by every file's name, size and modification time, so a changed folder is
opened again; in deployment Flower starts a fresh ClientApp process per message, so
there a site is decoded on every message.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from shared_model.config import MANIFEST, ModelConfig
from shared_model.report_labeller import NORMAL, TERMS, read_finding
from shared_model.tokenizer import describing_part, split_words

REQUIRED_COLUMNS: tuple[str, ...] = ("case_id", "image", "report", "label")
# What prediction needs: a case to predict has no truth yet, so no label or split.
INFERENCE_COLUMNS: tuple[str, ...] = ("case_id", "image", "report")
BOX_COLUMNS: tuple[str, ...] = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm")
# Cumulative upper bounds of the hash split: 70% train, 15% val, 15% test.
HASH_SPLIT: tuple[tuple[str, float], ...] = (("train", 0.70), ("val", 0.85), ("test", 1.0))
# ITU-R BT.601 luma, the weights PIL uses for RGB -> L.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# What `load_image` does to pixels before the model sees them; a model trained on another
# version (a cached public model) is trained again. 2: uniform borders blacked out;
# 3: and each channel equalised.
PREPROCESSING = 3
# Fixed input normalisation, the same at every site: pixel values in [0, 1] (scaled by
# their true bit depth) become (x - PIXEL_MEAN) / PIXEL_STD. Constants, not statistics of a
# site's data: a statistic of the train split would move every record's input when one
# record is added or removed, outside what DP-SGD accounts for.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25
# How many bad rows a strict-mode SiteError lists before pointing to `medfuse data check`.
MAX_LISTED_BAD_ROWS = 50
# Why an empty image cell is a bad row for a model that reads the film.
NO_IMAGE_REASON = ("empty image path (a row without an image is usable only by a text-only "
                   "model, modality \"text\")")

Split = Literal["train", "val", "test"]


class TokenizerLike(Protocol):
    """What the reader needs from `shared_model.tokenizer.Tokenizer` (taken as an argument,
    so tests and tools can pass a stand-in)."""

    def encode_padded(self, text: str, max_len: int) -> torch.Tensor: ...

    def encode_target(self, text: str, max_len: int) -> torch.Tensor: ...


class SiteError(Exception):
    """A site that cannot be opened at all; `str(exc)` is one paragraph for a person.

    `bad_rows` holds the unusable rows when they are the reason (strict mode, or no usable
    training rows), so a tool can list them without parsing the message.
    """

    def __init__(self, message: str, bad_rows: Sequence[BadRow] = ()) -> None:
        super().__init__(message)
        self.bad_rows: tuple[BadRow, ...] = tuple(bad_rows)


@dataclass(frozen=True)
class BadRow:
    """One unusable manifest row.

    `row` is the row number as a person sees it in a spreadsheet: the header is row 1, the
    first case is row 2. A report that spans several lines is still one row, so this is
    not the line number in the text file.
    """

    row: int
    case_id: str
    reason: str


@dataclass(frozen=True)
class SiteSummary:
    """What `medfuse data check` shows about one site; no image, report or token in it.

    `counts[split][label]` counts usable cases (every split and label present, zeros
    included). `formats` and `sizes` (original width x height) count usable rows only.
    `error` is the reason the site is not usable ("" when it is). `total_rows` counts the
    manifest's case rows; blank lines are not cases and are not counted.
    """

    name: str
    path: Path
    labels: tuple[str, ...]
    total_rows: int
    usable_rows: int
    counts: dict[str, dict[str, int]]
    formats: dict[str, int]
    sizes: dict[tuple[int, int], int]
    bad_rows: tuple[BadRow, ...]
    usable: bool
    error: str = ""
    hash_split_rows: int = 0  # usable rows whose split came from the case_id hash
    # usable rows without an image: only a text-only model (modality "text") keeps them
    text_only_rows: int = 0

    @property
    def text_only(self) -> bool:
        """Whether no usable row has an image: a site for the report branch alone."""
        return self.usable_rows > 0 and self.text_only_rows == self.usable_rows

    def counts_frame(self) -> pd.DataFrame:
        """Counts as a labels x splits table (pandas), for printing or tests."""
        return pd.DataFrame(
            {s: [self.counts.get(s, {}).get(lab, 0) for lab in self.labels] for s in SPLITS},
            index=pd.Index(self.labels, name="label"),
            dtype="int64",
        )

    @property
    def min_size(self) -> tuple[int, int] | None:
        """Smallest original (width, height) by area, or None without usable images."""
        return min(self.sizes, key=lambda s: (s[0] * s[1], s)) if self.sizes else None

    @property
    def max_size(self) -> tuple[int, int] | None:
        """Largest original (width, height) by area, or None without usable images."""
        return max(self.sizes, key=lambda s: (s[0] * s[1], s)) if self.sizes else None


class SiteSplit(Dataset):
    """One split of one site, in memory: `dataset[i]` is the sample tuple of `batch.py`.

    `case_ids` and `reports` (the raw report strings, needed as references for BLEU and
    ROUGE) stay on the site like everything else here.
    """

    def __init__(
        self,
        split: str,
        images: torch.Tensor,  # (N, C, H, W) float32, normalised
        tokens: torch.Tensor,  # (N, T) int64
        gen_tokens: torch.Tensor,  # (N, G) int64
        label_ids: torch.Tensor,  # (N,) int64
        has_box: torch.Tensor,  # (N,) float32
        boxes: torch.Tensor,  # (N, 4) float32
        case_ids: Sequence[str],
        reports: Sequence[str],
        describes: torch.Tensor | None = None,  # (N,) float32; all 1.0 where not given
    ) -> None:
        n = images.shape[0]
        if describes is None:
            describes = torch.ones(n, dtype=torch.float32)
        sizes = {t.shape[0] for t in (tokens, gen_tokens, label_ids, has_box, boxes, describes)}
        if sizes != {n} or len(case_ids) != n or len(reports) != n:
            raise ValueError(f"split {split!r}: tensors and lists differ in length")
        self.split = split
        self.images = images
        self.tokens = tokens
        self.gen_tokens = gen_tokens
        self.label_ids = label_ids
        self.has_box = has_box
        self.boxes = boxes
        self.describes = describes
        self.case_ids: tuple[str, ...] = tuple(case_ids)
        self.reports: tuple[str, ...] = tuple(reports)

    def __len__(self) -> int:
        """Number of cases (not batches)."""
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return (
            self.images[index],
            self.tokens[index],
            self.gen_tokens[index],
            self.label_ids[index],
            self.has_box[index],
            self.boxes[index],
            self.describes[index],
        )


@dataclass(frozen=True)
class SiteData:
    """One opened site: three in-memory splits and the (fixed) input normalisation."""

    name: str
    path: Path
    labels: tuple[str, ...]
    train: SiteSplit
    val: SiteSplit
    test: SiteSplit
    norm_mean: tuple[float, ...]  # per channel: the fixed PIXEL_MEAN, never a data statistic
    norm_std: tuple[float, ...]
    summary: SiteSummary

    def splits(self) -> Iterator[SiteSplit]:
        yield from (self.train, self.val, self.test)


@dataclass(frozen=True)
class InferenceCase:
    """One readable row of a folder opened for prediction; `label` ("" where the manifest
    gives none) and `box` are the truth, shown beside the prediction, never its input.
    `image_path` is the original file, so a picture can show it at its own resolution."""

    row: int
    case_id: str
    image_path: Path
    image: torch.Tensor  # (C, S, S) float32, normalised as in training
    report: str
    label: str
    box: tuple[float, float, float, float] | None
    split: str  # as the manifest gives it; "" where it gives none


@dataclass(frozen=True)
class InferenceSite:
    """A folder opened for prediction: its readable cases in manifest order, and every
    row that is not one with its reason (so none is silently left out)."""

    name: str
    path: Path
    labels: tuple[str, ...]
    total_rows: int
    cases: tuple[InferenceCase, ...]
    bad_rows: tuple[BadRow, ...]


# --------------------------------------------------------------------------- public API


def open_site(
    site_dir: Path,
    *,
    labels: Sequence[str],
    model: ModelConfig,
    tokenizer: TokenizerLike,
    strict: bool = False,
) -> SiteData:
    """Open ONE site folder: validate every row, decode every image, split, normalise.

    Bad rows are skipped and listed in `summary.bad_rows`; with `strict=True` any bad row
    refuses the site. For a text-only model (`model.modality == "text"`) a row with an
    empty image cell is usable: the report branch never reads the film, so its image
    tensor is left at zero (a real-report site with no films trains the report branch);
    for any other model such a row is bad and says why. Raises `SiteError` (a message
    for a person) when the site cannot be used; raises `ValueError` only for a
    programming error (`labels` not matching `model.num_classes`).
    """
    label_set = _check_labels(labels, model)
    site_dir = Path(site_dir)
    scan = _scan(site_dir, label_set, model, keep_images=True)
    summary = _summary(site_dir, label_set, scan)
    _raise_if_unusable(site_dir, scan, strict)

    assert scan.images is not None
    n = len(scan.rows)
    images = scan.images[:n]  # rows are ordered train, val, test: each split is a slice
    bounds = _split_bounds(scan.rows)
    images.sub_(PIXEL_MEAN).div_(PIXEL_STD)

    reports = [r.report for r in scan.rows]
    tokens = _stack_tokens(
        [tokenizer.encode_padded(t, model.max_report_tokens) for t in reports],
        model.max_report_tokens,
    )
    gen_tokens = _stack_tokens(
        [tokenizer.encode_target(t, model.max_gen_tokens) for t in reports],
        model.max_gen_tokens,
    )
    label_ids = torch.tensor([r.label_id for r in scan.rows], dtype=torch.int64)
    has_box = torch.tensor([r.box is not None for r in scan.rows], dtype=torch.float32)
    boxes = torch.tensor(
        [r.box if r.box is not None else (0.0, 0.0, 0.0, 0.0) for r in scan.rows],
        dtype=torch.float32,
    ).reshape(n, 4)
    describes = torch.tensor([_states_finding(r.report, r.label_id, label_set)
                              for r in scan.rows], dtype=torch.float32)

    def part(split: str) -> SiteSplit:
        lo, hi = bounds[split]
        return SiteSplit(
            split,
            images[lo:hi],
            tokens[lo:hi],
            gen_tokens[lo:hi],
            label_ids[lo:hi],
            has_box[lo:hi],
            boxes[lo:hi],
            [r.case_id for r in scan.rows[lo:hi]],
            reports[lo:hi],
            describes[lo:hi],
        )

    return SiteData(
        name=summary.name,
        path=site_dir,
        labels=label_set,
        train=part("train"),
        val=part("val"),
        test=part("test"),
        norm_mean=(PIXEL_MEAN,) * images.shape[1],
        norm_std=(PIXEL_STD,) * images.shape[1],
        summary=summary,
    )


def _states_finding(report: str, label_id: int, labels: tuple[str, ...]) -> bool:
    """Whether the report's describing part states the case's label, as the report
    labeller reads it; True for a label the labeller has no terms for.

    Reports that say nothing about the film ("limited study", "heart size cannot be
    assessed") are common; a decoder taught them writes them, since they are the likeliest
    text for every finding (on the demo's hospitals, pooled: 28 of 153 generated reports
    were one such text). The decoder learns only from reports that state the finding; the
    others are still references in scoring."""
    label = labels[label_id]
    if label != NORMAL and label not in TERMS:
        return True
    return read_finding(split_words(describing_part(report)), labels) == label


def open_for_inference(
    site_dir: Path, *, labels: Sequence[str], model: ModelConfig
) -> InferenceSite:
    """Open ONE folder to predict on: every row, any split, labels optional.

    A folder of test cases only, or of cases nobody has labelled yet, is what a model is
    used on, so neither is refused here as `open_site` refuses it for training. Rows are
    checked as for training, except that an empty or absent label and split are no
    reason; an unknown label still is (a typo would pose as a wrong prediction). Raises
    `SiteError` only for the folder as a whole (no folder, no manifest, a column of
    `INFERENCE_COLUMNS` missing); `ValueError` for `labels` not matching `model`.
    """
    label_set = _check_labels(labels, model)
    site_dir = Path(site_dir)
    frame = _read_manifest(site_dir, INFERENCE_COLUMNS)
    candidates = _inference_rows(frame, site_dir.resolve(), label_set)
    rows, bad, images = _decode(candidates, model, keep_images=True, by_split=False)
    assert images is not None
    images = images[: len(rows)].sub_(PIXEL_MEAN).div_(PIXEL_STD)  # (N, C, S, S)
    cases = tuple(_inference_case(r, images[k], label_set) for k, r in enumerate(rows))
    return InferenceSite(name=_site_name(site_dir), path=site_dir, labels=label_set,
                         total_rows=len(candidates), cases=cases, bad_rows=tuple(bad))


def check_site(
    site_dir: Path,
    *,
    labels: Sequence[str],
    model: ModelConfig,
    tokenizer: TokenizerLike,
    strict: bool = False,
) -> SiteSummary:
    """What `medfuse data check` reports: never raises for a problem with the data.

    Decodes every image like `open_site` (so it finds the same bad rows) but keeps none of
    them. A site that `open_site` would refuse comes back with `usable=False` and the
    `SiteError` message in `error`. `tokenizer` is accepted for symmetry with `open_site`;
    tokenising cannot fail on a row, so the check does not spend time on it.
    """
    del tokenizer
    label_set = _check_labels(labels, model)
    site_dir = Path(site_dir)
    try:
        scan = _scan(site_dir, label_set, model, keep_images=False)
    except SiteError as exc:
        return SiteSummary(
            name=_site_name(site_dir),
            path=site_dir,
            labels=label_set,
            total_rows=0,
            usable_rows=0,
            counts={s: dict.fromkeys(label_set, 0) for s in SPLITS},
            formats={},
            sizes={},
            bad_rows=exc.bad_rows,
            usable=False,
            error=str(exc),
        )
    summary = _summary(site_dir, label_set, scan)
    try:
        _raise_if_unusable(site_dir, scan, strict)
    except SiteError as exc:
        return replace(summary, usable=False, error=str(exc))
    return summary


def hash_split(case_id: str) -> Split:
    """The split of a case without a `split` value: 70% train, 15% val, 15% test.

    SHA-256 of the UTF-8 case_id, so the same case lands in the same split on every
    machine and every run (Python's `hash()` is salted per process).
    """
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    for split, upper in HASH_SPLIT:
        if u < upper:
            return split  # type: ignore[return-value]
    return "test"


def load_image(path: Path, model: ModelConfig) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Decode one image file fully into (C, S, S) float32 in [0, 1] at the model's size.

    Returns the array, a format description ("png 16-bit grey", "dicom 12-bit grey", ...)
    and the original (width, height). Pixel values are scaled by their real bit depth.
    Raises `ValueError` or `OSError` (and whatever a decoder raises) for an unusable file.
    """
    pixels, fmt = decode_pixels(path)
    size = (int(pixels.shape[1]), int(pixels.shape[0]))
    return _to_model_input(pixels, model), fmt, size


def decode_pixels(path: Path) -> tuple[np.ndarray, str]:
    """The file's pixels at their own size, scaled by their real bit depth, and a format
    description: what `load_image` resizes, and what a privacy ledger identifies a record
    by (so that a losslessly re-encoded file is the same record)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".dcm":
        return _read_dicom(path)
    if suffix in (".png", ".jpg", ".jpeg"):
        return _read_pil(path)
    raise ValueError(f"unsupported extension {suffix!r}")


# --------------------------------------------------------------------------- scanning


@dataclass
class _Row:
    """One manifest row on its way through validation; the usable ones are kept."""

    row_no: int
    case_id: str
    image: str
    report: str
    label_id: int
    split: str
    hashed: bool  # split came from the case_id hash
    box: tuple[float, float, float, float] | None
    path: Path | None
    reasons: list[str]
    fmt: str = ""
    size: tuple[int, int] = (0, 0)


@dataclass
class _Scan:
    total_rows: int
    rows: list[_Row]  # usable rows, ordered train, val, test (manifest order within)
    bad_rows: list[BadRow]
    images: torch.Tensor | None  # (>= len(rows), C, S, S); the first len(rows) are filled


def _scan(
    site_dir: Path, labels: tuple[str, ...], model: ModelConfig, *, keep_images: bool
) -> _Scan:
    """Read the manifest, validate each row and decode each image of one site; a row
    without an image passes only where the model is text-only (`_image_optional`)."""
    frame = _read_manifest(site_dir)
    root = site_dir.resolve()
    has_split = "split" in frame.columns
    first_row: dict[str, int] = {}  # case_id -> the row it was first used in
    candidates: list[_Row] = []
    for i, rec in enumerate(frame.to_dict("records")):
        if any(v.strip() for v in rec.values()):  # a blank line is no case, but counts
            candidates.append(_check_row(rec, i + 2, root, labels, has_split, first_row,
                                         image_optional=_image_optional(model)))
    rows, bad, images = _decode(candidates, model, keep_images)
    return _Scan(total_rows=len(candidates), rows=rows, bad_rows=bad, images=images)


def _image_optional(model: ModelConfig) -> bool:
    """Whether rows may come without an image: only for a model that never reads one."""
    return model.modality == "text"


def _check_row(rec: dict[str, str], row_no: int, root: Path, labels: tuple[str, ...],
               has_split: bool, first_row: dict[str, int], *,
               label_optional: bool = False, image_optional: bool = False) -> _Row:
    """One manifest row (`row_no` as a spreadsheet counts: the header is row 1), with
    every reason it is unusable; images are not read yet. `label_optional` (prediction)
    lets an empty label pass: a case to predict need not be labelled. `image_optional`
    (a text-only model) lets an empty image cell pass; a non-empty one is still checked,
    so a broken path is reported whatever the model."""
    # A cell that is not UTF-8 (a report pasted from a Latin-1 system) makes its row bad,
    # not the site; the case_id is shown with the odd bytes escaped, a report never.
    reasons: list[str] = [r for c in REQUIRED_COLUMNS if (r := _not_utf8(c, rec[c]))]
    case_id = _escape_bytes(rec["case_id"].strip())
    if not case_id:
        reasons.append("empty case_id")
    elif case_id in first_row:
        reasons.append(f"duplicate case_id {case_id!r} (first used in row {first_row[case_id]})")
    else:
        first_row[case_id] = row_no
    label = rec["label"].strip()
    if label not in labels and (label or not label_optional):
        shown = f"unknown label {label!r}" if label else "empty label"
        reasons.append(f"{shown} (allowed: {', '.join(labels)})")
    split_value = rec["split"].strip() if has_split else ""
    if split_value and split_value not in SPLITS:
        reasons.append(f"unknown split {split_value!r} (allowed: train, val, test, or empty "
                       "for a split by case_id hash)")
    box_reason, box = _parse_box(rec)
    if box_reason:
        reasons.append(box_reason)
    no_image = not rec["image"].strip()
    path_reason, path = _image_path(root, rec["image"])
    if no_image and not image_optional:
        reasons.append(NO_IMAGE_REASON)
    elif path_reason and not no_image:
        reasons.append(path_reason)
    return _Row(
        row_no=row_no, case_id=case_id, image=rec["image"].strip(), report=rec["report"],
        label_id=labels.index(label) if label in labels else -1,
        split=split_value if split_value in SPLITS else hash_split(case_id),
        hashed=not split_value, box=box, path=path, reasons=reasons,
    )


def _decode(candidates: list[_Row], model: ModelConfig, keep_images: bool, *,
            by_split: bool = True) -> tuple[list[_Row], list[BadRow], torch.Tensor | None]:
    """Decode the images in split order, so that each split is a contiguous slice of one
    image tensor (or, `by_split=False`, in manifest order, as prediction lists them);
    (usable rows, bad rows by row number, images or None)."""
    order = {s: k for k, s in enumerate(SPLITS)} if by_split else {}
    candidates = sorted(candidates, key=lambda r: (order.get(r.split, 0), r.row_no))
    side = model.image_size
    images = (torch.empty((len(candidates), model.in_channels, side, side),
                          dtype=torch.float32) if keep_images else None)
    rows: list[_Row] = []
    bad: list[BadRow] = []
    for row in candidates:
        if row.path is not None:
            # Any decoder failure (PIL, pydicom, numpy) is this row's problem, not the
            # site's: one bad file must not stop the others from being read.
            try:
                pixels, row.fmt, row.size = load_image(row.path, model)
            except Exception as exc:
                row.reasons.append(f"unreadable or truncated image {row.image!r}: {_describe(exc)}")
            else:
                if images is not None and not row.reasons:
                    images[len(rows)] = torch.from_numpy(pixels)
        elif images is not None and not row.reasons:
            images[len(rows)] = 0.0  # no film (a text-only row): never read, kept finite
        if row.reasons:
            bad.append(BadRow(row=row.row_no, case_id=row.case_id, reason="; ".join(row.reasons)))
        else:
            rows.append(row)
    bad.sort(key=lambda b: b.row)
    return rows, bad, images


def _not_utf8(column: str, value: str) -> str:
    """Empty for UTF-8 text, else why the cell is not: its first odd byte and where it
    is, never the text itself (which may be a report)."""
    for at, char in enumerate(value):
        if "\udc80" <= char <= "\udcff":  # an undecodable byte, as surrogateescape keeps it
            return (f"{column} is not UTF-8 text (byte 0x{ord(char) - 0xDC00:02X} at "
                    f"character {at + 1}); save the manifest as UTF-8")
    return ""


def _escape_bytes(value: str) -> str:
    """`value` with each undecodable byte written as \\xNN (printable, comparable)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_manifest(site_dir: Path, required: Sequence[str] = REQUIRED_COLUMNS
                   ) -> pd.DataFrame:
    """The manifest as strings ("" for empty cells), column names stripped and lower-cased;
    `required` is what training needs unless the caller (prediction) needs less."""
    if not site_dir.is_dir():
        raise SiteError(
            f"Site folder {str(site_dir)!r} does not exist or is not a folder. A site is a "
            f"folder holding {MANIFEST} and the images it names (dataset format v1)."
        )
    manifest = site_dir / MANIFEST
    if not manifest.is_file():
        raise SiteError(
            f"Site folder {str(site_dir)!r} has no {MANIFEST}. Every site needs one, with the "
            f"columns {', '.join(required)} (and optionally "
            f"{_optional_columns(required)}), one row per case."
        )
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs write.
        frame = pd.read_csv(
            manifest,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            # A byte that is not UTF-8 is kept (as a lone surrogate) for its row to be
            # reported and skipped by `_check_row`, instead of refusing the whole site.
            encoding_errors="surrogateescape",
            skip_blank_lines=False,  # kept (and later ignored) so row numbers stay true
        )
    except Exception as exc:  # parser, decoding and IO errors alike: all mean "unreadable"
        raise SiteError(
            f"{MANIFEST} in {str(site_dir)!r} could not be read as CSV ({_describe(exc)}). It "
            "must be UTF-8, comma-separated, with a header row; a report that contains "
            "commas, quotes or line breaks must be quoted."
        ) from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    header = next((r for c in frame.columns if (r := _not_utf8("the header row", c))), "")
    if header:
        raise SiteError(f"{MANIFEST} in {str(site_dir)!r}: row 1: {header}, with a header "
                        f"row of {', '.join(required)}.")
    twice = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if twice:
        raise SiteError(
            f"{MANIFEST} in {str(site_dir)!r} has the column(s) {', '.join(twice)} more than "
            "once (column names are compared ignoring case and surrounding spaces); keep one."
        )
    missing = [c for c in required if c not in frame.columns]
    if missing:
        found = ", ".join(frame.columns) if len(frame.columns) else "none"
        raise SiteError(
            f"{MANIFEST} in {str(site_dir)!r} lacks the required column(s) "
            f"{', '.join(missing)}; the columns found are: {found}. Required: "
            f"{', '.join(required)} (report may be empty)."
        )
    # Short rows leave NaN even with na_filter off; a missing cell is an empty one.
    return frame.fillna("").astype(str)


def _inference_rows(frame: pd.DataFrame, root: Path, labels: tuple[str, ...]) -> list[_Row]:
    """Every case row of a manifest checked as `_check_row` checks it, where neither an
    empty label nor any split is a reason: the split is only shown, where it is valid."""
    first_row: dict[str, int] = {}
    rows: list[_Row] = []
    for i, rec in enumerate(frame.to_dict("records")):
        if any(v.strip() for v in rec.values()):  # a blank line is no case, but counts
            row = _check_row({**rec, "label": rec.get("label", "")}, i + 2, root, labels,
                             False, first_row, label_optional=True)
            given = rec.get("split", "").strip()
            row.split = given if given in SPLITS else ""
            rows.append(row)
    return rows


def _optional_columns(required: Sequence[str]) -> str:
    """The optional columns for a message: those of the training set `required` leaves out,
    then split and the box."""
    rest = [c for c in REQUIRED_COLUMNS if c not in required]
    return f"{', '.join([*rest, 'split'])} and {', '.join(BOX_COLUMNS)}"


def _inference_case(row: _Row, image: torch.Tensor, labels: tuple[str, ...]
                    ) -> InferenceCase:
    """A checked, decoded row as a case to predict (`image` (C, S, S), normalised)."""
    assert row.path is not None
    return InferenceCase(
        row=row.row_no, case_id=row.case_id, image_path=row.path, image=image,
        report=row.report, label=labels[row.label_id] if row.label_id >= 0 else "",
        box=row.box, split=row.split)


def _image_path(root: Path, raw: str) -> tuple[str, Path | None]:
    """(reason, None) for an unusable path, ("", path) for a file inside the site folder.

    Paths are relative to the site folder with "/" (a "\\" is read as "/", as written by
    Windows tools). Absolute paths, ".." escapes and symlinks leading out of the folder
    are refused: a site reads only its own folder.
    """
    text = raw.strip().replace("\\", "/")
    if not text:
        return "empty image path", None
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return f"image path {text!r} is absolute; it must be relative to the site folder", None
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../"):
        return f"image path {text!r} leads outside the site folder", None
    suffix = posixpath.splitext(norm)[1].lower()
    if suffix not in IMAGE_EXTENSIONS:
        return (
            f"unsupported image extension {suffix or '(none)'!r} in {text!r} "
            f"(allowed: {', '.join(IMAGE_EXTENSIONS)})",
            None,
        )
    path = root / norm
    if not path.resolve().is_relative_to(root):
        return f"image path {text!r} is a link leading outside the site folder", None
    if not path.is_file():
        return f"missing image file {text!r}", None
    return "", path


def _parse_box(rec: dict[str, str]) -> tuple[str, tuple[float, float, float, float] | None]:
    """(reason, None) for a bad box, ("", box) or ("", None) where the row has no box."""
    values = [rec.get(c, "").strip() for c in BOX_COLUMNS]
    given = [c for c, v in zip(BOX_COLUMNS, values, strict=True) if v]
    if not given:
        return "", None
    if len(given) < len(BOX_COLUMNS):
        empty = [c for c in BOX_COLUMNS if c not in given]
        return f"box partially given: {', '.join(empty)} empty", None
    numbers: list[float] = []
    for name, value in zip(BOX_COLUMNS, values, strict=True):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isnan(number):
            return f"box value {name}={value!r} is not a number", None
        numbers.append(number)
    outside = [f"{n}={v:g}" for n, v in zip(BOX_COLUMNS, numbers, strict=True) if not 0 <= v <= 1]
    if outside:
        return f"box outside [0, 1]: {', '.join(outside)} (fractions of width/height)", None
    x0, y0, x1, y1 = numbers
    if x1 <= x0 or y1 <= y0:
        return f"inverted box: need x0 < x1 and y0 < y1, got {x0:g}, {y0:g}, {x1:g}, {y1:g}", None
    return "", (x0, y0, x1, y1)


# --------------------------------------------------------------------------- decoding


def _read_pil(path: Path) -> tuple[np.ndarray, str]:
    """A PNG or JPEG as (H, W) or (H, W, 3) float32 in [0, 1], scaled by its bit depth.

    Pillow reads 16-bit grey PNGs as "I;16" (or "I"), which are divided by 65535, never
    by 255; 16-bit RGB PNGs Pillow itself reduces to 8-bit RGB.
    """
    with Image.open(path) as im:
        im.load()  # decode everything now: a truncated file fails here, not mid-round
        kind = im.format or "?"
        if kind not in ("PNG", "JPEG", "MPO"):
            raise ValueError(f"file content is {kind}, not PNG or JPEG")
        mode = im.mode
        if kind == "PNG":
            depth, colour = _png_header(path)
            tone = {0: "grey", 2: "rgb", 3: "palette", 4: "grey", 6: "rgb"}.get(colour, "?")
            fmt = f"png {depth}-bit {tone}" if tone != "palette" else "png palette"
        else:
            depth = 8
            fmt = "jpeg grey" if mode in ("L", "1") else "jpeg rgb"
        if mode.startswith("I;16"):
            pixels = np.asarray(im).astype(np.float32) / 65535.0
        elif mode == "I":
            pixels = np.asarray(im).astype(np.float32) / float(2 ** min(depth, 16) - 1)
        elif mode in ("1", "L", "LA", "La"):
            pixels = np.asarray(im.convert("L")).astype(np.float32) / 255.0
        else:  # RGB, RGBA, P, CMYK, YCbCr, ...: 8 bits per channel after conversion
            pixels = np.asarray(im.convert("RGB")).astype(np.float32) / 255.0
    return np.clip(pixels, 0.0, 1.0), fmt


def _png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk, which Pillow does not expose."""
    with path.open("rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[12:16] != b"IHDR":
        raise ValueError("PNG without an IHDR header")
    return head[24], head[25]


def _read_dicom(path: Path) -> tuple[np.ndarray, str]:
    """A DICOM image as (H, W) or (H, W, 3) float32 in [0, 1].

    The stored range is set by BitsStored (a 12-bit image is divided by 4095, not 65535),
    signed when PixelRepresentation is 1. RescaleSlope/Intercept map values and range
    alike; MONOCHROME1 (white is low) is inverted; of a multi-frame image the first frame
    is taken.
    """
    import pydicom  # lazy: pydicom is slow (0.1 s); only sites with DICOM files pay it

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("DICOM file without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples not in (1, 3):
        raise ValueError(f"unsupported SamplesPerPixel {samples}")
    if samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported photometric interpretation {photometric}")
    arr = np.asarray(ds.pixel_array)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo_raw = -(2.0 ** (bits - 1)) if signed else 0.0
    hi_raw = 2.0 ** (bits - 1) - 1 if signed else 2.0**bits - 1
    values = arr.astype(np.float64)
    tone = "grey" if samples == 1 else "rgb"
    if samples == 1:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        values = values * slope + intercept
        lo, hi = sorted((lo_raw * slope + intercept, hi_raw * slope + intercept))
    else:
        lo, hi = lo_raw, hi_raw
    pixels = ((values - lo) / max(hi - lo, 1e-12)).astype(np.float32)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
        tone = "grey (monochrome1)"
    if pixels.ndim != (2 if samples == 1 else 3):
        raise ValueError(f"unexpected pixel array shape {tuple(arr.shape)}")
    return np.clip(pixels, 0.0, 1.0), f"dicom {bits}-bit {tone}"


def _to_model_input(pixels: np.ndarray, model: ModelConfig) -> np.ndarray:
    """(H, W) or (H, W, 3) in [0, 1] -> (C, S, S) float32: uniform borders blacked out
    (`mask_border`), grey by luminance for one channel, grey replicated otherwise,
    bilinear resize in PIL's float mode, then each channel equalised (`equalise`)."""
    pixels = mask_border(pixels)
    side = model.image_size
    if model.in_channels == 3 and pixels.ndim == 3:
        chans = [pixels[..., k] for k in range(3)]
    else:
        grey = pixels @ LUMA if pixels.ndim == 3 else pixels
        chans = [grey]
    resized = [
        equalise(np.asarray(
            Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize(
                (side, side), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        ))
        for c in chans
    ]
    if len(resized) == 1:
        resized = resized * model.in_channels
    return np.clip(np.stack(resized), 0.0, 1.0)


def equalise(channel: np.ndarray) -> np.ndarray:
    """`channel` with each non-black intensity replaced by its rank among the non-black
    pixels (a fraction in (0, 1]); black stays black.

    Scanners differ by their tone curves (contrast, brightness, gamma, bit depth,
    inversion): any such monotone curve leaves every pixel's rank where it was, so after
    histogram equalisation, as chest X-ray pipelines use it, films of the same chest from
    two hospitals look alike. A public model pretrained on equalised films scored 0.76
    -> 0.83 on hospitals whose tone curves it had never seen (0.93 unchanged on its own
    style). Black (a masked border, clipped air) is left out so a frame's size does not
    shift the film's ranks.
    """
    film = channel[channel > 0]
    if film.size == 0:
        return channel
    order = np.sort(film)
    ranks = np.searchsorted(order, channel, side="right") / order.size
    return np.where(channel > 0, ranks, 0.0).astype(np.float32)


def mask_border(pixels: np.ndarray) -> np.ndarray:
    """`pixels` (H, W) or (H, W, 3) with any uniform strip along its edges set to black.

    Frames burnt in around a film (collimation, a scanner's white or grey surround) differ
    between hospitals and carry nothing about the patient, yet a CNN reads them: a public
    model met a thick white frame it had never seen and lost 20-30 points of accuracy on
    that hospital. Blacking out such strips gives every hospital's films the same dark
    surround, the common radiograph preprocessing of cropping borders without changing the
    geometry, so boxes keep their coordinates. A strip is the run of edge lines (rows or
    columns) that are each uniform (`_uniform_line`) at the outermost line's level, up to a
    fifth of the side, plus one more line for a lossy codec's ringing at its inner edge.
    """
    grey = pixels @ LUMA if pixels.ndim == 3 else pixels
    h, w = grey.shape
    top = _uniform_run([grey[i] for i in range(h // BORDER_MAX)])
    bottom = _uniform_run([grey[h - 1 - i] for i in range(h // BORDER_MAX)])
    left = _uniform_run([grey[:, j] for j in range(w // BORDER_MAX)])
    right = _uniform_run([grey[:, w - 1 - j] for j in range(w // BORDER_MAX)])
    if not (top or bottom or left or right):
        return pixels
    out = pixels.copy()
    out[:top] = 0.0
    out[h - bottom:] = 0.0
    out[:, :left] = 0.0
    out[:, w - right:] = 0.0
    return out


BORDER_MAX = 5  # a border strip is at most 1/5 of the side
BORDER_TOLERANCE = 0.08  # a frame line's pixels lie this close to the frame's level ...
BORDER_SHARE = 0.9  # ... in this share of the line (a lossy codec blurs the rest)


def _uniform_line(line: np.ndarray, level: float) -> bool:
    """Whether `line` is flat at `level`: a burnt-in frame, not anatomy or image noise."""
    return float((np.abs(line - level) <= BORDER_TOLERANCE).mean()) >= BORDER_SHARE


def _uniform_run(lines: list[np.ndarray]) -> int:
    """How many lines from the edge inwards form one uniform strip (0: none), with one
    line more for a codec's ringing at the strip's inner edge. A lone flat line (an
    image's dark background, say) is not a frame, nor a strip that does not end within
    the lines looked at (a flat image)."""
    if not lines:
        return 0
    level = float(np.median(lines[0]))
    n = 0
    while n < len(lines) and _uniform_line(lines[n], level):
        n += 1
    return 0 if n < 2 or n == len(lines) else n + 1


# --------------------------------------------------------------------------- helpers


def _check_labels(labels: Sequence[str], model: ModelConfig) -> tuple[str, ...]:
    label_set = tuple(labels)
    if len(set(label_set)) != len(label_set) or len(label_set) < 2:
        raise ValueError(f"labels must be at least two distinct names, got {label_set}")
    if len(label_set) != model.num_classes:
        raise ValueError(
            f"{len(label_set)} labels {label_set} but model.num_classes={model.num_classes}"
        )
    return label_set


def _site_name(site_dir: Path) -> str:
    return site_dir.name or site_dir.resolve().name


def _split_bounds(rows: Sequence[_Row]) -> dict[str, tuple[int, int]]:
    bounds: dict[str, tuple[int, int]] = {}
    start = 0
    for split in SPLITS:
        end = start + sum(1 for r in rows if r.split == split)
        bounds[split] = (start, end)
        start = end
    return bounds


def _summary(site_dir: Path, labels: tuple[str, ...], scan: _Scan) -> SiteSummary:
    counts = {s: dict.fromkeys(labels, 0) for s in SPLITS}
    for r in scan.rows:
        counts[r.split][labels[r.label_id]] += 1
    return SiteSummary(
        name=_site_name(site_dir),
        path=site_dir,
        labels=labels,
        total_rows=scan.total_rows,
        usable_rows=len(scan.rows),
        counts=counts,
        formats=dict(Counter(r.fmt for r in scan.rows if r.path is not None).most_common()),
        sizes=dict(Counter(r.size for r in scan.rows if r.path is not None).most_common()),
        bad_rows=tuple(scan.bad_rows),
        usable=any(r.split == "train" for r in scan.rows),
        hash_split_rows=sum(r.hashed for r in scan.rows),
        text_only_rows=sum(r.path is None for r in scan.rows),
    )


def _raise_if_unusable(site_dir: Path, scan: _Scan, strict: bool) -> None:
    where = str(site_dir)
    if strict and scan.bad_rows:
        listed = "; ".join(
            f"row {b.row} ({b.case_id or 'no case_id'}): {b.reason}"
            for b in scan.bad_rows[:MAX_LISTED_BAD_ROWS]
        )
        more = len(scan.bad_rows) - MAX_LISTED_BAD_ROWS
        tail = f"; and {more} more" if more > 0 else ""
        raise SiteError(
            f"Site {where!r} has {len(scan.bad_rows)} unusable row(s) of {scan.total_rows} "
            f"and strict mode refuses it: {listed}{tail}. Fix these rows, or open the site "
            f"without strict mode to skip them (`medfuse data check {where}` lists them).",
            scan.bad_rows,
        )
    if not any(r.split == "train" for r in scan.rows):
        raise SiteError(
            f"Site {where!r} has no usable training rows: {scan.total_rows} row(s) in "
            f"{MANIFEST}, {len(scan.bad_rows)} unusable, {len(scan.rows)} usable, none of them "
            "in the train split. Run `medfuse data check "
            f"{where}` to see every unusable row and the counts per split.",
            scan.bad_rows,
        )


def _stack_tokens(encoded: list[torch.Tensor], length: int) -> torch.Tensor:
    if not encoded:
        return torch.zeros((0, length), dtype=torch.int64)
    return torch.stack([torch.as_tensor(t, dtype=torch.int64) for t in encoded])


def _describe(exc: BaseException) -> str:
    """An exception as one short line, without a traceback."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
