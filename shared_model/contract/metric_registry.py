"""Every evaluation metric, in one table (no Flower, no torch at import).

A metric is one `Metric` entry of `METRICS`: its wire key (`shared_model.contract.wire`), which way
is better, how the exact summary computes it (`exact`), how a site releases it under DP
(`dp`: its per-case slots in the release vector and how the noised sums turn into the
value; None where it is not released under DP), and how it is shown (label, format and
the views that list it). The exact summary (`shared_model.train.summarise`), the DP
release (`client.release`), the run's tables (`server.results`, `server.ops`), the
simulation report (`simulations.report`) and the CLI prints all read this table: adding a
metric is one entry here plus its computation.

The DP release vector of one case is the one-hot confusion cell (K*K columns, norm 1),
then one column per `Slot` of `release_slots()`, each in [0, 1]; the sensitivity of the
summed vectors is therefore sqrt(1 + number of slots) (`eval_sensitivity`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from shared_model.contract import wire

if TYPE_CHECKING:
    from shared_model.train import CaseResults


class View(Enum):
    """Where a metric is shown."""

    ROUND = "round"  # the per-round table at the server (beside loss and epsilon)
    TABLES = "tables"  # final-metric tables: report, summaries, deploy and CLI tables
    TERMINAL = "terminal"  # also the simulation's 80-column terminal table (ten columns fit)


PerCase = Callable[["CaseResults"], "np.ndarray | None"]  # (N,) in [0, 1], None: no column


@dataclass(frozen=True)
class Slot:
    """One per-case column of the DP release vector: each case adds a value in [0, 1].
    Metrics may share a slot (the same name); it is released once."""

    name: str
    per_case: PerCase  # None where the head it needs is missing: the column stays 0


@dataclass(frozen=True)
class NoisedSums:
    """The noised sums of a DP release, as the post-processing reads them."""

    confusion: np.ndarray  # (K, K) noised counts, clipped at 0; rows true, columns predicted
    n_hat: float  # the noised number of cases, at least 1
    slots: Mapping[str, float]  # slot name -> noised sum

    def __getitem__(self, slot: str) -> float:
        return self.slots[slot]


@dataclass(frozen=True)
class DpRelease:
    """How a metric is released under DP: its own slots (none where it reads only the
    confusion matrix) and the value computed from the noised sums (post-processing)."""

    slots: tuple[Slot, ...]
    value: Callable[[NoisedSums], float]


@dataclass(frozen=True)
class Metric:
    name: str  # the wire key (shared_model.contract.wire)
    label: str  # in tables and plots
    higher_is_better: bool
    # whether a split's results can have it (the model has the head it needs)
    present: Callable[[CaseResults], bool]
    # the exact value of a non-empty split (None where what it needs is missing)
    exact: Callable[[CaseResults, int], float | None]
    dp: DpRelease | None  # None: not released under DP (left out of a private release)
    views: frozenset[View] = frozenset()
    digits: int = 3
    short: str = ""  # a narrower label for the terminal ("" = label)

    @property
    def narrow(self) -> str:
        """The label where space is short (the terminal, a one-line summary)."""
        return self.short or self.label

    def fmt(self, value: float | None) -> str:
        """The value as the tables show it ("-" when there is none)."""
        if value is None or not np.isfinite(value):
            return "-"
        return f"{value:.{self.digits}f}"


# ------------------------------------------------------------------ heads


def _always(cases: CaseResults) -> bool:
    return True


def _has_boxes(cases: CaseResults) -> bool:
    return cases.boxes is not None


def _has_reports(cases: CaseResults) -> bool:
    return cases.refs is not None


def _boxes_complete(cases: CaseResults) -> bool:
    return (cases.boxes is not None and cases.has_box is not None
            and cases.true_boxes is not None)


def _reports_complete(cases: CaseResults) -> bool:
    return cases.refs is not None and cases.hyps is not None


def _has_attention(cases: CaseResults) -> bool:
    return cases.attention_peaks is not None


def _has_labelled_reports(cases: CaseResults) -> bool:
    """Reports, and the class names the report labeller reads them against."""
    return _has_reports(cases) and len(cases.label_names) > 0


# ------------------------------------------------------------------ exact computations


def _metrics():
    """shared_model.metrics, imported where a metric is computed, not where the registry
    is read (the dashboard and the tables read names and directions only)."""
    # lazy: shared_model.metrics imports torch, scikit-learn and rouge-score (seconds)
    from shared_model import metrics

    return metrics


def _classification(key: str) -> Callable[[CaseResults, int], float]:
    def exact(cases: CaseResults, num_classes: int) -> float:
        return _metrics().classification_metrics(cases.labels, cases.probs, num_classes)[key]
    return exact


def _exact_iou(cases: CaseResults, num_classes: int) -> float | None:
    if not _has_boxes(cases):
        return None
    return _metrics().mean_iou(cases.boxes, cases.true_boxes, cases.has_box)


def _exact_bleu4(cases: CaseResults, num_classes: int) -> float | None:
    if not _reports_complete(cases):
        return None
    return _metrics().bleu4([[r] for r in cases.refs], cases.hyps)


def _exact_rouge_l(cases: CaseResults, num_classes: int) -> float | None:
    return _metrics().rouge_l(cases.refs, cases.hyps) if _reports_complete(cases) else None


def _exact_empty_reports(cases: CaseResults, num_classes: int) -> float | None:
    if not _reports_complete(cases):
        return None
    return float(np.mean([len(h) == 0 for h in cases.hyps]))


def predicted_names(cases: CaseResults) -> list[str]:
    """Each case's predicted class name; "" for every case where the results do not name
    the classes."""
    if len(cases.label_names) != cases.probs.shape[1]:
        return [""] * cases.n
    return [cases.label_names[int(k)] for k in cases.probs.argmax(axis=1)]


def _exact_box_rate_normal(cases: CaseResults, num_classes: int) -> float | None:
    """Share of the lesion-free (normal) cases on which a box is drawn, by the rule that
    draws it (`metrics.boxes_drawn`: lesion score >= the split's `lesion_threshold` and a
    finding predicted); None without lesion scores or without a normal case."""
    if cases.lesion_scores is None or cases.has_box is None:
        return None
    normal = cases.has_box <= 0.5
    if not normal.any():
        return None
    drawn = _metrics().boxes_drawn(cases.lesion_scores, cases.lesion_threshold,
                                   predicted_names(cases))
    return float(np.mean(drawn[normal]))


def _detection_scores(cases: CaseResults) -> np.ndarray:
    """Each case's detection score: its lesion score, or without a lesion head the
    probability of its predicted class (the model's confidence in the detection)."""
    if cases.lesion_scores is not None:
        return cases.lesion_scores
    return cases.probs.max(axis=1)


def class_aps(cases: CaseResults) -> dict[int, float] | None:
    """AP at IoU 0.4 of each class with a lesion case (class index -> AP), for tables
    that break mAP down; None without a complete box head."""
    if not _boxes_complete(cases):
        return None
    return _metrics().per_class_ap(cases.boxes, cases.true_boxes, cases.has_box, cases.labels,
                                   cases.probs.argmax(axis=1), _detection_scores(cases))


def _exact_map40(cases: CaseResults, num_classes: int) -> float | None:
    per_class = class_aps(cases)
    return None if per_class is None else _metrics().mean_ap(per_class)


def _exact_iou_meanbox(cases: CaseResults, num_classes: int) -> float | None:
    if not _boxes_complete(cases):
        return None
    return _metrics().mean_box_iou(cases.true_boxes, cases.has_box, cases.labels,
                                   cases.probs.argmax(axis=1))


def _exact_pointing(cases: CaseResults, num_classes: int) -> float | None:
    if cases.attention_peaks is None or cases.true_boxes is None or cases.has_box is None:
        return None
    return _metrics().pointing_game(cases.attention_peaks, cases.true_boxes, cases.has_box)


def _readings(cases: CaseResults) -> tuple[list[str], list[str]] | None:
    """(true label names, the labeller's reading of each generated report); None without
    reports or without names for every class."""
    if cases.hyps is None or len(cases.label_names) != cases.probs.shape[1]:
        return None
    truth = [cases.label_names[int(k)] for k in cases.labels]
    return truth, _metrics().read_reports(cases.hyps, cases.label_names)


def _clinical_efficacy(key: str) -> Callable[[CaseResults, int], float | None]:
    def exact(cases: CaseResults, num_classes: int) -> float | None:
        read = _readings(cases)
        return None if read is None else _metrics().clinical_efficacy(*read)[key]
    return exact


def _exact_finding_agreement(cases: CaseResults, num_classes: int) -> float | None:
    read = _readings(cases)
    if read is None:
        return None
    predicted = predicted_names(cases)
    return float(np.mean([r == p for r, p in zip(read[1], predicted, strict=True)]))


def _exact_distinct(cases: CaseResults, num_classes: int) -> float | None:
    return _metrics().distinct_share(cases.hyps) if _reports_complete(cases) else None


def _exact_bleu1(cases: CaseResults, num_classes: int) -> float | None:
    if cases.refs is None or cases.hyps is None:
        return None
    return _metrics().bleu1([[r] for r in cases.refs], cases.hyps)


def _has_train_refs(cases: CaseResults) -> bool:
    """Reports, and the training references the constant report is chosen on."""
    return _has_reports(cases) and bool(cases.train_refs)


def _exact_const(index: int) -> Callable[[CaseResults, int], float | None]:
    """BLEU-4 (1) or ROUGE-L (2) on the split's references of the best constant report
    chosen on the training references (`metrics.constant_report_scores`); None without
    them (never the split's own best, an oracle)."""
    def exact(cases: CaseResults, num_classes: int) -> float | None:
        if cases.refs is None or not cases.train_refs:
            return None
        scores = _metrics().constant_report_scores(cases.train_refs, cases.refs)
        return None if scores is None else scores[index]
    return exact


# ------------------------------------------------------------------ DP slots


def _iou_per_case(cases: CaseResults) -> np.ndarray | None:
    if not _boxes_complete(cases):
        return None
    iou = _metrics().box_iou_rows(cases.boxes, cases.true_boxes)
    return np.where(cases.has_box > 0.5, iou, 0.0)


def _lesion_per_case(cases: CaseResults) -> np.ndarray | None:
    return cases.has_box > 0.5 if _boxes_complete(cases) else None


def _rouge_l_per_case(cases: CaseResults) -> np.ndarray | None:
    return _metrics().rouge_l_rows(cases.refs, cases.hyps) if _reports_complete(cases) else None


def _empty_per_case(cases: CaseResults) -> np.ndarray | None:
    if not _reports_complete(cases):
        return None
    return np.array([len(h) == 0 for h in cases.hyps])


IOU_SUM = Slot("iou-sum", _iou_per_case)  # IoU of each lesion case, 0 elsewhere
LESIONS = Slot("lesions", _lesion_per_case)  # 1 for a lesion case
ROUGE_L_SUM = Slot("rouge-l-sum", _rouge_l_per_case)
EMPTY_REPORTS_SUM = Slot("empty-reports-sum", _empty_per_case)


# ------------------------------------------------------------------ post-processing


def _share(value: float) -> float:
    return float(np.clip(value, 0.0, 1.0))


def noised_accuracy(s: NoisedSums) -> float:
    return _share(np.trace(s.confusion) / s.n_hat)


def noised_macro_f1(confusion: np.ndarray) -> float:
    """Macro-F1 over the classes present or predicted (as `classification_metrics` does);
    0.0, not NaN, when the noised confusion shows none: a released value is always a
    number, so that no reply drops or flags it depending on the data."""
    tp = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    f1 = []
    for c in range(confusion.shape[0]):
        if support[c] < 0.5 and predicted[c] < 0.5:
            continue
        denom = support[c] + predicted[c]
        f1.append(2 * tp[c] / denom if denom > 0 else 0.0)
    return float(np.clip(np.mean(f1), 0.0, 1.0)) if f1 else 0.0


def _per_case_mean(slot: Slot) -> DpRelease:
    """A share over all cases: the slot's noised sum over the noised case count."""
    return DpRelease((slot,), lambda s: _share(s[slot.name] / s.n_hat))


# ------------------------------------------------------------------ the table

SHOWN = frozenset({View.TABLES, View.TERMINAL})  # every table, the terminal's too
TABLES_ONLY = frozenset({View.TABLES})  # the full tables, not the 80-column terminal


METRICS: tuple[Metric, ...] = (
    Metric(wire.M_LOSS, "loss", higher_is_better=False, present=_always,
           exact=lambda c, k: c.loss_sum / c.n, dp=None),
    Metric(wire.M_ACCURACY, "accuracy", higher_is_better=True, present=_always,
           exact=_classification(wire.M_ACCURACY), dp=DpRelease((), noised_accuracy),
           views=frozenset({View.ROUND, View.TABLES, View.TERMINAL}), short="acc"),
    Metric(wire.M_MACRO_F1, "macro-F1", higher_is_better=True, present=_always,
           exact=_classification(wire.M_MACRO_F1),
           dp=DpRelease((), lambda s: noised_macro_f1(s.confusion)),
           views=frozenset({View.ROUND, View.TABLES, View.TERMINAL})),
    Metric(wire.M_AUROC, "AUROC", higher_is_better=True, present=_always,
           exact=_classification(wire.M_AUROC), dp=None, views=SHOWN),
    Metric(wire.M_IOU, "IoU", higher_is_better=True, present=_has_boxes, exact=_exact_iou,
           dp=DpRelease((IOU_SUM, LESIONS),
                        lambda s: _share(s[IOU_SUM.name] / max(s[LESIONS.name], 1.0))),
           views=SHOWN),
    Metric(wire.M_POINTING, "pointing game", higher_is_better=True, present=_has_attention,
           exact=_exact_pointing, dp=None, views=TABLES_ONLY, short="pointing"),
    Metric(wire.M_BLEU4, "BLEU-4", higher_is_better=True, present=_has_reports,
           exact=_exact_bleu4, dp=None, views=SHOWN),
    Metric(wire.M_ROUGE_L, "ROUGE-L", higher_is_better=True, present=_has_reports,
           exact=_exact_rouge_l, dp=_per_case_mean(ROUGE_L_SUM), views=SHOWN),
    Metric(wire.M_EMPTY_REPORTS, "empty reports", higher_is_better=False,
           present=_has_reports, exact=_exact_empty_reports,
           dp=_per_case_mean(EMPTY_REPORTS_SUM)),
    Metric(wire.M_BOX_RATE_NORMAL, "box rate (normal)", higher_is_better=False,
           present=_has_boxes, exact=_exact_box_rate_normal, dp=None,
           views=SHOWN, short="box@normal"),
    # Exact only (dp=None), in the full tables only (the terminal's 80 columns are full).
    # None has a slot: each would widen the private release vector and raise its
    # sensitivity, and mAP, the leave-one-out mean box, the distinct share and the best
    # constant report are not sums of bounded per-case terms at all.
    Metric(wire.M_MAP40, "mAP@0.4", higher_is_better=True, present=_has_boxes,
           exact=_exact_map40, dp=None, views=TABLES_ONLY),
    Metric(wire.M_IOU_MEANBOX, "IoU (mean-box baseline)", higher_is_better=True,
           present=_has_boxes, exact=_exact_iou_meanbox, dp=None, views=TABLES_ONLY,
           short="IoU base"),
    Metric(wire.M_BLEU1, "BLEU-1", higher_is_better=True, present=_has_reports,
           exact=_exact_bleu1, dp=None, views=TABLES_ONLY),
    Metric(wire.M_CONST_BLEU4, "BLEU-4 (constant report)", higher_is_better=True,
           present=_has_train_refs, exact=_exact_const(1), dp=None, views=TABLES_ONLY,
           short="BLEU-4 const"),
    Metric(wire.M_CONST_ROUGE_L, "ROUGE-L (constant report)", higher_is_better=True,
           present=_has_train_refs, exact=_exact_const(2), dp=None, views=TABLES_ONLY,
           short="ROUGE-L const"),
    Metric(wire.M_DISTINCT_REPORTS, "distinct reports", higher_is_better=True,
           present=_has_reports, exact=_exact_distinct, dp=None, views=TABLES_ONLY,
           short="distinct"),
    Metric(wire.M_CE_PRECISION, "CE precision", higher_is_better=True,
           present=_has_labelled_reports, exact=_clinical_efficacy(wire.M_CE_PRECISION),
           dp=None, views=TABLES_ONLY, short="CE P"),
    Metric(wire.M_CE_RECALL, "CE recall", higher_is_better=True,
           present=_has_labelled_reports, exact=_clinical_efficacy(wire.M_CE_RECALL),
           dp=None, views=TABLES_ONLY, short="CE R"),
    Metric(wire.M_CE_F1, "CE F1", higher_is_better=True, present=_has_labelled_reports,
           exact=_clinical_efficacy(wire.M_CE_F1), dp=None, views=TABLES_ONLY),
    Metric(wire.M_FINDING_AGREEMENT, "finding agreement", higher_is_better=True,
           present=_has_labelled_reports, exact=_exact_finding_agreement, dp=None,
           views=TABLES_ONLY, short="agree"),
)



# ------------------------------------------------------------------ per-label metrics


@dataclass(frozen=True)
class PerLabelMetric:
    """A metric with one value per label of the label set (one-vs-rest), keyed
    `prefix` + the label's name. Exact only: a value per label would add a slot per
    label to the DP release vector (raising its sensitivity), and AUROC is a rank
    statistic, not a sum of bounded per-case terms. Shown in a table of its own (the
    label set decides its columns), not among `METRICS`' columns."""

    prefix: str  # the wire key of label L is prefix + L
    label: str  # in tables: "AUROC (one-vs-rest)"
    higher_is_better: bool
    present: Callable[[CaseResults], bool]
    # class index -> value of a non-empty split; every class present as a key
    exact: Callable[[CaseResults], dict[int, float]]

    def key(self, label_name: str) -> str:
        return self.prefix + label_name


def class_aurocs(cases: CaseResults) -> dict[int, float]:
    """One-vs-rest AUROC of every class (class index -> AUROC; NaN where the split has
    no positive or no negative of it), as `class_aps` breaks mAP down by class."""
    return _metrics().per_class_auroc(cases.labels, cases.probs)


PER_LABEL: tuple[PerLabelMetric, ...] = (
    PerLabelMetric(wire.M_AUROC_LABEL_PREFIX, "AUROC (one-vs-rest)", higher_is_better=True,
                   present=_always, exact=class_aurocs),
)


def label_names_of(cases: CaseResults, num_classes: int) -> tuple[str, ...]:
    """The names per-label keys use: the split's label names, or "class-K" where the
    results do not know them. Decided by the model and the run's label set, never by
    the data, so every reply of one kind carries the same keys."""
    names = tuple(cases.label_names)
    return names if len(names) == num_classes else tuple(f"class-{k}" for k in range(num_classes))


def exact_per_label(cases: CaseResults, num_classes: int) -> dict[str, float]:
    """Every per-label metric of one non-empty split, one key per label (NaN where a
    label cannot be scored on this split)."""
    names = label_names_of(cases, num_classes)
    out: dict[str, float] = {}
    for metric in PER_LABEL:
        if not metric.present(cases):
            continue
        values = metric.exact(cases)
        out.update({metric.key(name): float(values.get(k, np.nan))
                    for k, name in enumerate(names)})
    return out


def per_label_of(name: str) -> tuple[PerLabelMetric, str] | None:
    """(the per-label metric, the label) a key names, or None for any other key."""
    for metric in PER_LABEL:
        if name.startswith(metric.prefix) and len(name) > len(metric.prefix):
            return metric, name[len(metric.prefix):]
    return None


BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
# the one number the one-line views show (round line, dashboard, plots, CLI prints)
HEADLINE: Metric = BY_NAME[wire.M_ACCURACY]


def shown_in(view: View) -> tuple[Metric, ...]:
    """The metrics a view lists, in table order."""
    return tuple(m for m in METRICS if view in m.views)


def released_under_dp() -> tuple[Metric, ...]:
    return tuple(m for m in METRICS if m.dp is not None)


def release_slots() -> tuple[Slot, ...]:
    """The per-case slots of the DP release vector after the confusion cells, in order;
    a slot several metrics read is released once."""
    slots: dict[str, Slot] = {}
    for m in released_under_dp():
        for s in m.dp.slots:  # type: ignore[union-attr]
            slots.setdefault(s.name, s)
    return tuple(slots.values())


def eval_sensitivity() -> float:
    """The L2 sensitivity of the summed case vectors: the one-hot confusion cell counts 1,
    every slot is bounded in [0, 1]."""
    return (1 + len(release_slots())) ** 0.5
