"""What a site releases besides its DP-SGD update, through the Gaussian mechanism (no Flower).

Two releases, each charged to the site's ledger like a training round:

- **The size of the training split**, once per data: n plus Gaussian noise of standard
  deviation `COUNT_NOISE` cases. The sample rate, the steps per epoch, Opacus' expected
  batch size and `num-examples` are all computed from this noised count, so the exact n
  never leaves the site and the accounting holds under add/remove-one adjacency.
- **Evaluation metrics** of the val or test split, as noised sums of per-case values that
  each lie in [0, 1]: the confusion matrix (each case adds 1 to one cell), the IoU and
  count of lesion cases, the ROUGE-L F-measure and whether the generated report is
  empty. One case changes that vector by an L2 norm of at most `EVAL_SENSITIVITY`, so
  noise of std `noise_multiplier * EVAL_SENSITIVITY` on every coordinate is the Gaussian
  mechanism at that noise multiplier, which the RDP accountant composes exactly (sample
  rate 1, one step).
  Accuracy, macro-F1, IoU, ROUGE-L and the count are computed from the noised sums on the
  node (post-processing costs nothing). Loss, AUROC and BLEU-4 are not sums of bounded
  per-case terms, so a private release leaves them out.
  The model is the server's: a crafted one can make one case's outputs NaN or infinite
  (a NaN embedding row for a word only that case's report holds). Each case vector is
  made finite before it is clipped (NaN -> 0, +-inf -> the bound), so the sensitivity
  bound holds for every model and every released metric is a finite number: which keys
  a release holds, and whether its values are numbers, never depend on one case.

The noise comes from the operating system's CSPRNG (`random.SystemRandom`), never from a
seed: nothing the server knows or sets can replay it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from shared_model import wire
from shared_model.metrics import box_iou_rows, rouge_l_rows
from shared_model.train import CaseResults

COUNT_NOISE = 10.0  # noise multiplier (= std in cases) of the one count release per data
# sqrt(1 confusion cell + IoU + lesion count + ROUGE-L + empty generated report)
EVAL_SENSITIVITY = 5**0.5

Gauss = Callable[[float], float]  # std -> one N(0, std^2) draw


def os_gauss() -> Gauss:
    """N(0, std^2) draws from the OS's CSPRNG."""
    rng = random.SystemRandom()
    return lambda std: rng.gauss(0.0, std)


def noised_count(n: int, gauss: Gauss | None = None) -> int:
    """n + N(0, COUNT_NOISE^2), rounded, at least 1 (post-processing of the release)."""
    draw = gauss or os_gauss()
    return max(int(round(n + draw(COUNT_NOISE))), 1)


def case_vectors(cases: CaseResults, num_classes: int) -> np.ndarray:
    """(N, K*K + 4) per-case contributions: one-hot confusion cell, IoU (lesion cases,
    else 0), lesion indicator, ROUGE-L F, empty generated report. Each row's L2 norm is
    at most EVAL_SENSITIVITY, whatever the model: a non-finite value (a crafted model's
    NaN box) is made finite first (NaN -> 0, +inf -> 1, -inf -> 0), since `np.clip`
    keeps NaN and one NaN would make the whole noised sum NaN."""
    n, k = cases.n, num_classes
    v = np.zeros((n, k * k + 4))
    pred = cases.probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    v[np.arange(n), cases.labels * k + pred] = 1.0
    if cases.boxes is not None and cases.has_box is not None and cases.true_boxes is not None:
        lesion = cases.has_box > 0.5
        v[:, k * k] = np.where(lesion, box_iou_rows(cases.boxes, cases.true_boxes), 0.0)
        v[:, k * k + 1] = lesion
    if cases.refs is not None and cases.hyps is not None:
        v[:, k * k + 2] = rouge_l_rows(cases.refs, cases.hyps)
        v[:, k * k + 3] = [len(h) == 0 for h in cases.hyps]
    return np.clip(np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def private_metrics(
    cases: CaseResults,
    num_classes: int,
    noise_multiplier: float,
    gauss: Gauss | None = None,
) -> dict[str, float]:
    """The Gaussian mechanism on the summed case vectors, then metrics from the noised sums.

    `noise_multiplier` is std / sensitivity; the ledger charges exactly that."""
    if noise_multiplier <= 0:
        raise ValueError("a private release needs a positive noise multiplier")
    draw = gauss or os_gauss()
    k = num_classes
    sums = case_vectors(cases, k).sum(axis=0)
    std = noise_multiplier * EVAL_SENSITIVITY
    noisy = sums + np.array([draw(std) for _ in range(sums.size)])
    confusion = np.clip(noisy[: k * k].reshape(k, k), 0.0, None)  # rows: true, cols: predicted
    n_hat = max(float(confusion.sum()), 1.0)
    out = {
        wire.M_NUM_EXAMPLES: float(max(int(round(n_hat)), 1)),
        wire.M_ACCURACY: float(np.clip(np.trace(confusion) / n_hat, 0.0, 1.0)),
        wire.M_MACRO_F1: _macro_f1(confusion),
    }
    if cases.boxes is not None:
        lesions = max(noisy[k * k + 1], 1.0)
        out[wire.M_IOU] = float(np.clip(noisy[k * k] / lesions, 0.0, 1.0))
    if cases.refs is not None:
        out[wire.M_ROUGE_L] = float(np.clip(noisy[k * k + 2] / n_hat, 0.0, 1.0))
        out[wire.M_EMPTY_REPORTS] = float(np.clip(noisy[k * k + 3] / n_hat, 0.0, 1.0))
    return out


def _macro_f1(confusion: np.ndarray) -> float:
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
