"""How big real lesion boxes are, and where they sit, per class: the numbers the
synthetic generator (`synth.py`) sizes and places its findings by.

The constants in `BOX_STATS` are summary statistics of NIH ChestX-ray14's public box table
(`BBox_List_2017.csv`, 984 boxes drawn by radiologists on 1024 x 1024 films): quantiles
of box width and height as fractions of the film side, of the box centre, and the rank
correlation of width and height. They are facts about a public table, not data, so they
are committed; the table itself is not (it lives in the cache that
`scripts/fetch-public-tables.sh` fills). `python -m shared_model.tooling.box_stats`
recomputes and prints them from that cache; a test checks the two agree.

Not used: RSNA's pneumonia boxes (9,555, 1024 px) agree with NIH's (median area 6.2% of
the film against 5.7%) and would only swamp NIH's 120; VinDr-CXR's table gives boxes in
pixels of films whose sizes it does not give.

`LABEL_SHARE` is the other real statistic the generator can follow (`label_mix = "nih"`):
the share of each of our findings among NIH's 112,120 studies (`Data_Entry_2017_v2020.csv`)
with exactly one of them, or none ("No Finding" is our normal).

Left and right: a film's left is the patient's right, and the generator puts each lesion
on a side, so a lesion's centre x is folded onto the film's left half (x -> 1 - x for a
box centred right of the midline): `cx` is then the distance from the film's nearer
edge, and a finding in the patient's left lung mirrors it. The heart is not folded.
"""

from __future__ import annotations

import csv
import gzip
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUANTILES: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
NIH_TABLE = "BBox_List_2017.csv.gz"
NIH_ENTRIES = "Data_Entry_2017_v2020.csv.gz"  # one row per study: its "Finding Labels"
NIH_FILM_PX = 1024.0
# our class -> NIH's "Finding Label"
NIH_LABELS: dict[str, str] = {
    "pneumonia": "Pneumonia", "nodule": "Nodule", "effusion": "Effusion",
    "cardiomegaly": "Cardiomegaly",
}
FOLDED: frozenset[str] = frozenset({"pneumonia", "nodule", "effusion"})  # lesions on a side

Quantiles = tuple[float, ...]  # values at QUANTILES


@dataclass(frozen=True)
class BoxStats:
    """One class's boxes in one table: quantiles (at QUANTILES) of width, height and
    centre, fractions of the film side; `cx` folded onto the left half when `folded`."""

    source: str
    n: int
    w: Quantiles
    h: Quantiles
    cx: Quantiles
    cy: Quantiles
    area: float  # median of width times height, a fraction of the film
    wh_rank_corr: float  # Spearman correlation of width and height
    folded: bool


BOX_STATS: dict[str, BoxStats] = {
    "pneumonia": BoxStats(
        source="NIH ChestX-ray14 BBox_List_2017", n=120,
        w=(0.144, 0.164, 0.185, 0.223, 0.258, 0.574, 0.695),
        h=(0.129, 0.158, 0.19, 0.269, 0.369, 0.497, 0.575),
        cx=(0.234, 0.243, 0.284, 0.31, 0.36, 0.426, 0.479),
        cy=(0.399, 0.422, 0.482, 0.556, 0.621, 0.686, 0.725),
        area=0.0572, wh_rank_corr=0.584, folded=True),
    "nodule": BoxStats(
        source="NIH ChestX-ray14 BBox_List_2017", n=79,
        w=(0.042, 0.047, 0.053, 0.069, 0.085, 0.098, 0.101),
        h=(0.04, 0.044, 0.055, 0.067, 0.078, 0.099, 0.113),
        cx=(0.132, 0.173, 0.211, 0.257, 0.321, 0.374, 0.426),
        cy=(0.268, 0.29, 0.353, 0.467, 0.606, 0.696, 0.726),
        area=0.0046, wh_rank_corr=0.855, folded=True),
    "effusion": BoxStats(
        source="NIH ChestX-ray14 BBox_List_2017", n=153,
        w=(0.072, 0.099, 0.153, 0.203, 0.259, 0.31, 0.345),
        h=(0.062, 0.087, 0.154, 0.271, 0.45, 0.588, 0.635),
        cx=(0.127, 0.146, 0.187, 0.221, 0.275, 0.311, 0.363),
        cy=(0.35, 0.418, 0.474, 0.56, 0.645, 0.712, 0.738),
        area=0.0557, wh_rank_corr=0.174, folded=True),
    "cardiomegaly": BoxStats(
        source="NIH ChestX-ray14 BBox_List_2017", n=146,
        w=(0.387, 0.403, 0.435, 0.466, 0.5, 0.535, 0.548),
        h=(0.284, 0.297, 0.336, 0.373, 0.406, 0.441, 0.471),
        cx=(0.497, 0.524, 0.541, 0.574, 0.603, 0.632, 0.655),
        cy=(0.46, 0.491, 0.525, 0.566, 0.617, 0.647, 0.684),
        area=0.1709, wh_rank_corr=0.497, folded=False),
}


