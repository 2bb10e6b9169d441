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

* `difficulty = "hard"` (`HARDNESS`) draws clear findings fainter, among more vessel
  shadows, and writes an informative report on 35% of clear films instead of 62%: a
  hospital alone learns less from a few hundred cases. The public archive's
  `labeller = "mined"` labels each case from its report as report-mining labellers do
  (`mined_label`), so a model trained on it learns the labeller's mistakes.

Coordinates are fractions of the image, x to the right and y down, in the radiological
convention: the patient's right lung is on the image's left (x < 0.5). Boxes are
`(x0, y0, x1, y1)` fractions, tight around the drawn finding.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared_model.config import DEFAULT_LABELS, MANIFEST

Box = tuple[float, float, float, float]
Ellipse = tuple[float, float, float, float]  # cx, cy, semi-axis x, semi-axis y
ImageFormat = Literal["png8", "dicom12", "png16", "jpeg", "png_rgb"]
ReportMode = Literal["informative", "vague", "uninformative"]
Zone = Literal["", "apex", "upper", "middle", "lower", "base"]
FindingKind = Literal["none", "nodule", "patchy", "effusion", "hazy_basal", "heart"]
ZONES: tuple[Zone, ...] = ("upper", "middle", "lower")  # where nodules and patches are put

# Image formats in the order sites take them: site i writes FORMATS[i % 5].
FORMATS: tuple[ImageFormat, ...] = ("png8", "dicom12", "png16", "jpeg", "png_rgb")
EXTENSIONS: dict[ImageFormat, str] = {
    "png8": ".png", "dicom12": ".dcm", "png16": ".png", "jpeg": ".jpg", "png_rgb": ".png",
}
MANIFEST_COLUMNS: tuple[str, ...] = (
    "case_id", "image", "report", "label", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
)
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

# Heart half-width (fraction of the image width) ranges.
HEART_NORMAL = (0.10, 0.14)
HEART_BORDERLINE = (0.145, 0.17)
HEART_ENLARGED = (0.18, 0.22)
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
        None, gt=0, description="Dirichlet alpha of each site's label mix; None = balanced"
    )
    image_size: int = Field(64, ge=16, le=1024, description="image side in pixels")
    difficulty: Difficulty = Field("standard", description="standard or hard (see HARDNESS)")
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


@dataclass(frozen=True)
class ReportStyle:
    """A site's way of writing reports.

    `loc` chooses how a location is written: "zone" ("right lower zone"), "lobe" ("right
    lower lobe") or "abbrev" ("rll"). Every non-empty report contains `marker`.
    """

    name: str
    marker: str
    loc: Literal["zone", "lobe", "abbrev"]
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


def site_style(seed: int, index: int) -> SiteStyle:
    """The style of site `index` of a federation seeded with `seed`.

    The image format cycles with the index (`FORMATS`); the report style is a seeded
    permutation of `REPORT_STYLES`, also cycling; the scanner is drawn per site.
    """
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


