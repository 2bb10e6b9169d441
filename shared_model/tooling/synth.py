"""Synthetic hospitals: chest-radiograph-like images and free-text reports in format v1.

`write_federation(out_dir, cfg)` writes `out_dir/site-00`, `site-01`, ... each a folder
holding `manifest.csv` and the images it names (dataset format v1, docs/dataset-format.md). The same
`SynthConfig` gives byte-identical files: every random draw comes from a NumPy Generator
seeded from (seed, site index, ...), and no encoder writes a timestamp.

What the data is built to test:

* Each modality alone is insufficient. In the image, a share of pneumonias and effusions
  are drawn by the same generator (a hazy basal opacity), some nodules are as faint as the
  lung markings and some hearts are borderline-sized; those cases are told apart only by
  the report. In the text, a share of reports say almost nothing ("comparison with
  prior.") or name an opacity without saying what it is, and most mention other diseases
  in negations or as history ("history of pneumonia, resolved"); there only the image
  decides. Reports are informative more often when the image is ambiguous (the
  radiologist says what the film cannot), so the two modalities rarely fail together.
* Sites differ: scanner (contrast, brightness, gamma, noise, blur, acquisition
  resolution), file format (8-bit PNG, 12-bit DICOM, 16-bit PNG, JPEG, RGB PNG, cycling
  by site index), label mix (Dirichlet skew), number of cases and report style (each site
  writes its own templates and abbreviations; every non-empty report of a site carries its
  style's `marker`). Even-numbered sites write a `split` column; odd ones leave the split
  to the reader's case_id hash.

* `style = "unseen"` draws every site's scanner from `UNSEEN_SCANNERS` and its report
  style from `UNSEEN_REPORT_STYLES`: families the public corpus never draws from (section
  headers, abbreviations and phrases partitioned in `VOCABULARY`; tone, blur, noise,
  resolution, aspect, frame and format outside `PUBLIC_SCANNERS`), so it tests whether a
  public start transfers to a hospital whose style the public data never showed. Its
  random streams are keyed (seed, UNSEEN_TAG, ...): it repeats no house federation's case.
  "house" (the default) draws the house styles, whose streams the unseen style left as
  they were.

* `difficulty = "hard"` (`HARDNESS`) draws clear findings fainter, among more vessel
  shadows, and writes an informative report on 35% of clear films instead of 62%: a
  hospital alone learns less from a few hundred cases. The public archive's
  `labeller = "mined"` labels each case from its report as report-mining labellers do
  (`mined_label`), so a model trained on it learns the labeller's mistakes.

* Findings are sized and placed by real boxes: each lesion's width and height are drawn
from the quantiles of its class in NIH ChestX-ray14's box table (`box_stats.BOX_STATS`;
a Gaussian copula keeps their rank correlation), its centre likewise, redrawn until it
lies in the lung. So a nodule is about 0.5% of the film (4-5 px at 64 px), a pneumonia
or an effusion about 6%, a cardiomegaly's heart about 17%. An effusion fills the lateral
base of its lung, highest at the wall; a hazy basal opacity, pneumonia or effusion, is
sized like either with equal chance, so its size does not tell them apart. The 30% of
cardiomegalies whose heart is borderline take the lower 30% of the real heart sizes, and
a borderline normal heart is drawn from the same range. What one lung cannot hold (the
widest pneumonias span both lungs, the tallest effusions reach the apex) is cut to fit.

Coordinates are fractions of the image, x to the right and y down, in the radiological
convention: the patient's right lung is on the image's left (x < 0.5). Boxes are
`(x0, y0, x1, y1)` fractions, tight around the drawn finding.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared_model.config import DEFAULT_LABELS, MANIFEST
from shared_model.tooling.box_stats import BOX_STATS, LABEL_SHARE, QUANTILES, BoxStats, Quantiles

Box = tuple[float, float, float, float]
Ellipse = tuple[float, float, float, float]  # cx, cy, semi-axis x, semi-axis y
ImageFormat = Literal["png8", "dicom12", "png16", "jpeg", "png_rgb", "dicom"]
ReportMode = Literal["informative", "vague", "uninformative"]
Zone = Literal["", "apex", "upper", "middle", "lower", "base"]
FindingKind = Literal["none", "nodule", "patchy", "effusion", "hazy_basal", "heart"]

# Image formats in the order sites take them: site i writes FORMATS[i % 5].
FORMATS: tuple[ImageFormat, ...] = ("png8", "dicom12", "png16", "jpeg", "png_rgb")
EXTENSIONS: dict[ImageFormat, str] = {
    "png8": ".png", "dicom12": ".dcm", "png16": ".png", "jpeg": ".jpg", "png_rgb": ".png",
    "dicom": ".dcm",  # bit depth and polarity set by Scanner.bits / Scanner.monochrome1
}
MANIFEST_COLUMNS: tuple[str, ...] = (
    "case_id", "image", "report", "label", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
)
# The federation generator's version: 2 = findings sized and placed by real boxes
# (BOX_STATS); 1 = hand-picked sizes. A simulation's cached synthetic sites and finished
# experiments (simulations/sites.py's stamp, SimulationConfig.fingerprint) of another
# version are not reused. The public corpus has its own, PUBLIC_GENERATOR.
FEDERATION_GENERATOR = 2
SPLIT_SHARES: tuple[tuple[str, float], ...] = (("train", 0.70), ("val", 0.15), ("test", 0.15))
CASES_JITTER = 0.25  # a site's case count is cases_per_site * U(1 - j, 1 + j)

# --- how hard each modality is (the knobs tuned with the proxy, see the module doc) ---
# Chance that a case's image is ambiguous, per label: pneumonia and effusion are then
# drawn as the same hazy basal opacity, a nodule is faint, a heart is borderline-sized.
IMAGE_AMBIGUOUS: dict[str, float] = {
    "normal": 0.15, "pneumonia": 0.45, "nodule": 0.10, "effusion": 0.45, "cardiomegaly": 0.30,
}
# Report mode given whether the image is ambiguous: (informative, vague, uninformative).
REPORT_MODES_CLEAR: tuple[float, float, float] = (0.62, 0.16, 0.22)
REPORT_MODES_AMBIGUOUS: tuple[float, float, float] = (0.90, 0.02, 0.08)
EMPTY_REPORT = 0.08  # share of uninformative reports that are empty
HISTORY_REMARK = 0.30  # chance of a misleading-looking remark about another disease


@dataclass(frozen=True)
class Hardness:
    """How faint a clear finding is drawn, how cluttered the lungs are, and how often the
    report of a clear film says what it shows. The ambiguous cases are the same at
    every difficulty."""

    nodule: tuple[float, float]  # density a clear nodule adds
    patchy: tuple[float, float]  # ... a consolidation
    effusion: tuple[float, float]  # ... an effusion
    hazy: tuple[float, float]  # ... a hazy basal opacity (pneumonia or effusion)
    vessels: tuple[int, int]  # vessel shadows per film, [low, high)
    vessel_gain: tuple[float, float]  # their density
    report_modes_clear: tuple[float, float, float]  # (informative, vague, uninformative)


Difficulty = Literal["standard", "hard"]
Labeller = Literal["noisy", "mined"]
Style = Literal["house", "unseen"]
LabelMix = Literal["balanced", "nih"]
HARDNESS: dict[Difficulty, Hardness] = {
    "standard": Hardness(
        nodule=(0.4, 0.55), patchy=(0.3, 0.45), effusion=(0.48, 0.6), hazy=(0.22, 0.32),
        vessels=(6, 11), vessel_gain=(0.03, 0.07), report_modes_clear=REPORT_MODES_CLEAR,
    ),
    # fainter findings in more vessel clutter, and fewer informative reports on clear
    # films: a hospital alone learns less from its few hundred cases
    "hard": Hardness(
        nodule=(0.2, 0.32), patchy=(0.18, 0.3), effusion=(0.3, 0.42), hazy=(0.14, 0.22),
        vessels=(8, 15), vessel_gain=(0.05, 0.11), report_modes_clear=(0.35, 0.20, 0.45),
    ),
}

# A normal heart's half-width (fraction of the image width); its half-height follows
# (`_heart_half_height`). Enlarged and borderline hearts are drawn from the real
# cardiomegaly boxes (BOX_STATS): a borderline one from their lower BORDERLINE_SHARE.
HEART_NORMAL = (0.10, 0.14)
BORDERLINE_SHARE = IMAGE_AMBIGUOUS["cardiomegaly"]
# A bigger heart grows down to the diaphragm and out to the patient's left: its centre
# moves right by HEART_LEFTWARD times its extra half-width (NIH's enlarged hearts are
# centred at x = 0.57), its lower border stays where it is.
HEART_LEFTWARD = 0.25
HEART_REFERENCE = 0.12  # the half-width whose centre is Anatomy.heart_anchor's x
# a hazy basal opacity is sized as one of these, chosen at random, whatever its label
HAZY_LIKE: tuple[str, str] = ("pneumonia", "effusion")
RIB_SPACING = 0.07
FIELD_OF_VIEW_MM = 150.0  # image width, for the nodule sizes written in reports


class SynthConfig(BaseModel):
    """A synthetic federation; the same config writes the same bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sites: int = Field(3, ge=1, le=1000, description="number of hospitals")
    cases_per_site: int = Field(
        200, ge=10, description="mean cases per hospital (each varies by up to +-25%)"
    )
    seed: int = Field(0, ge=0, description="same seed, same bytes")
    label_skew: float | None = Field(
        None, gt=0, description="Dirichlet alpha of each site's label mix; None = the mix "
        "itself at every site"
    )
    label_mix: LabelMix = Field(
        "balanced", description="the labels' overall shares: balanced (equal), or nih "
        "(box_stats.LABEL_SHARE: 88% normal, pneumonia 0.5%, as real hospitals see them)")
    image_size: int = Field(64, ge=16, le=1024, description="image side in pixels")
    difficulty: Difficulty = Field("standard", description="standard or hard (see HARDNESS)")
    style: Style = Field(
        "house", description="house: the federation styles (REPORT_STYLES, site_style); "
        "unseen: scanners and report styles from families the public corpus never uses "
        "(UNSEEN_SCANNERS, UNSEEN_REPORT_STYLES), to test a public start on a new style")
    labels: tuple[str, ...] = Field(
        DEFAULT_LABELS, description="fixed: the synthetic findings exist for these only"
    )

    @field_validator("labels")
    @classmethod
    def _default_labels_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(value) != DEFAULT_LABELS:
            raise ValueError(
                f"labels={','.join(value)!r}: synthetic hospitals draw findings for the "
                f"default label set only ({','.join(DEFAULT_LABELS)})"
            )
        return tuple(value)


