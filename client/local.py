"""One site's local round, in plain PyTorch and Opacus: what the ClientApp calls (no Flower).

A private round reads like this: plan its privacy cost against the ledger (refusing a
round that would pass the budget, before anything runs), make the model, optimizer and
loader private (Opacus, Poisson sampling, noise from secret randomness), train with the
shared `train_epoch` unchanged, and settle the ledger (the entry on disk before anything
leaves the site). A non-private round, which only a node that allows it runs, is recorded
in the ledger as infinite epsilon: that data's budget is spent from then on.

Secret randomness: under DP the Poisson batches, the Gaussian noise and every other draw
(dropout) come from seeds taken from the operating system (`secrets`), never from the run
seed, the site name or the round, which the server knows: with a replayable seed the
server could regenerate the noise on fake data of the same size and subtract it. The run
seed keeps model initialisation and non-private runs reproducible.

Non-finite values: the coordinator crafts the global model, so it can make one case's
forward pass NaN. Under DP a sample whose gradient is not finite contributes nothing
(`FiniteDPOptimizer`), so a model with finite weights always trains to a finite update;
and an update that is still not finite (the weights the server sent were not, or a step
overflowed) is never returned: `local_train` raises `NonFiniteUpdate` after the round is
charged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

from client.privacy import AccountantName, BudgetError, Ledger, LedgerStore, noise_for_budget
from client.release import COUNT_NOISE, noised_count
from client.site import DEFAULT_EVAL_EPSILON_BUDGET, NodeConfig, RoundAsk, round_refusal
from shared_model.augment import views_of
from shared_model.config import DEFAULT_LESION_THRESHOLD, ModelConfig
from shared_model.contract.run_config import LocalRecipe, RunConfig
from shared_model.dataset import SiteData, SiteSplit
from shared_model.grad_samplers import ClippedGradients, ClippedModule, unsupported_layers
from shared_model.model import MedFuseModel, TrainLayers, freeze
from shared_model.tokenizer import Tokenizer
from shared_model.train import (
    CaseResults,
    evaluate_cases,
    make_loss_fn,
    proximal_pull,
    references_of,
    seed_everything,
    summarise,
    threshold_on,
    train_epoch,
    unwrap,
)

log = logging.getLogger(__name__)

OptimizerName = Literal["sgd", "adam"]
# where a DP step's per-example gradients come from (`make_private`)
PerExampleGradients = Literal["fast", "hooks"]


SECURE_RNG_NOTE = (
    "DP noise and Poisson batches come from PyTorch's generator seeded with 64 secret bits "
    "from the operating system. Secure mode (a cryptographic generator, and Opacus' defence "
    "against floating-point attacks on the Gaussian sampler) needs torchcsprng, which does "
    "not build for torch 2.13, so it is off (docs/privacy.md, Randomness).")


class DPSetupError(RuntimeError):
    """This node cannot train privately as the run asks (e.g. secure mode without its RNG)."""


class NonFiniteUpdate(RuntimeError):
    """The trained state holds a NaN or an infinity, so `local_train` returns nothing.

    Raised after the ledger entry of the round is on disk (`save_ledger` has run): under
    DP, whether the noised update is finite is post-processing of the DP release, so the
    one bit it tells is covered by the epsilon charged; without DP the round is already
    recorded as infinite epsilon. The message is for the node's log only (the ClientApp
    answers with a fixed error code and no text).
    """


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP-SGD of one site. The budget (epsilon, delta) is the ledger's."""

    enabled: bool = True
    noise_multiplier: float | None = None  # None: the smallest that fits the budget's plan
    max_grad_norm: float = 1.0
    accountant: AccountantName = "rdp"
    secure_mode: bool = False
    # training epsilon this release may not spend: what the hospital keeps for its own
    # later releases (node config epsilon-reserve; medfuse personalise spends it)
    reserve: float = 0.0

    @classmethod
    def of(cls, run: RunConfig, *, reserve: float = 0.0) -> DPSettings:
        """What the run config asks (dp, noise, clipping, accountant, secure mode)."""
        return cls(enabled=run.dp,
                   noise_multiplier=run.noise_multiplier or None,  # 0: from the budget
                   max_grad_norm=run.max_grad_norm, accountant=run.accountant,
                   secure_mode=run.secure_mode, reserve=reserve)