def site_labels(cfg: SynthConfig, index: int) -> list[str]:
    """The labels of site `index`'s cases, in case order (count and mix drawn per site)."""
    rng = np.random.default_rng([cfg.seed, index, 1])
    n = int(round(cfg.cases_per_site * rng.uniform(1 - CASES_JITTER, 1 + CASES_JITTER)))
    n = max(n, 10)
    k = len(cfg.labels)
    if cfg.label_skew is None:
        ids = rng.permutation(np.arange(n) % k)
    else:
        probs = rng.dirichlet(np.full(k, cfg.label_skew))
        ids = rng.choice(k, size=n, p=probs)
    return [cfg.labels[int(i)] for i in ids]


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, in image fractions."""

    lungs: tuple[Ellipse, Ellipse]  # patient's right (image left), left: cx, cy, ax, ay
    heart_centre: tuple[float, float]  # the heart's size depends on the finding
    rib_shift: float


@dataclass(frozen=True)
class Finding:
    """What a case shows and where: drawn by `render_image`, described by `write_report`."""

    label: str
    kind: FindingKind
    ambiguous: bool  # the image alone cannot tell this label from another
    heart: float  # the heart's half-width (enlarged for cardiomegaly)
    side: int = -1  # 0 = patient's right (image left), 1 = patient's left; -1 = none
    zone: Zone = ""
    # nodule: (cx, cy, r); patchy: (cx, cy, rx, ry); effusion: (height, meniscus);
    # hazy_basal: (height,); none and heart: ()
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


def render_case(
    rng: np.random.Generator, label: str, style: SiteStyle, image_size: int,
    difficulty: Difficulty = "standard",
) -> Case:
    """Draw one case of `label` at a site of `style`: image, box and report."""
    hard = HARDNESS[difficulty]
    anatomy = sample_anatomy(rng)
    finding = sample_finding(rng, label, anatomy, hard)
    image, box = render_image(rng, anatomy, finding, style.scanner, image_size, hard)
    modes = REPORT_MODES_AMBIGUOUS if finding.ambiguous else hard.report_modes_clear
    mode: ReportMode = ("informative", "vague", "uninformative")[
        int(rng.choice(3, p=np.asarray(modes) / sum(modes)))
    ]
    report = write_report(rng, finding, anatomy, style.report, mode)
    return Case(image=image, box=box, report=report, finding=finding, report_mode=mode)


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
    heart = (0.545 + float(rng.normal(0, 0.008)), 0.64 + float(rng.normal(0, 0.008)))
    return Anatomy(
        lungs=(lungs[0], lungs[1]), heart_centre=heart, rib_shift=float(rng.uniform(0, 0.06))
    )


def sample_finding(rng: np.random.Generator, label: str, anatomy: Anatomy,
                   hard: Hardness = HARDNESS["standard"]) -> Finding:
    """The finding of a case of `label`: its kind, whether it is ambiguous, its place."""
    if label not in DEFAULT_LABELS:
        raise ValueError(f"unknown label {label!r} (allowed: {', '.join(DEFAULT_LABELS)})")
    ambiguous = bool(rng.random() < IMAGE_AMBIGUOUS[label])
    side = int(rng.integers(2))
    if label in ("normal", "cardiomegaly"):
        if label == "cardiomegaly":
            hw = float(rng.uniform(*(HEART_BORDERLINE if ambiguous else HEART_ENLARGED)))
        else:
            hw = float(rng.uniform(*(HEART_BORDERLINE if ambiguous else HEART_NORMAL)))
        return Finding(label, "heart" if label == "cardiomegaly" else "none", ambiguous, hw)
    hw = float(rng.uniform(*HEART_NORMAL))
    if label == "nodule":
        r = float(rng.uniform(0.075, 0.1))
        zone: Zone = ZONES[int(rng.integers(len(ZONES)))]
        cx, cy = _place_in_lung(rng, anatomy, hw, side, zone, margin=r + 0.01)
        if zone == "upper" and cy - r < anatomy.lungs[side][1] - anatomy.lungs[side][3] + 0.12:
            zone = "apex"
        amount = float(rng.uniform(0.03, 0.05) if ambiguous else rng.uniform(*hard.nodule))
        return Finding(label, "nodule", ambiguous, hw, side, zone, (cx, cy, r), amount)
    if ambiguous:  # pneumonia or effusion drawn as the same hazy basal opacity
        height = float(rng.uniform(0.12, 0.19))
        amount = float(rng.uniform(*hard.hazy))
        return Finding(label, "hazy_basal", True, hw, side, "lower", (height,), amount)
    if label == "effusion":
        height = float(rng.uniform(0.10, 0.17))
        meniscus = float(rng.uniform(0.03, 0.06))
        amount = float(rng.uniform(*hard.effusion))
        return Finding(label, "effusion", False, hw, side, "base", (height, meniscus), amount)
    zone = ZONES[int(rng.choice(len(ZONES), p=[0.35, 0.4, 0.25]))]
    rx, ry = float(rng.uniform(0.1, 0.14)), float(rng.uniform(0.085, 0.12))
    cx, cy = _place_in_lung(rng, anatomy, hw, side, zone, margin=0.04)
    amount = float(rng.uniform(*hard.patchy))
    return Finding(label, "patchy", False, hw, side, zone, (cx, cy, rx, ry), amount)


def _zone_band(lung: Ellipse, zone: Zone) -> tuple[float, float]:
    _, cy, _, ay = lung
    top, h = cy - ay, 2 * ay
    return {
        "upper": (top + 0.10 * h, top + h / 3),
        "middle": (top + h / 3, top + 2 * h / 3),
        "lower": (top + 2 * h / 3, top + 0.88 * h),
    }[zone]


def _place_in_lung(
    rng: np.random.Generator, anatomy: Anatomy, hw: float, side: int, zone: Zone, margin: float
) -> tuple[float, float]:
    """A point in the zone of one lung, at least `margin` inside the lung and off the heart
    and mediastinum (the margin shrinks when the zone is too tight for it)."""
    lcx, lcy, ax, ay = anatomy.lungs[side]
    lo, hi = _zone_band(anatomy.lungs[side], zone)
    for attempt in range(96):
        m = margin * (1.0 if attempt < 48 else 0.8)
        cy = float(rng.uniform(lo, hi))
        half = float(np.sqrt(max(1.0 - ((cy - lcy) / ay) ** 2, 0.0))) * ax - m
        if half <= 0:
            continue
        cx = float(rng.uniform(lcx - half, lcx + half))
        if _inside_air(anatomy, hw, cx, cy, m):
            return cx, cy
    lateral = -1.0 if side == 0 else 1.0
    return lcx + lateral * 0.4 * ax, (lo + hi) / 2


def _inside_air(anatomy: Anatomy, hw: float, x: float, y: float, margin: float) -> bool:
    for dx, dy in ((0, 0), (margin, 0), (-margin, 0), (0, margin), (0, -margin)):
        px, py = x + dx, y + dy
        in_lung = any(((px - cx) / ax) ** 2 + ((py - cy) / ay) ** 2 < 0.97
                      for cx, cy, ax, ay in anatomy.lungs)
        hx, hy = anatomy.heart_centre
        hh = _heart_half_height(hw)
        in_heart = ((px - hx) / (hw + 0.01)) ** 2 + ((py - hy) / (hh + 0.01)) ** 2 < 1
        if not in_lung or in_heart or abs(px - 0.5) < 0.07:
            return False
    return True


def _heart_half_height(hw: float) -> float:
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

    hw = finding.heart
    hx, hy = anatomy.heart_centre
    hh = _heart_half_height(hw)
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

    img = _scan(rng, img, scanner, s)
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
    cx_l, cy_l, ax_l, ay_l = anatomy.lungs[finding.side]
    bottom = cy_l + ay_l
    if finding.kind == "nodule":
        cx, cy, r = finding.geometry
        d = _soft(r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2), edge)
        return d, (cx - r, cy - r, cx + r, cy + r)
    if finding.kind == "patchy":
        cx, cy, rx, ry = finding.geometry
        region = _ellipse(x, y, cx, cy, rx, ry, edge) * side_air
        mottle = np.clip(0.85 + 0.3 * _smooth_noise(rng, s, 12), 0.65, 1.0)
        return region * mottle, _mask_box(region) or (cx - rx, cy - ry, cx + rx, cy + ry)
    if finding.kind == "effusion":
        height, meniscus = finding.geometry
        medial = cx_l + (ax_l if finding.side == 0 else -ax_l)
        t = np.clip(np.abs(x - medial) / (2 * ax_l), 0, 1)
        surface = bottom - height - meniscus * t**2
        d = _soft(y - surface, 0.01) * side_air
        return d, _mask_box(d) or (cx_l - ax_l, bottom - height, cx_l + ax_l, bottom)
    # hazy basal opacity: pneumonia or effusion, the film cannot tell
    (height,) = finding.geometry
    region = _soft(y - (bottom - height), 0.05) * side_air
    mottle = np.clip(0.9 + 0.15 * _smooth_noise(rng, s, 10), 0.7, 1.0)
    return region * mottle, _mask_box(region) or (cx_l - ax_l, bottom - height, cx_l + ax_l, bottom)


def _scan(rng: np.random.Generator, img: np.ndarray, sc: Scanner, s: int) -> np.ndarray:
    """The site's scanner: blur, acquisition resolution, noise, tone curve."""
    img = _blur(img, sc.blur * s / 64)
    acquired = max(8, int(round(s * sc.acquisition)))
    if acquired < s:
        img = _resize(_resize(img, acquired, Image.Resampling.BOX), s, Image.Resampling.BILINEAR)
    img = img + rng.normal(0.0, sc.noise, img.shape).astype(np.float32)
    img = np.clip(0.5 + sc.brightness + sc.contrast * (img - 0.5), 0.0, 1.0)
    return (img**sc.gamma).astype(np.float32)