# --------------------------------------------------------------------------- site styles


@dataclass(frozen=True)
class Scanner:
    """How a site's machine turns anatomy into pixels, and how it stores them."""

    contrast: float  # gain around mid-grey
    brightness: float  # offset
    gamma: float
    noise: float  # Gaussian noise sigma, in [0, 1] intensity units
    blur: float  # Gaussian blur sigma in pixels at 64 px (scaled with the image size)
    acquisition: float  # acquired at this fraction of the resolution, then upsampled
    image_format: ImageFormat
    jpeg_quality: int
    tint: tuple[float, float, float]  # RGB gains of an RGB export (1, 1, 1 = grey)
    # the rest is off in the house styles (their streams are as before these fields existed)
    aspect: float = 1.0  # stored width / height (the reader resizes to a square)
    frame: float = 0.0  # width of a frame burnt in around the film, fraction of the side
    frame_level: float = 0.0  # its intensity: 0 black, 1 white
    marker: str = ""  # a burnt-in side letter ("L" or "R"), "" none
    marker_corner: int = 0  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    bits: int = 12  # BitsStored of a "dicom" file
    monochrome1: bool = False  # a "dicom" file stored inverted (white is low), as tagged


@dataclass(frozen=True)
class ReportStyle:
    """A site's way of writing reports.

    `loc` chooses how a location is written: "zone" ("right lower zone"), "lobe" ("right
    lower lobe"), "abbrev" ("rll"), "ABBREV" ("RLL") or "rtlt" ("Rt lower zone"). Every
    non-empty report contains `marker`.
    """

    name: str
    marker: str
    loc: Literal["zone", "lobe", "abbrev", "ABBREV", "rtlt"]
    layout: str  # format string with {marker} {ind} {body} {imp}
    indication: str  # format string with {ind}
    positive: dict[str, tuple[str, ...]]  # label -> finding sentences ({loc}, {side}, ...)
    negative: dict[str, tuple[str, ...]]  # label -> negation sentences
    impression: dict[str, tuple[str, ...]]
    vague_zone: tuple[str, ...]  # an opacity named but not explained
    vague_heart: tuple[str, ...]  # the heart neither normal nor enlarged
    history: dict[str, tuple[str, ...]]  # label -> remark that it is NOT present now
    nothing: tuple[str, ...]  # reports that say almost nothing
    side_words: tuple[str, str]  # patient's (right, left)


@dataclass(frozen=True)
class SiteStyle:
    """Everything that makes one site differ from the others except its label mix."""

    index: int
    scanner: Scanner
    report: ReportStyle
    writes_split: bool  # False: the reader splits by a hash of case_id


INDICATIONS: tuple[str, ...] = (
    "cough", "fever and cough", "shortness of breath", "chest pain", "pre-operative",
    "follow-up", "fall", "routine screening", "dyspnoea", "weight loss", "haemoptysis",
    "sepsis, source unknown", "ICU admission", "line placement",
)

REPORT_STYLES: tuple[ReportStyle, ...] = (
    ReportStyle(
        name="verbose",
        marker="FINDINGS:",
        loc="zone",
        layout="EXAMINATION: Chest radiograph, PA.\n{ind}{marker} {body}\nIMPRESSION: {imp}",
        indication="INDICATION: {ind}.\n",
        positive={
            "normal": ("The lungs are clear.", "Clear lungs bilaterally."),
            "pneumonia": (
                "There is patchy consolidation in the {loc}.",
                "Airspace opacity in the {loc}, in keeping with consolidation.",
            ),
            "nodule": (
                "A well-defined {size} mm nodule is seen in the {loc}.",
                "There is a rounded nodule in the {loc}, measuring {size} mm.",
            ),
            "effusion": (
                "There is a {side} pleural effusion with a meniscus at the {side} base.",
                "Blunting of the {side} costophrenic angle due to a pleural effusion.",
            ),
            "cardiomegaly": (
                "The cardiac silhouette is enlarged, cardiothoracic ratio {ctr}.",
                "The heart is enlarged.",
            ),
        },
        negative={
            "pneumonia": ("No focal consolidation.", "No airspace opacity."),
            "nodule": ("No pulmonary nodule.", "No suspicious nodule."),
            "effusion": ("No pleural effusion.", "The costophrenic angles are clear."),
            "cardiomegaly": ("Heart size is normal.", "The cardiac silhouette is normal."),
        },
        impression={
            "normal": ("Normal chest radiograph.", "No acute cardiopulmonary abnormality."),
            "pneumonia": ("{Side} {zone} zone pneumonia.", "Consolidation, likely pneumonia."),
            "nodule": ("Pulmonary nodule, CT is advised.", "{Side} lung nodule."),
            "effusion": ("{Side} pleural effusion.", "Pleural effusion."),
            "cardiomegaly": ("Cardiomegaly.", "Enlarged heart."),
        },
        vague_zone=("There is an opacity in the {loc}.", "Ill-defined density in the {loc}."),
        vague_heart=("The heart size cannot be assessed on this projection.",),
        history={
            "pneumonia": ("History of pneumonia, resolved.",),
            "nodule": ("The previously reported nodule is no longer seen.",),
            "effusion": ("The effusion previously noted has now cleared.",),
            "cardiomegaly": ("Prior cardiomegaly, heart size now normal.",),
        },
        nothing=(
            "Comparison with prior.", "Portable AP film, rotated.",
            "Limited study, see prior report.", "Study reviewed.",
        ),
        side_words=("right", "left"),
    ),
    ReportStyle(
        name="terse",
        marker="cxr:",
        loc="abbrev",
        layout="cxr: {ind}{body} {imp}",
        indication="hx {ind}. ",
        positive={
            "normal": ("lungs clear.", "nad."),
            "pneumonia": ("{loc} consolidation.", "{loc} patchy airspace opacity."),
            "nodule": ("{loc} nodule {size}mm.", "{size} mm nodule {loc}."),
            "effusion": ("{s} pleural eff, meniscus.", "{s} cp angle blunted, effusion."),
            "cardiomegaly": ("cardiomegaly, ctr {ctr}.", "hrt enlarged."),
        },
        negative={
            "pneumonia": ("no consolidation.", "no focal opacity."),
            "nodule": ("no nodule.",),
            "effusion": ("no eff.", "cp angles clear."),
            "cardiomegaly": ("hrt nl.", "hrt size nl."),
        },
        impression={
            "normal": ("", "nad."),
            "pneumonia": ("?pneumonia.", "c/w pneumonia."),
            "nodule": ("ct adv.", ""),
            "effusion": ("", "effusion."),
            "cardiomegaly": ("", "cm."),
        },
        vague_zone=("{loc} opacity.", "opacity {loc}."),
        vague_heart=("hrt size n/a ap film.",),
        history={
            "pneumonia": ("hx pneumonia, resolved.",),
            "nodule": ("prior nodule not seen.",),
            "effusion": ("eff prev noted, now cleared.",),
            "cardiomegaly": ("prior cm, now nl.",),
        },
        nothing=("comparison w prior.", "portable ap, rotated.", "see prior.", "?"),
        side_words=("r", "l"),
    ),
    ReportStyle(
        name="dictated",
        marker="Clinical history:",
        loc="lobe",
        layout="Clinical history: {ind}{body} Conclusion: {imp}",
        indication="{ind}. ",
        positive={
            "normal": ("The lungs are well expanded and clear.",),
            "pneumonia": (
                "There is consolidation in the {loc} consistent with pneumonia.",
                "Patchy infiltrate is noted in the {loc}.",
            ),
            "nodule": (
                "There is a {size} mm nodular opacity in the {loc}.",
                "A solitary nodule is identified in the {loc}.",
            ),
            "effusion": (
                "A {side} pleural effusion is present at the {side} base.",
                "There is fluid at the {side} base with a meniscus.",
            ),
            "cardiomegaly": ("The heart is enlarged.", "There is cardiomegaly."),
        },
        negative={
            "pneumonia": ("There is no focal consolidation.",),
            "nodule": ("No nodule is seen.",),
            "effusion": ("There is no effusion.", "No pleural fluid."),
            "cardiomegaly": ("The heart is not enlarged.", "Heart size is within normal limits."),
        },
        impression={
            "normal": ("no acute disease.", "normal study."),
            "pneumonia": ("pneumonia in the {loc}.", "pneumonia."),
            "nodule": ("nodule, recommend CT.", "solitary pulmonary nodule."),
            "effusion": ("{side} effusion.", "pleural effusion."),
            "cardiomegaly": ("cardiomegaly.", "enlarged heart."),
        },
        vague_zone=("There is some opacity in the {loc}.",),
        vague_heart=("Heart size difficult to assess, AP projection.",),
        history={
            "pneumonia": ("Known history of pneumonia, now resolved.",),
            "nodule": ("The nodule described previously is not seen.",),
            "effusion": ("Effusion previously noted, now cleared.",),
            "cardiomegaly": ("Previous cardiomegaly has resolved.",),
        },
        nothing=("Comparison with prior.", "Film rotated, limited.", "As before."),
        side_words=("right", "left"),
    ),
    ReportStyle(
        name="structured",
        marker="Lungs:",
        loc="zone",
        layout="Exam: chest, AP portable. {ind}\nLungs: {body}\nOther: {imp}",
        indication="Reason: {ind}.",
        positive={
            "normal": ("clear.", "no abnormality."),
            "pneumonia": ("consolidation {loc}.", "patchy opacity {loc}, ?infection."),
            "nodule": ("nodule {loc}, {size} mm.", "{size} mm round opacity {loc}, nodule."),
            "effusion": ("effusion at {side} base.", "{side} basal effusion with meniscus."),
            "cardiomegaly": ("clear. Heart: enlarged, CTR {ctr}.", "clear. Heart: cardiomegaly."),
        },
        negative={
            "pneumonia": ("no consolidation.",),
            "nodule": ("no nodule.",),
            "effusion": ("Pleura: no effusion.", "Pleura: normal."),
            "cardiomegaly": ("Heart: normal size.", "Heart: normal."),
        },
        impression={
            "normal": ("nil.", "none."),
            "pneumonia": ("pneumonia.", "nil."),
            "nodule": ("CT recommended.", "nil."),
            "effusion": ("nil.", "effusion."),
            "cardiomegaly": ("nil.", "cardiomegaly."),
        },
        vague_zone=("opacity {loc}.",),
        vague_heart=("Heart: not assessable.",),
        history={
            "pneumonia": ("Hx: pneumonia, resolved.",),
            "nodule": ("Hx: nodule, no longer seen.",),
            "effusion": ("Hx: effusion, now cleared.",),
            "cardiomegaly": ("Hx: cardiomegaly, now normal.",),
        },
        nothing=("comparison with prior.", "rotated film.", "see previous."),
        side_words=("right", "left"),
    ),
    ReportStyle(
        name="opinion",
        marker="Opinion:",
        loc="lobe",
        layout="{ind}Opinion: {body} {imp}",
        indication="Request: {ind}. ",
        positive={
            "normal": ("Normal appearances.", "Unremarkable chest."),
            "pneumonia": ("{Loc} pneumonia.", "Consolidation {loc}."),
            "nodule": ("{Loc} nodule, {size} mm.", "Nodule in the {loc}."),
            "effusion": ("{Side} pleural effusion.", "{Side} effusion."),
            "cardiomegaly": ("Cardiomegaly.", "Enlarged heart, CTR {ctr}."),
        },
        negative={
            "pneumonia": ("No consolidation.",),
            "nodule": ("No nodule.",),
            "effusion": ("No effusion.",),
            "cardiomegaly": ("Normal heart size.",),
        },
        impression={k: ("",) for k in DEFAULT_LABELS},
        vague_zone=("Opacity, {loc}.", "Shadowing {loc}."),
        vague_heart=("Heart size indeterminate.",),
        history={
            "pneumonia": ("Previous pneumonia, resolved.",),
            "nodule": ("Previous nodule, resolved.",),
            "effusion": ("Previous effusion, cleared.",),
            "cardiomegaly": ("Previous cardiomegaly, resolved.",),
        },
        nothing=("Comparison with prior.", "Portable AP film, rotated.", "No change."),
        side_words=("right", "left"),
    ),
)


