"""`medfuse data check` output and exit codes, rendered from real (tiny) site folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from client.data_check import exit_code, render_summary
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import SiteSummary, check_site

MODEL = ModelConfig(image_size=16)


def make_site(root: Path, *, bad: bool) -> Path:
    """Four good train cases and a val case; with `bad`, two unusable rows as well."""
    root.mkdir(parents=True)
    rows = []
    for i in range(5):
        Image.fromarray(np.full((20, 24), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(
            {
                "case_id": f"c{i}",
                "image": f"{i}.png",
                "report": "clear lungs",
                "label": "normal" if i % 2 else "nodule",
                "split": "val" if i == 4 else "train",
            }
        )
    if bad:
        rows.append({"case_id": "c9", "image": "gone.png", "report": "", "label": "normal"})
        rows.append({"case_id": "c[x]", "image": "0.png", "report": "", "label": "[flu]"})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return root


def check(path: Path, strict: bool = False) -> SiteSummary:
    return check_site(path, labels=DEFAULT_LABELS, model=MODEL, tokenizer=None, strict=strict)


def test_render_shows_counts_formats_and_bad_rows(tmp_path: Path) -> None:
    # Prepare
    summary = check(make_site(tmp_path / "site-a", bad=True))
    console = Console(record=True, width=120)

    # Execute
    render_summary(summary, console)
    text = console.export_text()

    # Assert
    assert "site site-a" in text
    assert "png 8-bit grey x 5" in text
    assert "24x20 x 5" in text
    assert "missing image file 'gone.png'" in text
    assert "unknown label '[flu]'" in text  # manifest text is not read as rich markup
    assert "c[x]" in text
    nodule = next(line for line in text.splitlines() if line.startswith("│ nodule"))
    assert [c.strip() for c in nodule.split("│")[2:6]] == ["2", "1", "0", "3"]
    assert "2 unusable row(s)" in text
    assert any(
        line.split() == ["│", "7", "│", "c9", "│", "missing", "image", "file", "'gone.png'", "│"]
        for line in text.splitlines()
    )
    assert "USABLE: 5 of 7 rows usable, 2 unusable row(s) will be skipped" in text


def test_render_an_unusable_site_says_why(tmp_path: Path) -> None:
    # Prepare
    summary = check(tmp_path / "nowhere")
    console = Console(record=True, width=120)

    # Execute
    render_summary(summary, console)
    text = console.export_text()

    # Assert
    assert "NOT USABLE" in text and "does not exist" in text


def test_exit_codes(tmp_path: Path) -> None:
    # Prepare
    clean = check(make_site(tmp_path / "clean", bad=False))
    with_bad = check(make_site(tmp_path / "bad", bad=True))
    missing = check(tmp_path / "missing")

    # Execute / Assert
    assert exit_code([clean, with_bad], strict=False) == 0
    assert exit_code([clean, with_bad], strict=True) == 1
    assert exit_code([clean], strict=True) == 0
    assert exit_code([clean, missing], strict=False) == 1


def _text_only_site(root: Path) -> Path:
    """Four train reports and a val report, no image at all."""
    root.mkdir(parents=True)
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "image", "report", "label", "split"])
        writer.writerows([f"t{i}", "", "clear lungs", "normal", "val" if i == 4 else "train"]
                         for i in range(5))
    return root


def test_a_text_only_site_is_said_to_be_one(tmp_path: Path) -> None:
    # Prepare
    site = _text_only_site(tmp_path / "site-t")
    text_model = ModelConfig(image_size=16, modality="text", generation=False)
    console, fused_console = Console(record=True, width=200), Console(record=True, width=200)

    # Execute
    render_summary(check_site(site, labels=DEFAULT_LABELS, model=text_model, tokenizer=None),
                   console)
    render_summary(check(site), fused_console)

    # Assert: for a text model it is usable and TEXT-ONLY; for the fused model every row
    # is bad, and the check says how to check it as a text-only site
    text, fused = console.export_text(), fused_console.export_text()
    assert "TEXT-ONLY site: none of its 5 usable rows has an image" in text
    assert "USABLE: 5 of 5 rows usable" in text
    assert "5 row(s) have no image: a text-only site?" in fused
    assert "--modality text" in fused and "NOT USABLE" in fused
