"""The simulation config's tables and `RUN_KEYS`, the simulation keys that are run-config keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic.fields import FieldInfo

from shared_model.contract.run_config import RunConfig, pyproject_defaults
from simulations.config import SimulationConfig, load_config
from simulations.sections import HARNESS_KEYS, RUN_KEYS, Experiment

SHIPPED = sorted((Path(__file__).resolve().parents[2] / "simulations").glob("*.toml"))


def _field(sim_key: str) -> FieldInfo:
    table, key = sim_key.split(".", 1)
    model = Experiment if table == "experiment" else SimulationConfig.model_fields[table].annotation
    return model.model_fields[key.replace("-", "_")]


def test_every_run_key_names_a_simulation_field_and_a_run_config_key() -> None:
    # Prepare
    run_fields = RunConfig.model_fields
    defaults = pyproject_defaults()

    # Execute / Assert: each row joins a field of the simulation config to a RunConfig key,
    # which the harness keeps for itself
    for sim_key, run_key in RUN_KEYS.items():
        sim_field = _field(sim_key)
        run_field = run_fields[run_key.replace("-", "_")]
        assert run_key in HARNESS_KEYS
        if not sim_key.startswith("experiment."):
            # a section key is declared once: RunConfig's bounds, pyproject's default
            # unless the simulation has its own ([training] rounds)
            assert sim_field.metadata == run_field.metadata, sim_key
            assert sim_field.annotation == run_field.annotation, sim_key
            if sim_key != "training.rounds":
                assert sim_field.get_default(call_default_factory=True) == defaults[run_key]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_makes_run_configs_of_its_own_keys(path: Path) -> None:
    # Prepare
    cfg = load_config(path)
    t, m = cfg.training, cfg.model

    for exp in cfg.experiments:
        # Execute
        run = RunConfig.parse(cfg.flower_run_config(exp, seed=3, sites_dir=Path("/s"),
                                                    output_dir=Path("/o")))

        # Assert: what the simulation config says is what the run config carries
        assert run.num_server_rounds == (exp.rounds or t.rounds) == cfg.rounds_of(exp)
        assert (run.local_epochs, run.batch_size, run.lr) == (t.local_epochs, t.batch_size, t.lr)
        assert (run.image_size, run.fusion, run.model_size, run.labels) == (
            m.image_size, m.fusion, m.model_size, m.labels)
        assert (run.strategy, run.dp, run.modality, run.seed) == (
            exp.strategy, exp.dp, exp.modality, 3)
        assert run.epsilon == (exp.epsilon or pyproject_defaults()["epsilon"])
