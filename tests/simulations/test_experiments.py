"""The table of experiment kinds and the config's pure helpers it relies on."""

from __future__ import annotations

import math
import typing
from pathlib import Path

from simulations.config import load_config
from simulations.experiments import KINDS, kind_of
from simulations.sections import Kind


def test_every_kind_of_the_config_has_an_entry_in_the_table() -> None:
    # Prepare: the kinds a config may name, with and without DP
    kinds = typing.get_args(Kind)
    cfg = load_config()

    # Execute
    keys = {kind_of(e) for e in cfg.experiments}

    # Assert: each resolves to a table entry; DP local-only is a kind of its own
    assert set(kinds) <= set(KINDS)
    assert keys <= set(KINDS)
    assert {"local", "local-dp", "federated"} <= keys


def test_model_for_is_the_run_configs_model() -> None:
    # Prepare
    cfg = load_config()

    # Execute / Assert: no run config (and no paths) needed for the same ModelConfig
    for exp in cfg.experiments:
        run = cfg.run_config(exp, 0, Path("/sites"), Path("/out"))
        assert cfg.model_for(exp) == run.model()


def test_epsilon_budget_is_the_experiments_else_the_run_configs_default() -> None:
    # Prepare
    cfg = load_config()

    # Execute / Assert
    for exp in cfg.experiments:
        flat = cfg.flower_run_config(exp, seed=0, sites_dir=Path("/s"), output_dir=Path("/o"))
        expected = float(flat["epsilon"]) if exp.dp else math.inf
        assert cfg.epsilon_budget(exp) == expected
        assert cfg.describe(exp)["epsilon_budget"] == expected
