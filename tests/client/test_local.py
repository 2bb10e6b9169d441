"""Local training in plain PyTorch/Opacus, without Flower (Opacus' test ideas)."""

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, Subset

from client.local import (
    Budget,
    DPSettings,
    LocalSteps,
    RoundPlan,
    dp_plan,
    local_evaluate,
    local_train,
    make_private,
    private_round,
    released_count,
)
from client.privacy import Ledger, LedgerStore, data_identity
from client.release import COUNT_NOISE
from client.site import DEFAULT_EVAL_EPSILON_BUDGET
from shared_model.batch import Batch
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.contract import wire
from shared_model.contract.run_config import LocalRecipe
from shared_model.dataset import SiteData, SiteSplit, open_site
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


def _store(tmp_path: Path) -> LedgerStore:
    return LedgerStore(tmp_path / "state")


def _ledger(tmp_path: Path, site: SiteData, budget: float = 50.0) -> Ledger:
    store = _store(tmp_path)
    with store.lock():
        return store.open(data_identity(site.path), site_name=site.name, data_path=site.path,
                          epsilon_budget=budget, eval_epsilon_budget=2.0, delta=DELTA)


def _train(site, state, *, ledger, dp, server_round=1, rounds_left=1, seed=0, tmp=None, **kw):
    """local_train as the ClientApp calls it; `ledger=None`: a fresh one in `tmp`."""
    if ledger is None:
        ledger = _ledger(tmp, site)
    store = LedgerStore(ledger.path.parent.parent)
    args = dict(epochs=1, lr=1e-3, batch_size=8, proximal_mu=0.0, run_id=7,
                server_round=server_round, rounds_left=rounds_left, device=CPU, seed=seed)
    args.update(kw)
    return local_train(CFG, site, state, dp=dp, ledger=ledger, save_ledger=store.save, **args)


def _private(model, optimizer, data, tmp: Path, site: SiteData, *, noise, clip,
             sample_rate=1.0):
    """The product's own `make_private` (the ClientApp's path): a Poisson loader over
    `data` at `sample_rate` (1.0: every case in every batch), gradients averaged over
    the expected batch size."""
    plan = RoundPlan(released_n=len(data), noise_multiplier=noise, sample_rate=sample_rate,
                     steps=1, epsilon_after=math.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, opt, dl, engine = make_private(model, optimizer, data, plan,
                                            DPSettings(max_grad_norm=clip),
                                            _ledger(tmp, site), CPU)
    return engine, net, opt, dl


def test_compare_to_vanilla(tmp_path: Path, site: SiteData, init_state: dict) -> None:
    # Prepare: the same model and SGD; DP with no noise and no clipping, every case in
    # its one batch (sample rate 1), against one plain full batch
    data = Subset(site.train, range(16))
    loader = DataLoader(data, batch_size=16, shuffle=False)
    plain = MedFuseModel(CFG)
    plain.load_state_dict(init_state)
    private = MedFuseModel(CFG)
    private.load_state_dict(init_state)
    _, net, opt, dl = _private(private, torch.optim.SGD(private.parameters(), lr=0.05), data,
                               tmp_path, site, noise=0.0, clip=1e9)
    loss_fn = make_loss_fn(CFG)
    # Execute
    a = train_epoch(plain, torch.optim.SGD(plain.parameters(), lr=0.05), loader, loss_fn, CFG,
                    CPU)
    b = train_epoch(net, opt, dl, loss_fn, CFG, CPU)
    # Assert
    assert (a.steps, a.examples) == (b.steps, b.examples) == (1, 16)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(unwrap(net).state_dict()[name], tensor, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_flat_clipping(tmp_path: Path, site: SiteData, init_state: dict) -> None:
    # noise 0, batch 1: the gradient the optimizer applies has norm exactly max_grad_norm
    clip = 1e-3
    model = MedFuseModel(CFG)
    model.load_state_dict(init_state)
    _, net, opt, dl = _private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                               Subset(site.train, [0]), tmp_path, site, noise=0.0, clip=clip)
    train_epoch(net, opt, dl, make_loss_fn(CFG), CFG, CPU)
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norm) == pytest.approx(clip, rel=1e-4)


