"""The report branch's attention over a few test reports, and its place in report.html."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from shared_model.config import ModelConfig
from shared_model.dataset import open_site
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from simulations import report
from simulations.experiments.attention import ATTENTION_FILE, pick_cases, write_attention

LABELS = ("normal", "effusion")
TEXT_MODEL = ModelConfig(image_size=16, modality="text", generation=False, num_classes=2)


def _site(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = [("clear lungs", "normal", "train"), ("large effusion", "effusion", "train"),
            ("lungs clear no effusion", "normal", "test"),
            ("left pleural effusion", "effusion", "test"), ("clear", "normal", "test")]
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "image", "report", "label", "split"])
        writer.writerows([f"c{i}", "", r, lab, s] for i, (r, lab, s) in enumerate(rows))
    return folder


def test_the_first_test_report_of_each_label_is_kept_with_a_weight_per_word(tmp_path: Path):
    # Prepare
    site = open_site(_site(tmp_path / "site-00"), labels=LABELS, model=TEXT_MODEL,
                     tokenizer=Tokenizer(TEXT_MODEL.vocab_size))
    state = MedFuseModel(TEXT_MODEL).state_dict()

    # Execute
    path = write_attention(tmp_path, TEXT_MODEL, state, [site])

    # Assert: one report per label, each word weighed, the weights a distribution
    cases = json.loads(Path(path).read_text())
    assert [i for _, i in pick_cases([site])] == [0, 1]
    assert [c["label"] for c in cases] == ["normal", "effusion"]
    assert cases[1]["words"] == ["left", "pleural", "effusion"]
    assert len(cases[1]["weights"]) == 3 and sum(cases[1]["weights"]) == pytest.approx(1, abs=1e-3)


def test_report_html_shades_the_words(tmp_path: Path):
    # Prepare: an experiment folder holding an attention file
    seed = tmp_path / "experiments" / "pooled" / "seed-0"
    seed.mkdir(parents=True)
    (seed / ATTENTION_FILE).write_text(json.dumps([{
        "site": "h1", "case_id": "c1", "label": "effusion", "predicted": "effusion",
        "probability": 0.9, "words": ["small", "effusion"], "weights": [0.2, 0.8],
        "left_out": 0}]))
    results = report.results_frame([("pooled", 0, 1, "h1", "test/accuracy", 1.0)])

    # Execute
    html = report.write_report(results, tmp_path).report_html.read_text()

    # Assert: the heaviest word fully shaded, the other in proportion
    assert report.shaded_words(["a", "b"], [0.2, 0.8]) == [("a", 0.25), ("b", 1.0)]
    assert "Where the report branch looks" in html
    assert 'rgba(230, 110, 0, 1.0)">effusion</span>' in html
    assert 'rgba(230, 110, 0, 0.25)">small</span>' in html
