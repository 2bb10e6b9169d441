"""The warm SuperExec (client/warm_exec.py): medfuse's own modules are dropped before a
fork, third-party ones stay; a ClientApp task runs Flower's `run_clientapp` in a forked
child, which exits with its code and is reaped. (A whole deployed round through it:
tests/deployment, and `medfuse bench`'s deploy figure.)"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

import client.warm_exec as warm_exec
from client.warm_exec import ForkExecutor, drop_own_modules
from shared_model.contract import pulls


def test_only_the_projects_own_modules_are_dropped(tmp_path: Path, monkeypatch):
    # Prepare: a project with one package, imported
    (tmp_path / "ownpkg").mkdir()
    (tmp_path / "ownpkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "ownpkg" / "mod.py").write_text("import json\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("ownpkg.mod")
    # Execute
    dropped = drop_own_modules(tmp_path)
    # Assert
    assert sorted(dropped) == ["ownpkg", "ownpkg.mod"]
    assert "ownpkg" not in sys.modules and "json" in sys.modules


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_clientapp_task_runs_in_a_forked_child_that_is_reaped(tmp_path: Path, monkeypatch):
    # Prepare: Flower's run_clientapp stood in for by one that notes its token and exits
    # as flwr_exit does
    seen = tmp_path / "token"

    def fake_run_clientapp(**kwargs: object) -> None:
        seen.write_text(f"{kwargs['token']} {kwargs['runtime_api_address']}")
        raise SystemExit(0)

    monkeypatch.setattr(warm_exec, "run_clientapp", fake_run_clientapp)
    executor = ForkExecutor()
    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1",
                         token="tok-1", insecure=True, root_certificates_path=None,
                         runtime_dependency_install=False, parent_pid=None,
                         suppress_output=True, task_id=7)
    # Execute
    result = executor.launch(spec)
    deadline = time.monotonic() + 30
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    # Assert
    assert result.status == LaunchResultStatus.ACCEPTED
    assert not executor.children  # reaped
    assert seen.read_text() == "tok-1 127.0.0.1:1"


def _in_a_fork(draw) -> int:  # type: ignore[no-untyped-def]
    """What `draw()` returns in a child forked from this process, as the warm exec forks."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's teardown
        os.write(write, str(draw()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return int(f.read())


def test_forked_clientapps_draw_their_dp_noise_seeds_afresh():
    # The attack: every task forks from one warm parent, so any generator state it holds
    # is the same in every child; a coordinator that learns one round's noise would know
    # the others'. The DP seeds come from the OS (client.local.secret_seed), not that state.
    import torch

    from client.local import secret_seed

    inherited = [_in_a_fork(lambda: int(torch.randint(0, 2**62, (1,)))) for _ in range(2)]
    seeds = [_in_a_fork(secret_seed) for _ in range(2)]

    assert inherited[0] == inherited[1]  # what the fork shares (why the seeds must not)
    assert seeds[0] != seeds[1]


def test_the_children_ask_promptly_for_arrays_their_supernode_has_not_pulled_yet(
        monkeypatch):
    # Prepare: Flower's functions as they are, restored after the test
    monkeypatch.setattr(warm_exec.flower_superexec, "get_executor",
                        warm_exec.flower_superexec.get_executor)
    monkeypatch.setattr(warm_exec.flower_clientapp, "pull_and_inflate_object_from_tree",
                        warm_exec.FLOWER_PULL_AND_INFLATE)
    # Execute
    warm_exec.swap_flower_parts()
    # Assert: Flower's pull with medfuse's waits (shared_model/contract/pulls.py)
    pull = warm_exec.flower_clientapp.pull_and_inflate_object_from_tree
    assert pull.func is warm_exec.FLOWER_PULL_AND_INFLATE
    assert pull.keywords["initial_backoff"] == pulls.FIRST_WAIT_S
    assert warm_exec.flower_superexec.get_executor is warm_exec._executor
