"""Evaluation metrics for the three heads, keyed by the wire names in `shared_model.contract.wire`.

Thin wrappers over well-kept libraries (scikit-learn, nltk, rouge-score); what they add is
the handling of the cases a single hospital produces: a site with one class, a split
with no lesion box, an empty report. None of them downloads anything; text metrics take
our own tokens (`Tokenizer.decode` output), never nltk's punkt.

Beside the scores themselves, the field reads each head against what a trivial model
gets: mAP at IoU 0.4 (the RSNA / ChestX-ray14 localisation threshold) beside the IoU of
the class's mean box, and BLEU / ROUGE-L beside the best constant report, with the
clinical efficacy of the generated reports (`shared_model.report_labeller`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from shared_model.boxes import box_iou
from shared_model.contract import wire
from shared_model.report_labeller import NORMAL, read_finding

Tokens = Sequence[str]
# One reference token list, or several references for the same hypothesis (nltk layout).
Reference = Sequence[str] | Sequence[Sequence[str]]


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Accuracy, macro-F1 and macro one-vs-rest AUROC of class probabilities.

    y_true: (N,) int class indices; probs: (N, K) with K == num_classes; the prediction is
    the arg-max class.

    - macro-F1 averages over the classes present in `y_true` or predicted (scikit-learn's
      own default label set), with zero_division=0. A class the site does not have and
      the model never predicts is left out: it says nothing about this site, and
      counting it as F1 = 0 would punish every site of a label-skewed federation.
    - AUROC is the mean of the one-vs-rest AUROCs of the classes present in `y_true`
      (each such class has positives, and negatives as soon as two classes are present).
      With fewer than two classes present it is NaN: a site that holds one class cannot
      rank positives against negatives, and 0.5 or 1.0 would be an invented number.
      Non-finite probabilities (a diverged model) also give NaN instead of an exception.

    An empty split gives NaN for all three.
    """
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (y_true.shape[0], num_classes):
        raise ValueError(
            f"probs must have shape (N, num_classes)=({y_true.shape[0]}, {num_classes}), "
            f"got {probs.shape}"
        )
    if y_true.size and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"y_true holds class indices outside 0..{num_classes - 1}")
    if y_true.size == 0:
        return {wire.M_ACCURACY: math.nan, wire.M_MACRO_F1: math.nan, wire.M_AUROC: math.nan}

    y_pred = probs.argmax(axis=1)
    return {
        wire.M_ACCURACY: float(accuracy_score(y_true, y_pred)),
        wire.M_MACRO_F1: float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        wire.M_AUROC: _macro_ovr_auroc(y_true, probs),
    }


def per_class_auroc(y_true: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    """One-vs-rest AUROC of every class (class index -> AUROC), the per-label breakdown
    of the macro AUROC: with one dominant label ("normal" is 70% of the OpenI reports)
    the macro hides which findings a model ranks well.

    Every class of `probs` gets an entry, so the keys never depend on the data: NaN for
    a class with no positive or no negative case in the split (nothing to rank, and 0.5
    or 1.0 would be invented), and for every class when a probability is not finite.
    """
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must have shape (N, K) with N={y_true.shape[0]}, "
                         f"got {probs.shape}")
    finite = bool(np.isfinite(probs).all())
    out: dict[int, float] = {}
    for c in range(probs.shape[1]):
        positive = y_true == c
        ranked = finite and positive.any() and not positive.all()
        out[c] = float(roc_auc_score(positive, probs[:, c])) if ranked else math.nan
    return out


def _macro_ovr_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    present = np.unique(y_true)
    if present.size < 2 or not np.isfinite(probs).all():
        return math.nan
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))