def site_style(seed: int, index: int, style: Style = "house") -> SiteStyle:
    """The style of site `index` of a federation seeded with `seed`.

    house: the image format cycles with the index (`FORMATS`); the report style is a
    seeded permutation of `REPORT_STYLES`, also cycling; the scanner is drawn per site.
    unseen: the scanner is drawn from `UNSEEN_SCANNERS` and the report style cycles
    through a seeded permutation of `UNSEEN_REPORT_STYLES`, families the public corpus
    never draws from (its streams are keyed by UNSEEN_TAG after the seed).
    """
    if style == "unseen":
        order = np.random.default_rng([seed, UNSEEN_TAG, 0x5EED]).permutation(
            len(UNSEEN_REPORT_STYLES))
        rng = np.random.default_rng([seed, UNSEEN_TAG, index, 0])
        return SiteStyle(
            index=index, scanner=draw_scanner(rng, UNSEEN_SCANNERS, index),
            report=UNSEEN_REPORT_STYLES[int(order[index % len(UNSEEN_REPORT_STYLES)])],
            writes_split=index % 2 == 0,
        )
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(REPORT_STYLES))
    rng = np.random.default_rng([seed, index, 0])
    fmt = FORMATS[index % len(FORMATS)]
    scanner = Scanner(
        contrast=float(rng.uniform(0.8, 1.2)),
        brightness=float(rng.uniform(-0.07, 0.07)),
        gamma=float(rng.uniform(0.8, 1.25)),
        noise=float(rng.uniform(0.008, 0.03)),
        blur=float(rng.uniform(0.0, 0.8)),
        acquisition=float(rng.choice([0.625, 0.75, 0.875, 1.0])),
        image_format=fmt,
        jpeg_quality=int(rng.integers(80, 96)),
        tint=(1.0, float(rng.uniform(0.94, 1.0)), float(rng.uniform(0.86, 0.98)))
        if fmt == "png_rgb"
        else (1.0, 1.0, 1.0),
    )
    return SiteStyle(
        index=index,
        scanner=scanner,
        report=REPORT_STYLES[int(order[index % len(REPORT_STYLES)])],
        writes_split=index % 2 == 0,
    )


# --------------------------------------------------------------------------- scanner families
#
# Where a scanner's settings are drawn from. The public corpus draws from PUBLIC_SCANNERS,
# an "unseen" federation from UNSEEN_SCANNERS: every setting of the second lies outside
# the first's ranges (or is a choice the first never makes), so an unseen site's films
# are of a kind the public model never saw. House sites keep their own draw (site_style).

UNSEEN_TAG = 0x0DD5  # second key (after the seed) of every stream of an unseen federation
Band = tuple[float, float]


@dataclass(frozen=True)
class ScannerFamily:
    """Ranges and choices a scanner is drawn from (`draw_scanner`); a setting with several
    bands draws one band, then a value inside it."""

    formats: tuple[ImageFormat, ...]  # site i takes formats[i % len]
    contrast: tuple[Band, ...]
    brightness: tuple[Band, ...]
    gamma: tuple[Band, ...]
    noise: tuple[Band, ...]
    blur: tuple[Band, ...]
    acquisition: tuple[float, ...]
    jpeg_quality: tuple[int, int]  # [low, high)
    aspect: tuple[Band, ...]  # stored width / height
    frame: float  # chance of a burnt-in frame
    frame_width: Band
    frame_level: tuple[Band, ...]  # 0 black (a black surround), up to 1 white (collimation)
    marker: float  # chance of a burnt-in side letter
    marker_corners: tuple[int, ...]
    bits: tuple[int, ...]  # BitsStored of a "dicom" file
    monochrome1: bool  # "dicom" files stored inverted (MONOCHROME1)


PUBLIC_SCANNERS = ScannerFamily(
    formats=FORMATS, contrast=((0.7, 1.3),), brightness=((-0.1, 0.1),), gamma=((0.7, 1.4),),
    noise=((0.004, 0.04),), blur=((0.0, 1.2),), acquisition=(0.5, 0.625, 0.75, 0.875, 1.0),
    jpeg_quality=(75, 96), aspect=((0.82, 1.22),), frame=0.5, frame_width=(0.02, 0.06),
    frame_level=((0.0, 0.0), (0.25, 0.95)), marker=0.5, marker_corners=(0, 1), bits=(12,),
    monochrome1=False,
)
UNSEEN_SCANNERS = ScannerFamily(
    formats=("dicom", "jpeg", "png16", "dicom", "png8"),
    contrast=((0.6, 0.7), (1.3, 1.42)), brightness=((-0.13, -0.1), (0.1, 0.13)),
    gamma=((0.6, 0.7), (1.4, 1.55)), noise=((0.04, 0.05),), blur=((1.2, 1.4),),
    acquisition=(0.45,), jpeg_quality=(55, 70), aspect=((0.7, 0.8), (1.25, 1.35)),
    frame=1.0, frame_width=(0.065, 0.08), frame_level=((1.0, 1.0),), marker=1.0,
    marker_corners=(2, 3), bits=(10, 14), monochrome1=True,
)


def draw_scanner(rng: np.random.Generator, family: ScannerFamily, index: int) -> Scanner:
    """A scanner of `family` for source or site `index` (format by index, the rest drawn)."""

    def band(bands: tuple[Band, ...]) -> float:
        lo, hi = bands[int(rng.integers(len(bands)))]
        return float(rng.uniform(lo, hi))

    fmt = family.formats[index % len(family.formats)]
    contrast, brightness, gamma = band(family.contrast), band(family.brightness), band(family.gamma)
    noise, blur = band(family.noise), band(family.blur)
    acquisition = float(rng.choice(family.acquisition))
    quality = int(rng.integers(*family.jpeg_quality))
    tint = (1.0, float(rng.uniform(0.94, 1.0)), float(rng.uniform(0.86, 0.98)))
    aspect = band(family.aspect)
    framed = bool(rng.random() < family.frame)
    frame = float(rng.uniform(*family.frame_width)) if framed else 0.0
    level = band(family.frame_level)
    marked = bool(rng.random() < family.marker)
    letter = "LR"[int(rng.integers(2))]
    corner = int(family.marker_corners[int(rng.integers(len(family.marker_corners)))])
    bits = int(family.bits[int(rng.integers(len(family.bits)))])
    return Scanner(
        contrast=contrast, brightness=brightness, gamma=gamma, noise=noise, blur=blur,
        acquisition=acquisition, image_format=fmt, jpeg_quality=quality,
        tint=tint if fmt == "png_rgb" else (1.0, 1.0, 1.0), aspect=aspect, frame=frame,
        frame_level=level, marker=letter if marked else "", marker_corner=corner, bits=bits,
        monochrome1=family.monochrome1,
    )


def _key(cfg: SynthConfig, *parts: int) -> list[int]:
    """A random stream's key: (seed, ...) for house sites, (seed, UNSEEN_TAG, ...) for
    unseen ones, so an unseen federation never repeats a house federation's cases."""
    return [cfg.seed, *(() if cfg.style == "house" else (UNSEEN_TAG,)), *parts]


