"""A membership-inference audit of a trained model: does it tell who was in its data?

A privacy officer's question is not only "what does the theorem say" but "can someone
with the model tell that a given patient was in the training data". This module runs the
attack and reports how well it does, per site:

- **members**: the site's train split (what the federation trained on); **non-members**:
  its val and test splits (never trained on), and for synthetic sites fresh cases from the
  same generator when the caller passes them;
- **loss threshold** (Yeom et al. 2018): a lower loss says member;
- **LiRA, offline** (Carlini et al. 2022, "Membership inference attacks from first
  principles"): each case's score under the audited model against its scores under
  reference models that never saw it (trained on population data that is neither a
  member nor an audited non-member: fresh synthetic cases or public folders), with one
  global variance, the paper's choice with few reference models.

Reported per attack: ROC AUC, TPR at 1% and 0.1% FPR, each with a bootstrap 95% interval,
and a verdict in words. At a few hundred cases a TPR at 0.1% FPR rests on at most one
false positive: its interval shows how little it can say. The statistic is the per-case
multitask loss with the report visible (classification, box and the report's tokens), so
a memorised report counts. Bootstrap draws use a fixed seed: they protect nothing, they
only make the report reproducible.

Membership is each site's train split; whether the model trained on that site at all is
checked against the model's record of its sites where there is one (`membership`), and
the verdict says so either way: an audit of a site that never trained the model would
report "no measurable leak" about cases that were never members.

The audit reads the site's data and writes its results on the site's disk; nothing is
sent anywhere. Its results are computed from the site's data without DP: they are for
the site's own eyes, like the exact metrics of `privacy show`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import ConcatDataset, Dataset, Subset

from shared_model.central import train_central
from shared_model.config import CentralConfig, ModelConfig
from shared_model.dataset import SiteData
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.figures import pyplot, save_png
from shared_model.train import case_losses

FPR_POINTS = (0.01, 0.001)
BOOTSTRAP = 1000
# verdict thresholds on the AUC's lower bound (0.5 = guessing)
CLEAR_LEAK = 0.60
SOME_LEAK = 0.52
# what a federation writes beside final/model.pt (server/checkpoint.py), with "sites"
MODEL_CARD = "model_card.json"


@dataclass(frozen=True)
class AttackResult:
    """How one attack did on one site: higher scores said member."""

    site: str
    attack: str  # "loss" or "lira-offline"
    members: int
    nonmembers: int
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1: float  # TPR at 1% FPR
    tpr_at_1_ci: tuple[float, float]
    tpr_at_01: float  # TPR at 0.1% FPR
    tpr_at_01_ci: tuple[float, float]
    fpr: tuple[float, ...]  # the ROC curve, for the plot
    tpr: tuple[float, ...]

    def row(self) -> dict[str, object]:
        """One flat row for tables (the curve left out)."""
        d = dataclasses.asdict(self)
        d.pop("fpr")
        d.pop("tpr")
        for key in ("auc_ci", "tpr_at_1_ci", "tpr_at_01_ci"):
            lo, hi = d.pop(key)
            d[f"{key}_lo"], d[f"{key}_hi"] = lo, hi
        return d


# ----------------------------------------------------------------- scores -> figures


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The best TPR with FPR at most `target` on the ROC curve."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def _figures(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float, float]:
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    s = np.r_[members, nonmembers]
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), tpr_at(fpr, tpr, FPR_POINTS[0]), tpr_at(fpr, tpr,
                                                                              FPR_POINTS[1])


def attack_result(site: str, attack: str, members: np.ndarray, nonmembers: np.ndarray, *,
                  bootstrap: int = BOOTSTRAP, seed: int = 0) -> AttackResult:
    """AUC and TPR at low FPR of scores (higher = member), with percentile bootstrap
    intervals (members and non-members resampled separately)."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if len(members) < 2 or len(nonmembers) < 2:
        raise ValueError(f"{site}: an audit needs at least 2 members and 2 non-members, got "
                         f"{len(members)} and {len(nonmembers)}")
    auc, t1, t01 = _figures(members, nonmembers)
    rng = np.random.default_rng(seed)
    draws = np.array([
        _figures(rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers)))
        for _ in range(bootstrap)
    ])
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    fpr, tpr, _ = roc_curve(y, np.r_[members, nonmembers])
    return AttackResult(
        site=site, attack=attack, members=len(members), nonmembers=len(nonmembers),
        auc=auc, auc_ci=(float(lo[0]), float(hi[0])),
        tpr_at_1=t1, tpr_at_1_ci=(float(lo[1]), float(hi[1])),
        tpr_at_01=t01, tpr_at_01_ci=(float(lo[2]), float(hi[2])),
        fpr=tuple(map(float, fpr)), tpr=tuple(map(float, tpr)),
    )


