"""The multitask loss: classification, lesion box, has-lesion score and description.

Every term is a mean over the samples of the batch, `sum_i loss_i / B`, where `loss_i`
depends on sample i alone. That is the form Opacus assumes with `loss_reduction="mean"`:
it recovers each sample's gradient by scaling the batch gradient by B, so a term whose
denominator counts something else (the box rows, the non-PAD tokens of the whole batch)
would mix samples and give wrong per-sample gradients, hence wrong clipping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared_model.batch import Batch
from shared_model.boxes import generalized_box_iou
from shared_model.config import ModelConfig
from shared_model.model import ModelOutput
from shared_model.tokenizer import EOS, PAD

# a valid stand-in target for rows without a box; their loss is masked out afterwards
_UNIT_BOX = (0.0, 0.0, 1.0, 1.0)


def box_loss(pred: torch.Tensor, target: torch.Tensor, has_box: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (mean over the 4 coordinates) + (1 - GIoU), on rows with a box, summed
    and divided by the batch size B, not by the number of box rows.

    Dividing by the number of box rows would make every sample's term depend on how many
    other samples in the batch have a box, which breaks Opacus' per-sample gradients. The
    price is that the term's scale follows the share of cases with a lesion; `loss_box`
    absorbs it. With no box in the batch the result is an exact zero that is still
    connected to the graph, so every box-head parameter gets a (zero) per-sample gradient.
    """
    b = pred.shape[0]
    mask = has_box.to(pred.dtype)  # (B,)
    safe = torch.where(mask.unsqueeze(-1) > 0, target, target.new_tensor(_UNIT_BOX))  # (B, 4)
    l1 = F.smooth_l1_loss(pred, safe, reduction="none").mean(-1)  # (B,)
    giou = generalized_box_iou(pred, safe)  # (B,)
    return ((l1 + 1 - giou) * mask).sum() / max(b, 1)


def token_loss(gen_logits: torch.Tensor, gen_tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next token, PAD targets ignored: the mean over each sample's
    own tokens, then the mean over samples (not the mean over all tokens of the batch,
    whose denominator would mix samples).

    An empty report (target BOS, EOS) is left out of the sum: it describes nothing, and
    with the per-sample mean its one token, "stop at once", weighs as much as a whole
    report. Every site has some empty reports but opens its real ones with a word of its
    own, so a federated average of decoders learnt that EOS is the likeliest first token
    everywhere and generated nothing. The per-sample mask keeps the loss DP-safe.
    """
    b = gen_logits.shape[0]
    target = gen_tokens[:, 1:]  # (B, G-1)
    ce = F.cross_entropy(
        gen_logits.flatten(0, 1), target.flatten(), ignore_index=PAD, reduction="none"
    ).view_as(target)  # (B, G-1)
    count = (target != PAD).sum(-1).clamp_min(1)  # (B,)
    described = (target[:, 0] != EOS).to(ce.dtype)  # (B,) 0 for an empty report
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
    if out.box is not None:
        box = box_loss(out.box, batch.box, batch.has_box)
        total = total + cfg.loss_box * box
        parts["box"] = float(box.detach())
    if out.lesion_logit is not None:
        lesion = F.binary_cross_entropy_with_logits(
            out.lesion_logit, batch.has_box.to(out.lesion_logit.dtype), reduction="sum"
        ) / max(b, 1)
        total = total + cfg.loss_lesion * lesion
        parts["lesion"] = float(lesion.detach())
    if out.image_logits is not None:
        aux = F.cross_entropy(out.image_logits, batch.label, reduction="sum") / max(b, 1)
        total = total + cfg.loss_aux_image * aux
        parts["aux-image"] = float(aux.detach())
    if out.gen_logits is not None:
        gen = token_loss(out.gen_logits, batch.gen_tokens)
        total = total + cfg.loss_gen * gen
        parts["gen"] = float(gen.detach())
    parts["total"] = float(total.detach())
    return total, parts
