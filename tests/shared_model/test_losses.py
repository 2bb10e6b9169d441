"""The multitask loss: masking, weights, and the per-sample mean that Opacus assumes."""

from __future__ import annotations

import pytest
import torch

from shared_model.batch import Batch
from shared_model.config import ModelConfig
from shared_model.losses import (
    cell_box_loss,
    cell_lesion_loss,
    multitask_loss,
    positive_cells,
    token_loss,
)
from shared_model.model import ModelOutput

B, K, G, V, N = 4, 5, 6, 64, 16  # N: a 4 x 4 feature map
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
        describes=torch.ones(B),
    )


def _output(seed: int = 0) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, 2, generator=g) * 0.5
    cxy = torch.rand(B, N, 2, generator=g) * 0.5
    return ModelOutput(
        logits=torch.randn(B, K, generator=g).requires_grad_(),
        box=torch.cat((xy, xy + 0.3), dim=-1),
        lesion_logit=torch.randn(B, generator=g),
        gen_logits=torch.randn(B, G - 1, V, generator=g).requires_grad_(),
        text_attention=None,
        image_attention=None,
        cell_boxes=torch.cat((cxy, cxy + 0.3), dim=-1).requires_grad_(),
        cell_logits=torch.randn(B, N, generator=g).requires_grad_(),
    )


def _rows(x: Batch | ModelOutput, idx: list[int]):
    return type(x)(*(None if t is None else t[idx] for t in x))


def test_positive_cells_are_the_centre_cell_and_the_central_half_of_the_box() -> None:
    # a small box (inside one cell of the 4 x 4 map), a large one, and no box
    box = torch.tensor([[0.30, 0.30, 0.40, 0.40], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    pos = positive_cells(box, torch.tensor([1.0, 1.0, 0.0]), N).view(3, 4, 4)
    assert pos[0].sum() == 1 and pos[0, 1, 1]  # the cell (x 0.25-0.5, y 0.25-0.5)
    assert pos[1].sum() == 4 and pos[1, 1:3, 1:3].all()  # centres within 0.25 of 0.5
    assert not pos[2].any()


def test_cell_box_loss_reads_only_the_positive_cells_of_lesion_cases() -> None:
    # Prepare: change every cell box that is not positive
    batch, out = _batch(), _output()
    pos = positive_cells(batch.box, batch.has_box, N)
    other = out.cell_boxes.detach().clone()
    other[~pos] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # Execute
    loss = cell_box_loss(out.cell_boxes, batch.box, pos)
    loss.backward()
    # Assert
    assert float(loss.detach()) == pytest.approx(float(cell_box_loss(other, batch.box, pos)))
    assert torch.equal(out.cell_boxes.grad[~pos], torch.zeros(int((~pos).sum()), 4))
    assert out.cell_boxes.grad[pos].abs().sum() > 0


def test_cell_box_loss_is_zero_on_exact_boxes_and_a_mean_over_the_batch() -> None:
    batch = _batch()
    pos = positive_cells(batch.box, batch.has_box, N)
    exact = batch.box.unsqueeze(1).expand(B, N, 4).clone()
    assert float(cell_box_loss(exact, batch.box, pos)) == pytest.approx(0.0, abs=1e-6)
    # one lesion case off by 0.1 in x1 at each positive cell: (smooth L1 + 1 - IoU) / B
    off = exact.clone()
    off[0, :, 2] += 0.1
    iou = 0.16 / 0.20
    expected = (0.5 * 0.01 / 4 + 1 - iou) / B
    assert float(cell_box_loss(off, batch.box, pos)) == pytest.approx(expected, rel=1e-5)


def test_cell_losses_without_lesions_are_connected() -> None:
    cells = torch.rand(3, N, 2).requires_grad_()
    boxes = torch.cat((cells * 0.5, cells * 0.5 + 0.2), dim=-1)
    pos = positive_cells(torch.zeros(3, 4), torch.zeros(3), N)
    loss = cell_box_loss(boxes, torch.zeros(3, 4), pos)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(cells.grad, torch.zeros(3, N, 2))
    # the lesion score still learns "no lesion anywhere" on a lesion-free film
    logits = torch.zeros(3, N, requires_grad=True)
    cell_lesion_loss(logits, pos).backward()
    assert (logits.grad > 0).all()


def test_cell_lesion_loss_balances_positive_and_negative_cells() -> None:
    # a case with one positive cell: that cell weighs as much as the other 15 together
    pos = torch.zeros(1, N, dtype=torch.bool)
    pos[0, 5] = True
    logits = torch.zeros(1, N, requires_grad=True)
    cell_lesion_loss(logits, pos).backward()
    assert float(logits.grad[0, 5]) == pytest.approx(-0.5)
    assert float(logits.grad[0, 0]) == pytest.approx(0.5 / (N - 1))


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
    for t in (out.cell_boxes, out.cell_logits, out.gen_logits):
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
    out = _output()._replace(box=None, lesion_logit=None, gen_logits=None, cell_boxes=None,
                             cell_logits=None)
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


def test_a_report_that_states_no_finding_teaches_the_decoder_nothing() -> None:
    # "heart size cannot be assessed" on a pneumonia film: a reference, never a target
    gen = torch.tensor([[1, 7, 8, 2, 0, 0], [1, 9, 8, 2, 0, 0]])
    logits = torch.randn(2, G - 1, V, requires_grad=True)
    loss = token_loss(logits, gen, torch.tensor([0.0, 1.0]))
    loss.backward()
    assert torch.equal(logits.grad[0], torch.zeros(G - 1, V))
    assert float(loss) == pytest.approx(float(token_loss(logits.detach()[1:], gen[1:])) / 2)
