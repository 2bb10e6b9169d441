"""The multitask loss: masking, weights, and the per-sample mean that Opacus assumes."""

from __future__ import annotations

import pytest
import torch

from shared_model.batch import Batch
from shared_model.config import ModelConfig
from shared_model.losses import box_loss, multitask_loss, token_loss
from shared_model.model import ModelOutput

B, K, G, V = 4, 5, 6, 64
CFG = ModelConfig.small(vocab_size=V, num_classes=K)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _batch() -> Batch:
    gen = torch.tensor(
        [[1, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0], [1, 3, 2, 0, 0, 0], [1, 5, 6, 7, 8, 2]]
    )
    return Batch(
        image=torch.zeros(B, 1, 8, 8),
        tokens=torch.ones(B, 3, dtype=torch.int64),
        gen_tokens=gen,
        label=torch.tensor([0, 1, 2, 4]),
        has_box=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        box=torch.tensor([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0], [0.2, 0.3, 0.6, 0.9], [0, 0, 0, 0]]),
    )


def _output(seed: int = 0) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, 2, generator=g) * 0.5
    return ModelOutput(
        logits=torch.randn(B, K, generator=g).requires_grad_(),
        box=torch.cat((xy, xy + 0.3), dim=-1).requires_grad_(),
        lesion_logit=torch.randn(B, generator=g).requires_grad_(),
        gen_logits=torch.randn(B, G - 1, V, generator=g).requires_grad_(),
        text_attention=None,
        image_attention=None,
    )


def _rows(x: Batch | ModelOutput, idx: list[int]):
    return type(x)(*(None if t is None else t[idx] for t in x))


def test_box_loss_ignores_rows_without_a_box() -> None:
    # Prepare: change the prediction and target of rows 1 and 3 (no box) only
    batch, out = _batch(), _output()
    other_pred = out.box.detach().clone()
    other_pred[[1, 3]] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    other_target = batch.box.clone()
    other_target[[1, 3]] = torch.tensor([0.4, 0.4, 0.41, 0.41])
    # Execute
    loss = box_loss(out.box, batch.box, batch.has_box)
    loss.backward()
    same = box_loss(other_pred, other_target, batch.has_box)
    # Assert
    assert float(loss.detach()) == pytest.approx(float(same), rel=1e-6)
    assert torch.equal(out.box.grad[[1, 3]], torch.zeros(2, 4))
    assert out.box.grad[[0, 2]].abs().sum() > 0


def test_box_loss_is_a_sum_over_box_rows_divided_by_the_batch_size() -> None:
    # one exact box (loss 0) and one row with no box, in a batch of 2
    pred = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.3, 0.3]])
    exact = box_loss(pred, pred.clone(), torch.tensor([1.0, 0.0]))
    # one box off by 0.1 in x1 (smooth L1 = 0.5 * 0.1^2 / 4 coordinates) over batch of 2
    target = torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.0, 0.0, 0.0, 0.0]])
    off = box_loss(pred, target, torch.tensor([1.0, 0.0]))
    iou = 0.16 / 0.20
    assert float(exact) == pytest.approx(0.0, abs=1e-7)
    assert float(off) == pytest.approx((0.5 * 0.01 / 4 + 1 - iou) / 2, rel=1e-5)


def test_box_loss_without_boxes_is_zero_and_connected() -> None:
    pred = torch.rand(3, 4).sort(-1).values.requires_grad_()
    loss = box_loss(pred, torch.zeros(3, 4), torch.zeros(3))
    loss.backward()
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    assert torch.equal(pred.grad, torch.zeros(3, 4))


def test_token_loss_ignores_pad_targets() -> None:
    # Prepare: scramble the logits wherever the target (gen_tokens[:, 1:]) is PAD
    batch, out = _batch(), _output()
    pad = batch.gen_tokens[:, 1:] == 0
    scrambled = out.gen_logits.detach().clone()
    scrambled[pad] = torch.randn(int(pad.sum()), V) * 10
    # Execute / Assert
    assert float(token_loss(out.gen_logits.detach(), batch.gen_tokens)) == pytest.approx(
        float(token_loss(scrambled, batch.gen_tokens)), rel=1e-6
    )


def test_batch_loss_is_the_mean_of_single_sample_losses() -> None:
    # what Opacus' loss_reduction="mean" assumes: no term mixes samples
    batch, out = _batch(), _output()
    whole, _ = multitask_loss(out, batch, CFG)
    alone = [multitask_loss(_rows(out, [i]), _rows(batch, [i]), CFG)[1]["total"] for i in range(B)]
    assert float(whole.detach()) == pytest.approx(sum(alone) / B, rel=1e-5)


def test_zero_weight_heads_contribute_nothing_but_stay_connected() -> None:
    # Prepare
    cfg = ModelConfig.small(
        vocab_size=V, num_classes=K, loss_box=0.0, loss_lesion=0.0, loss_gen=0.0
    )
    batch, out = _batch(), _output()
    # Execute
    total, parts = multitask_loss(out, batch, cfg)
    total.backward()
    # Assert: only classification counts; the other heads get zero gradients, not none
    assert parts["total"] == pytest.approx(parts["cls"], rel=1e-6)
    assert parts["box"] > 0 and parts["lesion"] > 0 and parts["gen"] > 0
    for t in (out.box, out.lesion_logit, out.gen_logits):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


def test_weights_scale_each_part() -> None:
    cfg = ModelConfig.small(
        vocab_size=V, num_classes=K, loss_cls=2.0, loss_box=3.0, loss_lesion=0.25, loss_gen=0.5
    )
    total, parts = multitask_loss(_output(), _batch(), cfg)
    expected = 2.0 * parts["cls"] + 3.0 * parts["box"] + 0.25 * parts["lesion"] + 0.5 * parts["gen"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert parts["total"] == pytest.approx(expected, rel=1e-5)


def test_heads_that_are_off_contribute_nothing() -> None:
    out = _output()._replace(box=None, lesion_logit=None, gen_logits=None)
    total, parts = multitask_loss(out, _batch(), CFG)
    assert float(total.detach()) == pytest.approx(parts["cls"], rel=1e-6)
    assert parts["box"] == parts["lesion"] == parts["gen"] == 0.0


def test_empty_batch_gives_a_finite_zero() -> None:
    # Poisson sampling can draw an empty batch; it still goes through backward
    batch, out = _rows(_batch(), []), _rows(_output(), [])
    total, parts = multitask_loss(out, batch, CFG)
    total.backward()
    assert float(total.detach()) == 0.0 and parts["total"] == 0.0


def test_an_empty_report_teaches_the_decoder_nothing() -> None:
    # The cause of federated decoders that stop at once: an empty report's one target,
    # EOS first, weighed as much as a whole report at every site. Its gradient is now zero.
    gen = torch.tensor([[1, 2, 0, 0, 0, 0], [1, 9, 8, 2, 0, 0]])  # empty report, a report
    logits = torch.randn(2, G - 1, V, requires_grad=True)
    loss = token_loss(logits, gen)
    loss.backward()
    assert torch.equal(logits.grad[0], torch.zeros(G - 1, V))
    assert logits.grad[1].abs().sum() > 0
    # and the per-sample mean over the batch is unchanged for the real report
    alone = token_loss(logits.detach()[1:], gen[1:])
    assert float(loss) == pytest.approx(float(alone) / 2, rel=1e-6)
