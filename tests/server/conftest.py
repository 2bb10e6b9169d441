"""Server test setup: Flower's task identity (which the ServerApp process normally sets,
and which building a Message needs) and a handler that collects the flwr logger's lines."""

from __future__ import annotations

import logging

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