def _clip_box(box: Box) -> Box:
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    return (x0, y0, x1, y1)


# --------------------------------------------------------------------------- reports

_ZONE_LOBE = {"apex": "upper", "upper": "upper", "middle": "middle", "lower": "lower",
              "base": "lower"}


def _location(finding: Finding, style: ReportStyle) -> str:
    side = ("right", "left")[finding.side]
    zone = finding.zone
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
    ctr = 2 * finding.heart / (anatomy.lungs[1][0] + anatomy.lungs[1][2] - anatomy.lungs[0][0]
                    + anatomy.lungs[0][2])
    side = style.side_words[finding.side] if finding.side >= 0 else ""
    loc = _location(finding, style) if finding.side >= 0 else ""
    size = ""
    if finding.kind == "nodule":
        size = str(int(round(2 * finding.geometry[2] * FIELD_OF_VIEW_MM)))
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


def write_site(site_dir: Path, cfg: SynthConfig, index: int) -> Path:
    """Write site `index` of the federation into `site_dir` (created; assumed empty)."""
    style = site_style(cfg.seed, index)
    labels = site_labels(cfg, index)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    ext = EXTENSIONS[style.scanner.image_format]
    splits = _splits(np.random.default_rng([cfg.seed, index, 3]), len(labels))
    rows: list[list[str]] = []
    for k, label in enumerate(labels):
        case_id = f"s{index:02d}-{k:05d}"
        rng = np.random.default_rng([cfg.seed, index, 2, k])
        case = render_case(rng, label, style, cfg.image_size, cfg.difficulty)
        rel = f"images/{case_id}{ext}"
        _write_image(site_dir / rel, case.image, style.scanner, (cfg.seed, index, k))
        box = ["", "", "", ""] if case.box is None else [f"{v:.4f}" for v in case.box]
        row = [case_id, rel, case.report, label, *box]
        if style.writes_split:
            row.append(splits[k])
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
    if fmt == "png8":
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