@dataclass(frozen=True)
class LocalSteps:
    """What one local round runs: epochs, step size, batches and the optimizer."""

    epochs: int
    lr: float
    batch_size: int
    proximal_mu: float = 0.0
    optimizer: OptimizerName = "adam"
    momentum: float = 0.0
    train_layers: TrainLayers = "all"
    augmult: int = 1  # views of each example in each step (augmentation multiplicity)

    @classmethod
    def of(cls, recipe: LocalRecipe, *, epochs: int, batch_size: int,
           lr: float | None = None, proximal_mu: float = 0.0) -> LocalSteps:
        """The run's recipe (`RunConfig.recipe()`), at `lr` where a round asks another."""
        return cls(epochs=epochs, lr=recipe.lr if lr is None else lr, batch_size=batch_size,
                   proximal_mu=proximal_mu, optimizer=recipe.optimizer,
                   momentum=recipe.momentum, train_layers=recipe.train_layers,
                   augmult=recipe.augmult)


# How a hospital adapts the federation's final model to its own cases with the epsilon it
# kept (`medfuse personalise`, the simulation's personalised rows): the classification
# heads only, so the reserve's noise spreads over ~70 k coordinates instead of ~1 M. The
# federation learns what is common; the heads learn the hospital's own label mix and
# readers. Measured on five hard synthetic hospitals (200 cases, label mix Dirichlet 0.5,
# a far public start; the federation spends 5 of 8, personalisation the last 3): the
# federation's model 0.645 -> 0.863 personalised this way (federation training the heads
# at SGD 1.0, cosine), 0.674 -> 0.781 (federation training every weight at SGD 0.1).
PERSONALISE = LocalSteps(epochs=5, lr=0.3, batch_size=32, optimizer="sgd",
                         train_layers="classifier")


def personal_steps(epochs: int | None = None, lr: float | None = None,
                   layers: str | None = None, batch_size: int | None = None) -> LocalSteps:
    """`PERSONALISE` with what a person changed (None keeps the default); `ValueError`
    naming `layers` where it is not one of TrainLayers."""
    if layers is not None and layers not in get_args(TrainLayers):
        raise ValueError(f"layers={layers!r}: allowed are {', '.join(get_args(TrainLayers))}")
    changed = {"epochs": epochs, "lr": lr, "train_layers": layers, "batch_size": batch_size}
    return replace(PERSONALISE, **{k: v for k, v in changed.items() if v is not None})


@dataclass(frozen=True)
class Budget:
    """The caps a data's ledger is opened with: they only ever lower what it holds."""

    epsilon: float  # training
    delta: float
    eval_epsilon: float = DEFAULT_EVAL_EPSILON_BUDGET  # the val/test splits'


@dataclass(frozen=True)
class TrainOutcome:
    state: dict[str, torch.Tensor] | None  # full state dict on CPU; None when refused
    num_examples: int  # the released size of the train split: noised under DP; 0 if refused
    train_loss: float  # mean loss per example seen, for the node's own log (nan if refused)
    epsilon: float  # the site's cumulative training epsilon after this round
    delta: float
    epsilon_left: float  # budget - epsilon, never negative
    refused: bool = False
    reason: str = ""  # why the site refused (a message for a person)
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    epsilon_budget: float = math.inf  # the data's training budget, as its ledger holds it


@dataclass(frozen=True)
class RoundPlan:
    """The privacy cost of one private round, known before it runs."""

    released_n: int  # the noised train-split size everything below is computed from
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float


