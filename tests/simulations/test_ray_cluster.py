"""A simulation on an existing Ray cluster: a head and one worker node on 127.0.0.1 (two
raylets, one CPU each, on ports of their own), the two-site simulation run on it with
`ray-address`, its ClientApps seen on both nodes, the cluster stopped after.

The cluster is Ray's own multi-node-on-one-machine harness (`ray.cluster_utils.Cluster`):
`ray start` cannot keep a second node on the loopback address (with multi-node clusters
enabled it resolves 127.0.0.1 to the machine's outward address), and nothing here may
listen beyond 127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from simulations.config import load_config
from simulations.runner import Runner

CONFIG = """
name = "on a Ray cluster"
seeds = [0]
[sites]
source = "synthetic"
count = 2
cases-per-site = 40
seed = 0
[model]
image-size = 32
[training]
rounds = 1
[resources]
client-cpus = 1
ray-address = "{address}"
[[experiment]]
name = "fedavg-dp"
kind = "federated"
dp = true
epsilon = 8.0
"""


def _raylet_pid(node) -> int:  # type: ignore[no-untyped-def]
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


class _ActorWatch(threading.Thread):
    """Which Ray node each ClientApp actor process runs under (its raylet's children)."""

    def __init__(self, raylets: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.raylets, self.seen, self.done = raylets, set(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid, node in self.raylets.items():
                with contextlib.suppress(psutil.Error):
                    for kid in psutil.Process(pid).children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            if "ClientAppActor" in " ".join(kid.cmdline()):
                                self.seen.add(node)
            time.sleep(0.5)


@pytest.mark.slow
def test_a_simulation_runs_on_a_two_node_ray_cluster(tmp_path: Path, monkeypatch):
    # Prepare: Ray's single-machine address rule (loopback), a head and a worker node
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    processes: list[psutil.Process] = []
    watch: _ActorWatch | None = None
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        raylets = {_raylet_pid(cluster.head_node): "head", _raylet_pid(worker): "worker"}
        processes = psutil.Process().children(recursive=True)
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        cfg_file = tmp_path / "cluster.toml"
        cfg_file.write_text(CONFIG.format(address=cluster.address), encoding="utf-8")
        cfg = load_config(cfg_file, out=tmp_path / "out")
        watch = _ActorWatch(raylets)
        watch.start()

        # Execute
        outcome = Runner(cfg, console=Console(quiet=True), progress=False).run()

        # Assert: the run finished, and its ClientApps ran on both Ray nodes
        assert not outcome.failed, outcome
        assert (tmp_path / "out" / "experiments" / "fedavg-dp" / "seed-0" / "final"
                / "model.pt").is_file()
        watch.done.set()
        watch.join(timeout=5)
        assert watch.seen == {"head", "worker"}, watch.seen
    finally:
        if watch is not None:
            watch.done.set()
        cluster.shutdown()
        from ray._common.utils import reset_ray_address

        reset_ray_address()  # the head wrote its address for `ray.init()` to find
    # Assert: no process of the cluster is left
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
