"""Re-partitioning one pool of cases into simulated hospitals (no Flower, no torch).

The partitioners are pure: they take labels (or a count), a number of hospitals and a
seed, and return one array of case indices per hospital; every case lands in exactly one.

* `iid_partition`       a random permutation cut into near-equal parts
* `dirichlet_partition` label skew: each label's cases are shared out by proportions drawn
                        from Dirichlet(alpha); small alpha gives hospitals that see mostly
                        one or two labels (Hsu et al. 2019; Flower's DirichletPartitioner)
* `quantity_partition`  quantity skew: hospital sizes drawn from Dirichlet(alpha), labels
                        mixed at random

`write_partitioned_sites` then writes each hospital as a site folder in format v1: the
images hard-linked (or copied where a link is not possible) from the pool's site folders,
and a `manifest.csv` with the hospital's own train/val/test split.
"""

from __future__ import annotations

import csv
import os
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from shared_model.config import MANIFEST

BOX_COLUMNS = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
OUT_COLUMNS = ("case_id", "image", "report", "label", "split", *BOX_COLUMNS)
SPLIT_SHARES = (0.70, 0.15, 0.15)  # train, val, test of every new hospital
MAX_TRIES = 200

PartitionKind = Literal["iid", "dirichlet", "quantity"]


class PartitionError(ValueError):
    """The pool cannot be split as asked; the message says why and what to change."""


# ---------------------------------------------------------------------- partitioners


def _check(n_cases: int, n_sites: int, min_size: int) -> None:
    if n_sites < 1:
        raise PartitionError(f"hospitals={n_sites}: need at least one")
    if n_cases < n_sites * min_size:
        raise PartitionError(
            f"{n_cases} cases cannot give {n_sites} hospitals at least {min_size} cases each "
            f"(needs {n_sites * min_size}); use fewer hospitals, a smaller min-cases or a "
            "larger pool"
        )


def iid_partition(n_cases: int, n_sites: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into `n_sites` parts whose sizes differ by at most one."""
    _check(n_cases, n_sites, 1)
    order = np.random.default_rng([seed, 11]).permutation(n_cases)
    return [np.sort(p) for p in np.array_split(order, n_sites)]


def dirichlet_partition(
    labels: Sequence[str], n_sites: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label skew: for every label, its cases go to the hospitals in proportions drawn from
    Dirichlet(alpha, ..., alpha). A hospital that has reached its fair share (n / n_sites)
    takes no more of the next labels (the balancing of FedLab / Flower), which keeps sizes
    within reach of `min_size`; draws are repeated until every hospital has `min_size`
    cases, and the last draw is topped up from the largest hospitals if none did."""
    if not alpha > 0:
        raise PartitionError(f"alpha={alpha}: must be > 0")
    y = np.asarray([str(v) for v in labels])
    n = len(y)
    _check(n, n_sites, min_size)
    rng = np.random.default_rng([seed, 13])
    classes = sorted(set(y.tolist()))
    fair = n / n_sites
    parts: list[list[int]] = []
    for _ in range(MAX_TRIES):
        parts = [[] for _ in range(n_sites)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_sites, alpha))
            full = np.array([len(q) >= fair for q in parts])
            if not full.all():
                p = np.where(full, 0.0, p)
            p = p / p.sum()
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            break
    else:
        _top_up(parts, min_size, rng)
    return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]


def quantity_partition(
    n_cases: int, n_sites: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Quantity skew: hospital sizes are `min_size` plus a share of the rest drawn from
    Dirichlet(alpha) (small alpha: a few large hospitals and many small ones); cases are
    dealt at random, so label mixes stay close to the pool's."""
    if not alpha > 0:
        raise PartitionError(f"alpha={alpha}: must be > 0")
    _check(n_cases, n_sites, min_size)
    rng = np.random.default_rng([seed, 17])
    spare = n_cases - n_sites * min_size
    shares = rng.dirichlet(np.full(n_sites, alpha))
    extra = np.floor(shares * spare).astype(int)
    # hand out what flooring left over to the largest remainders
    rest = spare - int(extra.sum())
    if rest:
        extra[np.argsort(-(shares * spare - extra), kind="stable")[:rest]] += 1
    sizes = extra + min_size
    order = rng.permutation(n_cases)
    return [np.sort(p) for p in np.split(order, np.cumsum(sizes)[:-1])]


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move random cases from the largest hospitals to those below `min_size`."""
    for small in sorted(range(len(parts)), key=lambda i: len(parts[i])):
        while len(parts[small]) < min_size:
            big = max(range(len(parts)), key=lambda i: len(parts[i]))
            j = int(rng.integers(len(parts[big])))
            parts[small].append(parts[big].pop(j))


def partition(
    kind: PartitionKind,
    labels: Sequence[str],
    n_sites: int,
    *,
    seed: int,
    alpha: float = 0.5,
    quantity_alpha: float = 1.0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """One of the partitioners by name; `labels` has one entry per case of the pool."""
    if kind == "iid":
        _check(len(labels), n_sites, min_size)
        return iid_partition(len(labels), n_sites, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, n_sites, alpha, seed, min_size)
    if kind == "quantity":
        return quantity_partition(len(labels), n_sites, quantity_alpha, seed, min_size)
    raise PartitionError(f"partition={kind!r}: allowed are iid, dirichlet, quantity")


# ---------------------------------------------------------------------- measures


def label_counts(labels: Sequence[str], parts: Sequence[np.ndarray]) -> pd.DataFrame:
    """hospitals x labels: how many cases of each label each hospital holds."""
    y = np.asarray([str(v) for v in labels])
    classes = sorted(set(y.tolist()))
    rows = [[int((y[p] == c).sum()) for c in classes] for p in parts]
    return pd.DataFrame(rows, columns=classes, index=[f"site-{i}" for i in range(len(parts))])


def label_skew(labels: Sequence[str], parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each hospital's label mix and the pool's:
    0 for identical mixes, near 1 when every hospital holds labels the others lack."""
    counts = label_counts(labels, parts).to_numpy(dtype=float)
    pool = counts.sum(0) / counts.sum()
    mixes = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(mixes - pool).sum(1).mean())


