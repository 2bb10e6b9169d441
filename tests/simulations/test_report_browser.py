"""report.html as a reader sees it: a small report from a hand-built run folder (no
training), opened in headless Chromium. Every figure shows a picture (no blank or empty
one), the sections and labels a reader looks for are there, and a screenshot is kept."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from simulations import report
from simulations.report import results_frame, write_report
from tests.server.test_dashboard import CHROMIUM, _chromium, _text
from tests.simulations.test_report import META, SITES, _table

CASES = {"site-00": 30, "site-01": 45}  # each hospital's test cases
AUDITED = ("pooled", "fedavg")
HEADINGS = ("Mean over hospitals", "Accuracy per hospital", "Membership inference", "Plots",
            "Learning curves per experiment")


def _roc(site: str, lift: float) -> SimpleNamespace:
    """An attack result as client.audit returns it (what write_roc_points reads)."""
    fpr = np.linspace(0.0, 1.0, 21)
    return SimpleNamespace(site=site, attack="loss", fpr=fpr,
                           tpr=np.clip(fpr + lift * np.sin(np.pi * fpr), 0.0, 1.0))


def _run_folder(out: Path) -> Path:
    """One seed of test_report's table, with each hospital's test cases, an audit of two
    experiments and the ROC points their seed folders keep: a run folder as `medfuse
    simulate` leaves it, without training."""
    rows = [tuple(r) for r in _table().itertuples(index=False) if r.seed == 0]
    rows += [(exp, 0, 0, site, report.TEST_CASES, n)
             for exp in META["experiment"] for site, n in CASES.items()]
    for exp in AUDITED:
        for i, site in enumerate(SITES):
            rows += [(exp, 0, 2, site, f"{report.AUDIT}loss-{key}", value)
                     for key, value in (("auc", 0.55 + 0.05 * i), ("auc-lo", 0.45),
                                        ("auc-hi", 0.65), ("tpr@1%fpr", 0.02))]
        folder = out / report.RUN_EXPERIMENTS_DIR / exp / "seed-0"
        folder.mkdir(parents=True)
        report.write_roc_points([_roc(s, 0.05 * (i + 1)) for i, s in enumerate(SITES)], folder)
    write_report(results_frame(rows), out, meta=META, title="browser check")
    return out / report.REPORT_FILE


def _pictures(dom: str) -> list[tuple[str, Image.Image]]:
    """(alt text, decoded picture) of every embedded image in the dumped DOM."""
    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]*)"', dom)
    return [(alt, Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            for alt, data in found]


def _blank(picture: Image.Image) -> bool:
    """A single colour (white, or anything else): a figure that drew nothing."""
    low, high = zip(*picture.getextrema(), strict=True)
    return low == high


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here "
                    "(`make browser` installs it as root with apt-get)")
def test_the_report_shows_every_figure_and_label_in_headless_chromium(tmp_path: Path):
    """Its screenshot is kept as an artefact: `report.png` under pytest's tmp_path, and a
    copy in the folder `$MEDFUSE_ARTIFACTS` names when that variable is set."""
    # Prepare
    page = _run_folder(tmp_path / "run")
    shot = tmp_path / "report.png"

    # Execute
    dom = _chromium("--dump-dom", page.as_uri())
    _chromium(f"--screenshot={shot}", "--window-size=1200,5000", page.as_uri())
    if os.environ.get("MEDFUSE_ARTIFACTS"):
        kept = Path(os.environ["MEDFUSE_ARTIFACTS"])
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, kept / shot.name)

    # Assert: every figure holds a decodable, non-blank picture and a caption
    figures = re.findall(r"<figure>(.*?)</figure>", dom, flags=re.DOTALL)
    pictures = _pictures(dom)
    assert figures and len(pictures) == len(figures) == dom.count("<img")
    for alt, picture in pictures:
        assert min(picture.size) > 0 and not _blank(picture), alt
    assert all(re.search(r"<figcaption>\s*\S", f) for f in figures)
    # the ROC of the audit among them, its verdict and table beside it
    titles = [alt for alt, _ in pictures]
    assert "membership inference: ROC of the loss attack per hospital" in titles
    assert {f"learning curves: {e}" for e in META["experiment"]} <= set(titles)
    text = _text(dom)
    for heading in HEADINGS:
        assert re.search(rf"<h2>{heading}</h2>", dom), heading
    for exp in META["experiment"]:
        assert exp in text
    assert "NO MEASURABLE LEAK" in text and "membership" in text.lower()
    # each mean with its interval, and what it is over: hospitals and their test cases
    assert re.search(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\] \(0\.\d{3}–0\.\d{3}\)", text)
    assert "2 × 1; 30–45 test cases each" in text
    assert "<th>hospital</th><th>test cases</th>" in dom
    assert all(f"<td>{site}</td><td>{n}</td>" in dom for site, n in CASES.items())
    assert "<td>mean</td><td>75 in all</td>" in dom
    # the screenshot shows a page, not a blank window
    assert shot.read_bytes().startswith(b"\x89PNG") and not _blank(Image.open(shot).convert("RGB"))
    print(f"\nscreenshot: {shot}")
