"""The OpenI reports are CC BY-NC-ND: neither they nor anything derived from them may be in
the repository. The attack: every sentence of the real reports (where the cache holds
them) looked for in every tracked file, and the names a real import writes looked for in
the tracked paths."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from simulations.importers.openi import iter_archive, parse_report

ROOT = Path(__file__).resolve().parents[1]
REAL_OPENI = Path.home() / ".cache" / "medfuse" / "public-tables" / "NLMCXR_reports.tgz"
MIN_SENTENCE = 40  # characters: shorter sentences ("No pneumothorax.") are common English
DERIVED_NAMES = re.compile(r"NLMCXR|ecgen-radiology|openi-text|\.xml$", re.IGNORECASE)


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [ROOT / p for p in out.split("\0") if p]


def _sentences(text: str) -> set[str]:
    """Lower-cased, space-normalised sentences of at least MIN_SENTENCE characters."""
    flat = " ".join(text.lower().split())
    return {s.strip() for s in re.split(r"(?<=[.;:])\s+", flat) if len(s.strip()) >= MIN_SENTENCE}


def test_no_tracked_path_is_a_real_report_or_an_import_of_one() -> None:
    named = [str(p.relative_to(ROOT)) for p in _tracked()
             if DERIVED_NAMES.search(p.name) or "openi-text" in str(p)]
    assert named == []


def test_no_sentence_of_the_real_reports_is_in_the_repository() -> None:
    if not REAL_OPENI.is_file():
        pytest.skip(f"no {REAL_OPENI.name} in {REAL_OPENI.parent} "
                    "(scripts/fetch-public-tables.sh fetches it)")
    real: set[str] = set()
    for member, xml in iter_archive(REAL_OPENI):
        for _, text in parse_report(xml, member).sections:
            real |= _sentences(text)
    assert len(real) > 1000  # the archive was read

    found = {}
    for path in _tracked():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files hold no report text
        if hits := _sentences(text) & real:
            found[str(path.relative_to(ROOT))] = sorted(hits)[:3]
    assert found == {}
