"""The committed real-box statistics: well formed, and what the NIH table gives."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from shared_model.tooling.box_stats import (
    BOX_STATS,
    LABEL_SHARE,
    NIH_ENTRIES,
    NIH_TABLE,
    QUANTILES,
    default_cache,
    format_table,
    main,
    read_label_shares,
    recompute,
    summarise,
)


def test_committed_statistics_are_well_formed() -> None:
    assert set(BOX_STATS) == {"pneumonia", "nodule", "effusion", "cardiomegaly"}
    for name, s in BOX_STATS.items():
        for values in (s.w, s.h, s.cx, s.cy):
            assert len(values) == len(QUANTILES), name
            assert list(values) == sorted(values) and 0 < values[0] and values[-1] < 1, name
        assert s.folded == (name != "cardiomegaly")
        if s.folded:  # a lesion's centre is folded onto the film's left half
            assert s.cx[-1] <= 0.5, name
        assert s.w[0] * s.h[0] < s.area < s.w[-1] * s.h[-1], name


def test_summarise_folds_lesion_centres_onto_the_left_half() -> None:
    # Prepare: two mirror-image boxes (x, y, w, h), one on each side of the film
    boxes = np.array([[0.1, 0.4, 0.2, 0.1], [0.7, 0.4, 0.2, 0.1]])

    # Execute
    folded = summarise(boxes, "hand-built", folded=True)
    raw = summarise(boxes, "hand-built", folded=False)

    # Assert
    assert set(folded.cx) == {0.2}  # both centres 0.2 from their nearer edge
    assert raw.cx[0] == pytest.approx(0.2 + 0.05 * 0.6) and raw.cx[-1] > 0.75
    assert set(folded.w) == {0.2} and set(folded.h) == {0.1} and folded.area == 0.02
    assert folded.n == 2 and folded.source == "hand-built"


def test_main_says_when_the_table_is_missing(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 2


def test_recomputed_from_a_hand_built_table(tmp_path: Path) -> None:
    # Prepare: a tiny table in NIH's format (pixels of a 1024 px film)
    rows = [["00000001_000.png", label, 100 + 40 * k, 300, 60 + 8 * k, 70 + 9 * k]
            for label in ("Pneumonia", "Nodule", "Effusion", "Cardiomegaly", "Mass")
            for k in range(5)]
    with gzip.open(tmp_path / NIH_TABLE, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""])
        writer.writerows(row + ["", "", ""] for row in rows)

    # Execute
    stats = recompute(tmp_path)

    # Assert
    assert set(stats) == set(BOX_STATS) and all(s.n == 5 for s in stats.values())
    assert stats["nodule"].w[QUANTILES.index(0.5)] == round(76 / 1024, 3)
    assert stats["nodule"].wh_rank_corr == pytest.approx(1.0)
    assert "nodule" in format_table(stats)


def test_committed_statistics_match_the_nih_table() -> None:
    cache = default_cache()
    if not (cache / NIH_TABLE).is_file():
        pytest.skip(f"no {NIH_TABLE} in {cache} (scripts/fetch-public-tables.sh fetches it)")
    assert recompute(cache) == BOX_STATS


def test_label_shares_from_a_hand_built_study_table(tmp_path: Path) -> None:
    # 8 normal, 1 nodule, 1 effusion; a study with two findings and another finding left out
    rows = (["No Finding"] * 8 + ["Nodule", "Effusion", "Nodule|Effusion", "Hernia"])
    path = tmp_path / NIH_ENTRIES
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Patient ID"])
        w.writerows([f"{i}.png", r, str(i)] for i, r in enumerate(rows))

    shares = read_label_shares(path)

    assert shares == {"normal": 0.8, "pneumonia": 0.0, "nodule": 0.1, "effusion": 0.1,
                      "cardiomegaly": 0.0}
    assert sum(LABEL_SHARE.values()) == pytest.approx(1.0, abs=1e-3)


def test_committed_label_shares_match_the_nih_study_table() -> None:
    cache = default_cache()
    if not (cache / NIH_ENTRIES).is_file():
        pytest.skip(f"no {NIH_ENTRIES} in {cache} (scripts/fetch-public-tables.sh fetches it)")
    assert read_label_shares(cache / NIH_ENTRIES) == LABEL_SHARE