def lira_offline(target_losses: np.ndarray, reference_losses: np.ndarray) -> np.ndarray:
    """Offline LiRA scores: how far below the reference models' loss the audited model's
    loss is, per case, in units of one global standard deviation.

    target_losses: (N,); reference_losses: (R, N), every reference model OUT for every
    case. Losses are taken on a log scale (they are positive and skewed)."""
    target = np.log(np.asarray(target_losses, float) + 1e-8)  # (N,)
    refs = np.log(np.asarray(reference_losses, float) + 1e-8)  # (R, N)
    sigma = float(refs.std(axis=0, ddof=1).mean()) if refs.shape[0] > 1 else 1.0
    return (refs.mean(axis=0) - target) / max(sigma, 1e-6)  # (N,) higher = member


def membership(model_path: Path, meta: Mapping[str, object], audited: Sequence[str]) -> str:
    """The verdict's clause on whether the audited sites' train splits were members.

    The model's record of its sites is its metadata's `sites`, else the `sites` of the
    `model_card.json` beside it (a federation's `final/`); names only, so a listed site's
    train split being what trained it is still assumed. Raises `ValueError` (one line)
    where that record leaves an audited site out: its cases were never members, and an
    audit of them would report no leak whatever the model remembers.
    """
    model_path = Path(model_path)
    card = model_path.parent / MODEL_CARD
    known, source, why = meta.get("sites"), f"{model_path}'s metadata", ""
    if known is None and card.is_file():
        source = str(card)
        try:
            known = json.loads(card.read_text(encoding="utf-8")).get("sites")
        except (OSError, ValueError, AttributeError) as exc:
            why = f"its model card {card} cannot be read ({exc})"
    if isinstance(known, list) and all(isinstance(k, str) for k in known):
        outside = [name for name in audited if name not in known]
        if outside:
            raise ValueError(
                f"site(s) {', '.join(outside)} are not among the sites of {model_path} "
                f"({', '.join(known) or 'none'}, per {source}): their cases were never "
                "members, so an audit would report no leak whatever the model remembers; "
                "audit the sites it trained on (a node that trained under another "
                "site-name: give its folder that name)")
        return (f"members: each site's train split; {source} lists these sites (by name: "
                "that this train split is what trained the model is assumed)")
    if not why:
        why = (f"{source} holds no list of site names" if known is not None or card.is_file()
               else f"{model_path} records no training sites and has no {MODEL_CARD} "
                    "beside it")
    return ("membership assumed, not checked: the members are each site's train split, "
            f"but {why}, so that these cases trained the model cannot be checked")


def verdict(results: Sequence[AttackResult], membership: str = "") -> str:
    """A sentence a privacy officer can read, from the strongest attack's AUC interval;
    `membership` (see `membership`) is appended, so that the sentence says whose
    membership it measured."""
    text = _verdict(results)
    return f"{text}; {membership}" if membership else text


def _verdict(results: Sequence[AttackResult]) -> str:
    if not results:
        return "no audit was run"
    worst = max(results, key=lambda r: r.auc_ci[0])
    lo, hi = worst.auc_ci
    what = (f"the strongest attack ({worst.attack} on {worst.site}) reaches AUC "
            f"{worst.auc:.3f} [{lo:.3f}, {hi:.3f}], TPR {worst.tpr_at_1:.1%} at 1% FPR")
    if lo >= CLEAR_LEAK:
        return f"LEAKS: {what}; an attacker tells members from non-members well above chance"
    if lo >= SOME_LEAK:
        return f"SOME LEAK: {what}; membership is detectable above chance"
    return (f"NO MEASURABLE LEAK: {what}; indistinguishable from guessing (0.5) at "
            f"{worst.members} members and {worst.nonmembers} non-members")


