"""One site's local round, in plain PyTorch and Opacus: what the ClientApp calls (no Flower).

With DP the model, optimizer and loader are wrapped by Opacus (`make_private`, Poisson
sampling) and the shared `train_epoch` runs unchanged. The engine's accountant starts
from the site's ledger, so the spent privacy is never forgotten; the round's cost is
computed before training and a round that would pass the budget is refused (no
training, nothing released). After training, the round is appended to the ledger and
the ledger saved (atomically) before anything leaves the site.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from client.privacy import (
    AccountantName,
    BudgetError,
    Ledger,
    epsilon_spent,
    new_entry,
    noise_for_budget,
    round_cost,
)
from shared_model.config import ModelConfig
from shared_model.dataset import SiteData
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.train import (
    evaluate,
    make_loss_fn,
    proximal_pull,
    seed_everything,
    train_epoch,
    unwrap,
)

log = logging.getLogger(__name__)

OptimizerName = Literal["sgd", "adam"]


class DPSetupError(RuntimeError):
    """This node cannot train privately as the run asks (e.g. secure mode without its RNG)."""


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP-SGD of one site. The budget (epsilon, delta) is the ledger's."""

    enabled: bool = True
    noise_multiplier: float | None = None  # None: the smallest that fits the budget's plan
    max_grad_norm: float = 1.0
    accountant: AccountantName = "rdp"
    secure_mode: bool = False


@dataclass(frozen=True)
class TrainOutcome:
    state: dict[str, torch.Tensor] | None  # full state dict on CPU; None when refused
    num_examples: int  # examples in the site's train split (not batches); 0 when refused
    train_loss: float  # mean loss per example seen (nan when refused)
    epsilon: float  # the site's cumulative epsilon after this round (inf without DP)
    delta: float
    epsilon_left: float  # budget - epsilon, never negative
    refused: bool = False
    reason: str = ""  # why the site refused (a message for a person)
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0