def test_empty_poisson_batch_is_noised_and_counted(tmp_path: Path, site: SiteData,
                                                   init_state: dict) -> None:
    # Prepare: an empty batch shaped like Opacus' Poisson loader makes it
    model = MedFuseModel(CFG)
    model.load_state_dict(init_state)
    engine, net, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                   site.train, tmp_path, site, noise=1.0, clip=1.0,
                                   sample_rate=0.25)
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
    # Execute: two rounds, the ledger reloaded from disk in between (a restarted node)
    first = _train(site, init_state, ledger=_ledger(tmp_path, site), dp=dp)
    second = _train(site, first.state, ledger=_ledger(tmp_path, site), dp=dp, server_round=2)
    # Assert: two rounds continued = one accountant that took all the steps (after the one
    # release of the noised count, which the plan is computed from)
    ledger = _ledger(tmp_path, site)
    q, steps = dp_plan(ledger.released_count, 8, 1)
    one = RDPAccountant()
    one.history = [(COUNT_NOISE, 1.0, 1), (1.0, q, 2 * steps)]
    assert second.epsilon == pytest.approx(one.get_epsilon(DELTA), rel=1e-12)
    assert first.epsilon < second.epsilon
    assert [(e.kind, e.server_round, e.steps) for e in ledger.entries] == [
        ("count", 1, 1), ("dp-sgd", 1, steps), ("dp-sgd", 2, steps)]
    assert ledger.epsilon() == second.epsilon == ledger.entries[-1].epsilon_after
    assert second.epsilon_left == pytest.approx(50.0 - second.epsilon)
    assert first.num_examples == second.num_examples == ledger.released_count


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


def test_the_reserve_is_left_for_the_hospitals_own_release(
    tmp_path: Path, site: SiteData, init_state: dict
) -> None:
    # Prepare: a budget of 3, of which the node keeps 1 (node config epsilon-reserve)
    ledger = _ledger(tmp_path, site, budget=3.0)
    federated = DPSettings(reserve=1.0)
    # Execute: the federation's last planned round, then the hospital's own fine-tuning
    fed = _train(site, init_state, ledger=ledger, dp=federated, rounds_left=1)
    again = _train(site, fed.state, ledger=ledger, dp=federated, server_round=2, rounds_left=1)
    own = _train(site, fed.state, ledger=ledger, dp=DPSettings(), run_id=8, rounds_left=1)
    # Assert: the federation spent up to 2, and a round more stayed within it (all noise
    # or refused); the hospital spent the rest
    assert not fed.refused and 1.9 < fed.epsilon <= 2.0
    assert again.refused or again.epsilon <= 2.0
    assert not own.refused and 2.9 < own.epsilon <= 3.0


def test_refusal_at_budget(tmp_path: Path, site: SiteData, init_state: dict) -> None:
    ledger = _ledger(tmp_path, site, budget=0.5)
    released_count(ledger, len(site.train), run_id=7, server_round=1, accountant="rdp")
    _store(tmp_path).save(ledger)
    before = ledger.path.read_bytes()
    out = _train(site, init_state, ledger=ledger, dp=DPSettings(noise_multiplier=0.5))
    assert out.refused and out.state is None and out.num_examples == 0
    assert "budget" in out.reason and site.name in out.reason
    assert ledger.path.read_bytes() == before


def test_num_examples_is_examples_not_batches(tmp_path: Path, site: SiteData,
                                             init_state: dict) -> None:
    out = _train(site, init_state, ledger=None, dp=DPSettings(enabled=False), batch_size=4,
                 tmp=tmp_path)
    assert out.num_examples == len(site.train) > math.ceil(len(site.train) / 4)
    assert math.isinf(out.epsilon)
    assert math.isinf(_ledger(tmp_path, site).epsilon())  # recorded: the budget is gone
    assert set(out.state) == set(init_state)  # the full state dict, every tensor shared
    assert all(t.device.type == "cpu" for t in out.state.values())