def site_labels(cfg: SynthConfig, index: int) -> list[str]:
    """The labels of site `index`'s cases, in case order (count and mix drawn per site)."""
    rng = np.random.default_rng(_key(cfg, index, 1))
    n = int(round(cfg.cases_per_site * rng.uniform(1 - CASES_JITTER, 1 + CASES_JITTER)))
    n = max(n, 10)
    k = len(cfg.labels)
    if cfg.label_mix == "balanced" and cfg.label_skew is None:
        ids = rng.permutation(np.arange(n) % k)
    elif cfg.label_mix == "balanced":
        ids = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, cfg.label_skew)))
    else:  # the real shares, each site's mix drawn around them when skewed
        share = np.array([LABEL_SHARE[label] for label in cfg.labels])
        share = share / share.sum()
        probs = share if cfg.label_skew is None else rng.dirichlet(cfg.label_skew * k * share)
        ids = rng.choice(k, size=n, p=probs)
    return [cfg.labels[int(i)] for i in ids]


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, in image fractions."""

    lungs: tuple[Ellipse, Ellipse]  # patient's right (image left), left: cx, cy, ax, ay
    # the heart's size depends on the finding (`_heart_ellipse`); this is the centre x of
    # a heart of half-width HEART_REFERENCE and the y of every heart's lower border
    heart_anchor: tuple[float, float]
    rib_shift: float


@dataclass(frozen=True)
class Finding:
    """What a case shows and where: drawn by `render_image`, described by `write_report`."""

    label: str
    kind: FindingKind
    ambiguous: bool  # the image alone cannot tell this label from another
    heart: tuple[float, float]  # the heart's half-width and half-height
    side: int = -1  # 0 = patient's right (image left), 1 = patient's left; -1 = none
    zone: Zone = ""
    # nodule and patchy: (cx, cy, rx, ry); effusion and hazy_basal: the box (x0, y0, x1,
    # y1) of the lung base it fills; none and heart: ()
    geometry: tuple[float, ...] = ()
    amount: float = 0.0  # density added by the finding


@dataclass(frozen=True)
class Case:
    """A rendered case; `finding` and `report_mode` are ground truth for analysis only."""

    image: np.ndarray  # (S, S) float32 in [0, 1], after the site's scanner
    box: Box | None
    report: str
    finding: Finding
    report_mode: ReportMode
    anatomy: Anatomy


def render_case(
    rng: np.random.Generator, label: str, style: SiteStyle, image_size: int,
    difficulty: Difficulty = "standard",
) -> Case:
    """Draw one case of `label` at a site of `style`: image, box and report."""
    hard = HARDNESS[difficulty]
    anatomy = sample_anatomy(rng)
    finding = sample_finding(rng, label, anatomy, hard)
    image, box = render_image(rng, anatomy, finding, style.scanner, image_size, hard)
    mode = draw_report_mode(rng, finding, hard)
    report = write_report(rng, finding, anatomy, style.report, mode)
    return Case(image=image, box=box, report=report, finding=finding, report_mode=mode,
                anatomy=anatomy)


def draw_report_mode(rng: np.random.Generator, finding: Finding, hard: Hardness) -> ReportMode:
    """How much the report of a case says: a draw the image cannot show (an ambiguous
    finding is mostly written up, a clear one as often as the difficulty says)."""
    modes = REPORT_MODES_AMBIGUOUS if finding.ambiguous else hard.report_modes_clear
    return ("informative", "vague", "uninformative")[
        int(rng.choice(3, p=np.asarray(modes) / sum(modes)))]


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A patient: lung fields, where the heart sits, where the ribs fall."""
    lungs = []
    for cx in (0.30, 0.70):
        lungs.append(
            (
                cx + float(rng.normal(0, 0.01)),
                0.47 + float(rng.normal(0, 0.01)),
                0.15 + float(rng.uniform(-0.01, 0.01)),
                0.29 + float(rng.uniform(-0.02, 0.02)),
            )
        )
    base = 0.64 + _heart_half_height(HEART_REFERENCE)
    heart = (0.545 + float(rng.normal(0, 0.008)), base + float(rng.normal(0, 0.008)))
    return Anatomy(
        lungs=(lungs[0], lungs[1]), heart_anchor=heart, rib_shift=float(rng.uniform(0, 0.06))
    )


def sample_finding(rng: np.random.Generator, label: str, anatomy: Anatomy,
                   hard: Hardness = HARDNESS["standard"]) -> Finding:
    """The finding of a case of `label`: its kind, whether it is ambiguous, its size and
    place (from the real boxes of its class, BOX_STATS, as far as one lung holds them)."""
    if label not in DEFAULT_LABELS:
        raise ValueError(f"unknown label {label!r} (allowed: {', '.join(DEFAULT_LABELS)})")
    ambiguous = bool(rng.random() < IMAGE_AMBIGUOUS[label])
    side = int(rng.integers(2))
    if label in ("normal", "cardiomegaly"):
        heart = _draw_heart(rng, label, ambiguous)
        return Finding(label, "heart" if label == "cardiomegaly" else "none", ambiguous, heart)
    heart = _normal_heart(rng)
    lung = anatomy.lungs[side]
    if label == "nodule":
        stats = BOX_STATS["nodule"]
        w, h = _draw_size(rng, stats)
        rx, ry = w / 2, h / 2
        cx, cy = _place_in_lung(rng, anatomy, heart, side, stats, (rx + 0.01, ry + 0.01))
        zone = _zone_at(lung, cy)
        if zone == "upper" and cy - ry < lung[1] - lung[3] + 0.12:
            zone = "apex"
        amount = float(rng.uniform(0.03, 0.05) if ambiguous else rng.uniform(*hard.nodule))
        return Finding(label, "nodule", ambiguous, heart, side, zone, (cx, cy, rx, ry), amount)
    if ambiguous:  # pneumonia or effusion drawn as the same hazy basal opacity
        like = BOX_STATS[HAZY_LIKE[int(rng.integers(len(HAZY_LIKE)))]]
        box = _basal_box(lung, side, *_draw_size(rng, like))
        amount = float(rng.uniform(*hard.hazy))
        return Finding(label, "hazy_basal", True, heart, side, "lower", box, amount)
    if label == "effusion":
        box = _basal_box(lung, side, *_draw_size(rng, BOX_STATS["effusion"]))
        amount = float(rng.uniform(*hard.effusion))
        return Finding(label, "effusion", False, heart, side, "base", box, amount)
    stats = BOX_STATS["pneumonia"]
    w, h = _draw_size(rng, stats)
    rx, ry = min(w / 2, lung[2]), min(h / 2, lung[3])  # one lung holds at most itself
    cx, cy = _place_in_lung(rng, anatomy, heart, side, stats, (rx, ry))
    amount = float(rng.uniform(*hard.patchy))
    return Finding(label, "patchy", False, heart, side, _zone_at(lung, cy), (cx, cy, rx, ry),
                   amount)


_NORMAL = NormalDist()


def _quantile(values: Quantiles, p: float) -> float:
    """The value at probability `p`, interpolated between the quantiles of BOX_STATS (the
    tails beyond the outer quantiles are clamped to them)."""
    return float(np.interp(p, QUANTILES, values))


def _draw_size(rng: np.random.Generator, stats: BoxStats, low: float = 0.0,
               high: float = 1.0) -> tuple[float, float]:
    """A box width and height from `stats`, the width from its quantiles in [low, high):
    a Gaussian copula gives the pair the table's rank correlation (Pearson's rho of the
    normal scores is 2 sin(pi r_s / 6) for Spearman's r_s)."""
    rho = 2 * np.sin(np.pi * stats.wh_rank_corr / 6)
    p_w = float(np.clip(rng.uniform(low, high), 1e-6, 1 - 1e-6))
    z_h = rho * _NORMAL.inv_cdf(p_w) + np.sqrt(1 - rho**2) * float(rng.standard_normal())
    return _quantile(stats.w, p_w), _quantile(stats.h, _NORMAL.cdf(z_h))


def _normal_heart(rng: np.random.Generator) -> tuple[float, float]:
    """A heart of normal size (half-width, half-height), as behind every lesion."""
    hw = float(rng.uniform(*HEART_NORMAL))
    return hw, _heart_half_height(hw)


def _draw_heart(rng: np.random.Generator, label: str, ambiguous: bool) -> tuple[float, float]:
    """The heart of a normal or cardiomegaly case. Borderline hearts (ambiguous cases of
    either label) take the lower BORDERLINE_SHARE of the real enlarged hearts' sizes, the
    clear cardiomegalies the rest, so all cardiomegalies together follow the real table."""
    if label == "normal" and not ambiguous:
        return _normal_heart(rng)
    low, high = (0.0, BORDERLINE_SHARE) if ambiguous else (BORDERLINE_SHARE, 1.0)
    w, h = _draw_size(rng, BOX_STATS["cardiomegaly"], low, high)
    return w / 2, h / 2


def _heart_ellipse(anatomy: Anatomy, heart: tuple[float, float]) -> Ellipse:
    """Where a heart of half-size `heart` sits: on the diaphragm, growing to the left."""
    hw, hh = heart
    ax, base = anatomy.heart_anchor
    return ax + HEART_LEFTWARD * (hw - HEART_REFERENCE), base - hh, hw, hh


def _zone_at(lung: Ellipse, y: float) -> Zone:
    """The lung zone (upper, middle or lower third of the lung's height) at height y."""
    _, cy, _, ay = lung
    third = (y - (cy - ay)) / (2 * ay) * 3
    return "upper" if third < 1 else "middle" if third < 2 else "lower"


def _place_in_lung(
    rng: np.random.Generator, anatomy: Anatomy, heart: tuple[float, float], side: int,
    stats: BoxStats, margin: tuple[float, float],
) -> tuple[float, float]:
    """A centre drawn from the real centres of `stats` (mirrored onto the patient's left
    for side 1), redrawn until it lies `margin` (x, y) inside one lung's air, off the
    heart and mediastinum; the margin shrinks when the lung is too tight for it."""
    ellipse = _heart_ellipse(anatomy, heart)
    for attempt in range(96):
        shrink = 1.0 if attempt < 32 else 0.75 if attempt < 64 else 0.5
        folded = _quantile(stats.cx, float(rng.random()))
        cy = _quantile(stats.cy, float(rng.random()))
        cx = folded if side == 0 else 1.0 - folded
        if _inside_air(anatomy, ellipse, cx, cy, (shrink * margin[0], shrink * margin[1])):
            return cx, cy
    return anatomy.lungs[side][0], anatomy.lungs[side][1]