def round_seed(seed: int, site_name: str, server_round: int) -> int:
    """A different, reproducible stream per (run seed, site, round)."""
    digest = hashlib.sha256(f"{seed}/{site_name}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dp_plan(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Opacus' own arithmetic: sample rate 1/len(loader) and int(1/q) Poisson steps per
    epoch. Known before training, so the round's cost is known before anything runs."""
    batches = max(math.ceil(num_examples / batch_size), 1)
    sample_rate = 1.0 / batches
    return sample_rate, epochs * int(1.0 / sample_rate)


def _optimizer(
    name: OptimizerName, params: list[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


def _to_device(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device) for k, v in state.items()}


def _budget_left(ledger: Ledger, spent: float) -> float:
    return max(ledger.epsilon_budget - spent, 0.0)


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
    ledger: Ledger | None,
    run_id: int,
    server_round: int,
    rounds_left: int,
    device: torch.device,
    seed: int,
    optimizer: OptimizerName = "adam",
) -> TrainOutcome:
    """Train the global model on this site's train split for `epochs` epochs.

    Returns the full state dict (every tensor is shared: GroupNorm has no running
    statistics) as CPU tensors, or a refusal when the round would pass the budget.
    """
    train = site.train
    n = len(train)
    if dp.enabled and ledger is None:
        raise ValueError("DP training needs the site's ledger")
    if dp.enabled:
        assert ledger is not None
        sample_rate, steps = dp_plan(n, batch_size, epochs)
        spent = epsilon_spent(ledger, dp.accountant)
        if dp.noise_multiplier is not None:
            sigma = dp.noise_multiplier
        else:
            # one noise level per run: derived at the run's first round for all the rounds
            # planned, kept while it still fits (cheap to account, what DP-SGD users expect)
            same_run = [e for e in ledger.entries if e.run_id == run_id
                        and e.sample_rate == sample_rate and e.steps == steps]
            sigma = same_run[-1].noise_multiplier if same_run else 0.0
            if not same_run or round_cost(
                ledger, sigma, sample_rate, steps, dp.accountant
            ) > ledger.epsilon_budget:
                try:
                    sigma = noise_for_budget(ledger, sample_rate, steps, rounds_left,
                                             accountant=dp.accountant)
                except BudgetError as exc:
                    return _refusal(ledger, spent, f"{site.name}: privacy budget spent: {exc}")
        cost = round_cost(ledger, sigma, sample_rate, steps, dp.accountant)
        if cost > ledger.epsilon_budget:
            return _refusal(
                ledger, spent,
                f"{site.name}: privacy budget spent: this round ({steps} steps, noise "
                f"{sigma:.4g}, sample rate {sample_rate:.4g}) would bring epsilon from "
                f"{spent:.4g} to {cost:.4g}, above the site's budget of "
                f"{ledger.epsilon_budget:g} (delta {ledger.delta:g})",
            )

    gen = seed_everything(round_seed(seed, site.name, server_round))
    model = MedFuseModel(model_cfg)
    model.load_state_dict(dict(global_state), strict=True)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(optimizer, params, lr)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen)
    net: torch.nn.Module = model
    engine: PrivacyEngine | None = None
    if dp.enabled:
        assert ledger is not None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            try:
                engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
            except ImportError as exc:
                raise DPSetupError(
                    f"secure-mode=true needs the torchcsprng package on this node ({exc})"
                ) from None
        # the spent privacy carries over: this engine's accountant starts from the ledger
        engine.accountant.history = list(ledger.history())
        net, opt, loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
        )
        assert len(loader) * epochs == steps, (len(loader), epochs, steps)

    after_step = None
    if proximal_mu > 0:
        after_step = proximal_pull(net, _to_device(global_state, device), proximal_mu, lr)
    loss_fn = make_loss_fn(model_cfg)
    seen, loss_sum, taken = 0, 0.0, 0
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer, whose input (the image) needs no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(epochs):
            stats = train_epoch(net, opt, loader, loss_fn, model_cfg, device, after_step)
            seen += stats.examples
            loss_sum += stats.loss * stats.examples
            taken += stats.steps
    state = {k: v.detach().cpu().clone() for k, v in unwrap(net).state_dict().items()}
    train_loss = loss_sum / seen if seen else math.nan

    if not dp.enabled:
        log.warning("%s: trained WITHOUT differential privacy (dp=false)", site.name)
        delta = ledger.delta if ledger is not None else 0.0
        return TrainOutcome(state=state, num_examples=n, train_loss=train_loss,
                            epsilon=math.inf, delta=delta, epsilon_left=0.0)

    assert engine is not None and ledger is not None
    counted = sum(s for _, _, s in engine.accountant.history) - sum(
        s for _, _, s in ledger.history()
    )
    if counted != taken or taken != steps:
        # every step must have been noised and counted; if not, release nothing
        raise RuntimeError(
            f"{site.name}: the accountant counted {counted} steps, the loop took {taken}, "
            f"{steps} were planned: refusing to release an update that was not accounted"
        )
    ledger.entries.append(
        new_entry(
            run_id=run_id, server_round=server_round, noise_multiplier=sigma,
            sample_rate=sample_rate, steps=steps, epsilon_after=cost,
            accountant=dp.accountant,
        )
    )
    ledger.save()  # on disk before anything leaves the site
    epsilon = epsilon_spent(ledger, dp.accountant)
    return TrainOutcome(
        state=state, num_examples=n, train_loss=train_loss, epsilon=epsilon,
        delta=ledger.delta, epsilon_left=_budget_left(ledger, epsilon),
        noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
    )


def _refusal(ledger: Ledger, spent: float, reason: str) -> TrainOutcome:
    log.warning("%s", reason)
    return TrainOutcome(
        state=None, num_examples=0, train_loss=math.nan, epsilon=spent, delta=ledger.delta,
        epsilon_left=_budget_left(ledger, spent), refused=True, reason=reason,
    )


def local_evaluate(
    model_cfg: ModelConfig,
    site: SiteData,
    state: Mapping[str, torch.Tensor],
    device: torch.device,
    split: Literal["val", "test"] = "val",
    batch_size: int = 64,
) -> tuple[dict[str, float], int]:
    """The shared `evaluate` of `state` on one split: (metrics, number of examples)."""
    data = site.val if split == "val" else site.test
    if len(data) == 0:
        return {}, 0
    model = MedFuseModel(model_cfg)
    model.load_state_dict(dict(state), strict=True)
    model.to(device)
    metrics = evaluate(model, data, model_cfg, Tokenizer(model_cfg.vocab_size), device,
                       batch_size=batch_size)
    return metrics, len(data)
