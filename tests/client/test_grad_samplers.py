"""The fast per-example gradients (`shared_model.grad_samplers`, `make_private`'s default)
against Opacus' hooks on the same model and batch: the same per-example norms, the same
clipped sums (so the same DP-SGD release), with augmentation multiplicity and with every
`dp-train-layers` choice."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader, Subset

from client.local import (
    Budget,
    DPSettings,
    FiniteDPOptimizer,
    RoundPlan,
    make_private,
    open_ledger,
    per_example,
    per_sample_norms,
)
from client.privacy import LedgerStore
from shared_model.augment import MILD, augment, repeat
from shared_model.batch import Batch
from shared_model.config import DEFAULT_LABELS, ModelConfig, TrainLayers
from shared_model.dataset import SiteData, open_site
from shared_model.grad_samplers import (
    ClippedGradients,
    ClippedModule,
    UnsupportedLayer,
    unsupported_layers,
)
from shared_model.model import MedFuseModel, freeze
from shared_model.tokenizer import Tokenizer
from shared_model.train import forward, make_loss_fn, unwrap

CPU = torch.device("cpu")
CFG = ModelConfig.small(image_size=32, dropout=0.0, report_dropout=0.0)
B = 6
LAYERS: tuple[TrainLayers, ...] = ("all", "no-embeddings", "heads", "classifier", "prior")


@pytest.fixture(scope="module")
def site(tiny_federation: list[Path]) -> SiteData:
    return open_site(tiny_federation[0], labels=DEFAULT_LABELS, model=CFG,
                     tokenizer=Tokenizer(CFG.vocab_size))


@pytest.fixture(scope="module")
def init_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in MedFuseModel(CFG).state_dict().items()}


def _rows(site: SiteData, k: int) -> Batch:
    """B train cases, each as k views (drawn once, seed 1)."""
    batch = Batch.of(next(iter(DataLoader(Subset(site.train, range(B)), batch_size=B))))
    torch.manual_seed(1)
    return augment(repeat(batch, k), MILD) if k > 1 else batch


def _model(init_state: dict, layers: TrainLayers) -> MedFuseModel:
    model = MedFuseModel(CFG)
    model.load_state_dict(init_state)
    freeze(model, layers)
    return model.train()


def _summed(tmp: Path, site: SiteData, init_state: dict, rows: Batch, *, mode: str,
            layers: TrainLayers, k: int, clip: float) -> dict[str, torch.Tensor]:
    """The product's make_private (noise 0, lr 0) over `rows`: each trained parameter's
    clipped sum, by `mode`'s per-example gradients."""
    model = _model(init_state, layers)
    plan = RoundPlan(released_n=len(site.train), noise_multiplier=0.0,
                     sample_rate=B / len(site.train), steps=1, epsilon_after=math.inf)
    store = LedgerStore(tmp / mode)
    with store.lock():
        ledger = open_ledger(store, site, Budget(epsilon=1e9, delta=1e-5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, opt, _, _ = make_private(
            model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                   lr=0.0),
            site.train, plan, DPSettings(max_grad_norm=clip), ledger, CPU, augmult=k,
            per_example_gradients=mode)  # type: ignore[arg-type]
        assert isinstance(net, ClippedModule) == (mode == "fast")
        assert (opt.clipper is not None) == (mode == "fast")
        opt.zero_grad(set_to_none=True)
        loss, _ = make_loss_fn(CFG)(forward(net, rows, CFG), rows)
        loss.backward()
        opt.step()
    return {n: p.summed_grad for n, p in unwrap(net).named_parameters() if p.requires_grad}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("layers", LAYERS)
def test_clipped_sums_equal_opacus_hooks(tmp_path, site, init_state, layers, k):
    # Prepare: one batch of B examples (k views each), three clipping norms: every
    # example clipped (the sums then weigh each example's direction alone), none
    # clipped (the plain sum of the per-example gradients), and in between
    rows = _rows(site, k)
    for clip in (1e-3, 1.0, 1e6):
        # Execute
        fast = _summed(tmp_path, site, init_state, rows, mode="fast", layers=layers, k=k,
                       clip=clip)
        hooks = _summed(tmp_path, site, init_state, rows, mode="hooks", layers=layers, k=k,
                        clip=clip)
        # Assert: the same parameters, the same sums (to float32 rounding)
        assert fast.keys() == hooks.keys()
        assert fast, layers
        scale = max(float(g.abs().max()) for g in hooks.values())
        for name, got in fast.items():
            torch.testing.assert_close(got, hooks[name], rtol=1e-4, atol=1e-5 * scale,
                                       msg=f"{layers} k={k} clip={clip}: {name}")


@pytest.mark.parametrize("k", [1, 2])
def test_per_example_norms_equal_opacus_hooks(site, init_state, k):
    # Prepare: Opacus' per-sample gradients of the same rows, averaged over the views
    rows = _rows(site, k)
    loss_fn = make_loss_fn(CFG)
    gsm = GradSampleModule(_model(init_state, "all"), loss_reduction="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn(forward(gsm, rows, CFG), rows)[0].backward()
    params = [p for p in unwrap(gsm).parameters() if p.requires_grad]
    want = per_sample_norms([per_example(p.grad_sample, k) for p in params])
    # Execute: the fast path's norms on a fresh copy of the model
    model = _model(init_state, "all")
    clipper = ClippedGradients(model)
    loss_fn(forward(ClippedModule(model, clipper), rows, CFG), rows)[0].backward()
    got = clipper.accumulate([p for p in model.parameters() if p.requires_grad],
                             max_grad_norm=1.0, multiplicity=k)
    # Assert: one norm per example (not per view), Opacus' to rounding
    assert got.shape == (B,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_weights_get_no_gradient_from_autograd_but_the_inputs_do(site, init_state):
    # the fast path detaches the trained weights in its forward pass: autograd computes
    # the layers' output gradients only, the clipped sums are `accumulate`'s
    rows = _rows(site, 1)
    model = _model(init_state, "all")
    clipper = ClippedGradients(model)
    make_loss_fn(CFG)(forward(ClippedModule(model, clipper), rows, CFG), rows)[0].backward()
    assert all(p.grad is None for p in model.parameters())
    assert len(clipper.calls) == sum(1 for _ in clipper._hooked)  # every layer reached


def test_a_second_forward_before_the_step_is_refused(site, init_state):
    rows = _rows(site, 1)
    model = _model(init_state, "all")
    clipper = ClippedGradients(model)
    net = ClippedModule(model, clipper)
    make_loss_fn(CFG)(forward(net, rows, CFG), rows)[0].backward()
    with pytest.raises(RuntimeError, match="accumulation"):
        forward(net, rows, CFG)
    clipper.clear()  # what the optimizer's step and zero_grad do
    forward(net, rows, CFG)


def test_an_empty_batch_gives_zero_sums(site, init_state):
    # Poisson sampling can draw no example: every trained parameter's sum is zero
    empty = Batch(*(t[:0] for t in _rows(site, 1)))
    model = _model(init_state, "heads")
    clipper = ClippedGradients(model)
    make_loss_fn(CFG)(forward(ClippedModule(model, clipper), empty, CFG), empty)[0].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = clipper.accumulate(params, max_grad_norm=1.0)
    assert norms.shape == (0,)
    assert all(torch.equal(p.summed_grad, torch.zeros_like(p)) for p in params)


def test_a_layer_it_does_not_know_falls_back_to_opacus_hooks(tmp_path, site):
    class Scale(nn.Module):  # a trained parameter outside any known layer
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 2), Scale())
    assert unsupported_layers(model) == ["1 (Scale)"]
    with pytest.raises(UnsupportedLayer):
        ClippedGradients(model)
    model[1].s.requires_grad_(False)  # frozen: nothing to compute for it
    assert unsupported_layers(model) == []
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight  # one weight in two layers: the norm of a sum
    assert unsupported_layers(tied) == ["0 (Linear)", "1 (Linear)"]


def test_finite_optimizer_without_a_clipper_is_opacus_flat_clipping():
    # the hooks path is unchanged: p.grad_sample in, Opacus' clipping
    p = nn.Parameter(torch.zeros(3))
    p.grad_sample = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])
    opt = FiniteDPOptimizer(torch.optim.SGD([p], lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=1.0, expected_batch_size=2)
    assert opt.clipper is None
    opt.clip_and_accumulate()
    torch.testing.assert_close(p.summed_grad, torch.tensor([0.9, 1.2, 0.0]), rtol=1e-5,
                               atol=1e-6)