def round_seed(seed: int, site_name: str, server_round: int) -> int:
    """A different, reproducible stream per (run seed, site, round): non-private runs only."""
    digest = hashlib.sha256(f"{seed}/{site_name}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def secret_seed() -> int:
    """64 bits from the operating system's CSPRNG: unknown to the server, never stored."""
    return secrets.randbits(64)


def training_refusal(node: NodeConfig, ask: RoundAsk, run: RunConfig) -> str:
    """Why this node refuses a training round ('' when it does not). Worked out from the
    node's config and the server's request alone, never from the data, so the reply may
    carry these words (`wire.DETAILED_ERRORS`); a budget refusal likewise quotes only the
    ledger's figures, which are post-processing of DP releases."""
    if not run.dp and not node.allow_non_private:
        return ("the run asks for training without differential privacy (dp=false) and this "
                "node does not allow it (node config allow-non-private=false)")
    return round_refusal(node, ask)


def dp_plan(released_n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate 1/k and k Poisson steps per epoch, k = ceil(released n / batch size).
    Computed from the released (noised) count, so the plan reveals nothing the count
    does not; known before training, so the round's cost is known before anything runs."""
    batches = max(math.ceil(released_n / batch_size), 1)
    return 1.0 / batches, epochs * batches


def _optimizer(
    name: OptimizerName, params: list[torch.nn.Parameter], lr: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def _to_device(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device) for k, v in state.items()}


def _budget_left(ledger: Ledger, spent: float) -> float:
    return max(ledger.epsilon_budget - spent, 0.0)


# ----------------------------------------------------------------- non-finite gradients


def per_sample_norms(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) each sample's gradient norm over all parameters together: the norm of its
    per-parameter norms, as Opacus' flat clipping computes it. NaN or inf in any one
    parameter's per-sample gradient makes that sample's norm NaN or inf."""
    norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
    return torch.stack([n.to(norms[0].device) for n in norms], dim=1).norm(2, dim=1)


def _zero_samples(grad_sample: torch.Tensor | list[torch.Tensor], drop: torch.Tensor) -> None:
    """Zero, in place, the rows `drop` (B,) bool marks in one parameter's per-sample
    gradient (a tensor, or Opacus' list of per-batch tensors, whose rows are `drop`'s in
    order). In place, so that Opacus' check that no gradient is used twice still sees
    the tensors it marked."""
    chunks = [grad_sample] if isinstance(grad_sample, torch.Tensor) else grad_sample
    start = 0
    for chunk in chunks:
        rows = drop[start:start + len(chunk)].to(chunk.device)
        chunk.masked_fill_(rows.view(-1, *[1] * (chunk.dim() - 1)), 0.0)
        start += len(chunk)


def per_example(grad_sample: torch.Tensor | list[torch.Tensor], k: int) -> torch.Tensor:
    """(B*k, ...) per-row gradients -> (B, ...) per-example ones: the mean over each
    example's k consecutive rows (its views, `shared_model.augment.repeat`).

    Why before clipping: the k rows all come from one example, so their mean is that
    example's one contribution, clipped to C like any other; the sum over a batch changes
    by at most C when one example is added or removed, and the accounting is that of one
    example (De et al. 2022, augmentation multiplicity). Clipping each row instead would
    let one example move the sum by k * C."""
    g = grad_sample if isinstance(grad_sample, torch.Tensor) else torch.cat(grad_sample)
    if len(g) % k:
        raise RuntimeError(f"{len(g)} per-sample rows are not whole groups of {k} views")
    return g.view(len(g) // k, k, *g.shape[1:]).mean(dim=1)


class FiniteDPOptimizer(DPOptimizer):
    """Opacus' flat-clipping `DPOptimizer`, except that a sample whose gradient norm is not
    finite contributes nothing, exactly as a sample clipped to norm 0 would.

    Why: Opacus scales each per-sample gradient by min(1, C / (norm + 1e-6)), which for a
    NaN or inf gradient is NaN or 0, and NaN * g and 0 * inf are NaN: one such sample makes
    the whole noised step NaN. A crafted global model whose forward pass is NaN for one
    target case alone then marks every update trained with that case, a membership bit
    outside the DP analysis. A clip factor of 0 alone would not do (0 * NaN is NaN), so
    the sample's per-sample gradients are zeroed, in every parameter at once (the norm is
    over all of them, as Opacus clips), and Opacus then clips and sums as always. Every
    step makes the same pass, whether it drops a sample or none: no branch on the data,
    so the time a step takes does not tell either (one more pass over the per-sample
    gradients, about what computing their norms costs).

    Privacy: what replaces a sample's gradient depends on that sample alone, and its norm
    (0) is within C, so the sensitivity of the clipped sum, and the accounting, are
    unchanged. With finite weights the clipped sum plus Gaussian noise is always finite,
    and so is the SGD or Adam step the wrapped optimizer takes with it.

    With `multiplicity` k > 1 each example came as k views (k consecutive rows): their
    per-row gradients are first averaged into the example's (`per_example`), then the
    same pass runs on B examples, not B*k rows.

    With a `clipper` (`make_private`'s default, `shared_model.grad_samplers`) the
    per-example gradients are never Opacus' `p.grad_sample`: the clipper computes each
    example's norm and the clipped sums layer by layer after the backward pass, with the
    same clip factor, the same dropping of non-finite examples and the same mean over
    the views, and leaves them in `p.summed_grad`, where Opacus' noise, scaling and
    accountant hook take over as always.

    Why a subclass that overrides `clip_and_accumulate`: Opacus has no hook between the
    per-sample gradients and the clipping (`attach_step_hook` runs after the noise), and
    this is the one method that sees all of a sample's gradients. Cleaning its input and
    calling Opacus' own keeps clipping, noise, accounting and the wrapped optimizer
    Opacus' code, unforked. `replacing` installs it over the optimizer Opacus built.
    """

    multiplicity: int = 1  # rows per example: k views, averaged before clipping
    # where the per-example gradients come from: None, Opacus' `p.grad_sample` (hooks);
    # else `ClippedGradients`, which clips and sums them itself (`make_private`'s default)
    clipper: ClippedGradients | None = None
    _batches: int = 0  # with a clipper: batches clipped into the sums since the last step

    def clip_and_accumulate(self) -> None:
        if self.clipper is not None:
            # the same clip, the same dropping of non-finite examples, the same views'
            # mean, computed layer by layer without Opacus' per-call hooks
            self.clipper.accumulate(self.params, max_grad_norm=self.max_grad_norm,
                                    multiplicity=self.multiplicity)
            self.clipper.clear()
            self._batches += 1
            return
        if self.multiplicity > 1:
            for p in self.params:
                p.grad_sample = per_example(p.grad_sample, self.multiplicity)
        samples = self.grad_samples
        if len(samples[0]):  # an empty Poisson batch has nothing to drop
            drop = ~torch.isfinite(per_sample_norms(samples))  # (B,)
            for p in self.params:
                _zero_samples(p.grad_sample, drop)
        super().clip_and_accumulate()

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Opacus' `pre_step` (clip and sum, noise, scale, count the step), less its
        check of `p.grad_sample`, which `ClippedGradients` never fills."""
        if self.clipper is None:
            return bool(super().pre_step(closure))
        if not self.params:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        self._batches = 0
        return True

    @property
    def accumulated_iterations(self) -> int:
        """Batches in the clipped sums (what Opacus reads from `p.grad_sample`; the
        accountant's sample rate and `scale_grad` use it): one, but for skipped steps."""
        if self.clipper is None:
            return super().accumulated_iterations
        return max(self._batches, 1)

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        if self.clipper is not None:
            self.clipper.clear()

    @classmethod
    def replacing(cls, opt: torch.optim.Optimizer, multiplicity: int = 1,
                  clipper: ClippedGradients | None = None) -> FiniteDPOptimizer:
        """The optimizer `PrivacyEngine.make_private` built, as a `FiniteDPOptimizer`:
        the same wrapped optimizer, noise, clipping norm, batch size, noise generator and
        accountant hook. Only Opacus' plain flat-clipping class (what `make_private` below
        asks for) is accepted; another would clip differently from what this class knows."""
        if type(opt) is not DPOptimizer:
            raise DPSetupError(
                f"Opacus built a {type(opt).__name__}, not the flat-clipping DPOptimizer "
                "whose non-finite samples this node knows how to drop"
            )
        finite = cls(opt.original_optimizer, noise_multiplier=opt.noise_multiplier,
                     max_grad_norm=opt.max_grad_norm,
                     expected_batch_size=opt.expected_batch_size,
                     loss_reduction=opt.loss_reduction, generator=opt.generator,
                     secure_mode=opt.secure_mode)
        if opt.step_hook is not None:
            finite.attach_step_hook(opt.step_hook)  # the accountant's: counts every step
        finite.multiplicity = multiplicity
        finite.clipper = clipper
        return finite


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of `state` that hold a NaN or an infinity."""
    return [k for k, v in state.items() if not bool(torch.isfinite(v).all())]


def non_finite_model(state: Mapping[str, torch.Tensor]) -> str:
    """Why a node will not train the model it was sent ('' when it will): a weight that
    is not finite makes every update non-finite, whatever the data, so the round would be
    charged and never released. Decided from the model alone: nothing is charged."""
    bad = non_finite_tensors(state)
    if not bad:
        return ""
    return (f"the model this round carries has weights that are not finite ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): not trained")


# ----------------------------------------------------------------- the round's steps


def released_count(ledger: Ledger, n: int, *, run_id: int, server_round: int,
                   accountant: AccountantName) -> int:
    """The train split's noised size: drawn once per data, charged once, kept in the ledger
    (saved by the caller before anything leaves the site)."""
    if ledger.released_count is None:
        ledger.released_count = noised_count(n)
        ledger.append("count", run_id=run_id, server_round=server_round,
                      noise_multiplier=COUNT_NOISE, accountant=accountant,
                      note="size of the training split")
    return ledger.released_count


def plan_round(ledger: Ledger, released_n: int, *, batch_size: int, epochs: int,
               dp: DPSettings, run_id: int, rounds_left: int) -> RoundPlan | str:
    """The round's noise, sampling and cost, or why the site refuses it (a message)."""
    if ledger.delta >= 1.0 / released_n:
        return (f"delta={ledger.delta:g} is not well below 1/n for a training split of about "
                f"{released_n} cases: one case could be released outright with probability "
                "delta. Use a delta below 1/n (1e-5 or less for sites under 10,000 cases)")
    sample_rate, steps = dp_plan(released_n, batch_size, epochs)
    cap = ledger.epsilon_budget - dp.reserve
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        # one noise level per run: derived at the run's first round for all the rounds
        # planned, kept while it still fits (cheap to account, what DP-SGD users expect)
        same_run = [e for e in ledger.entries if e.kind == "dp-sgd" and e.run_id == run_id
                    and e.sample_rate == sample_rate and e.steps == steps]
        sigma = same_run[-1].noise_multiplier if same_run else 0.0
        if not same_run or ledger.cost_with(
            (sigma, sample_rate, steps), "train", dp.accountant
        ) > cap:
            try:
                sigma = noise_for_budget(ledger, sample_rate, steps, rounds_left,
                                         accountant=dp.accountant, target=cap)
            except BudgetError as exc:
                return f"privacy budget spent: {exc}"
    cost = ledger.cost_with((sigma, sample_rate, steps), "train", dp.accountant)
    if cost > cap:
        spent = ledger.epsilon("train", dp.accountant)
        kept = f", less the {dp.reserve:g} this node keeps in reserve" if dp.reserve else ""
        return (f"privacy budget spent: this round ({steps} steps, noise {sigma:.4g}, sample "
                f"rate {sample_rate:.4g}) would bring epsilon from {spent:.4g} to "
                f"{cost:.4g}, above the site's budget of {ledger.epsilon_budget:g}{kept} "
                f"(delta {ledger.delta:g})")
    return RoundPlan(released_n, sigma, sample_rate, steps, cost)


def _per_example_source(model: MedFuseModel, asked: PerExampleGradients
                        ) -> PerExampleGradients:
    """`asked`, or "hooks" where `ClippedGradients` does not cover a trained layer."""
    if asked == "fast" and (bad := unsupported_layers(model)):
        log.info("per-example gradients by Opacus' hooks: no fast path for %s", bad[:3])
        return "hooks"
    return asked


def make_private(
    model: MedFuseModel, optimizer: torch.optim.Optimizer, train: SiteSplit, plan: RoundPlan,
    dp: DPSettings, ledger: Ledger, device: torch.device, augmult: int = 1,
    per_example_gradients: PerExampleGradients = "fast",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, PrivacyEngine]:
    """Opacus' `make_private` over a Poisson loader at the plan's sample rate, with the
    noise and the sampling drawn from secret seeds, gradients averaged over the
    released (not the exact) expected batch size, and samples whose gradient is not
    finite dropped (`FiniteDPOptimizer`); with `augmult` k, each example's k views are
    averaged before clipping.

    `per_example_gradients`: "fast" (the default) computes each example's clipped
    gradient with `shared_model.grad_samplers.ClippedGradients` (one batched product per
    layer after the backward pass; Opacus' module wrapper is then its no-op one);
    "hooks" with Opacus' `GradSampleModule`. The clipping, the noise, the sampling and
    the accounting are the same either way (Opacus' optimizer and accountant); "fast"
    falls back to "hooks" for a model with a trained layer it does not know."""
    try:
        with warnings.catch_warnings():
            # Opacus warns on every engine that its generator is not the secure one: true,
            # and said once in medfuse's words instead (`SECURE_RNG_NOTE`)
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
    except ImportError as exc:
        raise DPSetupError(
            f"secure-mode=true needs the torchcsprng package on this node ({exc})"
        ) from None
    # the spent privacy carries over: this engine's accountant starts from the ledger
    engine.accountant.history = list(ledger.history("train"))
    sampler_rng = None if dp.secure_mode else torch.Generator().manual_seed(secret_seed())
    noise_rng = None if dp.secure_mode else torch.Generator(device=device).manual_seed(
        secret_seed())
    loader = DPDataLoader(train, sample_rate=plan.sample_rate,
                          generator=sampler_rng or engine.secure_rng)
    source = _per_example_source(model, per_example_gradients)
    net, opt, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        poisson_sampling=False,  # the loader above already samples (at the plan's rate)
        noise_generator=noise_rng,
        grad_sample_mode="no_op" if source == "fast" else "hooks",
    )
    # "fast": the hooks on the model itself (`net` only wraps it), which also refuse a
    # second forward pass before the step, as `forbid_grad_accumulation` does for hooks
    clipper = ClippedGradients(model) if source == "fast" else None
    opt = FiniteDPOptimizer.replacing(opt, multiplicity=augmult, clipper=clipper)
    if clipper is None:
        net.forbid_grad_accumulation()
    else:
        net = ClippedModule(model, clipper)
    # Opacus derives it from the exact dataset size; the plan's released count instead
    opt.expected_batch_size = max(round(plan.released_n * plan.sample_rate), 1)
    return net, opt, loader, engine


def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, loader, model_cfg: ModelConfig,
           device: torch.device, epochs: int, after_step, augmult: int = 1,
           ) -> tuple[float, int]:
    """(mean loss per example seen, optimizer steps taken) over `epochs` epochs."""
    loss_fn = make_loss_fn(model_cfg)
    seen, loss_sum, taken = 0, 0.0, 0
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer, whose input (the image) needs no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(epochs):
            stats = train_epoch(net, opt, loader, loss_fn, model_cfg, device, after_step,
                                views=views_of(augmult))
            seen += stats.examples
            loss_sum += stats.loss * stats.examples
            taken += stats.steps
    return (loss_sum / seen if seen else math.nan), taken