# ---------------------------------------------------------------------- site folders


@dataclass(frozen=True)
class PoolCase:
    """One manifest row of the pool, with where it came from."""

    source: Path  # the site folder it was read from
    source_name: str
    record: dict[str, str]


def read_pool(site_dirs: Sequence[Path]) -> list[PoolCase]:
    """Every manifest row of the given site folders, in order (bad rows included: the new
    hospitals report and skip them when they are opened)."""
    cases: list[PoolCase] = []
    names = unique_names([Path(d) for d in site_dirs])
    for d, name in zip(site_dirs, names, strict=True):
        d = Path(d)
        manifest = d / MANIFEST
        if not manifest.is_file():
            raise PartitionError(f"site folder {str(d)!r} has no {MANIFEST}")
        try:
            frame = pd.read_csv(
                manifest, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig"
            )
        except Exception as exc:  # parser, decoding and IO errors alike
            raise PartitionError(f"{manifest} could not be read as CSV: {exc}") from None
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        for rec in frame.fillna("").astype(str).to_dict("records"):
            if not any(v.strip() for v in rec.values()):
                continue
            cases.append(PoolCase(source=d.resolve(), source_name=name, record=rec))
    return cases


def unique_names(dirs: Sequence[Path]) -> list[str]:
    """A folder name for each of `dirs`: its own, with -2, -3... where two share one."""
    seen: dict[str, int] = {}
    out = []
    for d in dirs:
        base = d.resolve().name or "site"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def site_folder_names(n_sites: int) -> list[str]:
    width = max(2, len(str(n_sites - 1)))
    return [f"site-{i:0{width}d}" for i in range(n_sites)]


def hospital_splits(n: int, seed: int, site: int) -> list[str]:
    """A fresh 70/15/15 split of one new hospital, with at least one val and one test case
    when it has three or more."""
    order = np.random.default_rng([seed, 19, site]).permutation(n)
    n_val = max(1, round(n * SPLIT_SHARES[1])) if n >= 3 else 0
    n_test = max(1, round(n * SPLIT_SHARES[2])) if n >= 3 else 0
    n_train = n - n_val - n_test
    out = [""] * n
    for rank, i in enumerate(order):
        out[int(i)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def _place_image(case: PoolCase, site_dir: Path, link: Literal["hardlink", "copy"]) -> str:
    """Link (or copy) the case's image into the new site; return its path there. A path
    that is unusable in the source (missing, absolute, outside the folder) is kept as it
    was, so the new hospital reports that row as bad, as the old one would have."""
    raw = case.record.get("image", "").strip().replace("\\", "/")
    norm = posixpath.normpath(raw) if raw else ""
    if not raw or raw.startswith("/") or norm == ".." or norm.startswith("../"):
        return raw
    src = case.source / norm
    try:
        inside = src.resolve().is_relative_to(case.source)
    except OSError:
        inside = False
    if not inside or not src.is_file():
        return raw
    rel = posixpath.join("images", case.source_name, norm)
    dst = site_dir / rel
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link == "hardlink":
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed: copy
                shutil.copy2(src, dst)
        else:
            shutil.copy2(src, dst)
    return rel


def write_partitioned_sites(
    pool: Sequence[PoolCase],
    parts: Sequence[np.ndarray],
    out_dir: Path,
    *,
    seed: int,
    link: Literal["hardlink", "copy"] = "hardlink",
) -> list[Path]:
    """Write hospital i as `out_dir/site-i` (format v1); return the folders in order.

    Case ids become `<source site>:<case_id>` (unique across the pool); the report, label
    and box are kept; every hospital gets its own split column."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for i, (name, idx) in enumerate(zip(site_folder_names(len(parts)), parts, strict=True)):
        site_dir = out_dir / name
        if site_dir.exists():
            shutil.rmtree(site_dir)
        site_dir.mkdir(parents=True)
        splits = hospital_splits(len(idx), seed, i)
        rows = []
        for k, j in enumerate(idx):
            case = pool[int(j)]
            rec = case.record
            cid = rec.get("case_id", "").strip()
            rows.append(
                [
                    f"{case.source_name}:{cid}" if cid else "",
                    _place_image(case, site_dir, link),
                    rec.get("report", ""),
                    rec.get("label", ""),
                    splits[k],
                    *(rec.get(c, "") for c in BOX_COLUMNS),
                ]
            )
        with (site_dir / MANIFEST).open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(OUT_COLUMNS)
            writer.writerows(rows)
        folders.append(site_dir)
    return folders
