"""Augmentation multiplicity under DP: k views of an example are one example to the clipping.

The privacy claim is that an example's k views move the noised sum by at most C, as one
example does; clipping each view instead would let it move the sum by k * C. The attack
below is the worst case: one example whose every view's gradient is far above C.
"""

import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import DataLoader, Subset

from client.local import (
    Budget,
    DPSettings,
    LocalSteps,
    RoundPlan,
    make_private,
    per_example,
    private_round,
)
from client.privacy import LedgerStore, data_identity
from shared_model.augment import MILD, STRONG, augment, repeat
from shared_model.batch import Batch
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import SiteData, open_site
from shared_model.model import MedFuseModel
from shared_model.tokenizer import PAD, Tokenizer
from shared_model.train import forward, make_loss_fn, train_epoch, unwrap

CPU = torch.device("cpu")
CFG = ModelConfig.small(image_size=32, dropout=0.0, report_dropout=0.0)
K = 4


@pytest.fixture(scope="module")
def site(tiny_federation: list[Path]) -> SiteData:
    return open_site(tiny_federation[0], labels=DEFAULT_LABELS, model=CFG,
                     tokenizer=Tokenizer(CFG.vocab_size))


@pytest.fixture(scope="module")
def init_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in MedFuseModel(CFG).state_dict().items()}


def _views(site: SiteData, n: int) -> list[torch.Tensor]:
    """The first `n` train cases as K views each (fixed: drawn once, seed 0)."""
    torch.manual_seed(0)
    batch = Batch.of(next(iter(DataLoader(Subset(site.train, range(n)), batch_size=n))))
    return list(augment(repeat(batch, K), STRONG))


def _private_k(model, data, tmp: Path, site: SiteData, *, clip: float, mode: str = "fast"):
    """The product's `make_private` at multiplicity K, noise 0, every case in its batch,
    per-example gradients by `mode` ("fast", the default, or Opacus' "hooks")."""
    plan = RoundPlan(released_n=len(data), noise_multiplier=0.0, sample_rate=1.0, steps=1,
                     epsilon_after=math.inf)
    store = LedgerStore(tmp / "state")
    with store.lock():
        ledger = store.open(data_identity(site.path), site_name=site.name,
                            data_path=site.path, epsilon_budget=50.0, eval_epsilon_budget=2.0,
                            delta=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), data, plan,
                            DPSettings(max_grad_norm=clip), ledger, CPU, augmult=K,
                            per_example_gradients=mode)


def test_per_example_is_the_gradient_of_the_mean_over_the_views(site, init_state):
    # Prepare: Opacus' per-sample gradients of 3 examples x K views
    rows = Batch(*_views(site, 3))
    gsm = GradSampleModule(MedFuseModel(CFG), loss_reduction="mean")
    unwrap(gsm).load_state_dict(init_state)
    loss_fn = make_loss_fn(CFG)
    # Execute
    loss, _ = loss_fn(forward(gsm, rows, CFG), rows)
    loss.backward()
    # Assert: example 1's row is the plain gradient of its K views' mean loss
    ref = MedFuseModel(CFG)
    ref.load_state_dict(init_state)
    mine = Batch(*(t[K:2 * K] for t in rows))
    ref_loss, _ = loss_fn(forward(ref, mine, CFG), mine)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    checked = 0
    for name, p in unwrap(gsm).named_parameters():
        if getattr(p, "grad_sample", None) is None or ref_grads[name].grad is None:
            continue
        got = per_example(p.grad_sample, K)
        assert got.shape == (3, *p.shape), name
        torch.testing.assert_close(got[1], ref_grads[name].grad, rtol=1e-3, atol=1e-6,
                                   msg=name)
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("mode", ["fast", "hooks"])
def test_an_example_seen_k_times_moves_the_sum_by_at_most_the_clip(tmp_path, site,
                                                                   init_state, mode):
    # Prepare: ONE example as K views, clip far below every view's gradient norm
    clip = 1e-4
    views = _views(site, 1)
    model = MedFuseModel(CFG)
    model.load_state_dict(init_state)
    net, opt, _, _ = _private_k(model, Subset(site.train, [0]), tmp_path, site, clip=clip,
                                mode=mode)
    # Execute: the loader yields the example's K views; the optimizer sees K rows
    train_epoch(net, opt, [views], make_loss_fn(CFG), CFG, CPU)
    # Assert: the applied gradient (noise 0, expected batch 1) is the example's clipped
    # contribution: norm C, not up to K * C as clipping each view would allow
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norm) == pytest.approx(clip, rel=1e-3)


def test_views_keep_labels_reports_and_boxes_inside_the_frame(site):
    torch.manual_seed(1)
    batch = Batch.of(next(iter(DataLoader(site.train, batch_size=8))))
    for v in (MILD, STRONG):
        out = augment(repeat(batch, 3), v)
        assert out.image.shape == (24, *batch.image.shape[1:])
        assert torch.equal(out.label, batch.label.repeat_interleave(3))
        assert torch.equal(out.gen_tokens, batch.gen_tokens.repeat_interleave(3, 0))
        assert ((out.tokens != PAD) == (batch.tokens != PAD).repeat_interleave(3, 0)).all()
        assert torch.isfinite(out.image).all()
        assert ((out.box >= 0) & (out.box <= 1)).all()
        kept = out.has_box > 0
        assert (out.box[kept, 2] > out.box[kept, 0]).all()
        assert not torch.equal(out.image[0], out.image[1])  # two views of one case differ
    empty = Batch(*(t[:0] for t in batch))
    assert augment(repeat(empty, 3), STRONG).size == 0


def test_a_round_with_views_takes_and_charges_the_steps_of_one_without(tmp_path, site,
                                                                         init_state):
    # the views ride inside each step: the accountant counts the steps of the plan (the
    # round is refused otherwise), and the plan is that of the examples, not of the views
    store = LedgerStore(tmp_path / "state")
    out = private_round(
        store, CFG, site, init_state,
        LocalSteps(epochs=2, lr=0.01, batch_size=8, optimizer="sgd", augmult=K),
        Budget(epsilon=8.0, delta=1e-5), device=CPU, run_id=3)
    assert not out.refused
    expected_steps = 2 * round(1 / out.sample_rate)
    assert out.steps == expected_steps
    assert 0 < out.epsilon <= 8.0
    assert all(torch.isfinite(t).all() for t in out.state.values())
