"""The evaluation policy in plain Python (no Flower): the per-run cap and the asked round."""

import pytest

from client.evaluation import EvaluationAsk, cap_reached
from client.site import NodeConfig


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
