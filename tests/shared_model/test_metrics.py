"""Metrics against hand-worked examples (the arithmetic is in the comments)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from shared_model.config import DEFAULT_LABELS
from shared_model.contract import wire
from shared_model.contract.metric_registry import (
    BY_NAME,
    View,
    class_aps,
    exact_per_label,
    per_label_of,
    release_slots,
    released_under_dp,
)
from shared_model.metrics import (
    POINTING_TOLERANCE,
    average_precision,
    best_constant_report,
    bleu1,
    bleu4,
    boxes_drawn,
    classification_metrics,
    clinical_efficacy,
    constant_report_scores,
    mean_iou,
    per_class_auroc,
    pointing_hits,
    rouge_l,
)
from shared_model.train import CaseResults, calibrated_threshold, summarise


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


def test_per_label_auroc_by_hand_nan_where_a_label_cannot_be_ranked() -> None:
    # Prepare: the four cases of the macro example above. Class 0: 3/4, class 1: 2/4
    # (worked there); class 2 has no positive case: NaN, not 0.5. The class-2 scores
    # alone would rank row 3 first, which must not matter.
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.6, 0.35, 0.05],
                      [0.2, 0.1, 0.7]])

    # Execute
    out = per_class_auroc(y_true, probs)

    # Assert: the mean of the defined ones is the macro AUROC
    assert list(out) == [0, 1, 2]
    assert out[0] == pytest.approx(0.75) and out[1] == pytest.approx(0.5)
    assert math.isnan(out[2])
    assert np.nanmean(list(out.values())) == pytest.approx(
        classification_metrics(y_true, probs, 3)[wire.M_AUROC])


def test_per_label_auroc_keys_come_from_the_label_set_never_the_data() -> None:
    # Prepare: a split of one class (nothing can be ranked), and a perfect ranking
    names = ("normal", "effusion")
    one_class = CaseResults(labels=np.array([1, 1]), probs=np.array([[.3, .7], [.6, .4]]),
                            loss_sum=1.0, boxes=None, true_boxes=None, has_box=None,
                            refs=None, hyps=None, label_names=names)
    ranked = dataclasses.replace(one_class, labels=np.array([1, 0]))
    unnamed = dataclasses.replace(ranked, label_names=())

    # Execute
    empty, perfect = exact_per_label(one_class, 2), exact_per_label(ranked, 2)

    # Assert: the same keys either way (NaN where unrankable), in summarise too, and
    # index names where the label names are unknown
    assert list(empty) == list(perfect) == ["auroc-normal", "auroc-effusion"]
    assert all(math.isnan(v) for v in empty.values())
    assert perfect == {"auroc-normal": 1.0, "auroc-effusion": 1.0}
    assert set(perfect) <= set(summarise(ranked, 2))
    assert list(exact_per_label(unnamed, 2)) == ["auroc-class-0", "auroc-class-1"]
    assert per_label_of("auroc-effusion")[1] == "effusion"
    assert per_label_of(wire.M_AUROC) is None


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


def test_box_rate_normal_draws_a_box_at_the_split_lesion_threshold() -> None:
    # Prepare: three lesion-free cases scored .9, .6, .1 and one lesion case
    cases = CaseResults(
        labels=np.array([0, 0, 0, 1]), probs=np.array([[.9, .1]] * 3 + [[.2, .8]]),
        loss_sum=1.0, boxes=np.zeros((4, 4)), true_boxes=np.zeros((4, 4)),
        has_box=np.array([0.0, 0.0, 0.0, 1.0]), refs=None, hyps=None,
        lesion_scores=np.array([0.9, 0.6, 0.1, 0.9]), lesion_threshold=0.65,
    )
    rate = BY_NAME[wire.M_BOX_RATE_NORMAL].exact
    # Execute / Assert: only .9 reaches .65; at .6 the .6 box is drawn too (>=)
    assert rate(cases, 2) == pytest.approx(1 / 3)
    assert rate(dataclasses.replace(cases, lesion_threshold=0.6), 2) == pytest.approx(2 / 3)
    assert rate(dataclasses.replace(cases, lesion_threshold=0.95), 2) == 0.0


def test_no_box_is_counted_where_no_finding_is_predicted() -> None:
    # Prepare: three lesion-free films, all scored .9 (above the .5 threshold): one
    # predicted normal, two predicted a finding; one lesion case predicted nodule
    names = ("normal", "pneumonia", "nodule")
    cases = CaseResults(
        labels=np.array([0, 0, 0, 2]), probs=one_hot_probs([0, 1, 2, 2], 3), loss_sum=1.0,
        boxes=np.zeros((4, 4)), true_boxes=np.zeros((4, 4)),
        has_box=np.array([0.0, 0.0, 0.0, 1.0]), refs=None, hyps=None,
        lesion_scores=np.array([0.9, 0.9, 0.9, 0.9]), label_names=names,
    )
    # Execute
    drawn = boxes_drawn(cases.lesion_scores, 0.5, ["normal", "pneumonia", "nodule", "nodule"])
    rate = summarise(cases, 3)[wire.M_BOX_RATE_NORMAL]
    # Assert: the film predicted normal gets no box however high its score; the score
    # alone decides where the classes are not named
    assert drawn.tolist() == [False, True, True, True]
    assert rate == pytest.approx(2 / 3)
    assert summarise(dataclasses.replace(cases, label_names=()), 3)[
        wire.M_BOX_RATE_NORMAL] == pytest.approx(1.0)
    assert boxes_drawn(np.array([0.4]), 0.5, ["nodule"]).tolist() == [False]
    with pytest.raises(ValueError, match="predicted classes"):
        boxes_drawn(np.array([0.9, 0.9]), 0.5, ["nodule"])


# ------------------------------------------------------------------ localisation

NORMAL_BOX = [0.0, 0.0, 0.0, 0.0]


def _boxes_case(labels: list[int], pred: list[int], boxes: list[list[float]],
                true: list[list[float]], scores: list[float], **extra: object) -> CaseResults:
    """Cases of three classes (0 normal, 1 and 2 with a lesion box)."""
    return CaseResults(
        labels=np.array(labels), probs=one_hot_probs(pred, 3), loss_sum=0.0,
        boxes=np.array(boxes, dtype=float), true_boxes=np.array(true, dtype=float),
        has_box=np.array([float(k != 0) for k in labels]), refs=None, hyps=None,
        lesion_scores=np.array(scores, dtype=float), **extra,  # type: ignore[arg-type]
    )


def test_a_perfect_box_scores_map_and_iou_one() -> None:
    # Prepare: both lesion cases boxed exactly, of their class; the normal one left alone
    true = [[.1, .1, .4, .4], [.5, .5, .8, .8], NORMAL_BOX]
    cases = _boxes_case([1, 2, 0], [1, 2, 0], true, true, [.9, .8, .1])
    # Execute
    metrics = summarise(cases, 3)
    # Assert
    assert metrics[wire.M_MAP40] == pytest.approx(1.0)
    assert metrics[wire.M_IOU] == pytest.approx(1.0)
    assert class_aps(cases) == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}


def test_a_box_shifted_below_iou_0_4_or_empty_is_no_hit() -> None:
    # Prepare: class 1's box shifted by .15: inter .15^2 = .0225, union .09 + .09 - .0225
    #   = .1575 -> IoU 1/7 < .4: AP 0; class 2's box predicted empty: IoU 0, AP 0
    true = [[.1, .1, .4, .4], [.5, .5, .8, .8], [.2, .2, .6, .6], NORMAL_BOX]
    pred = [[.25, .25, .55, .55], NORMAL_BOX, [.2, .2, .6, .6], NORMAL_BOX]
    cases = _boxes_case([1, 2, 2, 0], [1, 2, 2, 0], pred, true, [.9, .8, .7, .1])
    # Execute
    metrics = summarise(cases, 3)
    # Assert: class 1 AP 0; class 2 (two ground truths): miss at .8, then hit at .7:
    #   P 1/2 at R 1/2, never more -> AP 1/4; mAP = 1/8
    assert class_aps(cases) == {1: 0.0, 2: pytest.approx(0.25)}
    assert metrics[wire.M_MAP40] == pytest.approx(1 / 8)
    assert metrics[wire.M_IOU] == pytest.approx((1 / 7 + 0 + 1) / 3)


def test_map40_ranks_each_class_detections_by_lesion_score() -> None:
    # Prepare
    # class 1 detections (predicted 1), by score: .9 hit, .8 miss (a normal case), .7 hit;
    #   its ground truths: the three class-1 lesion cases (one of them predicted 2)
    #   P/R: 1 @ 1/3, 1/2 @ 1/3, 2/3 @ 2/3 -> AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    # class 2 detections: .6 miss (a class-1 case), .5 hit; one ground truth
    #   P/R: 0 @ 0, 1/2 @ 1 -> AP = 1/2
    # mAP = (5/9 + 1/2) / 2 = 19/36
    box = [.1, .1, .5, .5]
    labels, pred = [1, 0, 1, 1, 2], [1, 1, 1, 2, 2]
    true = [box, NORMAL_BOX, box, box, box]
    cases = _boxes_case(labels, pred, [box] * 5, true, [.9, .8, .7, .6, .5])
    # Execute
    aps = class_aps(cases)
    # Assert
    assert aps == {1: pytest.approx(5 / 9), 2: pytest.approx(0.5)}
    assert summarise(cases, 3)[wire.M_MAP40] == pytest.approx(19 / 36)
    # the same detections in another order: the score, not the case order, ranks them
    order = [4, 3, 2, 1, 0]
    shuffled = _boxes_case([labels[i] for i in order], [pred[i] for i in order], [box] * 5,
                           [true[i] for i in order], [[.9, .8, .7, .6, .5][i] for i in order])
    assert summarise(shuffled, 3)[wire.M_MAP40] == pytest.approx(19 / 36)


def test_average_precision_by_all_point_interpolation() -> None:
    # hits at ranks 1 and 3 of 3, 4 ground truths (2 never detected):
    # P/R 1 @ 1/4, 1/2 @ 1/4, 2/3 @ 1/2 -> AP = 1/4 * 1 + 1/4 * 2/3 = 5/12
    assert average_precision(np.array([.3, .2, .1]), np.array([1, 0, 1]), 4) == \
        pytest.approx(5 / 12)
    assert average_precision(np.zeros(0), np.zeros(0), 2) == 0.0
    assert math.isnan(average_precision(np.zeros(1), np.zeros(1), 0))


def test_localisation_without_lesion_cases_is_nan_and_without_a_box_head_absent() -> None:
    # Prepare: two normal cases only
    cases = _boxes_case([0, 0], [0, 1], [NORMAL_BOX, [.1, .1, .2, .2]], [NORMAL_BOX] * 2,
                        [.1, .9], attention_peaks=np.array([[.5, .5], [.5, .5]]))
    no_head = dataclasses.replace(cases, boxes=None, true_boxes=None, has_box=None,
                                  lesion_scores=None, attention_peaks=None)
    # Execute
    metrics, without = summarise(cases, 3), summarise(no_head, 3)
    # Assert: NaN as IoU has it (nothing to score), absent without the head
    for name in (wire.M_MAP40, wire.M_IOU_MEANBOX, wire.M_IOU, wire.M_POINTING):
        assert math.isnan(metrics[name]), name
        assert name not in without, name


def test_the_mean_box_baseline_leaves_each_case_out() -> None:
    # Prepare
    # case 0 (class 1, predicted 2): the other class-2 box [.1,.1,.4,.4] vs [0,0,.2,.2]:
    #   inter .1^2 = .01, union .04 + .09 - .01 = .12 -> 1/12
    # case 1 (class 1, predicted 1): the other class-1 box [0,0,.2,.2] vs [0,0,.4,.4]:
    #   .04 / .16 -> 1/4
    # case 2 (class 2, predicted 2): no other class-2 lesion case: the mean of all others,
    #   [0,0,.3,.3] vs [.1,.1,.4,.4]: inter .2^2 = .04, union .09 + .09 - .04 = .14 -> 2/7
    # case 3 is normal: not scored, not averaged. mean = (1/12 + 1/4 + 2/7) / 3 = 13/63
    true = [[0, 0, .2, .2], [0, 0, .4, .4], [.1, .1, .4, .4], [.6, .6, .9, .9]]
    cases = _boxes_case([1, 1, 2, 0], [2, 1, 2, 0], [[0, 0, 1, 1]] * 4, true, [.5] * 4)
    # Execute / Assert
    assert summarise(cases, 3)[wire.M_IOU_MEANBOX] == pytest.approx(13 / 63)
    # one lesion case has no other box to average
    one = _boxes_case([1, 0], [1, 0], [[0, 0, 1, 1]] * 2, true[:2], [.5] * 2)
    assert math.isnan(summarise(one, 3)[wire.M_IOU_MEANBOX])


def test_pointing_game_counts_lesion_cases_whose_attention_peak_is_in_the_true_box():
    # Prepare: three lesion cases (peak in, out, on the edge) and one normal case whose
    # peak would hit (not counted); the predicted boxes' centres (.9, .9) hit nothing, so
    # the predicted box plays no part
    true = [[.2, .2, .6, .6], [.2, .2, .4, .4], [0, 0, .5, .5], [.2, .2, .6, .6]]
    peaks = np.array([[.4, .4], [.7, .7], [.5, .5], [.4, .4]])
    cases = _boxes_case([1, 1, 2, 0], [1, 1, 2, 0], [[.8, .8, 1, 1]] * 4, true, [.5] * 4,
                        attention_peaks=peaks)
    # Execute / Assert: 2 of 3
    assert summarise(cases, 3)[wire.M_POINTING] == pytest.approx(2 / 3)
    assert wire.M_POINTING not in summarise(dataclasses.replace(cases, attention_peaks=None), 3)


def test_pointing_game_counts_a_peak_within_the_fields_tolerance_of_the_box():
    # Prepare: a nodule-sized box [.40, .40, .42, .42] (smaller than an 8 x 8 cell);
    # tolerance 15/224 = .0670. Peaks: inside; .05 right of it (within); .05 right and
    # .05 below (the corner of the grown box, within); .08 left (outside); far outside
    box = [.40, .40, .42, .42]
    peaks = np.array([[.41, .41], [.47, .41], [.47, .47], [.32, .41], [.9, .1]])
    cases = _boxes_case([2] * 5, [2] * 5, [box] * 5, [box] * 5, [.5] * 5,
                        attention_peaks=peaks)
    # Execute
    hits = pointing_hits(peaks, np.array([box] * 5))
    # Assert
    assert POINTING_TOLERANCE == pytest.approx(15 / 224)
    assert hits.tolist() == [True, True, True, False, False]
    assert summarise(cases, 3)[wire.M_POINTING] == pytest.approx(3 / 5)
    # without the tolerance only the peak inside the box hits
    assert pointing_hits(peaks, np.array([box] * 5), tolerance=0.0).tolist() == [
        True, False, False, False, False]


# ------------------------------------------------------------------ reports


def test_bleu1_by_hand() -> None:
    # "heart size enlarged" against "heart size is normal": 2 of 3 unigrams match;
    # brevity penalty exp(1 - 4/3) -> BLEU-1 = 2/3 * exp(-1/3)
    ref, hyp = "heart size is normal".split(), "heart size enlarged".split()
    assert bleu1([ref], [hyp]) == pytest.approx(2 / 3 * math.exp(-1 / 3))
    assert bleu1([ref], [ref]) == pytest.approx(1.0)


def _report_case(labels: list[int], pred: list[int], refs: list[str], hyps: list[str],
                 names: tuple[str, ...] = DEFAULT_LABELS,
                 train: list[str] | None = None) -> CaseResults:
    return CaseResults(
        labels=np.array(labels), probs=one_hot_probs(pred, len(DEFAULT_LABELS)), loss_sum=0.0,
        boxes=None, true_boxes=None, has_box=None, refs=[r.split() for r in refs],
        hyps=[h.split() for h in hyps], label_names=names,
        train_refs=None if train is None else [r.split() for r in train],
    )


def test_a_constant_report_is_one_distinct_report_and_the_constant_baseline() -> None:
    # Prepare: the most common reference written for every case; the training
    # references are the test ones here, so the training constant is that report
    common = "no acute cardiopulmonary disease is seen"
    refs = [common, "the heart is enlarged", common, "small right pleural effusion"]
    cases = _report_case([0, 4, 0, 3], [0, 0, 0, 0], refs, [common] * 4, train=refs)
    # Execute
    metrics = summarise(cases, 5)
    # Assert: one report of four; it is the best constant, so it scores the baseline
    assert metrics[wire.M_DISTINCT_REPORTS] == pytest.approx(1 / 4)
    assert metrics[wire.M_CONST_BLEU4] == pytest.approx(metrics[wire.M_BLEU4])
    assert metrics[wire.M_CONST_BLEU4] == pytest.approx(max(
        bleu4([r.split() for r in refs], [c.split()] * 4) for c in refs))
    # ROUGE-L: two copies (1); "the heart is enlarged" shares "is": P 1/6, R 1/4,
    # F 1/5; the effusion report shares nothing -> (1 + 1 + 1/5 + 0) / 4 = 0.55
    assert metrics[wire.M_CONST_ROUGE_L] == pytest.approx(0.55)
    assert metrics[wire.M_CONST_ROUGE_L] == pytest.approx(metrics[wire.M_ROUGE_L])
    # the references as reports: three distinct of four
    varied = dataclasses.replace(cases, hyps=[r.split() for r in refs])
    assert summarise(varied, 5)[wire.M_DISTINCT_REPORTS] == pytest.approx(3 / 4)


def test_the_constant_report_is_chosen_on_training_references_not_the_test_split() -> None:
    # Prepare: the training set's best constant is one of its "no acute disease ..."
    # reports; the test split's references all say "small right pleural effusion", so
    # the test split's own best (an oracle) would match them exactly
    train = ["no acute disease", "no acute disease", "no acute disease is seen",
             "the heart is enlarged"]
    test = ["small right pleural effusion"] * 3
    cases = _report_case([3, 3, 3], [3, 3, 3], test, test, train=train)
    chosen, *_ = best_constant_report([r.split() for r in train])
    # Execute
    metrics = summarise(cases, 5)
    scores = constant_report_scores([r.split() for r in train], [r.split() for r in test])
    # Assert: the training constant scored on the test references, far below the oracle
    assert " ".join(chosen) in train[:3]
    assert scores is not None and scores[0] == chosen
    expected = bleu4([r.split() for r in test], [list(chosen)] * 3)
    assert metrics[wire.M_CONST_BLEU4] == pytest.approx(expected)
    assert metrics[wire.M_CONST_BLEU4] < 0.1  # nothing shared with the effusion report
    assert metrics[wire.M_CONST_ROUGE_L] == pytest.approx(0.0)
    assert best_constant_report([r.split() for r in test])[1] == pytest.approx(1.0)  # oracle


def test_without_training_references_there_is_no_constant_baseline() -> None:
    # Prepare: reports but no training split to choose the constant on
    refs = ["small right pleural effusion", "the heart is enlarged"]
    cases = _report_case([3, 4], [3, 4], refs, refs)
    # Execute
    metrics = summarise(cases, 5)
    # Assert: absent, not the test split's own best (an oracle); the rest is there
    assert wire.M_CONST_BLEU4 not in metrics
    assert wire.M_CONST_ROUGE_L not in metrics
    assert wire.M_BLEU4 in metrics
    assert constant_report_scores([], [r.split() for r in refs]) is None
    assert wire.M_CONST_BLEU4 not in summarise(dataclasses.replace(cases, train_refs=[]), 5)


def test_the_best_constant_report_is_searched_not_just_the_most_common() -> None:
    # "no acute disease" is the most common reference, but as a constant its brevity
    # penalty costs more than its matches gain: 0.200 against 0.250 for either 4-word
    # report (the references' median length); of the two tied, the first seen
    refs = [r.split() for r in ("no acute disease", "the heart is enlarged", "no acute disease",
                                "small right pleural effusion")]
    best, score, _ = best_constant_report(refs)
    assert best == ("the", "heart", "is", "enlarged")
    assert score == pytest.approx(0.25)
    assert score == pytest.approx(bleu4(refs, [list(best)] * 4))
    assert score > bleu4(refs, [refs[0]] * 4)


def test_clinical_efficacy_and_finding_agreement_on_hand_made_reports() -> None:
    # Prepare: true names pneumonia, effusion, normal, nodule, nodule, effusion; read
    #   pneumonia, normal (negated), cardiomegaly, nodule, pneumonia, effusion
    # pneumonia:    TP 1, read 2, true 1 -> P 1/2, R 1,   F1 2/3
    # effusion:     TP 1, read 1, true 2 -> P 1,   R 1/2, F1 2/3
    # nodule:       TP 1, read 1, true 2 -> P 1,   R 1/2, F1 2/3
    # cardiomegaly: TP 0, read 1, true 0 -> 0, 0, 0 ("normal" left out of the average)
    # macro P = 5/2 / 4 = 5/8, R = 2 / 4 = 1/2, F1 = 2 / 4 = 1/2
    # agreement with the classifier (predicted 1 3 0 2 0 3): cases 0, 3, 5 -> 1/2
    hyps = ["patchy consolidation right lower zone", "no pleural effusion",
            "the heart is enlarged", "<num> mm nodule in the rul",
            "consolidation c w pneumonia", "small right pleural effusion"]
    cases = _report_case([1, 3, 0, 2, 2, 3], [1, 3, 0, 2, 0, 3], hyps, hyps)
    # Execute
    metrics = summarise(cases, 5)
    # Assert
    assert metrics[wire.M_CE_PRECISION] == pytest.approx(5 / 8)
    assert metrics[wire.M_CE_RECALL] == pytest.approx(1 / 2)
    assert metrics[wire.M_CE_F1] == pytest.approx(1 / 2)
    assert metrics[wire.M_FINDING_AGREEMENT] == pytest.approx(1 / 2)
    # without class names the labeller has nothing to read against: absent
    unnamed = summarise(dataclasses.replace(cases, label_names=()), 5)
    for name in (wire.M_CE_PRECISION, wire.M_CE_RECALL, wire.M_CE_F1,
                 wire.M_FINDING_AGREEMENT):
        assert name not in unnamed, name
    assert wire.M_DISTINCT_REPORTS in unnamed


def test_clinical_efficacy_is_nan_when_no_disease_is_true_or_read() -> None:
    out = clinical_efficacy(["normal", "normal"], ["normal", "normal"])
    assert all(math.isnan(v) for v in out.values())
    with pytest.raises(ValueError, match="one each"):
        clinical_efficacy(["normal"], [])


def test_the_new_metrics_are_exact_only_and_in_the_full_tables_only() -> None:
    # a DP evaluation releases none of them: the release vector keeps its four slots
    added = (wire.M_MAP40, wire.M_IOU_MEANBOX, wire.M_POINTING, wire.M_BLEU1,
             wire.M_CONST_BLEU4, wire.M_CONST_ROUGE_L, wire.M_DISTINCT_REPORTS,
             wire.M_CE_PRECISION, wire.M_CE_RECALL, wire.M_CE_F1, wire.M_FINDING_AGREEMENT)
    for name in added:
        assert BY_NAME[name].dp is None, name
        assert BY_NAME[name].views == frozenset({View.TABLES}), name
    assert not set(added) & {m.name for m in released_under_dp()}
    assert [s.name for s in release_slots()] == [
        "iou-sum", "lesions", "rouge-l-sum", "empty-reports-sum"]


def _scored(scores: list[float], lesion: list[int]) -> CaseResults:
    n = len(scores)
    return CaseResults(
        labels=np.zeros(n, dtype=np.int64), probs=np.full((n, 2), 0.5), loss_sum=0.0,
        boxes=np.zeros((n, 4)), true_boxes=np.zeros((n, 4)),
        has_box=np.asarray(lesion, dtype=float), refs=None, hyps=None,
        lesion_scores=np.asarray(scores, dtype=float))


def test_the_calibrated_threshold_separates_lesion_from_lesion_free_cases() -> None:
    # separable: midway between the highest lesion-free and the lowest lesion score
    assert calibrated_threshold(_scored([0.1, 0.3, 0.7, 0.9], [0, 0, 1, 1])) == pytest.approx(0.5)
    # one lesion-free case scores high: Youden's J keeps every lesion case above the cut
    th = calibrated_threshold(_scored([0.1, 0.2, 0.95, 0.6, 0.8], [0, 0, 0, 1, 1]))
    assert th == pytest.approx(0.4)
    # nothing to separate: one kind only, or no lesion head
    assert calibrated_threshold(_scored([0.2, 0.9], [1, 1])) is None
    assert calibrated_threshold(_scored([0.2, 0.9], [0, 0])) is None
    assert calibrated_threshold(dataclasses.replace(_scored([0.2], [1]),
                                                    lesion_scores=None)) is None
