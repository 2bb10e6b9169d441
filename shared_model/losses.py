"""The multitask loss: classification, lesion box, has-lesion score and description.

Every term is a mean over the samples of the batch, `sum_i loss_i / B`, where `loss_i`
depends on sample i alone. That is the form Opacus assumes with `loss_reduction="mean"`:
it recovers each sample's gradient by scaling the batch gradient by B, so a term whose
denominator counts something else (the box rows, the non-PAD tokens of the whole batch)
would mix samples and give wrong per-sample gradients, hence wrong clipping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shared_model.batch import Batch
from shared_model.boxes import generalized_box_iou
from shared_model.config import ModelConfig
from shared_model.model import ModelOutput, cell_centres
from shared_model.tokenizer import EOS, PAD

# a valid stand-in target for rows without a box; their loss is masked out afterwards
_UNIT_BOX = (0.0, 0.0, 1.0, 1.0)


def _box_terms(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (mean over the 4 coordinates) + (1 - GIoU) of each row, (N,)."""
    l1 = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)  # (N,)
    return l1 + 1 - generalized_box_iou(pred, target)  # (N,)


def positive_cells(box: torch.Tensor, has_box: torch.Tensor, n_cells: int) -> torch.Tensor:
    """(B, N) True where a feature-map cell answers for the case's lesion: its centre lies
    in the central half of the true box, or it is the cell holding the box's centre (so a
    box smaller than a cell still has one). FCOS' centre sampling: cells near a box's edge
    see mostly background and learn worse boxes. A lesion-free case has none."""
    side = math.isqrt(n_cells)  # the feature map is square (the image is)
    centres = cell_centres(side, side, box)  # (N, 2)
    mid = (box[:, :2] + box[:, 2:]) / 2  # (B, 2)
    reach = ((box[:, 2:] - box[:, :2]) / 4).clamp_min(0.5 / side)  # (B, 2)
    near = ((centres.unsqueeze(0) - mid.unsqueeze(1)).abs() <= reach.unsqueeze(1)).all(-1)
    return near & (has_box.unsqueeze(1) > 0.5)  # (B, N)


def cell_box_loss(cell_boxes: torch.Tensor, box: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The box terms of each case's positive cells, averaged over that case's positives,
    then summed over cases and divided by B, not by the number of lesion cases (which
    would make a sample's term depend on the others': wrong per-sample gradients). The
    price is that the term's scale follows the share of lesion cases; `loss_box` absorbs
    it. With no lesion in the batch the result is an exact zero still connected to the
    graph, so every box-head parameter gets a (zero) per-sample gradient."""
    b, n, _ = cell_boxes.shape
    target = torch.where(pos.unsqueeze(-1), box.unsqueeze(1),
                         box.new_tensor(_UNIT_BOX))  # (B, N, 4)
    terms = _box_terms(cell_boxes.reshape(b * n, 4), target.reshape(b * n, 4)).view(b, n)
    weight = pos.to(terms.dtype)  # (B, N)
    per_case = (terms * weight).sum(-1) / weight.sum(-1).clamp_min(1)  # (B,)
    return per_case.sum() / max(b, 1)


def cell_lesion_loss(cell_logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each cell's lesion score, balanced within each case: the
    mean over its positive cells plus the mean over its negative cells (one lesion covers
    a few of 64 cells; unbalanced, "no lesion anywhere" would win). Summed over cases,
    divided by B."""
    target = pos.to(cell_logits.dtype)  # (B, N)
    bce = F.binary_cross_entropy_with_logits(cell_logits, target, reduction="none")  # (B, N)
    n_pos = target.sum(-1)  # (B,)
    n_neg = (1 - target).sum(-1)  # (B,)
    per_case = ((bce * target).sum(-1) / n_pos.clamp_min(1)
                + (bce * (1 - target)).sum(-1) / n_neg.clamp_min(1))  # (B,)
    return per_case.sum() / max(cell_logits.shape[0], 1)


def token_loss(gen_logits: torch.Tensor, gen_tokens: torch.Tensor,
               describes: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the next token, PAD targets ignored: the mean over each sample's
    own tokens, then the mean over samples (not the mean over all tokens of the batch,
    whose denominator would mix samples).

    An empty report (target BOS, EOS) is left out of the sum: it describes nothing, and
    with the per-sample mean its one token, "stop at once", weighs as much as a whole
    report. Every site has some empty reports but opens its real ones with a word of its
    own, so a federated average of decoders learnt that EOS is the likeliest first token
    everywhere and generated nothing. So is a report that does not state the case's
    finding (`describes` 0: `dataset._states_finding`). The per-sample masks keep the
    loss DP-safe.
    """
    b = gen_logits.shape[0]
    target = gen_tokens[:, 1:]  # (B, G-1)
    ce = F.cross_entropy(
        gen_logits.flatten(0, 1), target.flatten(), ignore_index=PAD, reduction="none"
    ).view_as(target)  # (B, G-1)
    count = (target != PAD).sum(-1).clamp_min(1)  # (B,)
    described = (target[:, 0] != EOS).to(ce.dtype)  # (B,) 0 for an empty report
    if describes is not None:
        described = described * describes.to(ce.dtype)  # (B,) 0 where it states no finding
    return (ce.sum(-1) / count * described).sum() / max(b, 1)


def multitask_loss(
    out: ModelOutput, batch: Batch, cfg: ModelConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the heads the model produced, and each part as a float for
    logging (`cls`, `box`, `lesion`, `gen`, `total`; 0.0 for a head that is off).

    A head whose weight is 0 still enters the sum (times 0): its parameters then get zero
    per-sample gradients instead of none, which Opacus' optimizer would refuse. An empty
    batch (Poisson sampling can draw one) gives a finite zero loss.
    """
    b = out.logits.shape[0]
    cls = F.cross_entropy(out.logits, batch.label, reduction="sum") / max(b, 1)
    total = cfg.loss_cls * cls
    parts = {"cls": float(cls.detach()), "box": 0.0, "lesion": 0.0, "gen": 0.0}
    if out.cell_boxes is not None and out.cell_logits is not None:
        pos = positive_cells(batch.box, batch.has_box, out.cell_logits.shape[1])  # (B, N)
        box = cell_box_loss(out.cell_boxes, batch.box, pos)
        lesion = cell_lesion_loss(out.cell_logits, pos)
        total = total + cfg.loss_box * box + cfg.loss_lesion * lesion
        parts["box"], parts["lesion"] = float(box.detach()), float(lesion.detach())
    if out.image_logits is not None:
        aux = F.cross_entropy(out.image_logits, batch.label, reduction="sum") / max(b, 1)
        total = total + cfg.loss_aux_image * aux
        parts["aux-image"] = float(aux.detach())
    if out.gen_logits is not None:
        gen = token_loss(out.gen_logits, batch.gen_tokens, batch.describes)
        total = total + cfg.loss_gen * gen
        parts["gen"] = float(gen.detach())
    parts["total"] = float(total.detach())
    return total, parts