def _inside_air(anatomy: Anatomy, heart: Ellipse, x: float, y: float,
                margin: tuple[float, float]) -> bool:
    """Whether (x, y) and the four points `margin` (x, y) away from it lie in a lung's
    air, off the heart and the mediastinum."""
    mx, my = margin
    hx, hy, hw, hh = heart
    for dx, dy in ((0, 0), (mx, 0), (-mx, 0), (0, my), (0, -my)):
        px, py = x + dx, y + dy
        in_lung = any(((px - cx) / ax) ** 2 + ((py - cy) / ay) ** 2 < 0.97
                      for cx, cy, ax, ay in anatomy.lungs)
        in_heart = ((px - hx) / (hw + 0.01)) ** 2 + ((py - hy) / (hh + 0.01)) ** 2 < 1
        if not in_lung or in_heart or abs(px - 0.5) < 0.07:
            return False
    return True


def _basal_box(lung: Ellipse, side: int, w: float, h: float) -> Box:
    """The box of fluid (or haze) filling a lung's lateral base: `w` wide from the lung's
    wall inwards, `h` tall from the lowest point of the lung beneath it, cut to what the
    lung holds (the top stays below the upper fifth of the lung)."""
    lcx, lcy, ax, ay = lung
    lateral = -1.0 if side == 0 else 1.0
    w, h = min(w, 1.8 * ax), min(h, 1.6 * ay)
    top = lcy + ay - h
    for _ in range(8):  # the wall depends on the top, the bottom on the inner edge
        wall = lcx + lateral * ax * float(np.sqrt(1 - (max(top - lcy, 0.0) / ay) ** 2))
        inner = wall - lateral * w
        below = 0.0 if lateral * (inner - lcx) <= 0 else ((inner - lcx) / ax) ** 2
        top = lcy + ay * float(np.sqrt(max(1 - below, 0.0))) - h
    bottom = top + h
    return min(wall, inner), top, max(wall, inner), bottom


def _heart_half_height(hw: float) -> float:
    """A normal heart's half-height for its half-width."""
    return 0.6 * hw + 0.03


# --------------------------------------------------------------------------- images


