"""The simulation SuperLink's environment: what every process of a simulation (the
SuperLink, the simulation process, Ray's workers, which inherit it) starts with."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.ops.supervisor import Supervisor
from simulations.experiments import flower


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Supervisor]:
    """Supervisors whose SuperLink `simulation_link` would start (nothing is started)."""
    seen: list[Supervisor] = []
    monkeypatch.setattr(Supervisor, "start_superlink",
                        lambda self, cmd, port, timeout=0: seen.append(self))
    return seen


def test_every_simulation_process_gets_the_allocator_settings(
    tmp_path: Path, started: list[Supervisor]
) -> None:
    # Execute
    link = flower.simulation_link(tmp_path / "flower")
    # Assert: glibc's settings beside Ray's address, in the environment the SuperLink
    # (and through it the simulation process and Ray's workers) is started with
    assert started == [link]
    env = link.group.env(link.extra_env)
    assert flower.ALLOCATOR_ENV == {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072",
                                    "MALLOC_TRIM_THRESHOLD_": "131072"}
    assert {k: env[k] for k in flower.ALLOCATOR_ENV} == flower.ALLOCATOR_ENV
    assert env["RAY_ADDRESS"] == "local" and env["OMP_NUM_THREADS"] == "1"


def test_a_cluster_address_keeps_the_allocator_settings(
    tmp_path: Path, started: list[Supervisor]
) -> None:
    # Execute
    link = flower.simulation_link(tmp_path / "flower", ray_address="10.0.0.5:6379")
    # Assert
    env = link.group.env(link.extra_env)
    assert env["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    assert all(env[k] == v for k, v in flower.ALLOCATOR_ENV.items())