def settle(ledger: Ledger, engine: PrivacyEngine, plan: RoundPlan, taken: int, *,
           run_id: int, server_round: int, accountant: AccountantName, site: str) -> None:
    """Every step noised and counted, or nothing is released; then the ledger entry."""
    counted = sum(s for _, _, s in engine.accountant.history) - sum(
        s for _, _, s in ledger.history("train")
    )
    if counted != taken or taken != plan.steps:
        raise RuntimeError(
            f"{site}: the accountant counted {counted} steps, the loop took {taken}, "
            f"{plan.steps} were planned: refusing to release an update that was not accounted"
        )
    entry = ledger.append("dp-sgd", run_id=run_id, server_round=server_round,
                          noise_multiplier=plan.noise_multiplier,
                          sample_rate=plan.sample_rate, steps=plan.steps,
                          accountant=accountant)
    assert math.isclose(entry.epsilon_after, plan.epsilon_after, rel_tol=1e-9)


# ----------------------------------------------------------------- the round


def local_train(
    model_cfg: ModelConfig,
    site: SiteData,
    global_state: Mapping[str, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    proximal_mu: float = 0.0,
    dp: DPSettings,
    ledger: Ledger,
    save_ledger: Callable[[Ledger], object],
    run_id: int,
    server_round: int,
    rounds_left: int,
    device: torch.device,
    seed: int,
    optimizer: OptimizerName = "adam",
    momentum: float = 0.0,
    train_layers: TrainLayers = "all",
    augmult: int = 1,
) -> TrainOutcome:
    """Train the global model on this site's train split: plan the round's privacy cost,
    make private, train, settle the ledger. `save_ledger(ledger)` (the ClientApp's store,
    under its lock) runs before anything that could leave the site is returned: the full
    state dict on the CPU (GroupNorm: no running statistics), or a refusal. Raises
    `NonFiniteUpdate`, after the ledger is saved, where the trained state is not finite."""
    n = len(site.train)
    plan: RoundPlan | None = None
    if dp.enabled:
        released_n = released_count(ledger, n, run_id=run_id, server_round=server_round,
                                    accountant=dp.accountant)
        save_ledger(ledger)  # the count is drawn once: on disk before it can be used
        planned = plan_round(ledger, released_n, batch_size=batch_size, epochs=epochs,
                             dp=dp, run_id=run_id, rounds_left=rounds_left)
        if isinstance(planned, str):
            return _refusal(ledger, dp.accountant, f"{site.name}: {planned}")
        plan = planned
        seed_everything(secret_seed())  # dropout and any other draw: secret too
    else:
        seed_everything(round_seed(seed, site.name, server_round))

    model = _global_model(model_cfg, global_state, device, train_layers)
    opt = _optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr,
                     momentum)
    net: torch.nn.Module = model
    engine: PrivacyEngine | None = None
    if plan is not None:
        net, opt, loader, engine = make_private(model, opt, site.train, plan, dp, ledger,
                                                device, augmult)
    else:
        loader = DataLoader(site.train, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(
                                round_seed(seed, site.name, server_round)))
    after_step = None
    if proximal_mu > 0:
        after_step = proximal_pull(net, _to_device(global_state, device), proximal_mu, lr)
    train_loss, taken = _train(net, opt, loader, model_cfg, device, epochs, after_step,
                               augmult)
    state = {k: v.detach().cpu().clone() for k, v in unwrap(net).state_dict().items()}

    if plan is None:
        outcome = _non_private(ledger, save_ledger, state, n, train_loss, run_id=run_id,
                               server_round=server_round, site=site.name)
    else:
        assert engine is not None
        settle(ledger, engine, plan, taken, run_id=run_id, server_round=server_round,
               accountant=dp.accountant, site=site.name)
        save_ledger(ledger)  # on disk before anything leaves the site
        outcome = _private(ledger, plan, state, train_loss, dp.accountant)
    return _finite(outcome, site.name)