def _soft(signed: np.ndarray, width: float) -> np.ndarray:
    """0 outside, 1 inside, a linear ramp of `width` across the edge (signed > 0 inside)."""
    return np.clip(0.5 + signed / width, 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
             width: float) -> np.ndarray:
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return _soft((1.0 - r) * min(ax, ay), width)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish random field with about `cells` bumps across the image."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _resize(a: np.ndarray, size: int, method: Image.Resampling) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(img.resize((size, size), method), dtype=np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.2:
        return a
    radius = max(1, int(np.ceil(2.5 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    n = a.shape[0]
    p = np.pad(a, radius, mode="edge")
    rows = sum(k[j] * p[:, j : j + n] for j in range(len(k)))
    return sum(k[j] * rows[j : j + n, :] for j in range(len(k)))  # type: ignore[return-value]


def _mask_box(mask: np.ndarray) -> Box | None:
    """Tight box (fractions, pixel edges) around `mask > 0.5`, or None when empty."""
    on = mask > 0.5
    cols, rows = np.flatnonzero(on.any(axis=0)), np.flatnonzero(on.any(axis=1))
    if cols.size == 0:
        return None
    n = mask.shape[0]
    return (cols[0] / n, rows[0] / n, (cols[-1] + 1) / n, (rows[-1] + 1) / n)


def render_image(
    rng: np.random.Generator, anatomy: Anatomy, finding: Finding, scanner: Scanner,
    image_size: int, hard: Hardness = HARDNESS["standard"],
) -> tuple[np.ndarray, Box | None]:
    """The radiograph (S, S) float32 in [0, 1] after the scanner, and the finding's box."""
    s = image_size
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s
    x, y = np.meshgrid(grid, grid)
    edge = 1.5 / s + 0.004

    hx, hy, hw, hh = _heart_ellipse(anatomy, finding.heart)
    body = _ellipse(x, y, 0.5, 0.56, 0.46, 0.56, 0.02)
    lung = [_ellipse(x, y, *lg, edge) for lg in anatomy.lungs]
    heart = _ellipse(x, y, hx, hy, hw, hh, edge)
    medi = _soft(0.05 - np.abs(x - 0.5), edge) * _soft(hy - y, 0.05) * _soft(y - 0.05, 0.02)
    open_air = (1.0 - heart) * (1.0 - medi)
    air = [lg * open_air for lg in lung]
    air_all = np.maximum(air[0], air[1])

    img = 0.08 + 0.52 * body
    img = img - 0.36 * air_all + 0.14 * heart + 0.10 * medi * (1 - heart)
    # posterior ribs: nine arcs 0.07 apart, curving down laterally
    u = (y - 0.13 - anatomy.rib_shift - 0.07 * ((x - 0.5) / 0.45) ** 2) / RIB_SPACING
    nearest = np.clip(np.rint(u), 0, 8)
    ribs = np.exp(-((((u - nearest) * RIB_SPACING) / 0.012) ** 2))
    img += 0.05 * ribs * body * (1 - heart)
    # lung markings: a smooth texture and vessel shadows near the hila (separable blobs)
    img += 0.025 * _smooth_noise(rng, s, 9) * air_all
    n_vessels = int(rng.integers(*hard.vessels))
    vx = 0.5 + rng.choice([-1.0, 1.0], n_vessels) * rng.uniform(0.08, 0.2, n_vessels)
    vy = rng.uniform(0.35, 0.62, n_vessels)
    vr = rng.uniform(0.012, 0.028, n_vessels)
    gain = rng.uniform(*hard.vessel_gain, n_vessels)
    gx = np.exp(-((grid[None, :] - vx[:, None]) ** 2) / (2 * vr[:, None] ** 2))  # (K, S)
    gy = np.exp(-((grid[None, :] - vy[:, None]) ** 2) / (2 * vr[:, None] ** 2))  # (K, S)
    img += (gy.T @ (gain[:, None] * gx)).astype(np.float32) * air_all  # (S, S)

    density, box = _finding_density(rng, finding, anatomy, x, y, air, edge)
    img = img + finding.amount * density
    if finding.kind == "heart":
        box = (hx - hw, hy - hh, hx + hw, hy + hh)

    img = _burn_in(_scan(rng, img, scanner, s), scanner)
    return img, (None if box is None else _clip_box(box))


def _finding_density(
    rng: np.random.Generator, finding: Finding, anatomy: Anatomy, x: np.ndarray,
    y: np.ndarray, air: list[np.ndarray], edge: float,
) -> tuple[np.ndarray, Box | None]:
    s = x.shape[0]
    zero = np.zeros_like(x)
    if finding.kind in ("none", "heart"):
        return zero, None
    side_air = air[finding.side]
    if finding.kind == "nodule":  # solid, so drawn over whatever lies behind it
        cx, cy, rx, ry = finding.geometry
        return _ellipse(x, y, cx, cy, rx, ry, edge), (cx - rx, cy - ry, cx + rx, cy + ry)
    if finding.kind == "patchy":
        cx, cy, rx, ry = finding.geometry
        region = _ellipse(x, y, cx, cy, rx, ry, edge) * side_air
        mottle = np.clip(0.85 + 0.3 * _smooth_noise(rng, s, 12), 0.65, 1.0)
        return region * mottle, _mask_box(region) or (cx - rx, cy - ry, cx + rx, cy + ry)
    x0, y0, x1, y1 = finding.geometry
    box = (x0, y0, x1, y1)
    # how far inside the box from its inner (medial) edge towards the lung's wall
    inner, lateral = (x1, -1.0) if finding.side == 0 else (x0, 1.0)
    depth = lateral * (x - inner)
    if finding.kind == "effusion":  # a meniscus: the fluid climbs the lateral wall
        t = np.clip(depth / (x1 - x0), 0.0, 1.0)
        surface = y0 + (y1 - y0) * (1.0 - t) ** 2
        d = _soft(depth, edge) * _soft(y - surface, 0.01) * side_air
        return d, _mask_box(d) or box
    # hazy basal opacity: pneumonia or effusion, the film cannot tell
    region = _soft(depth, 0.05) * _soft(y - y0, 0.05) * side_air
    mottle = np.clip(0.9 + 0.15 * _smooth_noise(rng, s, 10), 0.7, 1.0)
    return region * mottle, _mask_box(region) or box


def _scan(rng: np.random.Generator, img: np.ndarray, sc: Scanner, s: int) -> np.ndarray:
    """The site's scanner: blur, acquisition resolution, noise, tone curve."""
    img = _blur(img, sc.blur * s / 64)
    acquired = max(8, int(round(s * sc.acquisition)))
    if acquired < s:
        img = _resize(_resize(img, acquired, Image.Resampling.BOX), s, Image.Resampling.BILINEAR)
    img = img + rng.normal(0.0, sc.noise, img.shape).astype(np.float32)
    img = np.clip(0.5 + sc.brightness + sc.contrast * (img - 0.5), 0.0, 1.0)
    return (img**sc.gamma).astype(np.float32)


# 5x7 glyphs of the side letters a radiographer puts on the cassette
_GLYPHS: dict[str, tuple[str, ...]] = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


def _burn_in(img: np.ndarray, sc: Scanner) -> np.ndarray:
    """A frame around the film and a side letter in a corner, as burnt into the pixels."""
    if sc.frame <= 0 and not sc.marker:
        return img
    img = img.copy()
    s = img.shape[0]
    if sc.frame > 0:
        w = max(1, int(round(sc.frame * s)))
        img[:w, :] = img[-w:, :] = sc.frame_level
        img[:, :w] = img[:, -w:] = sc.frame_level
    if sc.marker:
        glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[sc.marker]])
        cell = max(1, int(round(s / 64)))
        g = np.kron(glyph, np.ones((cell, cell), dtype=bool))
        pad = max(1, int(round(sc.frame * s))) + max(1, int(round(0.025 * s)))
        y0 = pad if sc.marker_corner in (0, 1) else s - pad - g.shape[0]
        x0 = pad if sc.marker_corner in (0, 2) else s - pad - g.shape[1]
        patch = img[y0 : y0 + g.shape[0], x0 : x0 + g.shape[1]]
        patch[g] = 1.0
    return img


def _clip_box(box: Box) -> Box:
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    return (x0, y0, x1, y1)


# --------------------------------------------------------------------------- reports

_ZONE_LOBE = {"apex": "upper", "upper": "upper", "middle": "middle", "lower": "lower",
              "base": "lower"}


def _location(finding: Finding, style: ReportStyle) -> str:
    side = ("right", "left")[finding.side]
    zone = finding.zone
    if style.loc == "ABBREV":  # RLL, LUL, lingula, right base
        if zone in ("apex", "base"):
            return f"{side} {zone}"
        if zone == "middle" and finding.side == 1:
            return "lingula"
        return f"{side[0]}{_ZONE_LOBE[zone][0]}l".upper()
    if style.loc == "rtlt":  # Rt lower zone, Lt apex
        short = ("Rt", "Lt")[finding.side]
        if zone in ("apex", "base"):
            return f"{short} {zone}"
        return f"{short} {'mid' if zone == 'middle' else zone} zone"
    if style.loc == "abbrev":
        if zone == "base":
            return f"{side[0]} base"
        if zone == "middle" and finding.side == 1:
            return "lingula"
        return f"{side[0]}{_ZONE_LOBE[zone][0]}l"
    if zone in ("apex", "base"):
        return f"{side} {zone}"
    if style.loc == "lobe":
        if zone == "middle" and finding.side == 1:
            return "lingula"
        return f"{side} {zone} lobe"
    return f"{side} {'mid' if zone == 'middle' else zone} zone"


def write_report(
    rng: np.random.Generator, finding: Finding, anatomy: Anatomy, style: ReportStyle,
    mode: ReportMode,
) -> str:
    """The report of a case in a site's style.

    informative: the finding with its location, negations of other diseases, sometimes a
    history remark about a disease that is not present. vague: an opacity (or the heart)
    named without saying what it is. uninformative: almost nothing, sometimes empty.
    """
    label = finding.label

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    others = [lab for lab in DEFAULT_LABELS if lab not in ("normal", label)]
    ind = style.indication.format(ind=pick(INDICATIONS)) if rng.random() < 0.7 else ""
    if mode == "uninformative" and rng.random() < EMPTY_REPORT:
        return ""
    fields = _fill(finding, anatomy, style, rng)
    remark = ""
    if mode != "vague" and rng.random() < HISTORY_REMARK:
        remark = " " + pick(style.history[pick(others)])
    if mode == "uninformative":
        body = pick(style.nothing)
        return _tidy(style.layout.format(marker=style.marker, ind=ind, body=body + remark, imp=""))
    if mode == "vague":
        if finding.kind in ("none", "heart"):
            body = pick(style.vague_heart)
        else:
            fields = _fill(finding, anatomy, style, rng, vague=True)
            body = pick(style.vague_zone).format(**fields)
        return _tidy(style.layout.format(marker=style.marker, ind=ind, body=body, imp=""))
    parts = [pick(style.positive[label]).format(**fields)]
    negatable = [o for o in others if not (label == "normal" and o == "cardiomegaly"
                                            and finding.ambiguous)]
    rng.shuffle(negatable)
    n_neg = int(rng.integers(1, len(negatable) + 1))
    if label == "normal" and finding.ambiguous:
        parts.append(pick(style.negative["cardiomegaly"]))
    parts += [pick(style.negative[o]) for o in negatable[:n_neg]]
    body = " ".join(parts) + remark
    imp = pick(style.impression[label]).format(**fields)
    return _tidy(style.layout.format(marker=style.marker, ind=ind, body=body, imp=imp))


def _tidy(text: str) -> str:
    """One space between words, no trailing blanks, no empty lines."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _fill(finding: Finding, anatomy: Anatomy, style: ReportStyle,
          rng: np.random.Generator, vague: bool = False) -> dict[str, str]:
    """Template fields. `vague`: a base or apex is written as the lower or upper zone,
    so the location word does not give away an effusion."""
    if vague and finding.zone in ("base", "apex"):
        zone: Zone = "lower" if finding.zone == "base" else "upper"
        finding = replace(finding, zone=zone)
    ctr = 2 * finding.heart[0] / (anatomy.lungs[1][0] + anatomy.lungs[1][2] - anatomy.lungs[0][0]
                    + anatomy.lungs[0][2])
    side = style.side_words[finding.side] if finding.side >= 0 else ""
    loc = _location(finding, style) if finding.side >= 0 else ""
    size = ""
    if finding.kind == "nodule":
        size = str(int(round((finding.geometry[2] + finding.geometry[3]) * FIELD_OF_VIEW_MM)))
    zone_word = {"middle": "mid"}.get(finding.zone, finding.zone)
    return {
        "loc": loc, "Loc": loc[:1].upper() + loc[1:], "side": side,
        "Side": side[:1].upper() + side[1:], "s": side, "zone": zone_word, "size": size,
        "ctr": f"{ctr + float(rng.normal(0, 0.01)):.2f}",
    }


# --------------------------------------------------------------------------- writing


def site_dirs(out_dir: Path, cfg: SynthConfig) -> list[Path]:
    """The site folders `write_federation` writes: out_dir/site-00, site-01, ..."""
    width = max(2, len(str(cfg.sites - 1)))
    return [Path(out_dir) / f"site-{i:0{width}d}" for i in range(cfg.sites)]


def write_federation(out_dir: Path, cfg: SynthConfig, *, overwrite: bool = False) -> list[Path]:
    """Write `cfg.sites` synthetic hospitals under `out_dir`; return their folders.

    Refuses (FileExistsError, before writing anything) when a site folder it would write
    exists and is not empty, unless `overwrite=True`, which deletes those site folders
    first (and only those).
    """
    dirs = site_dirs(out_dir, cfg)
    busy = [d for d in dirs if d.exists() and (not d.is_dir() or any(d.iterdir()))]
    if busy and not overwrite:
        raise FileExistsError(
            f"{len(busy)} site folder(s) already exist and are not empty, e.g. {busy[0]}; "
            "pass overwrite=True (--overwrite) to replace them or choose another folder"
        )
    for d in busy:
        if d.is_dir():
            shutil.rmtree(d)
        else:
            d.unlink()
    for i, d in enumerate(dirs):
        write_site(d, cfg, i)
    return dirs


def site_cases(cfg: SynthConfig, index: int) -> Iterator[tuple[str, str, str, Case]]:
    """Site `index`'s cases in manifest order: (case_id, label, split, case), the split
    "" where the site's style writes none (the reader then splits by case_id hash).
    `write_site` writes these; an analysis that needs a case's ground truth (its finding,
    anatomy, report mode) draws the same cases here without reading the folder."""
    style = site_style(cfg.seed, index, cfg.style)
    labels = site_labels(cfg, index)
    splits = _splits(np.random.default_rng(_key(cfg, index, 3)), len(labels))
    for k, label in enumerate(labels):
        rng = np.random.default_rng(_key(cfg, index, 2, k))
        case = render_case(rng, label, style, cfg.image_size, cfg.difficulty)
        yield f"s{index:02d}-{k:05d}", label, splits[k] if style.writes_split else "", case


def write_site(site_dir: Path, cfg: SynthConfig, index: int) -> Path:
    """Write site `index` of the federation into `site_dir` (created; assumed empty)."""
    style = site_style(cfg.seed, index, cfg.style)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    ext = EXTENSIONS[style.scanner.image_format]
    rows: list[list[str]] = []
    for k, (case_id, label, split, case) in enumerate(site_cases(cfg, index)):
        rel = f"images/{case_id}{ext}"
        _write_image(site_dir / rel, case.image, style.scanner, (cfg.seed, index, k))
        box = ["", "", "", ""] if case.box is None else [f"{v:.4f}" for v in case.box]
        row = [case_id, rel, case.report, label, *box]
        if style.writes_split:
            row.append(split)
        rows.append(row)
    header = list(MANIFEST_COLUMNS) + (["split"] if style.writes_split else [])
    with (site_dir / MANIFEST).open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return site_dir


def _splits(rng: np.random.Generator, n: int) -> list[str]:
    order = rng.permutation(n)
    out = [""] * n
    n_train = int(round(n * SPLIT_SHARES[0][1]))
    n_val = int(round(n * SPLIT_SHARES[1][1]))
    for rank, i in enumerate(order):
        out[int(i)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def _write_image(path: Path, image: np.ndarray, sc: Scanner, key: tuple[int, int, int]) -> None:
    fmt = sc.image_format
    if sc.aspect != 1.0:  # stored non-square: the longer side keeps the size
        s = image.shape[0]
        w, h = (s, round(s / sc.aspect)) if sc.aspect > 1 else (round(s * sc.aspect), s)
        img = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
        image = np.clip(np.asarray(img.resize((w, h), Image.Resampling.BILINEAR),
                                   dtype=np.float32), 0.0, 1.0)
    if fmt == "dicom":
        top = 2**sc.bits - 1
        pixels = _quantise(1.0 - image if sc.monochrome1 else image, top, np.uint16)
        _write_dicom(path, pixels, key, bits=sc.bits,
                     photometric="MONOCHROME1" if sc.monochrome1 else "MONOCHROME2")
    elif fmt == "png8":
        Image.fromarray(_quantise(image, 255, np.uint8)).save(path, format="PNG")
    elif fmt == "png16":
        Image.fromarray(_quantise(image, 65535, np.uint16)).save(path, format="PNG")
    elif fmt == "jpeg":
        Image.fromarray(_quantise(image, 255, np.uint8)).save(
            path, format="JPEG", quality=sc.jpeg_quality
        )
    elif fmt == "png_rgb":
        rgb = np.stack([image * g for g in sc.tint], axis=-1)
        Image.fromarray(_quantise(rgb, 255, np.uint8)).save(path, format="PNG")
    else:
        _write_dicom(path, _quantise(image, 4095, np.uint16), key)


def _quantise(a: np.ndarray, top: int, dtype: type) -> np.ndarray:
    return np.clip(np.rint(a * top), 0, top).astype(dtype)


def _write_dicom(path: Path, pixels: np.ndarray, key: tuple[int, int, int], bits: int = 12,
                 photometric: str = "MONOCHROME2") -> None:
    """A `bits`-bit (BitsStored, BitsAllocated 16) CR image, MONOCHROME2 unless told, no
    dates, UIDs derived from (seed, site, case)."""
    # lazy: pydicom is slow (0.1 s) and `medfuse --help` imports this module (deploy)
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # lazy: as above

    seed, site, case = key

    def uid(kind: str, *parts: int) -> UID:
        return generate_uid(entropy_srcs=["medfuse-synth", kind, *map(str, parts)])

    cr_storage = UID("1.2.840.10008.5.1.4.1.1.1")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = cr_storage
    meta.MediaStorageSOPInstanceUID = uid("sop", seed, site, case)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = cr_storage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study", seed, site, case)
    ds.SeriesInstanceUID = uid("series", seed, site, case)
    ds.Modality = "CR"
    ds.PatientID = f"s{site:02d}-{case:05d}"
    ds.PatientName = "Synthetic^Patient"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- public corpus
#
# A SYNTHETIC stand-in for a pooled public archive of chest radiographs with reports (NIH
# ChestX-ray14, CheXpert, MIMIC-CXR, PadChest): larger than any hospital and pooled from
# many source hospitals of its own (PublicConfig.sources, 12 by default), each with its
# own scanner drawn from the wide PUBLIC_SCANNERS family (tone curve, contrast, bit depth
# and file format, noise, blur, acquisition resolution, aspect ratio, black or grey
# frames, burnt-in L/R markers) and one of several report styles (PUBLIC_REPORT_STYLES:
# the archive's own, sectioned FINDINGS/IMPRESSION reports with abbreviations such as RLL,
# b/l, w/, no e/o, PTX, and narrative prose with negations and synonyms), with the label
# noise of labels mined from reports by NLP. A model trained on it should learn features
# that transfer across hospitals, not one hospital's look. No real patient is in it.
# Every random stream is keyed by PUBLIC_TAG first, so no seed of a federation (whose
# streams start with its seed) can give the same cases, and none of its report styles is
# one of REPORT_STYLES or UNSEEN_REPORT_STYLES. It is never a federation's data.

PUBLIC_TAG = 0x9B11C  # first key of every random stream of the public corpus
# The public corpus generator's version: 3 = findings sized and placed by real boxes
# (BOX_STATS); 2 = many source hospitals drawn from PUBLIC_SCANNERS, three report styles
# (1 = four sources, one style). A cached public model (server/ops/pretrain.py) of another
# version is not reused.
PUBLIC_GENERATOR = 3
MISREAD_HISTORY = 0.5  # mined labels: share of past-disease remarks read as that disease

PUBLIC_STYLE = ReportStyle(
    name="archive",
    marker="Findings:",
    loc="lobe",
    layout="Comparison: none. {ind}Findings: {body} Impression: {imp}",
    indication="Indication: {ind}. ",
    positive={
        "normal": ("Lungs are clear bilaterally.", "No acute cardiopulmonary abnormality."),
        "pneumonia": ("Focal airspace consolidation in the {loc}.",
                      "Patchy opacity in the {loc} consistent with pneumonia."),
        "nodule": ("Solitary nodule in the {loc}, approximately {size} mm.",
                   "Nodular opacity of {size} mm in the {loc}."),
        "effusion": ("Small {side} pleural effusion.", "{Side} pleural effusion is present."),
        "cardiomegaly": ("Cardiomegaly with cardiothoracic ratio {ctr}.",
                         "Heart size is enlarged."),
    },
    negative={
        "pneumonia": ("No focal airspace disease.", "No consolidation."),
        "nodule": ("No nodules or masses.",),
        "effusion": ("No pleural effusion or pneumothorax.", "No effusion."),
        "cardiomegaly": ("Heart size within normal limits.",
                         "Normal cardiomediastinal silhouette."),
    },
    impression={
        "normal": ("No acute disease.", "Normal chest."),
        "pneumonia": ("Pneumonia.", "Findings consistent with pneumonia."),
        "nodule": ("Pulmonary nodule, follow-up advised.", "Nodule."),
        "effusion": ("Pleural effusion.", "{Side} effusion."),
        "cardiomegaly": ("Cardiomegaly.", "Enlarged heart."),
    },
    vague_zone=("Opacity in the {loc}, indeterminate.", "Nonspecific {loc} opacity."),
    vague_heart=("Heart size difficult to assess on this projection.",),
    history={
        "pneumonia": ("Prior pneumonia has resolved.",),
        "nodule": ("Previously reported nodule not seen.",),
        "effusion": ("Prior effusion has resolved.",),
        "cardiomegaly": ("Previously enlarged heart now normal.",),
    },
    nothing=("Limited study.", "Portable film, limited evaluation.", "Stable."),
    side_words=("right", "left"),
)


PUBLIC_SECTIONED = ReportStyle(
    name="sectioned",
    marker="FINDINGS:",
    loc="ABBREV",
    layout="EXAM: CXR PA. {ind}FINDINGS: {body} IMPRESSION: {imp}",  # one line, as
    indication="HISTORY: {ind}. ",  # every public report (a manifest line per case)
    positive={
        "normal": ("Lungs clear b/l. No PTX.", "Clear lungs b/l w/o focal opacity."),
        "pneumonia": ("{Loc} consolidation c/w pneumonia.",
                      "Airspace opacity in the {loc} w/ air bronchograms, c/w pneumonia."),
        "nodule": ("{size} mm nodule in the {loc}.", "{Loc} pulmonary nodule measuring {size} mm."),
        "effusion": ("{Side} pleural effusion w/ blunting of the {side} CP angle.",
                     "Small {side} pleural effusion."),
        "cardiomegaly": ("Cardiomegaly, CTR {ctr}.",
                         "Enlarged cardiac silhouette c/w cardiomegaly."),
    },
    negative={
        "pneumonia": ("No e/o focal consolidation.", "No evidence of pneumonia.",
                      "Pneumonia: none."),
        "nodule": ("No e/o pulmonary nodule.", "Negative for nodules.", "Nodule: none."),
        "effusion": ("No pleural effusion or PTX.", "CP angles sharp b/l.", "Effusion: none."),
        "cardiomegaly": ("Heart size nml.", "Cardiomediastinal silhouette WNL.",
                         "Cardiomegaly: none."),
    },
    impression={
        "normal": ("No acute cardiopulmonary process.", "Normal CXR."),
        "pneumonia": ("{Loc} pneumonia.", "Findings c/w pneumonia."),
        "nodule": ("{Loc} nodule; recommend CT.", "Pulmonary nodule."),
        "effusion": ("{Side} pleural effusion.", "Pleural effusion."),
        "cardiomegaly": ("Cardiomegaly.", "Mild cardiomegaly."),
    },
    vague_zone=("Indeterminate opacity in the {loc}.", "Hazy {loc} opacity, nonspecific."),
    vague_heart=("Heart size not well assessed on AP film.",),
    history={
        "pneumonia": ("Hx of pneumonia, now resolved.",),
        "nodule": ("Previously seen nodule no longer visualized.",),
        "effusion": ("Hx of effusion, now resolved.",),
        "cardiomegaly": ("Hx of cardiomegaly, heart size now nml.",),
    },
    nothing=("Limited exam.", "No significant interval change.", "Portable AP, limited."),
    side_words=("right", "left"),
)

PUBLIC_NARRATIVE = ReportStyle(
    name="narrative",
    marker="Frontal chest radiograph.",
    loc="lobe",
    layout="Frontal chest radiograph. {ind}{body} Impression: {imp}",
    indication="Indication: {ind}. ",
    positive={
        "normal": ("The lungs are clear without focal airspace disease.",
                   "Clear lungs without focal opacity."),
        "pneumonia": ("Airspace disease in the {loc}, compatible with pneumonia.",
                      "There is {loc} consolidation compatible with pneumonia."),
        "nodule": ("A {size} mm nodule projects over the {loc}.",
                   "Rounded nodule in the {loc}, {size} mm."),
        "effusion": ("Moderate {side} pleural effusion.", "There is a {side} pleural effusion."),
        "cardiomegaly": ("The heart is enlarged, compatible with cardiomegaly.", "Cardiomegaly."),
    },
    negative={
        "pneumonia": ("Without focal consolidation.", "Negative for pneumonia.",
                      "Consolidation is absent."),
        "nodule": ("Without pulmonary nodules.", "Negative for nodules.",
                   "Pulmonary nodules are absent."),
        "effusion": ("Without pleural effusion.", "No evidence of pleural effusion.",
                     "Pleural effusion is absent."),
        "cardiomegaly": ("The heart is normal in size.", "No evidence of cardiomegaly.",
                         "Cardiomegaly is absent."),
    },
    impression={
        "normal": ("No acute cardiopulmonary disease.", "Normal examination."),
        "pneumonia": ("Pneumonia.", "{Loc} pneumonia."),
        "nodule": ("Pulmonary nodule.", "Nodule, CT follow-up."),
        "effusion": ("{Side} pleural effusion.", "Effusion."),
        "cardiomegaly": ("Cardiomegaly.", "Enlarged heart."),
    },
    vague_zone=("Ill-defined opacity in the {loc}.", "Subtle {loc} opacity."),
    vague_heart=("Cardiac size is difficult to evaluate on this portable film.",),
    history={
        "pneumonia": ("Previous pneumonia is no longer seen.",),
        "nodule": ("Prior nodule no longer evident.",),
        "effusion": ("Previous pleural effusion has cleared.",),
        "cardiomegaly": ("Heart size has normalized since prior cardiomegaly.",),
    },
    nothing=("Study limited by rotation.", "Unchanged from prior.", "Portable technique."),
    side_words=("right", "left"),
)

# The archive's report styles: source hospital s writes PUBLIC_REPORT_STYLES[s % 3].
PUBLIC_REPORT_STYLES: tuple[ReportStyle, ...] = (PUBLIC_STYLE, PUBLIC_SECTIONED, PUBLIC_NARRATIVE)

# Report styles of an "unseen" federation: none of their section headers, abbreviations
# or reserved phrases (VOCABULARY["unseen"]) is ever written by the public corpus.
UNSEEN_REPORT_STYLES: tuple[ReportStyle, ...] = (
    ReportStyle(
        name="conclusion",
        marker="OBSERVATIONS:",
        loc="rtlt",
        layout="REASON FOR REQUEST: {ind}\nVIEW: single frontal.\nOBSERVATIONS: {body}\n"
        "CONCLUSION: {imp}",
        indication="{ind}.",
        positive={
            "normal": ("Lung fields unremarkable.", "Nothing abnormal detected."),
            "pneumonia": ("Inflammatory change {loc}, representing pneumonia.",
                          "Patchy inflammatory change in the {loc}; pneumonia."),
            "nodule": ("Discrete nodule {loc}, approx. {size} mm.",
                       "Discrete {size} mm nodule, {loc}."),
            "effusion": ("Fluid layering in the {side} hemithorax: pleural effusion.",
                         "{Side} pl. effusion."),
            "cardiomegaly": ("Cardiac enlargement (cardiomegaly), ratio {ctr}.",
                             "Cardiomegaly, cardiac enlargement."),
        },
        negative={
            "pneumonia": ("No inflammatory change.", "Pneumonia: not demonstrated."),
            "nodule": ("No discrete nodule.", "Nodule: not demonstrated."),
            "effusion": ("Pleural spaces free of fluid.", "Effusion absent."),
            "cardiomegaly": ("Cardiac size unremarkable.", "No cardiac enlargement."),
        },
        impression={
            "normal": ("Nothing abnormal detected.", "Unremarkable study."),
            "pneumonia": ("Pneumonia {loc}.", "Pneumonia."),
            "nodule": ("Nodule {loc}, CT suggested.", "Nodule."),
            "effusion": ("{Side} pl. effusion.", "Pleural effusion."),
            "cardiomegaly": ("Cardiomegaly.", "Cardiac enlargement."),
        },
        vague_zone=("Shadow {loc}, nature uncertain.",),
        vague_heart=("Cardiac size: not assessable, AP.",),
        history={
            "pneumonia": ("Old pneumonia, since resolved.",),
            "nodule": ("Earlier nodule, since gone.",),
            "effusion": ("Earlier effusion, since resolved.",),
            "cardiomegaly": ("Earlier cardiomegaly, since resolved.",),
        },
        nothing=("Compared with earlier film.", "Unchanged appearance.", "Rotated, suboptimal."),
        side_words=("Rt", "Lt"),
    ),
    ReportStyle(
        name="summary",
        marker="Summary:",
        loc="rtlt",
        layout="Clinical details: {ind}\n{body}\nSummary: {imp}",
        indication="{ind}.",
        positive={
            "normal": ("Heart and lungs NSF.", "Lung fields unremarkable."),
            "pneumonia": ("{Loc} inflammatory change, pneumonia.", "Pneumonia {loc}."),
            "nodule": ("Nodule {loc}, approx. {size} mm.", "{Loc}: solitary nodule."),
            "effusion": ("{Side} pl. effusion, fluid layering.", "Pleural effusion {side}."),
            "cardiomegaly": ("Cardiomegaly.", "Heart: cardiac enlargement, cardiomegaly."),
        },
        negative={
            "pneumonia": ("No pneumonia.", "Nil inflammatory change."),
            "nodule": ("No nodule seen.", "Nil nodule."),
            "effusion": ("No effusion.", "Costophrenic recesses free of fluid."),
            "cardiomegaly": ("Cardiac size unremarkable.", "No cardiomegaly."),
        },
        impression={
            "normal": ("NSF.", "Unremarkable."),
            "pneumonia": ("Pneumonia.", "{Loc} pneumonia."),
            "nodule": ("Nodule, for CT.", "Nodule."),
            "effusion": ("Pleural effusion.", "{Side} pl. effusion."),
            "cardiomegaly": ("Cardiomegaly.", "Cardiac enlargement."),
        },
        vague_zone=("Shadowing {loc}.", "Shadow {loc}, nature uncertain."),
        vague_heart=("Cardiac size not assessable.",),
        history={
            "pneumonia": ("Old pneumonia, long since resolved.",),
            "nodule": ("Earlier nodule, long since gone.",),
            "effusion": ("Old effusion, long since resolved.",),
            "cardiomegaly": ("Old cardiomegaly, long since resolved.",),
        },
        nothing=("Rotated, suboptimal.", "Appearance unchanged.", "Compared with earlier film."),
        side_words=("Rt", "Lt"),
    ),
)

# The partition, as data: section headers, abbreviations and phrases the public corpus
# writes (its templates use them; the unseen ones must not) and those reserved for an
# unseen federation (the public templates never use them). Matched case-insensitively as
# whole words (tests/shared_model/test_synth.py proves the partition on generated text).
# Negation grammar itself ("no", "not", "absent", a negation after the finding) is plain
# English, shared by both sides; the idioms around it ("no e/o", "without", "negative
# for" / "nil", "not demonstrated", "free of fluid") are partitioned.
VOCABULARY: dict[str, dict[Literal["public", "unseen"], tuple[str, ...]]] = {
    "headers": {
        "public": ("Comparison: none.", "Findings:", "Impression:", "Indication:", "HISTORY:",
                   "EXAM:", "Frontal chest radiograph."),
        "unseen": ("REASON FOR REQUEST:", "OBSERVATIONS:", "CONCLUSION:", "VIEW:",
                   "Clinical details:", "Summary:"),
    },
    "abbreviations": {
        "public": ("RLL", "RML", "RUL", "LLL", "LUL", "b/l", "w/", "w/o", "no e/o", "PTX",
                   "c/w", "WNL", "nml", "CP angle", "CXR", "Hx of"),
        "unseen": ("Rt", "Lt", "approx.", "pl.", "NSF"),
    },
    "phrases": {
        "public": ("no evidence of", "without", "negative for", "airspace", "consistent with",
                   "compatible with", "cardiomediastinal"),
        "unseen": ("not demonstrated", "free of fluid", "inflammatory change",
                   "cardiac enlargement", "nothing abnormal detected", "discrete", "hemithorax",
                   "layering", "nil", "unremarkable", "nature uncertain"),
    },
}


class PublicConfig(BaseModel):
    """The synthetic public corpus, a stand-in for a pooled multi-hospital archive (see
    the comment above PUBLIC_TAG); the same config writes the same bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cases: int = Field(2000, ge=50, le=1_000_000, description="cases in the archive")
    seed: int = Field(0, ge=0, description="same seed, same bytes (its own streams)")
    sources: int = Field(12, ge=1, le=64, description="source hospitals pooled in the archive, "
                         "each with its own scanner and one of the archive's report styles")
    label_noise: float = Field(0.08, ge=0.0, lt=1.0,
                               description="share of labels replaced as NLP mining would")
    image_size: int = Field(64, ge=16, le=1024)
    label_mix: tuple[float, ...] = Field(
        (0.40, 0.18, 0.12, 0.15, 0.15), description="share of each default label"
    )
    difficulty: Difficulty = Field("standard", description="its films and reports (HARDNESS)")
    labeller: Labeller = Field(
        "noisy", description="noisy: the true label; mined: read off the report as a "
        "report-mining labeller would (mined_label); then label_noise replaced at random")


