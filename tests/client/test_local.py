"""Local training in plain PyTorch/Opacus, without Flower (Opacus' test ideas)."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, Subset

from client.local import DPSettings, dp_plan, local_evaluate, local_train
from client.privacy import Ledger, epsilon_spent, load_ledger, open_ledger
from shared_model import wire
from shared_model.batch import Batch
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import SiteData, open_site
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.train import make_loss_fn, train_epoch, unwrap

CPU = torch.device("cpu")
DELTA = 1e-5
# no dropout: the vanilla comparisons need the same forward pass on both sides
CFG = ModelConfig.small(image_size=32, dropout=0.0, report_dropout=0.0)


@pytest.fixture(scope="module")
def site(tiny_federation: list[Path]) -> SiteData:
    return open_site(tiny_federation[0], labels=DEFAULT_LABELS, model=CFG,
                     tokenizer=Tokenizer(CFG.vocab_size))


@pytest.fixture(scope="module")
def init_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in MedFuseModel(CFG).state_dict().items()}


def _ledger(tmp_path: Path, site: SiteData, budget: float = 50.0) -> Ledger:
    return open_ledger(tmp_path / "state", site_name=site.name, data_path=site.path,
                       epsilon_budget=budget, delta=DELTA)


def _train(site, state, *, ledger, dp, server_round=1, rounds_left=1, seed=0, **kw):
    args = dict(epochs=1, lr=1e-3, batch_size=8, proximal_mu=0.0, run_id=7,
                server_round=server_round, rounds_left=rounds_left, device=CPU, seed=seed)
    args.update(kw)
    return local_train(CFG, site, state, dp=dp, ledger=ledger, **args)


def _private(model, optimizer, loader, *, noise, clip, poisson=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        net, opt, dl = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                           noise_multiplier=noise, max_grad_norm=clip,
                                           poisson_sampling=poisson)
    return engine, net, opt, dl


def test_compare_to_vanilla(site: SiteData, init_state: dict) -> None:
    # Prepare: the same model, SGD and fixed batches; DP with no noise and no clipping
    data = Subset(site.train, range(16))
    loader = DataLoader(data, batch_size=8, shuffle=False)
    plain = MedFuseModel(CFG)
    plain.load_state_dict(init_state)
    private = MedFuseModel(CFG)
    private.load_state_dict(init_state)
    _, net, opt, dl = _private(private, torch.optim.SGD(private.parameters(), lr=0.05), loader,
                               noise=0.0, clip=1e9)
    loss_fn = make_loss_fn(CFG)
    # Execute
    a = train_epoch(plain, torch.optim.SGD(plain.parameters(), lr=0.05), loader, loss_fn, CFG,
                    CPU)
    b = train_epoch(net, opt, dl, loss_fn, CFG, CPU)
    # Assert
    assert (a.steps, a.examples) == (b.steps, b.examples) == (2, 16)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(unwrap(net).state_dict()[name], tensor, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_flat_clipping(site: SiteData, init_state: dict) -> None:
    # noise 0, batch 1: the gradient the optimizer applies has norm exactly max_grad_norm
    clip = 1e-3
    model = MedFuseModel(CFG)
    model.load_state_dict(init_state)
    loader = DataLoader(Subset(site.train, [0]), batch_size=1)
    _, net, opt, dl = _private(model, torch.optim.SGD(model.parameters(), lr=0.0), loader,
                               noise=0.0, clip=clip)
    train_epoch(net, opt, dl, make_loss_fn(CFG), CFG, CPU)
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norm) == pytest.approx(clip, rel=1e-4)


def test_empty_poisson_batch_is_noised_and_counted(site: SiteData, init_state: dict) -> None:
    # Prepare: an empty batch shaped like Opacus' Poisson loader makes it
    model = MedFuseModel(CFG)
    model.load_state_dict(init_state)
    engine, net, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                   DataLoader(site.train, batch_size=8), noise=1.0, clip=1.0,
                                   poisson=True)
    empty = [t[:0] for t in Batch.of(next(iter(DataLoader(site.train, batch_size=2))))]
    before = {k: v.clone() for k, v in unwrap(net).state_dict().items()}
    # Execute
    stats = train_epoch(net, opt, [empty], make_loss_fn(CFG), CFG, CPU)
    # Assert: one step, counted, and every parameter moved by the noise alone
    assert (stats.steps, stats.examples) == (1, 0)
    assert sum(s for _, _, s in engine.accountant.history) == 1
    for name, p in unwrap(net).named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
        assert torch.isfinite(p).all(), name


def test_ledger_carries_over_rounds(tmp_path: Path, site: SiteData, init_state: dict) -> None:
    # Prepare
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    q, steps = dp_plan(len(site.train), 8, 1)
    # Execute: two rounds, the ledger reloaded from disk in between (a restarted node)
    first = _train(site, init_state, ledger=_ledger(tmp_path, site), dp=dp)
    second = _train(site, first.state, ledger=_ledger(tmp_path, site), dp=dp, server_round=2)
    # Assert: two rounds continued = one accountant that took all the steps
    one = RDPAccountant()
    one.history = [(1.0, q, 2 * steps)]
    assert second.epsilon == pytest.approx(one.get_epsilon(DELTA), rel=1e-12)
    assert first.epsilon < second.epsilon
    ledger = load_ledger(tmp_path / "state")
    assert [(e.server_round, e.steps) for e in ledger.entries] == [(1, steps), (2, steps)]
    assert epsilon_spent(ledger) == second.epsilon == ledger.entries[-1].epsilon_after
    assert second.epsilon_left == pytest.approx(50.0 - second.epsilon)


def test_derived_noise_spends_the_budget_over_the_planned_rounds(
    tmp_path: Path, site: SiteData, init_state: dict
) -> None:
    ledger = _ledger(tmp_path, site, budget=3.0)
    out = _train(site, init_state, ledger=ledger, dp=DPSettings(), rounds_left=2)
    assert not out.refused and out.epsilon < 3.0
    last = _train(site, out.state, ledger=ledger, dp=DPSettings(), server_round=2,
                  rounds_left=1)
    assert not last.refused
    assert 2.9 < last.epsilon <= 3.0


def test_refusal_at_budget(tmp_path: Path, site: SiteData, init_state: dict) -> None:
    ledger = _ledger(tmp_path, site, budget=0.5)
    before = (tmp_path / "state" / "privacy-ledger.json").read_bytes()
    out = _train(site, init_state, ledger=ledger, dp=DPSettings(noise_multiplier=0.5))
    assert out.refused and out.state is None and out.num_examples == 0
    assert "budget" in out.reason and site.name in out.reason
    assert (tmp_path / "state" / "privacy-ledger.json").read_bytes() == before


def test_num_examples_is_examples_not_batches(site: SiteData, init_state: dict) -> None:
    out = _train(site, init_state, ledger=None, dp=DPSettings(enabled=False), batch_size=4)
    assert out.num_examples == len(site.train) > math.ceil(len(site.train) / 4)
    assert math.isinf(out.epsilon)
    assert set(out.state) == set(init_state)  # the full state dict, every tensor shared
    assert all(t.device.type == "cpu" for t in out.state.values())


def test_same_seed_same_weights(tmp_path: Path, site: SiteData, init_state: dict) -> None:
    plain = DPSettings(enabled=False)
    a = _train(site, init_state, ledger=None, dp=plain, seed=3)
    b = _train(site, init_state, ledger=None, dp=plain, seed=3)
    c = _train(site, init_state, ledger=None, dp=plain, seed=4)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)
    private = DPSettings(noise_multiplier=1.0)
    d = _train(site, init_state, ledger=_ledger(tmp_path / "d", site), dp=private, seed=3)
    e = _train(site, init_state, ledger=_ledger(tmp_path / "e", site), dp=private, seed=3)
    assert all(torch.equal(d.state[k], e.state[k]) for k in d.state)


def test_fedprox_pull_to_the_global_model(site: SiteData, init_state: dict) -> None:
    # lr * mu = 1: the proximal step puts every parameter back on the global model
    out = _train(site, init_state, ledger=None, dp=DPSettings(enabled=False), lr=0.01,
                 proximal_mu=100.0, optimizer="sgd")
    for name in dict(MedFuseModel(CFG).named_parameters()):
        torch.testing.assert_close(out.state[name], init_state[name], msg=name)


def test_local_evaluate(site: SiteData, init_state: dict) -> None:
    metrics, n = local_evaluate(CFG, site, init_state, CPU, split="val")
    assert n == len(site.val) > 0
    assert {wire.M_LOSS, wire.M_ACCURACY, wire.M_MACRO_F1} <= set(metrics)