def open_ledger(store: LedgerStore, site: SiteData, budget: Budget) -> Ledger:
    """This data's ledger in `store` (found by the data's identity, created on first use),
    its budgets and delta lowered to `budget`'s where those are smaller. Call under
    `store.lock()`."""
    return store.open(store.identify(site.path), site_name=site.name, data_path=site.path,
                      epsilon_budget=budget.epsilon, eval_epsilon_budget=budget.eval_epsilon,
                      delta=budget.delta)


def private_round(
    store: LedgerStore,
    model_cfg: ModelConfig,
    site: SiteData,
    start: Mapping[str, torch.Tensor],
    steps: LocalSteps,
    budget: Budget,
    *,
    device: torch.device,
    dp: DPSettings = DPSettings(),
    run_id: int | None = None,
    server_round: int = 1,
    rounds_left: int = 1,
    seed: int = 0,
) -> TrainOutcome:
    """One training round of `site` from `start`, charged to the data's ledger in `store`:
    under the store's lock, open the ledger (`open_ledger`), plan the round's privacy cost,
    train, settle and save (`local_train`). The one way every caller runs a round: the
    ClientApp's train message, `medfuse personalise`, the simulation's local baselines.

    `run_id` None: a fresh secret id, for a one-off release outside any federated run
    (its noise level is then derived for this round alone). A refusal (the budget is
    spent) is an outcome with `refused`; raises `LedgerError`, `DPSetupError` and
    `NonFiniteUpdate` (after the round is saved) as `local_train` does.

        store = LedgerStore(state_dir)
        site = open_site(site_dir, labels=mf.labels, model=mf.model_config,
                         tokenizer=Tokenizer(mf.model_config.vocab_size))
        out = private_round(
            store, mf.model_config, site, mf.state,
            LocalSteps.of(run.recipe(), epochs=2, batch_size=32),
            Budget(epsilon=8.0, delta=1e-5), device=torch.device("cpu"))
        if out.refused:
            print(out.reason)
    """
    with store.lock():
        ledger = open_ledger(store, site, budget)
        return local_train(
            model_cfg, site, start, epochs=steps.epochs, lr=steps.lr,
            batch_size=steps.batch_size, proximal_mu=steps.proximal_mu, dp=dp, ledger=ledger,
            save_ledger=store.save,
            run_id=secrets.randbits(31) if run_id is None else run_id,
            server_round=server_round, rounds_left=rounds_left, device=device, seed=seed,
            optimizer=steps.optimizer, momentum=steps.momentum,
            train_layers=steps.train_layers, augmult=steps.augmult)