def mean_iou(
    pred_boxes: np.ndarray | torch.Tensor,
    true_boxes: np.ndarray | torch.Tensor,
    has_box: np.ndarray | torch.Tensor,
) -> float:
    """Mean IoU of predicted (N, 4) against true (N, 4) boxes over the lesion cases only
    (`has_box` > 0.5); NaN when the split has no lesion case. Boxes are x0, y0, x1, y1."""
    pred = torch.as_tensor(pred_boxes).detach().to(torch.float64).cpu()
    true = torch.as_tensor(true_boxes).detach().to(torch.float64).cpu()
    mask = torch.as_tensor(has_box).detach().cpu().reshape(-1) > 0.5
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != 4:
        raise ValueError(
            f"pred_boxes and true_boxes must both be (N, 4), got {tuple(pred.shape)} and "
            f"{tuple(true.shape)}"
        )
    if mask.shape[0] != pred.shape[0]:
        raise ValueError(f"has_box has {mask.shape[0]} rows, boxes have {pred.shape[0]}")
    if not bool(mask.any()):
        return math.nan
    return float(box_iou(pred[mask], true[mask]).mean())


def bleu4(references: Sequence[Reference], hypotheses: Sequence[Tokens]) -> float:
    """Corpus BLEU-4 (nltk `corpus_bleu`, weights 0.25 x 4) with Chen & Cherry's
    smoothing method 1 (an epsilon of 0.1 for an n-gram order with no match), so a short
    report does not score 0 just because it has no matching 4-gram.

    `references[i]` is the token list of hypothesis i's reference, or a list of token
    lists when it has several. 0.0 for empty input.
    """
    return _corpus_bleu(references, hypotheses, (0.25, 0.25, 0.25, 0.25))


def bleu1(references: Sequence[Reference], hypotheses: Sequence[Tokens]) -> float:
    """Corpus BLEU-1 (clipped unigram precision times the brevity penalty), as report
    generation papers print beside BLEU-4: it says whether the right words come at all,
    where BLEU-4 also asks for their order. Same inputs and smoothing as `bleu4`."""
    return _corpus_bleu(references, hypotheses, (1.0,))


def _corpus_bleu(references: Sequence[Reference], hypotheses: Sequence[Tokens],
                 weights: tuple[float, ...]) -> float:
    _check_pairs(references, hypotheses)
    if not hypotheses:
        return 0.0
    score = corpus_bleu(
        [_reference_set(r) for r in references],
        [list(h) for h in hypotheses],
        weights=weights,
        smoothing_function=SmoothingFunction().method1,
    )
    return float(score)


class _WhitespaceTokenizer:
    """rouge-score tokenizer for text we joined from our own tokens: split on spaces only.

    rouge-score's default tokenizer replaces every non-alphanumeric character with a
    space, which would turn "<oov:12>" into "oov", "12" (two tokens, and every OOV word
    would share the "oov" token). Our tokens are already normalised, so we keep them whole.
    """

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def rouge_l(references: Sequence[Reference], hypotheses: Sequence[Tokens]) -> float:
    """Mean ROUGE-L F-measure (rouge-score's `RougeScorer`, LCS-based, no stemming).

    References take the same forms as in `bleu4`; with several references the best
    F-measure counts (rouge-score's `score_multi`). A pair with an empty side scores 0.
    0.0 for empty input.
    """
    _check_pairs(references, hypotheses)
    if not hypotheses:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    scores = []
    for ref, hyp in zip(references, hypotheses, strict=True):
        targets = [" ".join(r) for r in _reference_set(ref)]
        scores.append(scorer.score_multi(targets, " ".join(hyp))["rougeL"].fmeasure)
    return float(np.mean(scores))


def box_iou_rows(pred_boxes: np.ndarray, true_boxes: np.ndarray) -> np.ndarray:
    """(N,) IoU of each predicted box with its own true box (rows paired, not all pairs)."""
    pred = torch.as_tensor(np.asarray(pred_boxes), dtype=torch.float64)
    true = torch.as_tensor(np.asarray(true_boxes), dtype=torch.float64)
    if pred.shape[0] == 0:
        return np.zeros(0)
    return box_iou(pred, true).numpy()