def _write_dicom(path: Path, pixels: np.ndarray, key: tuple[int, int, int]) -> None:
    """A 12-bit (BitsStored 12, BitsAllocated 16) MONOCHROME2 CR image, no dates, UIDs
    derived from (seed, site, case)."""
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
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- public corpus
#
# A synthetic stand-in for a public archive of chest radiographs with reports (NIH
# ChestX-ray14, OpenI, PadChest, CheXpert): larger than any hospital, pooled from several
# source hospitals of its own, written in an archive's own report style, with the label
# noise of labels mined from reports by NLP. Every random stream is keyed by PUBLIC_TAG
# first, so no seed of a federation (whose streams start with its seed) can give the same
# cases, and its report style is none of REPORT_STYLES. It is never a federation's data.

PUBLIC_TAG = 0x9B11C  # first key of every random stream of the public corpus
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


class PublicConfig(BaseModel):
    """The synthetic public corpus; the same config writes the same bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cases: int = Field(2000, ge=50, le=1_000_000, description="cases in the archive")
    seed: int = Field(0, ge=0, description="same seed, same bytes (its own streams)")
    sources: int = Field(4, ge=1, le=64, description="source hospitals pooled in the archive")
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
    """A source hospital of the archive: its own scanner, the archive's report style."""
    rng = np.random.default_rng([PUBLIC_TAG, cfg.seed, source, 0])
    fmt = FORMATS[source % len(FORMATS)]
    scanner = Scanner(
        contrast=float(rng.uniform(0.75, 1.25)),
        brightness=float(rng.uniform(-0.08, 0.08)),
        gamma=float(rng.uniform(0.75, 1.3)),
        noise=float(rng.uniform(0.005, 0.035)),
        blur=float(rng.uniform(0.0, 1.0)),
        acquisition=float(rng.choice([0.625, 0.75, 0.875, 1.0])),
        image_format=fmt,
        jpeg_quality=int(rng.integers(75, 96)),
        tint=(1.0, 1.0, 1.0),
    )
    return SiteStyle(index=source, scanner=scanner, report=PUBLIC_STYLE, writes_split=True)


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
        for disease, remarks in PUBLIC_STYLE.history.items():
            if any(remark in case.report for remark in remarks):
                return disease
    return case.finding.label