def public_style(cfg: PublicConfig, source: int) -> SiteStyle:
    """A source hospital of the archive: a scanner drawn from PUBLIC_SCANNERS and one of
    the archive's report styles (PUBLIC_REPORT_STYLES, cycling with the source)."""
    rng = np.random.default_rng([PUBLIC_TAG, cfg.seed, source, 0])
    return SiteStyle(index=source, scanner=draw_scanner(rng, PUBLIC_SCANNERS, source),
                     report=PUBLIC_REPORT_STYLES[source % len(PUBLIC_REPORT_STYLES)],
                     writes_split=True)


def write_public(out_dir: Path, cfg: PublicConfig) -> Path:
    """Write the public corpus as one folder in format v1 (train/val/test columns)."""
    site_dir = Path(out_dir)
    if site_dir.exists() and any(site_dir.iterdir()):
        raise FileExistsError(f"{site_dir} exists and is not empty")
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([PUBLIC_TAG, cfg.seed, 1])
    mix = np.asarray(cfg.label_mix) / sum(cfg.label_mix)
    truth = rng.choice(len(DEFAULT_LABELS), size=cfg.cases, p=mix)
    flip = rng.random(cfg.cases) < cfg.label_noise
    replaced = rng.integers(0, len(DEFAULT_LABELS), cfg.cases)
    misread = rng.random(cfg.cases) < MISREAD_HISTORY
    splits = _splits(np.random.default_rng([PUBLIC_TAG, cfg.seed, 3]), cfg.cases)
    styles = [public_style(cfg, s) for s in range(cfg.sources)]
    rows: list[list[str]] = []
    for k in range(cfg.cases):
        style = styles[k % cfg.sources]
        case_id = f"pub-{k:06d}"
        case = render_case(np.random.default_rng([PUBLIC_TAG, cfg.seed, 2, k]),
                           DEFAULT_LABELS[int(truth[k])], style, cfg.image_size,
                           cfg.difficulty)
        if flip[k]:
            recorded = DEFAULT_LABELS[int(replaced[k])]
        elif cfg.labeller == "mined":
            recorded = mined_label(case, bool(misread[k]))
        else:
            recorded = case.finding.label
        ext = EXTENSIONS[style.scanner.image_format]
        rel = f"images/{case_id}{ext}"
        _write_image(site_dir / rel, case.image, style.scanner, (PUBLIC_TAG, cfg.seed, k))
        box = ["", "", "", ""] if case.box is None else [f"{v:.4f}" for v in case.box]
        rows.append([case_id, rel, case.report, recorded, *box,
                     splits[k]])
    with (site_dir / MANIFEST).open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*MANIFEST_COLUMNS, "split"])
        writer.writerows(rows)
    return site_dir


def mined_label(case: Case, misreads_history: bool) -> str:
    """The label a report-mining labeller (as behind NIH ChestX-ray14 or CheXpert) reads
    off an archive report: nothing said is "normal", an indeterminate opacity counts as
    pneumonia (uncertain read as positive), and a remark that a disease has resolved is,
    when `misreads_history`, read as that disease (a negation missed)."""
    if case.report_mode == "uninformative":
        return "normal"
    if case.report_mode == "vague":
        return "normal" if case.finding.kind in ("none", "heart") else "pneumonia"
    if misreads_history:
        for style in PUBLIC_REPORT_STYLES:
            for disease, remarks in style.history.items():
                if any(remark in case.report for remark in remarks):
                    return disease
    return case.finding.label