def _finite(outcome: TrainOutcome, site: str) -> TrainOutcome:
    """`outcome`, or `NonFiniteUpdate` where its state holds a NaN or an infinity. Called
    once the round is in the ledger on disk: the round stays charged either way."""
    assert outcome.state is not None
    bad = non_finite_tensors(outcome.state)
    if bad:
        raise NonFiniteUpdate(
            f"{site}: the trained update holds NaN or inf in {len(bad)} of "
            f"{len(outcome.state)} tensors (first {bad[0]!r}); it is not released, and the "
            "round stays in the ledger"
        )
    return outcome


def _private(ledger: Ledger, plan: RoundPlan, state: dict[str, torch.Tensor],
             train_loss: float, accountant: AccountantName) -> TrainOutcome:
    epsilon = ledger.epsilon("train", accountant)
    return TrainOutcome(
        state=state, num_examples=plan.released_n, train_loss=train_loss, epsilon=epsilon,
        delta=ledger.delta, epsilon_left=_budget_left(ledger, epsilon),
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
        epsilon_budget=ledger.epsilon_budget,
    )


def _global_model(model_cfg: ModelConfig, global_state: Mapping[str, torch.Tensor],
                  device: torch.device, train_layers: TrainLayers) -> MedFuseModel:
    """The global model on `device`, in train mode, with only `train_layers` trainable."""
    model = MedFuseModel(model_cfg)
    model.load_state_dict(dict(global_state), strict=True)
    model.to(device).train()
    freeze(model, train_layers)
    return model