def test_same_seed_same_weights_only_without_dp(tmp_path: Path, site: SiteData,
                                                init_state: dict) -> None:
    plain = DPSettings(enabled=False)
    a = _train(site, init_state, ledger=None, dp=plain, seed=3, tmp=tmp_path / "a")
    b = _train(site, init_state, ledger=None, dp=plain, seed=3, tmp=tmp_path / "b")
    c = _train(site, init_state, ledger=None, dp=plain, seed=4, tmp=tmp_path / "c")
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)
    # under DP the seed the server knows decides nothing: the same call differs
    private = DPSettings(noise_multiplier=1.0)
    d = _train(site, init_state, ledger=_ledger(tmp_path / "d", site), dp=private, seed=3)
    e = _train(site, init_state, ledger=_ledger(tmp_path / "e", site), dp=private, seed=3)
    assert not all(torch.equal(d.state[k], e.state[k]) for k in d.state)


def test_fedprox_pull_to_the_global_model(tmp_path: Path, site: SiteData,
                                          init_state: dict) -> None:
    # lr * mu = 1: the proximal step puts every parameter back on the global model
    out = _train(site, init_state, ledger=None, dp=DPSettings(enabled=False), lr=0.01,
                 proximal_mu=100.0, optimizer="sgd", tmp=tmp_path)
    for name in dict(MedFuseModel(CFG).named_parameters()):
        torch.testing.assert_close(out.state[name], init_state[name], msg=name)


def test_local_evaluate(site: SiteData, init_state: dict) -> None:
    metrics, n = local_evaluate(CFG, site, init_state, CPU, split="val")
    assert n == len(site.val) > 0
    assert {wire.M_LOSS, wire.M_ACCURACY, wire.M_MACRO_F1} <= set(metrics)


def _fake_like(site: SiteData) -> SiteData:
    """What a curious server can build: random data of the same size (it knows n)."""
    t = site.train
    g = torch.Generator().manual_seed(99)
    fake = SiteSplit(
        "train", torch.randn(t.images.shape, generator=g), torch.zeros_like(t.tokens),
        torch.zeros_like(t.gen_tokens), torch.zeros_like(t.label_ids),
        torch.zeros_like(t.has_box), torch.zeros_like(t.boxes),
        [f"fake-{i}" for i in range(len(t))], [""] * len(t), torch.ones(len(t)),
    )
    return dataclasses.replace(site, train=fake)


def test_noise_replay_on_fake_data_does_not_recover_the_clipped_sum(
    tmp_path: Path, site: SiteData, init_state: dict
) -> None:
    # Prepare: the attack of a curious server. It knows the run seed, the site name, the
    # round and the size of the site, so it replays the round on fake data of that size
    # and subtracts: with replayable randomness the noise cancels and what is left is the
    # difference of two clipped sums (at most 2 * C per sampled case per step).
    sigma, clip, batch = 1.0, 1.0, 8
    dp = DPSettings(noise_multiplier=sigma, max_grad_norm=clip)
    kw = dict(dp=dp, lr=1.0, optimizer="sgd", seed=0, server_round=3, batch_size=batch)
    # Execute
    real = _train(site, init_state, ledger=_ledger(tmp_path / "real", site), **kw)
    replay = _train(_fake_like(site), init_state, ledger=_ledger(tmp_path / "fake", site), **kw)
    # Assert: the difference is as large as two independent noises, far above what the
    # clipped sums alone could make (a replayed noise gave 0.55 here against 197)
    params = [k for k, _ in MedFuseModel(CFG).named_parameters()]
    diff = torch.linalg.vector_norm(torch.cat([(real.state[k] - replay.state[k]).flatten()
                                               for k in params]))
    d = sum(init_state[k].numel() for k in params)
    steps = real.steps
    noise_norm = math.sqrt(2 * steps) * sigma * clip * math.sqrt(d) / batch
    clipped_bound = 2 * clip * steps * 3  # even with every batch 3x its expected size
    assert float(diff) > 0.5 * noise_norm > 4 * clipped_bound


