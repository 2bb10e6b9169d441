"""Box geometry for the localisation head, its loss and its metric.

Boxes are `(x0, y0, x1, y1)` fractions of the image width and height. Every function is
elementwise over rows (row i of `a` against row i of `b`), never all pairs: a case has at
most one lesion box, so there is nothing to match.

Degenerate boxes (zero width or height, or both boxes empty) must not produce NaN: the
box loss is computed on every row and masked afterwards, and a NaN times a zero mask is
still NaN, in the loss and in its gradient.
"""

from __future__ import annotations

import torch

EPS = 1e-7


def _area(b: torch.Tensor) -> torch.Tensor:
    """Area of each row; inverted boxes count as empty, not negative."""
    return (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.maximum(a[:, :2], b[:, :2])  # (N, 2)
    hi = torch.minimum(a[:, 2:], b[:, 2:])  # (N, 2)
    wh = (hi - lo).clamp_min(0)  # (N, 2)
    inter = wh[:, 0] * wh[:, 1]  # (N,)
    union = _area(a) + _area(b) - inter  # (N,)
    return inter, union


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of row i of `a` with row i of `b`, shape (N,).

    The union is floored at a tiny epsilon rather than offset by it, so identical boxes
    score exactly 1 and two empty boxes score 0.
    """
    _check(a, b)
    inter, union = _inter_union(a, b)
    return inter / union.clamp_min(EPS)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU (Rezatofighi et al. 2019) of row i of `a` with row i of `b`, shape (N,).

    In [-1, 1]: IoU minus the share of the smallest enclosing box that neither box covers.
    Unlike IoU it still has a gradient when the boxes do not overlap, which is why the box
    loss uses it.
    """
    _check(a, b)
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp_min(EPS)
    lo = torch.minimum(a[:, :2], b[:, :2])  # (N, 2)
    hi = torch.maximum(a[:, 2:], b[:, 2:])  # (N, 2)
    wh = (hi - lo).clamp_min(0)  # (N, 2)
    enclosing = wh[:, 0] * wh[:, 1]  # (N,)
    return iou - (enclosing - union) / enclosing.clamp_min(EPS)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """Centre, width and height (..., 4) to corners (..., 4)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape[-1] != 4 or a.shape != b.shape:
        raise ValueError(
            f"boxes must both be (N, 4) x0, y0, x1, y1; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