# ----------------------------------------------------------------- the audit of a site


def _model(model_cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> MedFuseModel:
    model = MedFuseModel(model_cfg)
    model.load_state_dict(dict(state), strict=True)
    return model


def non_members(site: SiteData, extra: Dataset | None = None) -> Dataset:
    """The site's val and test splits (never trained on), and `extra` cases if given."""
    parts = [d for d in (site.val, site.test, extra) if d is not None and len(d)]
    return ConcatDataset(parts)


def reference_models(model_cfg: ModelConfig, population: Sequence[SiteData], k: int, *,
                     initial_state: Mapping[str, torch.Tensor] | None, epochs: int,
                     seed: int = 0, device: str = "auto") -> list[dict[str, torch.Tensor]]:
    """`k` models trained as the audited one was (from its starting point, centrally,
    without DP) on random halves of `population`, data that holds none of the audited
    cases: every reference model is OUT for every case."""
    rng = np.random.default_rng(seed)
    states = []
    for j in range(k):
        halves = [dataclasses.replace(s, train=Subset(s.train, sorted(rng.choice(
            len(s.train), max(len(s.train) // 2, 1), replace=False).tolist())))
            for s in population]  # fmt: skip
        cfg = CentralConfig(epochs=epochs, seed=seed + 1 + j, device=device)
        model, _ = train_central(halves, model_cfg, cfg, Tokenizer(model_cfg.vocab_size),
                                 initial_state=initial_state)
        states.append({k2: v.detach().cpu() for k2, v in model.state_dict().items()})
    return states


def audit_site(model_cfg: ModelConfig, state: Mapping[str, torch.Tensor], site: SiteData, *,
               references: Sequence[Mapping[str, torch.Tensor]] = (),
               extra_nonmembers: Dataset | None = None,
               device: torch.device = torch.device("cpu"),
               bootstrap: int = BOOTSTRAP) -> list[AttackResult]:
    """The loss attack, and offline LiRA when reference models are given, on one site."""
    outside = non_members(site, extra_nonmembers)
    model = _model(model_cfg, state)
    mem = case_losses(model, site.train, model_cfg, device)  # (M,)
    non = case_losses(model, outside, model_cfg, device)  # (N,)
    results = [attack_result(site.name, "loss", -mem, -non, bootstrap=bootstrap)]
    if references:
        ref_mem = np.stack([case_losses(_model(model_cfg, r), site.train, model_cfg, device)
                            for r in references])  # (R, M)
        ref_non = np.stack([case_losses(_model(model_cfg, r), outside, model_cfg, device)
                            for r in references])  # (R, N)
        scores = lira_offline(np.r_[mem, non], np.c_[ref_mem, ref_non])
        results.append(attack_result(site.name, "lira-offline", scores[: len(mem)],
                                     scores[len(mem):], bootstrap=bootstrap))
    return results


def results_table(results: Sequence[AttackResult]) -> list[dict[str, object]]:
    return [r.row() for r in results]


def mean_auc(results: Sequence[AttackResult], attack: str) -> float:
    aucs = [r.auc for r in results if r.attack == attack]
    return float(np.mean(aucs)) if aucs else math.nan


def roc_plot(results: Sequence[AttackResult], path, title: str = "membership inference"):
    """ROC curves on log-log axes (where low-FPR leaks show), chance as the diagonal."""
    fig, ax = pyplot().subplots(figsize=(5.5, 5))
    for r in results:
        fpr = np.maximum(np.asarray(r.fpr), 1e-4)
        tpr = np.maximum(np.asarray(r.tpr), 1e-4)
        ax.plot(fpr, tpr, label=f"{r.site} {r.attack} (AUC {r.auc:.2f})", lw=1.2)
    ax.plot([1e-4, 1], [1e-4, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)
