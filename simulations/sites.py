"""The simulated hospitals: written (synthetic), linked (given folders) or re-partitioned
under OUT/sites/, then opened here for the baselines and the final tests.

    sites/synthetic/          the synthetic hospitals of [sites] source = "synthetic"
    sites/natural/            links to the given site folders (source = "folders")
    sites/PARTITION-N/        N hospitals re-partitioned from either (iid, dirichlet...)

Each folder carries a stamp of what made it: the same settings reuse it, others rewrite it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from client.site import list_sites
from shared_model.config import MANIFEST
from shared_model.dataset import SiteData, SiteError, open_site
from shared_model.files import atomic_write_text
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.synth import FEDERATION_GENERATOR, SynthConfig, write_federation
from simulations.config import SimulationConfig
from simulations.experiments.context import PreparedSites, SimulationError
from simulations.partition import (
    PartitionError,
    label_skew,
    partition,
    read_pool,
    unique_names,
    write_partitioned_sites,
)
from simulations.sections import later_defaults

SITES_DIR = "sites"
STAMP_FILE = ".medfuse-sites.json"
MAX_LISTED_SITES = 12  # more hospitals than this: one summary line per split


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / STAMP_FILE
    try:
        return json.loads(path.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _write_stamp(folder: Path, stamp: dict) -> None:
    atomic_write_text(folder / STAMP_FILE, json.dumps(stamp, indent=2, sort_keys=True))


def _synthetic_sites(cfg: SimulationConfig, root: Path, echo: Callable[[str], None]) -> Path:
    s = cfg.sites
    synth = SynthConfig(
        sites=s.count,
        cases_per_site=s.cases_per_site,
        seed=s.seed,
        label_skew=s.label_skew or None,
        label_mix=s.label_mix,
        image_size=cfg.model.image_size,
        difficulty=s.difficulty,
        style=s.style,
    )
    # style and label_mix count only when not the default: older stamps still match
    stamp = {"synthetic": synth.model_dump(mode="json", exclude=later_defaults(synth)),
        "generator": FEDERATION_GENERATOR}  # sites of an older generator are rewritten
    base = root / "synthetic"
    if base.is_dir() and _stamp_matches(base, stamp) and len(list_sites(base)) == s.count:
        echo(f"sites: {s.count} synthetic hospitals already in {base}")
        return base
    if base.exists():
        shutil.rmtree(base)
    t0 = time.monotonic()
    write_federation(base, synth)
    _write_stamp(base, stamp)
    echo(
        f"sites: wrote {s.count} synthetic hospitals ({s.cases_per_site} cases each on "
        f"average, label skew alpha {s.label_skew or 'none'}, {cfg.model.image_size} px) "
        f"to {base} in {time.monotonic() - t0:.0f} s"
    )
    return base


def _linked_folders(folders: Sequence[Path], root: Path) -> Path:
    """One folder of links to the given site folders (the ClientApps read one sites-dir)."""
    for f in folders:
        if not Path(f).is_dir():
            raise SimulationError(f"site folder {str(f)!r} does not exist")
        if not (Path(f) / MANIFEST).is_file():
            raise SimulationError(
                f"site folder {str(f)!r} has no manifest.csv (a site is a folder holding "
                "manifest.csv and the images it names, dataset format v1)"
            )
    base = root / "natural"
    if base.exists():
        shutil.rmtree(base)  # links only: rmtree never follows them
    base.mkdir(parents=True)
    for f, name in zip(folders, unique_names([Path(f) for f in folders]), strict=True):
        os.symlink(Path(f).resolve(), base / name, target_is_directory=True)
    return base


def prepare_sites(cfg: SimulationConfig, out: Path, echo: Callable[[str], None]) -> PreparedSites:
    """Write, link or re-partition the hospitals; return the sites-dir and its folders."""
    root = out / SITES_DIR
    root.mkdir(parents=True, exist_ok=True)
    s = cfg.sites
    if s.source == "synthetic":
        natural_root = _synthetic_sites(cfg, root, echo)
        natural = list_sites(natural_root)
    else:
        natural_root = _linked_folders(s.folders, root)
        natural = list_sites(natural_root)
    if s.partition == "natural":
        return PreparedSites(root=natural_root, dirs=natural)

    assert s.hospitals is not None
    manifests = [d / MANIFEST for d in natural]
    stamp = {
        "partition": s.model_dump(
            mode="json",
            include={
                "partition",
                "hospitals",
                "alpha",
                "quantity_alpha",
                "min_cases",
                "seed",
                "link",
            },
        ),
        "pool": [[str(m.resolve()), m.stat().st_size, m.stat().st_mtime_ns] for m in manifests],
    }
    base = root / f"{s.partition}-{s.hospitals}"
    if base.is_dir() and _stamp_matches(base, stamp) and len(list_sites(base)) == s.hospitals:
        echo(f"sites: {s.hospitals} re-partitioned hospitals already in {base}")
        return PreparedSites(root=base, dirs=list_sites(base))
    if base.exists():
        shutil.rmtree(base)
    t0 = time.monotonic()
    try:
        pool = read_pool(natural)
        labels = [c.record.get("label", "").strip() for c in pool]
        parts = partition(
            s.partition,
            labels,
            s.hospitals,
            seed=s.seed,
            alpha=s.alpha,
            quantity_alpha=s.quantity_alpha,
            min_size=s.min_cases,
        )
        write_partitioned_sites(pool, parts, base, seed=s.seed, link=s.link)
    except PartitionError as exc:
        raise SimulationError(f"sites.partition={s.partition!r}: {exc}") from None
    _write_stamp(base, stamp)
    sizes = sorted(len(p) for p in parts)
    how = {
        "iid": "IID",
        "dirichlet": f"Dirichlet label skew alpha {s.alpha}",
        "quantity": f"quantity skew alpha {s.quantity_alpha}",
    }[s.partition]
    echo(
        f"sites: {len(pool)} cases of {len(natural)} site folder(s) re-partitioned into "
        f"{s.hospitals} hospitals ({how}): sizes {sizes[0]}..{sizes[-1]} (median "
        f"{sizes[len(sizes) // 2]}), label-mix distance from the pool "
        f"{label_skew(labels, parts):.2f}; written to {base} in "
        f"{time.monotonic() - t0:.0f} s"
    )
    return PreparedSites(root=base, dirs=list_sites(base))


def open_sites(
    cfg: SimulationConfig, sites: PreparedSites, echo: Callable[[str], None], max_listed: int = 5
) -> list[SiteData]:
    """Open every hospital here (baselines and final tests); bad rows are listed and
    skipped; a hospital that cannot be used at all stops the simulation before training."""
    model = cfg.model_for(cfg.experiments[0])
    tokenizer = Tokenizer(model.vocab_size)
    opened = []
    many = len(sites.dirs) > MAX_LISTED_SITES
    for d in sites.dirs:
        try:
            site = open_site(d, labels=cfg.label_set, model=model, tokenizer=tokenizer)
        except SiteError as exc:
            raise SimulationError(f"hospital {d.name} ({d}) cannot be used: {exc}") from None
        bad = site.summary.bad_rows
        line = (
            f"  {d.name}: {len(site.train)} train / {len(site.val)} val / "
            f"{len(site.test)} test cases"
        )
        if bad:
            line += f"; {len(bad)} bad row(s) skipped"
        if bad or not many:
            echo(line)
        for b in bad[:max_listed]:
            echo(f"    row {b.row} ({b.case_id or 'no case_id'}): {b.reason}")
        if len(bad) > max_listed:
            echo(f"    ... and {len(bad) - max_listed} more (medfuse data check {d})")
        opened.append(site)
    if many:
        for split in ("train", "val", "test"):
            n = sorted(len(getattr(s, split)) for s in opened)
            echo(
                f"  {split} cases per hospital: {n[0]}..{n[-1]} (median {n[len(n) // 2]}, "
                f"total {sum(n)})"
            )
    return opened
