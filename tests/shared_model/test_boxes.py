"""Box geometry on worked examples."""

from __future__ import annotations

import pytest
import torch

from shared_model.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _t(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_identical_boxes() -> None:
    a = _t((0.1, 0.2, 0.5, 0.9), (0.0, 0.0, 1.0, 1.0))
    assert torch.equal(box_iou(a, a.clone()), torch.ones(2))
    assert torch.equal(generalized_box_iou(a, a.clone()), torch.ones(2))


def test_disjoint_boxes() -> None:
    a = _t((0.0, 0.0, 0.2, 0.2))
    b = _t((0.5, 0.5, 0.7, 0.7))
    assert float(box_iou(a, b)) == 0.0
    # enclosing box 0.49, union 0.08: GIoU = 0 - 0.41 / 0.49
    assert float(generalized_box_iou(a, b)) == pytest.approx(-0.41 / 0.49, rel=1e-5)


def test_far_disjoint_giou_tends_to_minus_one() -> None:
    a = _t((0.0, 0.0, 0.01, 0.01))
    b = _t((0.99, 0.99, 1.0, 1.0))
    assert float(generalized_box_iou(a, b)) < -0.99


def test_partial_overlap_by_hand() -> None:
    # a: 0.4 x 0.4 = 0.16; b: 0.4 x 0.2 = 0.08; overlap [0.2, 0.4] x [0.2, 0.4] = 0.04
    a = _t((0.0, 0.0, 0.4, 0.4))
    b = _t((0.2, 0.2, 0.6, 0.4))
    union = 0.16 + 0.08 - 0.04
    enclosing = 0.6 * 0.4
    assert float(box_iou(a, b)) == pytest.approx(0.04 / union, rel=1e-5)
    assert float(generalized_box_iou(a, b)) == pytest.approx(
        0.04 / union - (enclosing - union) / enclosing, rel=1e-5
    )


def test_elementwise_not_pairwise() -> None:
    a = _t((0.0, 0.0, 0.5, 0.5), (0.0, 0.0, 0.5, 0.5))
    b = _t((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0))
    assert box_iou(a, b).tolist() == [1.0, 0.0]


def test_degenerate_boxes_are_finite_with_finite_gradients() -> None:
    # Prepare: empty boxes, a point, an inverted box
    a = _t((0.3, 0.3, 0.3, 0.3), (0.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.2, 0.2)).requires_grad_()
    b = _t((0.3, 0.3, 0.3, 0.3), (0.0, 0.0, 0.0, 0.0), (0.1, 0.1, 0.4, 0.4))
    # Execute
    iou = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    (iou.sum() + giou.sum()).backward()
    # Assert
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    assert iou.tolist() == [0.0, 0.0, 0.0]
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="N, 4"):
        box_iou(torch.zeros(2, 4), torch.zeros(3, 4))


def test_cxcywh_to_xyxy() -> None:
    out = cxcywh_to_xyxy(_t((0.5, 0.5, 0.2, 0.4)))
    torch.testing.assert_close(out, _t((0.4, 0.3, 0.6, 0.7)))
