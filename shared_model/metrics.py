"""Evaluation metrics for the three heads, keyed by the wire names in `shared_model.contract.wire`.

Thin wrappers over well-kept libraries (scikit-learn, nltk, rouge-score); what they add is
the handling of the cases a single hospital produces: a site with one class, a split
with no lesion box, an empty report. None of them downloads anything; text metrics take
our own tokens (`Tokenizer.decode` output), never nltk's punkt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from shared_model.boxes import box_iou
from shared_model.contract import wire

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
    _check_pairs(references, hypotheses)
    if not hypotheses:
        return 0.0
    score = corpus_bleu(
        [_reference_set(r) for r in references],
        [list(h) for h in hypotheses],
        weights=(0.25, 0.25, 0.25, 0.25),
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
