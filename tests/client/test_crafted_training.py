"""A curious coordinator's crafted global models against a site's private training.

The attack: a global model whose forward pass is NaN for one target case alone (every
weight finite). Opacus turns one NaN per-sample gradient into a NaN step, so on the
unfixed code every update trained with the target sampled was NaN and every update
without it finite: membership, outside the DP analysis. Each test runs the product's own
path (`client.local.local_train` / `make_private`, real Opacus, a real ledger on disk).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from client.local import (
    DPSettings,
    FiniteDPOptimizer,
    NonFiniteUpdate,
    RoundPlan,
    TrainOutcome,
    local_train,
    make_private,
)
from client.privacy import Ledger, LedgerStore, data_identity
from shared_model.batch import Batch
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import SiteData, open_site
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.train import forward, make_loss_fn, train_epoch, unwrap
from tests.client.crafted import TARGET_ID, nan_trigger_state, neighbouring_sites, unique_word

CPU = torch.device("cpu")
# no report dropout: the trigger fires whenever the target is sampled (the strongest attack);
# no dropout: the same forward pass on both sides where gradients are compared
CFG = ModelConfig.small(image_size=32, dropout=0.0, report_dropout=0.0)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def sites(tiny_federation: list[Path], tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[str, SiteData, SiteData]:
    """(trigger word, site with the target case, the same site without it)."""
    tokenizer = Tokenizer(CFG.vocab_size)
    word = unique_word(tiny_federation[0], tokenizer)
    site_in, site_out = neighbouring_sites(tiny_federation[0], tmp_path_factory.mktemp("nb"),
                                           word)
    return word, *(open_site(s, labels=DEFAULT_LABELS, model=CFG, tokenizer=tokenizer)
                   for s in (site_in, site_out))


@pytest.fixture(scope="module")
def crafted(sites: tuple[str, SiteData, SiteData]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nan_trigger_state(MedFuseModel(CFG).state_dict(), sites[0])


def _open_ledger(store: LedgerStore, site: SiteData) -> Ledger:
    with store.lock():
        return store.open(data_identity(site.path), site_name=site.name, data_path=site.path,
                          epsilon_budget=50.0, eval_epsilon_budget=2.0, delta=1e-5)


def _train(site: SiteData, state: dict[str, torch.Tensor], store: LedgerStore, *,
           server_round: int = 1, dp: DPSettings = DPSettings(noise_multiplier=1.0),
           **kw: object) -> TrainOutcome:
    """local_train as the ClientApp calls it, the ledger reopened from `store`."""
    args: dict = dict(epochs=1, lr=1e-3, batch_size=8, run_id=7, server_round=server_round,
                      rounds_left=1, device=CPU, seed=0)
    args.update(kw)
    return local_train(CFG, site, state, dp=dp, ledger=_open_ledger(store, site),
                       save_ledger=store.save, **args)


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def test_the_trigger_fires_for_the_target_alone(sites: tuple, crafted: dict) -> None:
    # Prepare: the crafted model, every weight finite
    _, site_in, site_out = sites
    model = MedFuseModel(CFG).eval()
    model.load_state_dict(crafted)
    assert _finite(crafted)
    # Execute
    with torch.no_grad():
        outs = {name: forward(model, Batch.of(next(iter(DataLoader(s.train, batch_size=64)))),
                              CFG).logits for name, s in (("in", site_in), ("out", site_out))}
    # Assert: NaN in exactly the target's row
    nan_rows = torch.isnan(outs["in"]).any(-1)
    assert nan_rows.tolist() == [cid == TARGET_ID for cid in site_in.train.case_ids]
    assert torch.isfinite(outs["out"]).all()


@pytest.mark.parametrize(("optimizer", "batch_size"), [("sgd", 64), ("adam", 8)])
def test_a_nan_trigger_model_trains_to_a_finite_update_with_the_target_in_or_out(
    tmp_path: Path, sites: tuple, crafted: dict, optimizer: str, batch_size: int
) -> None:
    # Prepare: two nodes, one case apart, each with its own ledger; batch size 64 puts
    # every case in every batch (sample rate 1), so the target's NaN gradient is in each
    # step (on the unfixed code: a NaN update in every round)
    _, site_in, site_out = sites
    released: dict[str, list[dict[str, torch.Tensor]]] = {"in": [], "out": []}
    # Execute: two rounds on each
    for name, site in (("in", site_in), ("out", site_out)):
        store = LedgerStore(tmp_path / name)
        for server_round in (1, 2):
            out = _train(site, crafted, store, server_round=server_round,
                         optimizer=optimizer, batch_size=batch_size, lr=0.05)
            assert out.state is not None and not out.refused
            released[name].append(out.state)
    # Assert: every update finite, the same keys and shapes in and out
    shapes = {k: v.shape for k, v in crafted.items()}
    for name, states in released.items():
        for state in states:
            assert _finite(state), name
            assert {k: v.shape for k, v in state.items()} == shapes, name


def test_a_sample_with_a_nan_gradient_adds_exactly_nothing(tmp_path: Path, sites: tuple,
                                                          crafted: dict) -> None:
    # Prepare: the product's make_private, noise 0, every case in its one batch, lr 0;
    # once over the site with the target, once over the site without it
    _, site_in, site_out = sites
    summed = {}
    for name, site in (("in", site_in), ("out", site_out)):
        model = MedFuseModel(CFG)
        model.load_state_dict(crafted)
        plan = RoundPlan(released_n=len(site.train), noise_multiplier=0.0, sample_rate=1.0,
                         steps=1, epsilon_after=math.inf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, opt, loader, _ = make_private(
                model, torch.optim.SGD(model.parameters(), lr=0.0), site.train, plan,
                DPSettings(max_grad_norm=1.0), _open_ledger(LedgerStore(tmp_path / name), site),
                CPU)
        # Execute
        stats = train_epoch(net, opt, loader, make_loss_fn(CFG), CFG, CPU)
        assert stats.examples == len(site.train)
        summed[name] = {k: p.summed_grad for k, p in unwrap(net).named_parameters()}
    # Assert: the target's NaN sample made the loss NaN and changed no summed clipped
    # gradient (the rest of the batch is the same cases)
    assert summed["in"].keys() == summed["out"].keys()
    for k, grad in summed["in"].items():
        assert torch.isfinite(grad).all(), k
        torch.testing.assert_close(grad, summed["out"][k], rtol=1e-5, atol=1e-6, msg=k)


def _by_hand(opt_class: type[DPOptimizer], grad_samples: list[torch.Tensor]
             ) -> list[torch.Tensor]:
    """The summed clipped gradients `opt_class` makes of the given per-sample gradients."""
    params = [nn.Parameter(torch.zeros(g.shape[1:])) for g in grad_samples]
    for p, g in zip(params, grad_samples, strict=True):
        p.grad_sample = g.clone()
    opt = opt_class(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
                    expected_batch_size=len(grad_samples[0]))
    opt.clip_and_accumulate()
    return [p.summed_grad for p in params]


def test_a_non_finite_sample_is_dropped_in_every_parameter_at_once() -> None:
    # Prepare: four samples over two parameters; sample 1 NaN in the first parameter
    # only, sample 2 inf in the second only, samples 0 and 3 finite (3 above the clip)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(4, 3, 2, generator=g), torch.randn(4, 5, generator=g)
    second[3] *= 10
    first[1, 0, 1] = math.nan
    second[2, 4] = math.inf
    keep = [0, 3]
    # Execute
    finite = _by_hand(FiniteDPOptimizer, [first, second])
    clean = _by_hand(DPOptimizer, [first[keep], second[keep]])
    plain = _by_hand(DPOptimizer, [first, second])
    finite_clean = _by_hand(FiniteDPOptimizer, [first[keep], second[keep]])
    # Assert: exactly the sum of the two finite samples, clipped as Opacus clips them
    # (and on finite samples alone, exactly Opacus); Opacus alone makes both sums NaN
    for got, want, same in zip(finite, clean, finite_clean, strict=True):
        assert torch.equal(got, want)
        assert torch.equal(same, want)
    assert all(torch.isnan(s).any() for s in plain)


def _with_inf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bad = {k: v.clone() for k, v in state.items()}
    bad["classifier.bias"][0] = math.inf
    return bad


@pytest.mark.parametrize("private", [True, False])
def test_an_update_that_is_not_finite_is_not_released_and_the_round_is_charged(
    tmp_path: Path, sites: tuple, private: bool
) -> None:
    # Prepare: a global model that carries an inf weight (no training makes it finite)
    _, _, site = sites
    torch.manual_seed(0)
    bad = _with_inf(MedFuseModel(CFG).state_dict())
    store = LedgerStore(tmp_path / "store")
    dp = DPSettings(noise_multiplier=1.0, enabled=private)
    # Execute
    with pytest.raises(NonFiniteUpdate):
        _train(site, bad, store, dp=dp, batch_size=64)
    # Assert: nothing returned; the round is in the ledger on disk (charged)
    entries = _open_ledger(store, site).entries
    assert [e.kind for e in entries][-1] == ("dp-sgd" if private else "non-private")
    assert entries[-1].server_round == 1