def test_poisson_batches_are_not_replayable(tmp_path: Path, site: SiteData,
                                            init_state: dict) -> None:
    # the same round, asked twice with the same seeds: the sampled batches differ, so
    # subsampling amplification holds against the server

    plan = RoundPlan(released_n=len(site.train), noise_multiplier=1.0, sample_rate=0.25,
                     steps=4, epsilon_after=0.0)
    sizes = []
    for k in range(2):
        torch.manual_seed(0)
        model = MedFuseModel(CFG)
        _, _, loader, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       site.train, plan, DPSettings(), _ledger(tmp_path / str(k),
                                                                                site), CPU)
        sizes.append([tuple(Batch.of(b).label.tolist()) for _ in range(3) for b in loader])
    assert sizes[0] != sizes[1]


@pytest.mark.parametrize("layers", ["no-embeddings", "heads", "classifier", "prior"])
def test_frozen_layers_keep_the_initial_values_under_dp(tmp_path: Path, site: SiteData,
                                                        init_state: dict, layers: str) -> None:
    from shared_model.model import FROZEN, TRAINED_ONLY

    out = _train(site, init_state, ledger=_ledger(tmp_path, site),
                 dp=DPSettings(noise_multiplier=1.0), train_layers=layers, lr=0.1)
    names = [k for k, _ in MedFuseModel(CFG).named_parameters()]
    if layers in TRAINED_ONLY:
        trained = list(TRAINED_ONLY[layers])
        frozen = [k for k in init_state if k not in trained]
    else:
        frozen = [k for k in init_state if k.startswith(FROZEN[layers])]
        trained = [k for k in names if k not in frozen]
    if layers == "prior":  # the label mix alone: the head's bias, num_classes coordinates
        assert trained == ["classifier.bias"] and "classifier.weight" in frozen
    assert frozen and all(torch.equal(out.state[k], init_state[k]) for k in frozen)
    assert all(not torch.equal(out.state[k], init_state[k]) for k in trained)  # noised


def test_private_round_opens_the_ledger_trains_and_saves_it(
    tmp_path: Path, site: SiteData, init_state: dict
) -> None:
    # Prepare: an empty store; the round as `medfuse personalise` asks it
    store = _store(tmp_path)
    steps = LocalSteps(epochs=1, lr=1e-3, batch_size=8, optimizer="sgd")
    # Execute
    out = private_round(store, CFG, site, init_state, steps, Budget(epsilon=50.0, delta=DELTA),
                        device=CPU)
    # Assert: the round is the ledger's, on disk, under the data's identity
    with store.lock():
        saved = store.load(store.identify(site.path).key)
    assert not out.refused and out.state is not None
    assert [e.kind for e in saved.entries] == ["count", "dp-sgd"]
    assert out.epsilon == pytest.approx(saved.epsilon("train")) and out.epsilon > 0
    assert out.epsilon_budget == saved.epsilon_budget == 50.0
    assert saved.eval_epsilon_budget == DEFAULT_EVAL_EPSILON_BUDGET


def test_private_round_refuses_past_the_budget_and_saves_only_the_count(
    tmp_path: Path, site: SiteData, init_state: dict
) -> None:
    # Prepare
    store = _store(tmp_path)
    steps = LocalSteps(epochs=1, lr=1e-3, batch_size=8)
    # Execute: fixed noise far too small for the budget
    out = private_round(store, CFG, site, init_state, steps, Budget(epsilon=0.5, delta=DELTA),
                        device=CPU, dp=DPSettings(noise_multiplier=0.1), run_id=3)
    # Assert
    with store.lock():
        saved = store.load(store.identify(site.path).key)
    assert out.refused and out.state is None and "budget spent" in out.reason
    assert [e.kind for e in saved.entries] == ["count"]


def test_local_steps_of_the_run_recipe_take_the_rounds_lr() -> None:
    # Prepare
    recipe = LocalRecipe("sgd", 0.05, 0.9, "head")
    # Execute
    steps = LocalSteps.of(recipe, epochs=2, batch_size=16, lr=0.01, proximal_mu=0.1)
    # Assert
    assert steps == LocalSteps(epochs=2, lr=0.01, batch_size=16, proximal_mu=0.1,
                               optimizer="sgd", momentum=0.9, train_layers="head")
    assert LocalSteps.of(recipe, epochs=1, batch_size=8).lr == 0.05
