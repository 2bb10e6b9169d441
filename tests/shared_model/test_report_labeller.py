"""The report labeller against synthetic reports in every style, and hand-made negations."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.report_labeller import read_finding
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.synth import PublicConfig, public_style, render_case, site_style

TOKENIZER = Tokenizer(ModelConfig().vocab_size)
AGREEMENT_BOUND = 0.97  # measured 0.992 here (seed 0); 0.80 without negation cues


def _decoded(text: str) -> list[str]:
    """The report as the metrics see it: encoded and decoded (no punctuation, OOV ids)."""
    return TOKENIZER.decode(TOKENIZER.encode(text, 10_000))


def _styles() -> list:
    """Every report style a federation or the public corpus writes: the five house
    styles (sites 0-4 of one seed cycle through them), both unseen ones, the archive's
    three."""
    house = [site_style(0, i) for i in range(5)]
    unseen = [site_style(0, i, "unseen") for i in range(2)]
    public = [public_style(PublicConfig(), s) for s in range(3)]
    return house + unseen + public


STYLES = _styles()


def test_every_style_is_covered() -> None:
    assert len({s.report.name for s in STYLES}) == 10


def test_agrees_with_the_true_label_on_informative_synthetic_reports() -> None:
    # Prepare: cases of every label at every style; the informative reports state their
    # finding (vague and uninformative ones do not, by design)
    rng = np.random.default_rng(0)
    read, truth = [], []
    for k in range(1500):
        style = STYLES[k % len(STYLES)]
        label = DEFAULT_LABELS[int(rng.integers(len(DEFAULT_LABELS)))]
        case = render_case(np.random.default_rng([0, k]), label, style, 16)
        if case.report_mode != "informative":
            continue
        # Execute
        read.append(read_finding(_decoded(case.report), DEFAULT_LABELS))
        truth.append(label)
    # Assert
    agreement = float(np.mean([r == t for r, t in zip(read, truth, strict=True)]))
    assert len(truth) > 700
    assert agreement >= AGREEMENT_BOUND, agreement
    # every label is read, and each mostly right
    for label in DEFAULT_LABELS:
        mine = [r for r, t in zip(read, truth, strict=True) if t == label]
        assert np.mean([r == label for r in mine]) >= 0.9, label



@pytest.mark.parametrize(("report", "expected"), [
    ("No pleural effusion. The heart is enlarged.", "cardiomegaly"),
    ("Effusion resolved.", "normal"),
    ("no effusion", "normal"),
    ("The effusion previously noted has now cleared. Clear lungs.", "normal"),
    ("History of pneumonia, resolved. No focal consolidation.", "normal"),
    ("Hx of pneumonia. Right pleural effusion. IMPRESSION: Effusion.", "effusion"),
    ("No nodules or masses. No consolidation.", "normal"),
    ("Negative for nodules. RLL consolidation c/w pneumonia.", "pneumonia"),
    ("Pneumonia: none. Nodule: none. 12 mm nodule in the RUL.", "nodule"),
    ("Pleural spaces free of fluid. Cardiomegaly.", "cardiomegaly"),
    ("The heart is not enlarged. Patchy airspace opacity in the left lower lobe.", "pneumonia"),
    ("hx cough. cm.", "cardiomegaly"),  # a history cue reaches the very next word only
    ("prior cm, now nl.", "normal"),
    ("rul nodule 2 cm. hrt nl.", "nodule"),  # "cm" after a number is a unit
    ("no focal opacity. cm.", "cardiomegaly"),  # a negation is spent on its own finding
    ("Previously seen nodule no longer visualized.", "normal"),
    ("Consolidation is absent.", "normal"),
    ("Comparison with prior.", "normal"),
    ("", "normal"),
])
def test_hand_made_reports(report: str, expected: str) -> None:
    assert read_finding(_decoded(report), DEFAULT_LABELS) == expected


def test_a_label_without_terms_or_not_asked_for_is_never_returned() -> None:
    # Prepare
    words = _decoded("Large right pneumothorax. Cardiomegaly.")
    # Execute / Assert: no terms for pneumothorax; cardiomegaly only where asked for
    assert read_finding(words, (*DEFAULT_LABELS, "pneumothorax")) == "cardiomegaly"
    assert read_finding(words, ("normal", "pneumothorax")) == "normal"
    assert read_finding(words, ("normal", "nodule")) == "normal"


def test_the_most_mentioned_finding_wins_then_the_first() -> None:
    more = _decoded("Small nodule. Pleural effusion. IMPRESSION: Pleural effusion.")
    tie = _decoded("Small nodule. Pleural effusion.")
    assert read_finding(more, DEFAULT_LABELS) == "effusion"
    assert read_finding(tie, DEFAULT_LABELS) == "nodule"
