"""Server test setup: Flower's task identity (which the ServerApp process normally sets,
and which building a Message needs) and a handler that collects the flwr logger's lines."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def flwr_log():
    """Every message the flwr logger emits during the test, formatted."""
    handler = _Lines()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture(scope="session")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small synthetic hospitals (24 cases, 32 px) for rounds through the ClientApp."""
    from shared_model.tooling.synth import SynthConfig, write_federation

    return write_federation(tmp_path_factory.mktemp("three-sites"),
                            SynthConfig(sites=3, cases_per_site=24, seed=11, image_size=32))