def rouge_l_rows(references: Sequence[Tokens], hypotheses: Sequence[Tokens]) -> np.ndarray:
    """(N,) ROUGE-L F-measure of each hypothesis against its one reference."""
    _check_pairs(references, hypotheses)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    return np.array([
        scorer.score(" ".join(r), " ".join(h))["rougeL"].fmeasure
        for r, h in zip(references, hypotheses, strict=True)
    ])


def _reference_set(ref: Reference) -> list[list[str]]:
    """One hypothesis' references as a list of token lists."""
    items = list(ref)
    if items and not isinstance(items[0], str):
        return [list(r) for r in items]
    return [[str(t) for t in items]]


def _check_pairs(references: Sequence[Reference], hypotheses: Sequence[Tokens]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses: one each")


# ------------------------------------------------------------------ localisation, as scored


DETECTION_IOU = 0.4  # a hit at IoU >= 0.4: the RSNA pneumonia / ChestX-ray14 threshold
# The lesion-free class: the one label of the data format a film without a finding has
# (report_labeller.NORMAL; every other label is a finding the labeller has terms for).
LESION_FREE = NORMAL


def finding_predicted(predicted: Sequence[str]) -> np.ndarray:
    """(N,) whether each predicted class name is a finding (not `LESION_FREE`); a name
    that is not known ("") counts as a finding, so without names the score alone rules."""
    return np.array([name != LESION_FREE for name in predicted], dtype=bool)


def boxes_drawn(scores: np.ndarray, threshold: float, predicted: Sequence[str]) -> np.ndarray:
    """(N,) whether each case gets a box: its lesion score reaches `threshold` AND its
    predicted class (`predicted`, names) is a finding. A box on a film the model calls
    normal points a reader at nothing and contradicts the model's own answer, so the
    one rule decides what `predict` draws and what the box rate on normal films counts."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(predicted) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} scores but {len(predicted)} predicted classes")
    return (scores >= threshold) & finding_predicted(predicted)


def average_precision(scores: np.ndarray, hits: np.ndarray, num_truths: int) -> float:
    """AP of ranked detections by all-point interpolation (VOC 2010+, COCO's area rule):
    the area under the precision-recall curve whose precision at each recall is the best
    precision at that recall or beyond. Ties in score keep their given order (a stable
    sort), so the value does not depend on the platform. NaN without ground truth."""
    if num_truths <= 0:
        return math.nan
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hit = np.asarray(hits, dtype=bool)[order]
    tp, fp = np.cumsum(hit), np.cumsum(~hit)
    recall = np.concatenate(([0.0], tp / num_truths))
    precision = np.concatenate(([0.0], tp / np.maximum(tp + fp, 1)))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * envelope[1:]))


def per_class_ap(
    pred_boxes: np.ndarray, true_boxes: np.ndarray, has_box: np.ndarray,
    labels: np.ndarray, pred_labels: np.ndarray, scores: np.ndarray,
    iou_threshold: float = DETECTION_IOU,
) -> dict[int, float]:
    """AP of each class with at least one lesion case (class index -> AP).

    Each case is one detection: its predicted box, of its predicted class, ranked by its
    score. Among class c's detections (the cases predicted c) a hit is a case whose true
    class is c, that has a true box, at IoU >= `iou_threshold`; the ground truths are
    the lesion cases of true class c. A case has one box and one detection, so there is
    nothing to match and no detection can claim a box twice. A case predicted lesion-free
    is a detection of no class, as `boxes_drawn` draws it no box; the threshold plays no
    part (AP ranks every detection by its score).
    """
    labels = np.asarray(labels).reshape(-1)
    pred_labels = np.asarray(pred_labels).reshape(-1)
    lesion = np.asarray(has_box).reshape(-1) > 0.5
    iou = box_iou_rows(pred_boxes, true_boxes)
    good = lesion & (labels == pred_labels) & (iou >= iou_threshold)  # NaN boxes: never
    out: dict[int, float] = {}
    for c in np.unique(labels[lesion]):
        mine = pred_labels == c
        out[int(c)] = average_precision(np.asarray(scores)[mine], good[mine],
                                        int((lesion & (labels == c)).sum()))
    return out


def mean_ap(per_class: dict[int, float]) -> float:
    """mAP: the mean of the classes' APs; NaN for a split with no lesion case."""
    return float(np.mean(list(per_class.values()))) if per_class else math.nan


def mean_box_iou(true_boxes: np.ndarray, has_box: np.ndarray, labels: np.ndarray,
                 pred_labels: np.ndarray) -> float:
    """Mean IoU of the baseline "the mean box of the predicted class" over the lesion
    cases: each case gets the mean true box of the other lesion cases of its predicted
    class in the split (left out itself, so the baseline never sees the box it is scored
    on), or of all other lesion cases where its predicted class has none. The floor a box
    head must beat: a predicted class alone already says roughly where its lesion lies.
    NaN with fewer than two lesion cases (nothing to average but the case itself)."""
    boxes = np.asarray(true_boxes, dtype=np.float64)
    lesion = np.flatnonzero(np.asarray(has_box).reshape(-1) > 0.5)
    if lesion.size < 2:
        return math.nan
    labels, pred_labels = np.asarray(labels).reshape(-1), np.asarray(pred_labels).reshape(-1)
    guesses = []
    for i in lesion:
        others = lesion[lesion != i]
        same = others[labels[others] == pred_labels[i]]
        guesses.append(boxes[same if same.size else others].mean(axis=0))
    return float(box_iou_rows(np.stack(guesses), boxes[lesion]).mean())


# The pointing game's tolerance, as a fraction of the image side: Zhang et al. 2016 count
# a hit within 15 px of the box on images of about 224 px, since a peak is read off a
# coarse map. Ours is the centre of an 8 x 8 attention cell (1/8 of the side), and a
# nodule's box (0.4% of the film) is smaller than a cell: without a tolerance a peak on
# the nodule's own cell can miss its box, and every model scored the same.
POINTING_TOLERANCE = 15 / 224


def pointing_hits(peaks: np.ndarray, true_boxes: np.ndarray,
                  tolerance: float = POINTING_TOLERANCE) -> np.ndarray:
    """(N,) whether each point (x, y) lies in its true box grown by `tolerance` (a
    fraction of the image side) on each side, edges included."""
    p, t = np.asarray(peaks, dtype=np.float64), np.asarray(true_boxes, dtype=np.float64)
    return ((t[:, 0] - tolerance <= p[:, 0]) & (p[:, 0] <= t[:, 2] + tolerance)
            & (t[:, 1] - tolerance <= p[:, 1]) & (p[:, 1] <= t[:, 3] + tolerance))


def pointing_game(peaks: np.ndarray, true_boxes: np.ndarray, has_box: np.ndarray,
                  tolerance: float = POINTING_TOLERANCE) -> float:
    """The pointing game (Zhang et al. 2016): the share of lesion cases whose attention
    peak falls inside the true box, or within `tolerance` of it (`POINTING_TOLERANCE`,
    the field's 15 px on 224). It asks whether the model looks at the lesion, not how
    well a box head draws it; NaN without a lesion case."""
    lesion = np.asarray(has_box).reshape(-1) > 0.5
    if not lesion.any():
        return math.nan
    return float(pointing_hits(peaks, true_boxes, tolerance)[lesion].mean())


# ------------------------------------------------------------------ reports, as scored


def distinct_share(hypotheses: Sequence[Tokens]) -> float:
    """Share of distinct reports among the generated ones: 1/N when the decoder writes
    one report whatever the film (a collapse BLEU can reward), 1 when all differ."""
    if not hypotheses:
        return 0.0
    return len({tuple(h) for h in hypotheses}) / len(hypotheses)


def clinical_efficacy(truth: Sequence[str], read: Sequence[str]) -> dict[str, float]:
    """CE precision, recall and F1 of the labeller's readings `read` of the generated
    reports against the true labels `truth` (names, one per case).

    Macro averages over the disease labels present in the truth or read, "normal" left
    out, as the CheXpert-based clinical-efficacy scores of report generation do (a
    generator that writes "normal" for everything scores 0, not the normal share). A
    label's precision is 0 where it is never read, its recall 0 where it is never true
    (zero_division=0). NaN for all three when no disease is true or read.
    """
    if len(truth) != len(read):
        raise ValueError(f"{len(truth)} true labels but {len(read)} readings: one each")
    diseases = sorted((set(truth) | set(read)) - {NORMAL})
    if not diseases:
        return {wire.M_CE_PRECISION: math.nan, wire.M_CE_RECALL: math.nan,
                wire.M_CE_F1: math.nan}
    t, r = np.asarray(truth, dtype=object), np.asarray(read, dtype=object)
    precision, recall, f1 = [], [], []
    for d in diseases:
        tp = float(np.sum((t == d) & (r == d)))
        p = tp / max(float(np.sum(r == d)), 1.0)
        q = tp / max(float(np.sum(t == d)), 1.0)
        precision.append(p)
        recall.append(q)
        f1.append(2 * p * q / (p + q) if p + q > 0 else 0.0)
    return {wire.M_CE_PRECISION: float(np.mean(precision)),
            wire.M_CE_RECALL: float(np.mean(recall)), wire.M_CE_F1: float(np.mean(f1))}


def read_reports(hypotheses: Sequence[Tokens], label_names: Sequence[str]) -> list[str]:
    """The labeller's reading of each report (a name of `label_names`, or "normal").
    Cached on its inputs: four metrics read the same reports."""
    return list(_read_all(tuple(tuple(h) for h in hypotheses), tuple(label_names)))


@lru_cache(maxsize=4)
def _read_all(hypotheses: tuple[tuple[str, ...], ...], labels: tuple[str, ...]
              ) -> tuple[str, ...]:
    return tuple(read_finding(h, labels) for h in hypotheses)


CONSTANT_CANDIDATES = 30  # the most common references tried as the constant report


def best_constant_report(references: Sequence[Tokens]) -> tuple[tuple[str, ...], float, float]:
    """The best constant report of a set of references and its scores on them: among the
    most common references (at most `CONSTANT_CANDIDATES`, ties in order of first
    appearance), the one whose corpus BLEU-4 is highest when every case gets it; (its
    tokens, its BLEU-4, its mean ROUGE-L). Searched on the training references
    (`constant_report_scores`), never on the split it is scored on: chosen there, it
    would be an oracle that has read the test reports. Cached on the references."""
    return _best_constant(tuple(tuple(r) for r in references))


@lru_cache(maxsize=4)
def _best_constant(refs: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], float, float]:
    if not refs:
        return (), 0.0, 0.0
    best: tuple[str, ...] = ()
    best_bleu = -1.0
    for candidate, _ in Counter(refs).most_common(CONSTANT_CANDIDATES):
        score = bleu4(refs, [candidate] * len(refs))
        if score > best_bleu:
            best, best_bleu = candidate, score
    return best, best_bleu, rouge_l(refs, [best] * len(refs))


def constant_report_scores(train_references: Sequence[Tokens], references: Sequence[Tokens]
                           ) -> tuple[tuple[str, ...], float, float] | None:
    """The baseline of the field ("the best constant training report"): the report
    `best_constant_report` picks on the training references, written for every case of
    the evaluated split; (its tokens, its BLEU-4 and mean ROUGE-L on `references`).
    None without training references: the split's own best would be an oracle, so there
    is no baseline rather than a flattering one. A generator must beat this report, which
    a template already does well on n-gram overlap."""
    if not train_references:
        return None
    best = list(best_constant_report(train_references)[0])
    return (tuple(best), bleu4(references, [best] * len(references)),
            rouge_l(references, [best] * len(references)))
