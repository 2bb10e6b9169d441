"""Pooled and local-only baselines: plain PyTorch on one machine, no Flower, no DP.

Pooled training on the union of the sites' train splits is the upper reference that
federated training is judged against; local-only training at each site is the lower one.
Both use the same `train_epoch` and `evaluate` as the federated client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import ConcatDataset, DataLoader

from shared_model.augment import views_for
from shared_model.config import CentralConfig, ModelConfig
from shared_model.dataset import SiteData
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.train import (
    evaluate,
    make_loss_fn,
    pick_device,
    references_of,
    seed_everything,
    threshold_on,
    train_epoch,
)


@dataclass
class CentralResult:
    """Test metrics per site and over the union of the test splits."""

    per_site: dict[str, dict[str, float]]
    overall: dict[str, float]
    train_examples: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, val acc


EpochCallback = Callable[[int, float], None]


def train_central(
    sites: Sequence[SiteData],
    model_cfg: ModelConfig,
    cfg: CentralConfig,
    tokenizer: Tokenizer,
    on_epoch: EpochCallback | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[MedFuseModel, CentralResult]:
    """Train one model on the union of `sites`' train splits; test on each site's test split.

    With one site this is the local-only baseline for that site. `initial_state`: start
    from these weights (the public model) instead of random ones.
    """
    start = time.perf_counter()
    device = pick_device(cfg.device)
    gen = seed_everything(cfg.seed)
    model = MedFuseModel(model_cfg)
    if initial_state is not None:
        model.load_state_dict(dict(initial_state), strict=True)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    train_set = ConcatDataset([s.train for s in sites])
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    loss_fn = make_loss_fn(model_cfg)
    history = []
    for epoch in range(cfg.epochs):
        stats = train_epoch(model, optimizer, loader, loss_fn, model_cfg, device,
                            views=views_for(cfg.views))
        scheduler.step()
        history.append({"epoch": float(epoch + 1), "train-loss": stats.loss})
        if on_epoch is not None:
            on_epoch(epoch + 1, stats.loss)
    threshold = _threshold(model, sites, model_cfg, tokenizer, device)
    labels = sites[0].labels if sites else ()
    # The constant-report baseline is chosen on training references: each site's own
    # for its test split (as `client.local.local_evaluate` does at a site, so every
    # experiment's per-site rows share one baseline), all of them for the union.
    writes = model_cfg.generation
    refs = {s.name: references_of(s.train, tokenizer) for s in sites} if writes else {}
    per_site = {
        s.name: evaluate(model, s.test, model_cfg, tokenizer, device, label_names=labels,
                         lesion_threshold=threshold, train_refs=refs.get(s.name))
        for s in sites if len(s.test)
    }
    union = [r for s in sites for r in refs[s.name]] if writes else None
    overall = evaluate(model, ConcatDataset([s.test for s in sites]), model_cfg, tokenizer,
                       device, label_names=labels, lesion_threshold=threshold,
                       train_refs=union)
    result = CentralResult(
        per_site=per_site,
        overall=overall,
        train_examples=len(train_set),
        seconds=time.perf_counter() - start,
        history=history,
    )
    return model, result


def _threshold(model: MedFuseModel, sites: Sequence[SiteData], model_cfg: ModelConfig,
               tokenizer: Tokenizer, device: torch.device) -> float:
    """The lesion threshold calibrated on the union of the validation splits."""
    return threshold_on(model, ConcatDataset([s.val for s in sites]), model_cfg, tokenizer,
                        device)
