"""kind = "bow": the bag-of-words baseline a reviewer asks for beside the report branch.

A multinomial logistic regression (scikit-learn) on TF-IDF word and word-pair counts of
the report text, trained here on the union of the hospitals' train splits (as pooled is),
its inverse regularisation C chosen on the union of their validation splits, and tested
on each hospital's test split with the same exact summary as every other experiment
(`shared_model.train.summarise`: accuracy, macro-F1, AUROC and each label's AUROC). It
reads the whole report with the same word rule as the model's tokenizer (`split_words`),
so a difference from the Bi-LSTM with attention is the model's, not the tokenising. No
image, no DP: what plain text classification gets on the same split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from shared_model.contract.metric_registry import HEADLINE
from shared_model.dataset import SiteData, SiteSplit
from shared_model.tokenizer import split_words
from shared_model.train import CaseResults, summarise
from simulations import report
from simulations.experiments.context import Context, ResultRow, SimulationError, Unit

# the inverse regularisation strengths tried on the pooled validation split
C_GRID: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MIN_DF = 2  # a word in one training report only is noise, and could name that patient
MAX_ITER = 2000


@dataclass(frozen=True)
class Texts:
    """Report texts and class indices of one or several splits."""

    reports: tuple[str, ...]
    labels: np.ndarray  # (N,) int64

    @staticmethod
    def of(splits: Sequence[SiteSplit]) -> Texts:
        return Texts(tuple(r for s in splits for r in s.reports),
                     np.concatenate([s.label_ids.numpy() for s in splits]
                                    or [np.zeros(0, dtype=np.int64)]).astype(np.int64))


def make_pipeline(c: float, seed: int) -> Pipeline:
    """TF-IDF of words and word pairs (sublinear counts) into a logistic regression.
    Word pairs keep a negation with its finding ("no effusion") apart from the finding."""
    return Pipeline([
        ("tfidf", TfidfVectorizer(analyzer=_ngrams, min_df=MIN_DF, sublinear_tf=True)),
        ("lr", LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)),
    ])


def _ngrams(text: str) -> list[str]:
    """The report's words (`split_words`, the model tokenizer's rule) and adjacent pairs."""
    words = split_words(text)
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def class_probs(model: Pipeline, reports: Sequence[str], num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities: a class no training report had gets 0."""
    out = np.zeros((len(reports), num_classes))
    if reports:
        out[:, model.classes_] = model.predict_proba(list(reports))
    return out


def fit_bow(train: Texts, val: Texts, num_classes: int, seed: int,
            grid: Sequence[float] = C_GRID) -> tuple[Pipeline, float]:
    """The pipeline fitted on `train` with the C of `grid` whose validation accuracy is
    highest (the first on a tie; the middle of the grid without validation cases), and
    that C. Raises ValueError when the training reports hold fewer than two classes."""
    if np.unique(train.labels).size < 2:
        raise ValueError("the training reports hold fewer than two labels")
    best: tuple[float, float] | None = None
    if val.labels.size:
        for c in grid:
            model = make_pipeline(c, seed).fit(list(train.reports), train.labels)
            acc = float(np.mean(class_probs(model, val.reports, num_classes).argmax(1)
                                == val.labels))
            if best is None or acc > best[0]:
                best = (acc, c)
    c = best[1] if best else grid[len(grid) // 2]
    return make_pipeline(c, seed).fit(list(train.reports), train.labels), c


def split_cases(model: Pipeline, split: SiteSplit, label_names: tuple[str, ...]
                ) -> CaseResults:
    """The baseline's results on one split, in the form every metric reads (no box, no
    generated report: only the classification metrics are present)."""
    k = len(label_names)
    probs = class_probs(model, split.reports, k)
    labels = split.label_ids.numpy().astype(np.int64)
    picked = probs[np.arange(labels.size), labels] if labels.size else np.zeros(0)
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).sum())
    return CaseResults(labels=labels, probs=probs, loss_sum=loss, boxes=None, true_boxes=None,
                       has_box=None, refs=None, hyps=None, label_names=label_names)


def scored_rows(unit: Unit, model: Pipeline, sites: Sequence[SiteData], rnd: int
              ) -> list[ResultRow]:
    """test/<metric> rows of every hospital's test split, and its epsilon (inf: no DP)."""
    rows: list[ResultRow] = []
    for site in sites:
        if len(site.test) == 0:
            continue
        metrics = summarise(split_cases(model, site.test, site.labels), len(site.labels))
        rows += unit.metric_rows(rnd, site.name, metrics)
        rows.append(unit.row(rnd, site.name, report.EPSILON, math.inf))
    return rows


def run(unit: Unit, ctx: Context) -> list[ResultRow]:
    sites = ctx.opened
    train = Texts.of([s.train for s in sites])
    val = Texts.of([s.val for s in sites])
    k = len(ctx.cfg.label_set)
    try:
        model, c = fit_bow(train, val, k, unit.seed)
    except ValueError as exc:
        raise SimulationError(f"bag-of-words baseline: {exc}") from exc
    rows = scored_rows(unit, model, sites, 1)
    words = len(model.named_steps["tfidf"].vocabulary_)
    acc = [v for (_, _, _, _, m, v) in rows if m == report.TEST + HEADLINE.name]
    ctx.say(f"  {unit.experiment.name}: {len(train.reports)} training reports, {words} "
            f"words and pairs, C={c:g}; mean test {HEADLINE.label} "
            f"{float(np.nanmean(acc)) if acc else math.nan:.3f}")
    return rows
