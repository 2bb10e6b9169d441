"""The membership-inference audit runs the attack: a memorising model is caught, a model
trained with strong DP is not, and the figures behave on known scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.audit import attack_result, audit_site, lira_offline, reference_models, verdict
from client.local import DPSettings, local_train
from client.privacy import LedgerStore, data_identity
from shared_model.config import DEFAULT_LABELS, CentralConfig, ModelConfig
from shared_model.dataset import SiteData, open_site
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.synth import SynthConfig, write_federation

CFG = ModelConfig.small(image_size=32)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[SiteData]:
    """Two hospitals of ~120 cases: one audited, one as population for reference models."""
    out = tmp_path_factory.mktemp("audit")
    dirs = write_federation(out, SynthConfig(sites=2, cases_per_site=120, seed=11,
                                             image_size=32))
    return [open_site(d, labels=DEFAULT_LABELS, model=CFG, tokenizer=Tokenizer(CFG.vocab_size))
            for d in dirs]


def _init() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MedFuseModel(CFG).state_dict()


def test_figures_on_known_scores():
    rng = np.random.default_rng(0)
    apart = attack_result("s", "loss", rng.normal(5, 1, 200), rng.normal(0, 1, 200),
                          bootstrap=200)
    same = attack_result("s", "loss", rng.normal(0, 1, 200), rng.normal(0, 1, 200),
                         bootstrap=200)
    assert apart.auc > 0.99 and apart.tpr_at_1 > 0.8
    assert same.auc_ci[0] < 0.5 < same.auc_ci[1] and same.tpr_at_1 < 0.1
    assert verdict([apart]).startswith("LEAKS") and verdict([same]).startswith("NO MEASURABLE")


def test_lira_scores_a_case_higher_when_the_model_fits_it_better_than_the_references():
    refs = np.full((4, 3), 1.0) + np.arange(4)[:, None] * 0.01  # (R, N) losses
    scores = lira_offline(np.array([0.1, 1.0, 3.0]), refs)
    assert scores[0] > scores[1] > scores[2]


@pytest.mark.slow
def test_a_memorising_model_is_caught_and_strong_dp_hides_membership(
    sites: list[SiteData], tmp_path: Path
):
    # Prepare: the same start, trained on the audited site's train split twice: without DP
    # until it memorises, and with DP-SGD at a large noise (the product's own local_train)
    from shared_model.central import train_central

    audited, population = sites
    memorised, _ = train_central([audited], CFG, CentralConfig(epochs=60, lr=3e-3, seed=0,
                                                                   weight_decay=0.0),
                                 Tokenizer(CFG.vocab_size), initial_state=_init())
    store = LedgerStore(tmp_path / "store")
    with store.lock():
        ledger = store.open(data_identity(audited.path), site_name=audited.name,
                            data_path=audited.path, epsilon_budget=1e9,
                            eval_epsilon_budget=2.0, delta=1e-5)
        private = local_train(CFG, audited, _init(), epochs=30, lr=3e-3, batch_size=16,
                              dp=DPSettings(noise_multiplier=8.0), ledger=ledger,
                              save_ledger=store.save, run_id=1, server_round=1,
                              rounds_left=1, device=CPU, seed=0)
    refs = reference_models(CFG, [population], 2, initial_state=_init(), epochs=10, seed=0,
                            device="cpu")
    # Execute
    leak = audit_site(CFG, memorised.state_dict(), audited, references=refs, bootstrap=200)
    hidden = audit_site(CFG, private.state, audited, references=refs, bootstrap=200)
    # Assert: the attack tells members apart on the memorising model, not on the DP one
    loss_leak = next(r for r in leak if r.attack == "loss")
    loss_hidden = next(r for r in hidden if r.attack == "loss")
    assert {r.attack for r in leak} == {"loss", "lira-offline"}
    assert loss_leak.auc_ci[0] > 0.6, loss_leak
    assert loss_hidden.auc_ci[0] < 0.5 + 0.05 and loss_hidden.auc < loss_leak.auc - 0.1
    assert math.isfinite(private.epsilon)
    print(f"\nmemorised: {[(r.attack, round(r.auc, 3)) for r in leak]}; "
          f"DP (noise 8, epsilon {private.epsilon:.2f}): "
          f"{[(r.attack, round(r.auc, 3)) for r in hidden]}")
