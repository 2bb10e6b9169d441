"""Partitioners (pure) and writing re-partitioned hospitals as site folders."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import open_site
from shared_model.tokenizer import Tokenizer
from simulations.partition import (
    PartitionError,
    dirichlet_partition,
    iid_partition,
    label_counts,
    label_skew,
    partition,
    quantity_partition,
    read_pool,
    write_partitioned_sites,
)
from tests.conftest import TINY_IMAGE


def _labels(n: int = 2000, seed: int = 0) -> list[str]:
    return np.random.default_rng(seed).choice(list(DEFAULT_LABELS), size=n).tolist()


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    every = np.concatenate(parts)
    assert len(every) == n
    assert np.array_equal(np.sort(every), np.arange(n))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity"])
@pytest.mark.parametrize("n_sites", [2, 7, 50])
def test_every_case_lands_in_exactly_one_hospital(kind: str, n_sites: int) -> None:
    # Prepare
    labels = _labels()

    # Execute
    parts = partition(kind, labels, n_sites, seed=3, alpha=0.5, quantity_alpha=0.5, min_size=10)

    # Assert
    assert len(parts) == n_sites
    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_small_alpha_skews_labels_far_more_than_iid() -> None:
    # Prepare
    labels = _labels()

    # Execute
    iid = label_skew(labels, iid_partition(len(labels), 10, seed=1))
    skewed = label_skew(labels, dirichlet_partition(labels, 10, alpha=0.1, seed=1))
    mild = label_skew(labels, dirichlet_partition(labels, 10, alpha=100.0, seed=1))

    # Assert: distance of each hospital's label mix from the pool's
    assert iid < 0.1
    assert skewed > 0.4 and skewed > 4 * iid
    assert mild < 0.1
    # small alpha: most hospitals are dominated by one label
    counts = label_counts(labels, dirichlet_partition(labels, 10, alpha=0.1, seed=1))
    top_share = (counts.max(axis=1) / counts.sum(axis=1)).median()
    assert top_share > 0.5


def test_quantity_skew_gives_unequal_sizes_iid_equal_ones() -> None:
    # Execute
    iid_sizes = [len(p) for p in iid_partition(2000, 20, seed=0)]
    q_sizes = [len(p) for p in quantity_partition(2000, 20, alpha=0.5, seed=0, min_size=10)]

    # Assert
    assert max(iid_sizes) - min(iid_sizes) <= 1
    assert max(q_sizes) >= 5 * min(q_sizes) and min(q_sizes) >= 10
    assert sum(q_sizes) == 2000


def test_same_seed_same_split_other_seed_other_split() -> None:
    labels = _labels(500)
    a = dirichlet_partition(labels, 5, 0.5, seed=2)
    b = dirichlet_partition(labels, 5, 0.5, seed=2)
    c = dirichlet_partition(labels, 5, 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_too_few_cases_is_refused_with_a_reason() -> None:
    with pytest.raises(PartitionError, match="cannot give 50 hospitals at least 10"):
        partition("dirichlet", _labels(300), 50, seed=0, min_size=10)
    with pytest.raises(PartitionError, match="alpha"):
        dirichlet_partition(_labels(300), 5, alpha=0.0, seed=0)


def test_written_hospitals_are_site_folders(tiny_federation: list[Path], tmp_path: Path) -> None:
    # Prepare: a pool of the two tiny sites plus one row whose image is missing
    pool_dirs = []
    for d in tiny_federation:
        shutil.copytree(d, tmp_path / "pool" / d.name)
        pool_dirs.append(tmp_path / "pool" / d.name)
    with (pool_dirs[0] / "manifest.csv").open("a", encoding="utf-8", newline="") as fh:
        ghost = ["ghost", "images/ghost.png", "no film", "normal", "", "", "", ""]
        csv.writer(fh, lineterminator="\n").writerow(ghost[: _width(pool_dirs[0])])
    pool = read_pool(pool_dirs)
    labels = [c.record["label"] for c in pool]
    parts = dirichlet_partition(labels, 4, alpha=0.5, seed=0, min_size=10)

    # Execute
    sites = write_partitioned_sites(pool, parts, tmp_path / "new", seed=0)

    # Assert: every case once, unique ids, own split, images linked not copied
    assert [s.name for s in sites] == ["site-00", "site-01", "site-02", "site-03"]
    ids = []
    for site in sites:
        with (site / "manifest.csv").open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        ids += [r["case_id"] for r in rows]
        assert {r["split"] for r in rows} == {"train", "val", "test"}
        for r in rows:
            if r["case_id"].endswith(":ghost"):
                continue
            linked = site / r["image"]
            assert linked.is_file() and linked.stat().st_nlink >= 2
    assert len(ids) == len(set(ids)) == len(pool)

    # Assert: a new hospital opens; the missing image is reported, not fatal
    model = ModelConfig(image_size=TINY_IMAGE)
    ghost_site = next(s for s in sites if ":ghost" in (s / "manifest.csv").read_text())
    opened = open_site(
        ghost_site, labels=DEFAULT_LABELS, model=model, tokenizer=Tokenizer(model.vocab_size)
    )
    assert [b.case_id for b in opened.summary.bad_rows] == [f"{pool_dirs[0].name}:ghost"]
    assert len(opened.train) > 0


def _width(site: Path) -> int:
    with (site / "manifest.csv").open(encoding="utf-8") as fh:
        return len(next(csv.reader(fh)))
