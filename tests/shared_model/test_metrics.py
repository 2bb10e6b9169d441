"""Metrics against hand-worked examples (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared_model.contract import wire
from shared_model.contract.metric_registry import BY_NAME
from shared_model.metrics import bleu4, classification_metrics, mean_iou, rouge_l
from shared_model.train import CaseResults


def one_hot_probs(pred: list[int], num_classes: int) -> np.ndarray:
    """Probabilities whose arg-max is `pred` (0.6 on the predicted class)."""
    probs = np.full((len(pred), num_classes), 0.4 / (num_classes - 1))
    probs[np.arange(len(pred)), pred] = 0.6
    return probs


def test_accuracy_and_macro_f1_six_samples_three_classes() -> None:
    # Prepare
    # y_true = 0 0 1 1 2 2, pred = 0 1 1 1 2 0: 4 of 6 right, accuracy = 2/3.
    # class 0: TP 1, FP 1 (row 5), FN 1 (row 1): P 1/2, R 1/2, F1 1/2
    # class 1: TP 2, FP 1 (row 1), FN 0:         P 2/3, R 1,   F1 2(2/3)/(5/3) = 4/5
    # class 2: TP 1, FP 0, FN 1 (row 5):         P 1,   R 1/2, F1 2(1/2)/(3/2) = 2/3
    # macro-F1 = (1/2 + 4/5 + 2/3) / 3 = (15 + 24 + 20) / 90 = 59/90
    y_true = np.array([0, 0, 1, 1, 2, 2])
    pred = [0, 1, 1, 1, 2, 0]

    # Execute
    three = classification_metrics(y_true, one_hot_probs(pred, 3), 3)
    five = classification_metrics(y_true, one_hot_probs(pred, 5), 5)

    # Assert
    assert three[wire.M_ACCURACY] == pytest.approx(2 / 3)
    assert three[wire.M_MACRO_F1] == pytest.approx(59 / 90)
    # classes 3 and 4 are neither present nor predicted: left out of the macro average
    assert five[wire.M_MACRO_F1] == pytest.approx(59 / 90)
    assert set(three) == {wire.M_ACCURACY, wire.M_MACRO_F1, wire.M_AUROC}


def test_auroc_macro_one_vs_rest_by_hand() -> None:
    # Prepare: classes 0 and 1 present, class 2 absent (left out of the mean).
    # class 0: positives (rows 0,1) score 0.9, 0.4; negatives (rows 2,3) 0.6, 0.2.
    #   pairs pos > neg: 0.9>0.6 y, 0.9>0.2 y, 0.4>0.6 n, 0.4>0.2 y -> 3/4
    # class 1: positives (rows 2,3) score 0.35, 0.1; negatives (rows 0,1) 0.05, 0.5.
    #   pairs: 0.35>0.05 y, 0.35>0.5 n, 0.1>0.05 y, 0.1>0.5 n -> 2/4
    # macro AUROC = (3/4 + 1/2) / 2 = 0.625
    y_true = np.array([0, 0, 1, 1])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.4, 0.5, 0.1],
            [0.6, 0.35, 0.05],
            [0.2, 0.1, 0.7],
        ]
    )

    # Execute
    out = classification_metrics(y_true, probs, 3)

    # Assert
    assert out[wire.M_AUROC] == pytest.approx(0.625)


def test_auroc_is_nan_for_a_site_with_one_class() -> None:
    # a site holding one class has no negatives to rank against
    out = classification_metrics(np.array([1, 1, 1]), one_hot_probs([1, 0, 1], 3), 3)

    assert math.isnan(out[wire.M_AUROC])
    assert out[wire.M_ACCURACY] == pytest.approx(2 / 3)


def test_classification_metrics_refuse_mismatched_probs() -> None:
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1]), np.zeros((2, 4)), 3)


def test_mean_iou_over_lesion_cases_only() -> None:
    # Prepare
    # row 0 identical boxes: IoU 1
    # row 1 disjoint boxes: IoU 0
    # row 2 [0,0,.4,.4] vs [.2,.2,.6,.6]: inter .2*.2 = .04, union .16+.16-.04 = .28 -> 1/7
    # row 3 has no lesion: left out whatever the prediction
    # mean over rows 0-2 = (1 + 0 + 1/7) / 3 = 8/21
    pred = np.array(
        [[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 1.0, 1.0]]
    )
    true = np.array(
        [[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.6, 0.6], [0.0, 0.0, 0.0, 0.0]]
    )
    has_box = np.array([1.0, 1.0, 1.0, 0.0])

    # Execute
    from_numpy = mean_iou(pred, true, has_box)
    from_torch = mean_iou(
        torch.tensor(pred, dtype=torch.float32),
        torch.tensor(true, dtype=torch.float32),
        torch.tensor(has_box, dtype=torch.float32),
    )

    # Assert
    assert from_numpy == pytest.approx(8 / 21)
    assert from_torch == pytest.approx(8 / 21, abs=1e-6)
    assert mean_iou(pred[:1], true[:1], has_box[:1]) == pytest.approx(1.0)


def test_mean_iou_is_nan_without_lesion_cases() -> None:
    boxes = np.zeros((2, 4))

    assert math.isnan(mean_iou(boxes, boxes, np.zeros(2)))


def test_bleu4_identical_disjoint_and_empty() -> None:
    # Prepare
    ref = ["no", "focal", "consolidation", "is", "seen"]
    disjoint = ["heart", "size", "<num>", "<oov:3>", "enlarged"]

    # Execute / Assert: identical -> every n-gram precision 1, no brevity penalty -> 1
    assert bleu4([ref], [ref]) == pytest.approx(1.0)
    # no unigram in common -> 0
    assert bleu4([ref], [disjoint]) == pytest.approx(0.0, abs=1e-9)
    assert bleu4([], []) == 0.0
    # several references per hypothesis (nltk's layout) are accepted too
    assert bleu4([[disjoint, ref]], [ref]) == pytest.approx(1.0)


def test_rouge_l_by_hand() -> None:
    # Prepare
    # pair 1: ref "the heart is normal in size" (6), hyp "heart size is normal" (4).
    #   LCS = heart, is, normal = 3; P = 3/4, R = 3/6; F = 2PR/(P+R) = (3/4)/(5/4) = 3/5
    # pair 2: identical -> 1
    # pair 3: "<oov:12> nodule" vs "<oov:7> nodule": LCS 1, P = R = 1/2, F = 1/2
    #   (rouge-score's default tokenizer would split "<oov:12>" into "oov", "12" and
    #   score 2/3: our tokens must be kept whole)
    # mean = (3/5 + 1 + 1/2) / 3 = 0.7
    refs = [
        "the heart is normal in size".split(),
        ["no", "effusion"],
        ["<oov:12>", "nodule"],
    ]
    hyps = ["heart size is normal".split(), ["no", "effusion"], ["<oov:7>", "nodule"]]

    # Execute
    score = rouge_l(refs, hyps)

    # Assert
    assert score == pytest.approx(0.7)
    assert rouge_l([], []) == 0.0
    assert rouge_l([["heart"]], [[]]) == 0.0


def test_text_metrics_refuse_unpaired_input() -> None:
    with pytest.raises(ValueError, match="one each"):
        bleu4([["a"]], [])
    with pytest.raises(ValueError, match="one each"):
        rouge_l([["a"]], [["a"], ["b"]])


def test_box_rate_normal_counts_boxes_predicted_on_lesion_free_cases() -> None:
    # Prepare: three lesion-free cases (two given a box) and one lesion case
    import dataclasses

    from shared_model.train import CaseResults, summarise

    cases = CaseResults(
        labels=np.array([0, 0, 0, 1]), probs=np.array([[.9, .1]] * 3 + [[.2, .8]]),
        loss_sum=1.0, boxes=np.zeros((4, 4)), true_boxes=np.zeros((4, 4)),
        has_box=np.array([0.0, 0.0, 0.0, 1.0]), refs=None, hyps=None,
        lesion_scores=np.array([0.9, 0.6, 0.1, 0.9]),
    )
    # Execute
    metrics = summarise(cases, 2)
    # Assert: 2 of 3; left out without lesion scores
    assert metrics[wire.M_BOX_RATE_NORMAL] == pytest.approx(2 / 3)
    no_scores = dataclasses.replace(cases, lesion_scores=None)
    assert wire.M_BOX_RATE_NORMAL not in summarise(no_scores, 2)


def test_pointing_game_counts_lesion_cases_whose_box_centre_hits_the_true_box():
    # three lesion cases (centre in, centre out, centre on the edge) and one normal case
    # whose predicted box would hit: the normal one does not count
    true = np.array([[0.2, 0.2, 0.6, 0.6], [0.2, 0.2, 0.4, 0.4], [0.0, 0.0, 0.5, 0.5],
                     [0.2, 0.2, 0.6, 0.6]])
    pred = np.array([[0.3, 0.3, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9], [0.4, 0.4, 0.6, 0.6],
                     [0.3, 0.3, 0.5, 0.5]])
    cases = CaseResults(labels=np.zeros(4, dtype=np.int64), probs=np.full((4, 2), 0.5),
                        loss_sum=0.0, boxes=pred, true_boxes=true,
                        has_box=np.array([1.0, 1.0, 1.0, 0.0]), refs=None, hyps=None)
    assert BY_NAME["pointing"].exact(cases, 2) == pytest.approx(2 / 3)
