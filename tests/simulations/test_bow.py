"""The bag-of-words baseline (kind = "bow"): it learns what the words say, and is scored
on each hospital's test split with the same exact summary as the other experiments."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from shared_model.config import ModelConfig
from shared_model.contract import wire
from shared_model.dataset import open_site
from shared_model.tokenizer import Tokenizer
from simulations import report
from simulations.experiments.bow import Texts, class_probs, fit_bow, scored_rows
from simulations.experiments.context import Unit
from simulations.sections import Experiment

LABELS = ("normal", "effusion", "nodule")
TEXT_MODEL = ModelConfig(image_size=16, modality="text", generation=False,
                         num_classes=len(LABELS))
WORDS = {"normal": "lungs are clear heart normal", "effusion": "large pleural effusion",
         "nodule": "small nodule in the upper lobe"}


def _toy(n: int, offset: int = 0) -> Texts:
    labels = [k % len(LABELS) for k in range(offset, offset + n)]
    return Texts(tuple(f"{WORDS[LABELS[k]]} case {i}" for i, k in enumerate(labels)),
                 np.array(labels, dtype=np.int64))


def _write_site(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A text-only site: (report, label, split) per row, no image."""
    folder.mkdir(parents=True)
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "image", "report", "label", "split"])
        writer.writerows([f"c{i}", "", r, lab, s] for i, (r, lab, s) in enumerate(rows))
    return folder


def test_bow_learns_a_trivially_separable_toy_set() -> None:
    # Prepare: each label has its own words
    train, val, test = _toy(30), _toy(6, 1), _toy(9, 2)

    # Execute
    model, c = fit_bow(train, val, len(LABELS), seed=0)
    probs = class_probs(model, test.reports, len(LABELS))

    # Assert
    assert np.array_equal(probs.argmax(1), test.labels)
    assert np.allclose(probs.sum(1), 1.0) and c > 0


def test_a_label_missing_from_training_gets_probability_zero() -> None:
    # Prepare: no nodule report to learn from
    train = Texts(_toy(30).reports[:20], _toy(30).labels[:20])
    keep = train.labels != 2

    # Execute
    model, _ = fit_bow(Texts(tuple(np.array(train.reports)[keep]), train.labels[keep]),
                       Texts((), np.zeros(0, dtype=np.int64)), len(LABELS), seed=0)

    # Assert: a full (N, 3) table, the absent class at 0
    probs = class_probs(model, ["small nodule"], len(LABELS))
    assert probs.shape == (1, 3) and probs[0, 2] == 0.0


def test_bow_is_scored_on_the_test_split_only(tmp_path: Path) -> None:
    # Prepare: a text-only hospital whose train and val reports agree with their labels,
    # and whose test split holds one report labelled against its words (a wrong label)
    rows = [(WORDS[LABELS[k % 3]], LABELS[k % 3], "train") for k in range(18)]
    rows += [(WORDS[LABELS[k % 3]], LABELS[k % 3], "val") for k in range(3)]
    rows += [(WORDS["normal"], "normal", "test"), (WORDS["effusion"], "effusion", "test"),
             (WORDS["nodule"], "effusion", "test")]
    site = open_site(_write_site(tmp_path / "site-00", rows), labels=LABELS,
                     model=TEXT_MODEL, tokenizer=Tokenizer(TEXT_MODEL.vocab_size))
    model, _ = fit_bow(Texts.of([site.train]), Texts.of([site.val]), len(LABELS), seed=0)
    unit = Unit(Experiment(name="bow", series="bow", kind="bow", modality="text",
                           strategy="fedavg", dp=False, epsilon=None, rounds=None,
                           run_config={}), 0)

    # Execute
    rows_out = scored_rows(unit, model, [site], 1)

    # Assert: 2 of the 3 test cases right (train accuracy would be 1.0), per-label AUROC
    # keyed by the label set (nodule has no positive in the test split: NaN), no DP
    values = {m: v for (_, _, _, s, m, v) in rows_out if s == "site-00"}
    assert values[report.TEST + wire.M_ACCURACY] == pytest.approx(2 / 3)
    assert values[report.TEST + "auroc-normal"] == pytest.approx(1.0)
    assert math.isnan(values[report.TEST + "auroc-nodule"])
    assert values[report.EPSILON] == math.inf
    assert report.TEST + wire.M_MACRO_F1 in values
