"""Characterisation of the DP evaluation release (`client.release`): for fixed case results
and a deterministic noise function, the exact case vectors, the exact draws asked for
(how many, of which std) and the exact released values. Recorded before the metric
registry took over the layout; any change here is a change to what a site releases."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from client.release import EVAL_SENSITIVITY, case_vectors, private_metrics
from shared_model.train import CaseResults

K = 3
FULL = CaseResults(
    labels=np.array([0, 1, 2, 1, 0]),
    probs=np.array([[.7, .2, .1], [.1, .6, .3], [.5, .2, .3], [.2, .3, .5], [np.nan, .5, .5]]),
    loss_sum=3.5,
    boxes=np.array([[.1, .1, .4, .4], [.2, .2, .6, .7], [np.nan] * 4, [0, 0, 1, 1],
                    [.3, .3, .5, .5]]),
    true_boxes=np.array([[.1, .1, .5, .5], [.25, .2, .6, .6], [.1, .1, .2, .2], [0, 0, .5, .5],
                         [0, 0, 0, 0]]),
    has_box=np.array([1.0, 1.0, 1.0, 0.0, 0.0]),
    refs=[["clear", "lungs"], ["small", "nodule", "left"], ["effusion"], ["no", "acute"],
          ["clear"]],
    hyps=[["clear", "lungs"], ["nodule"], [], ["acute", "disease"], []],
)
NO_BOXES = dataclasses.replace(FULL, boxes=None, true_boxes=None, has_box=None)
NO_REPORTS = dataclasses.replace(FULL, refs=None, hyps=None)
EMPTY = CaseResults(labels=np.zeros(0, dtype=np.int64), probs=np.zeros((0, K)), loss_sum=0.0,
                    boxes=np.zeros((0, 4)), true_boxes=np.zeros((0, 4)), has_box=np.zeros(0),
                    refs=[], hyps=[])


def _gauss(asked: list[float]) -> Callable[[float], float]:
    """A deterministic stand-in for N(0, std^2): std times a fixed sequence in [-1, 1)."""
    def draw(std: float) -> float:
        asked.append(std)
        return std * (((len(asked) * 0.6180339887) % 1.0) * 2.0 - 1.0)
    return draw


def test_the_sensitivity_is_that_of_five_unit_slots() -> None:
    assert EVAL_SENSITIVITY == 2.23606797749979


def test_case_vectors_layout_is_unchanged() -> None:
    # Execute
    v = case_vectors(FULL, K)
    # Assert: confusion cells (true * K + predicted), IoU, lesion, ROUGE-L, empty report
    assert v.tolist() == [
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5625, 1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.7, 1.0, 0.5, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    ]
    assert case_vectors(NO_BOXES, K)[:, 9:11].tolist() == [[0.0, 0.0]] * 5
    assert case_vectors(NO_REPORTS, K)[:, 11:].tolist() == [[0.0, 0.0]] * 5
    assert case_vectors(EMPTY, K).shape == (0, 13)


@pytest.mark.parametrize(("cases", "z", "expected"), [
    (FULL, 0.8, {"num-examples": 8.0, "accuracy": 0.3469221508008897,
                 "macro-f1": 0.2762223536939257, "iou": 0.02921926571142013,
                 "rouge-l": 0.22307956915703728, "empty-reports": 0.04385290134459263}),
    (NO_BOXES, 1.3, {"num-examples": 10.0, "accuracy": 0.30791007482415333,
                     "macro-f1": 0.27286217244357863, "rouge-l": 0.1529233763499889,
                     "empty-reports": 0.0}),
    (NO_REPORTS, 2.0, {"num-examples": 14.0, "accuracy": 0.26534801536437175,
                       "macro-f1": 0.2529699967761421, "iou": 0.0}),
    (EMPTY, 0.5, {"num-examples": 3.0, "accuracy": 0.1519396734709511,
                  "macro-f1": 0.17005331853129965, "iou": 0.0, "rouge-l": 0.0,
                  "empty-reports": 0.0}),
], ids=["full", "no-boxes", "no-reports", "empty"])
def test_private_metrics_are_unchanged_for_the_same_noise(
    cases: CaseResults, z: float, expected: dict[str, float]
) -> None:
    # Prepare
    asked: list[float] = []
    # Execute
    out = private_metrics(cases, K, z, _gauss(asked))
    # Assert: the same values in the same key order, from 13 draws of std z * sensitivity
    assert list(out.items()) == list(expected.items())
    assert asked == [z * 2.23606797749979] * (K * K + 4)
