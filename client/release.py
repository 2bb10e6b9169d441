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

from shared_model.contract import wire
from shared_model.contract.metric_registry import (
    NoisedSums,
    eval_sensitivity,
    release_slots,
    released_under_dp,
)
from shared_model.train import CaseResults

COUNT_NOISE = 10.0  # noise multiplier (= std in cases) of the one count release per data
# sqrt(1 confusion cell + one per registry slot: IoU, lesion count, ROUGE-L, empty report)
EVAL_SENSITIVITY = eval_sensitivity()

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
    """(N, K*K + S) per-case contributions: one-hot confusion cell, then the registry's
    release slots in order (`release_slots`: IoU of lesion cases, lesion indicator,
    ROUGE-L F, empty generated report); a slot whose head is missing stays 0. Each row's
    L2 norm is at most EVAL_SENSITIVITY, whatever the model: a non-finite value (a crafted
    model's NaN box) is made finite first (NaN -> 0, +inf -> 1, -inf -> 0), since
    `np.clip` keeps NaN and one NaN would make the whole noised sum NaN."""
    n, k = cases.n, num_classes
    slots = release_slots()
    v = np.zeros((n, k * k + len(slots)))
    pred = cases.probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    v[np.arange(n), cases.labels * k + pred] = 1.0
    for j, slot in enumerate(slots):
        column = slot.per_case(cases)
        if column is not None:
            v[:, k * k + j] = column
    return np.clip(np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def private_metrics(
    cases: CaseResults,
    num_classes: int,
    noise_multiplier: float,
    gauss: Gauss | None = None,
) -> dict[str, float]:
    """The Gaussian mechanism on the summed case vectors, then metrics from the noised sums
    (each registry metric with a DP release whose head the model has).

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
    noised = NoisedSums(confusion, n_hat, {
        slot.name: noisy[k * k + j] for j, slot in enumerate(release_slots())})
    out = {wire.M_NUM_EXAMPLES: float(max(int(round(n_hat)), 1))}
    for metric in released_under_dp():
        if metric.present(cases):
            out[metric.name] = float(metric.dp.value(noised))  # type: ignore[union-attr]
    return out
