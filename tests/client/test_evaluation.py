"""The evaluation policy in plain Python (no Flower): the per-run cap and the asked round;
the researcher's exact evaluation of one site (`local_evaluate`)."""

from pathlib import Path

import pytest
import torch

from client.evaluation import EvaluationAsk, cap_reached
from client.local import local_evaluate
from client.site import NodeConfig
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.contract import wire
from shared_model.dataset import open_site
from shared_model.metrics import constant_report_scores
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.train import references_of


@pytest.mark.parametrize(("done", "final", "refused"), [
    (0, False, False), (2, False, False), (3, False, True),  # the 4th is the final model's
    (3, True, False), (4, True, True),
])
def test_the_last_evaluation_a_run_may_have_is_kept_for_its_final_model(
    done: int, final: bool, refused: bool
) -> None:
    # Prepare
    node = NodeConfig.model_validate({"max-evaluations-per-run": 4})
    # Execute
    why = cap_reached(node, done, final=final)
    # Assert
    assert bool(why) is refused
    assert not why or "max-evaluations-per-run" in why


def test_exact_evaluation_is_not_capped() -> None:
    # Prepare
    node = NodeConfig.model_validate({"max-evaluations-per-run": 1, "evaluation": "exact"})
    # Execute / Assert
    assert cap_reached(node, 10, final=False) == ""


def test_inside_a_train_message_the_model_is_the_previous_rounds() -> None:
    # Prepare / Execute
    ask = EvaluationAsk(split="val", run_id=1, server_round=5, total_rounds=5, in_train=True)
    # Assert
    assert ask.evaluated_round == 4
    assert EvaluationAsk("val", 1, 5, 5).evaluated_round == 5


def test_local_evaluate_chooses_the_constant_report_on_the_sites_training_split(
    tiny_federation: list[Path],
) -> None:
    # Prepare: an untrained model on one tiny site
    cfg = ModelConfig.small(image_size=32, max_gen_tokens=8)
    tok = Tokenizer(cfg.vocab_size)
    site = open_site(tiny_federation[0], labels=DEFAULT_LABELS, model=cfg, tokenizer=tok)
    torch.manual_seed(0)
    state = MedFuseModel(cfg).state_dict()
    # Execute
    metrics, _ = local_evaluate(cfg, site, state, torch.device("cpu"), split="val")
    # Assert: the best constant of the site's training references, scored on val's
    scores = constant_report_scores(references_of(site.train, tok), references_of(site.val, tok))
    assert scores is not None
    assert metrics[wire.M_CONST_BLEU4] == pytest.approx(scores[1])
    assert metrics[wire.M_CONST_ROUGE_L] == pytest.approx(scores[2])
    assert " ".join(scores[0]) in {" ".join(r) for r in references_of(site.train, tok)}