def _non_private(ledger: Ledger, save_ledger: Callable[[Ledger], object],
                 state: dict[str, torch.Tensor], n: int, train_loss: float, *, run_id: int,
                 server_round: int, site: str) -> TrainOutcome:
    """A round without DP (only where the node allows it): the ledger records it as
    infinite epsilon before the update can leave."""
    log.warning("%s: trained WITHOUT differential privacy (dp=false): the ledger records "
                "this release as infinite epsilon", site)
    ledger.append("non-private", run_id=run_id, server_round=server_round,
                  noise_multiplier=0.0, note="trained with dp=false")
    save_ledger(ledger)
    return TrainOutcome(state=state, num_examples=n, train_loss=train_loss,
                        epsilon=math.inf, delta=ledger.delta, epsilon_left=0.0,
                        epsilon_budget=ledger.epsilon_budget)


def _refusal(ledger: Ledger, accountant: AccountantName, reason: str) -> TrainOutcome:
    log.warning("%s", reason)
    spent = ledger.epsilon("train", accountant)
    return TrainOutcome(
        state=None, num_examples=0, train_loss=math.nan, epsilon=spent, delta=ledger.delta,
        epsilon_left=_budget_left(ledger, spent), refused=True, reason=reason,
        epsilon_budget=ledger.epsilon_budget,
    )