# Share of each label among NIH's studies with "No Finding" or exactly one of our findings
# (68,436 studies; recomputed by `read_label_shares`): a real hospital sees mostly normal
# films, pneumonia in one study of two hundred.
LABEL_SHARE: dict[str, float] = {
    "normal": 0.882, "pneumonia": 0.0047, "nodule": 0.04, "effusion": 0.058,
    "cardiomegaly": 0.016,
}


def default_cache() -> Path:
    """Where `scripts/fetch-public-tables.sh` puts the public tables: $MEDFUSE_PUBLIC_TABLES,
    else ~/.cache/medfuse/public-tables (as `medfuse data import` looks)."""
    return Path(os.environ.get("MEDFUSE_PUBLIC_TABLES",
                               Path.home() / ".cache" / "medfuse" / "public-tables"))


def read_nih_boxes(path: Path) -> dict[str, np.ndarray]:
    """NIH's boxes per NIH label, (N, 4) arrays of x, y, w, h in film fractions."""
    rows: dict[str, list[list[float]]] = {}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)  # "Image Index","Finding Label","Bbox [x",y,w,"h]",,,
        for row in reader:
            rows.setdefault(row[1], []).append([float(v) / NIH_FILM_PX for v in row[2:6]])
    return {label: np.asarray(boxes) for label, boxes in rows.items()}


def read_label_shares(path: Path) -> dict[str, float]:
    """`LABEL_SHARE` from NIH's study table at `path`, rounded as committed."""
    theirs = {"No Finding": "normal"} | {v: k for k, v in NIH_LABELS.items()}
    counts = dict.fromkeys(LABEL_SHARE, 0)
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if (ours := theirs.get(row["Finding Labels"])) is not None:
                counts[ours] += 1
    total = sum(counts.values())
    return {k: round(v / total, 4 if v / total < 0.01 else 3) for k, v in counts.items()}


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (the table's values are continuous: no ties)."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def summarise(boxes: np.ndarray, source: str, folded: bool) -> BoxStats:
    """The statistics of (N, 4) x, y, w, h boxes, rounded to 3 decimals as committed."""
    x, y, w, h = boxes.T
    cx, cy = x + w / 2, y + h / 2
    if folded:
        cx = np.where(cx < 0.5, cx, 1.0 - cx)

    def q(v: np.ndarray) -> Quantiles:
        return tuple(round(float(t), 3) for t in np.quantile(v, QUANTILES))

    return BoxStats(source=source, n=len(boxes), w=q(w), h=q(h), cx=q(cx), cy=q(cy),
                    area=round(float(np.median(w * h)), 4),
                    wh_rank_corr=round(_rank_corr(w, h), 3), folded=folded)


def recompute(cache: Path) -> dict[str, BoxStats]:
    """`BOX_STATS` as computed from the NIH table in `cache`."""
    boxes = read_nih_boxes(cache / NIH_TABLE)
    return {ours: summarise(boxes[theirs], "NIH ChestX-ray14 BBox_List_2017", ours in FOLDED)
            for ours, theirs in NIH_LABELS.items()}


def format_table(stats: dict[str, BoxStats]) -> str:
    """A plain-text table: median size, area and centre per class, and the quantiles."""
    mid = QUANTILES.index(0.5)
    lines = [f"{'class':<13}{'n':>5}{'area':>8}{'w':>7}{'h':>7}{'cx':>7}{'cy':>7}  source"]
    for name, s in stats.items():
        lines.append(f"{name:<13}{s.n:>5}{s.area:>8.4f}{s.w[mid]:>7.3f}{s.h[mid]:>7.3f}"
                     f"{s.cx[mid]:>7.3f}{s.cy[mid]:>7.3f}  {s.source}"
                     f"{' (cx folded)' if s.folded else ''}")
    lines.append(f"quantiles at {QUANTILES}:")
    for name, s in stats.items():
        lines.append(f"  {name}: w={s.w} h={s.h} cx={s.cx} cy={s.cy} "
                     f"wh_rank_corr={s.wh_rank_corr}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Print the statistics recomputed from the cache (argv[0], default `default_cache()`)
    and whether they match the committed `BOX_STATS` and `LABEL_SHARE`."""
    cache = Path(argv[0]) if argv else default_cache()
    missing = [t for t in (NIH_TABLE, NIH_ENTRIES) if not (cache / t).is_file()]
    if missing:
        print(f"no {', '.join(missing)} in {cache}: run scripts/fetch-public-tables.sh",
              file=sys.stderr)
        return 2
    stats, shares = recompute(cache), read_label_shares(cache / NIH_ENTRIES)
    print(format_table(stats))
    print(f"label shares: {shares}")
    same = stats == BOX_STATS and shares == LABEL_SHARE
    print("matches the committed BOX_STATS and LABEL_SHARE" if same
          else "DIFFERS from the committed BOX_STATS or LABEL_SHARE")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