def local_cases(
    model_cfg: ModelConfig,
    site: SiteData,
    state: Mapping[str, torch.Tensor],
    device: torch.device,
    split: Literal["val", "test"] = "val",
    batch_size: int = 64,
) -> CaseResults:
    """The shared `evaluate_cases` of `state` on one split of this site; the test split's
    lesion threshold set on this site's validation split (`threshold_on`), the
    constant-report baseline chosen on its training references (`references_of`)."""
    data = site.val if split == "val" else site.test
    model = MedFuseModel(model_cfg)
    model.load_state_dict(dict(state), strict=True)
    model.to(device)
    tok = Tokenizer(model_cfg.vocab_size)
    threshold = (threshold_on(model, site.val, model_cfg, tok, device, batch_size)
                 if split == "test" else DEFAULT_LESION_THRESHOLD)
    return evaluate_cases(model, data, model_cfg, tok, device, batch_size=batch_size,
                          label_names=site.labels, lesion_threshold=threshold,
                          train_refs=references_of(site.train, tok))


def local_evaluate(
    model_cfg: ModelConfig,
    site: SiteData,
    state: Mapping[str, torch.Tensor],
    device: torch.device,
    split: Literal["val", "test"] = "val",
    batch_size: int = 64,
) -> tuple[dict[str, float], int]:
    """Exact metrics of `state` on one split: (metrics, number of examples). For the
    researcher's own tables; what a node releases goes through `client.release`."""
    data = site.val if split == "val" else site.test
    if len(data) == 0:
        return {}, 0
    cases = local_cases(model_cfg, site, state, device, split, batch_size)
    return summarise(cases, model_cfg.num_classes), len(data)
