"""Flower's side of the harness: the simulation SuperLink that federated experiments run on.

It is a simulation-mode SuperLink that this run starts from the project root on a free
127.0.0.1 port (`flower/` under the output folder is its FLWR_HOME and keeps its logs) and
stops at the end, also on an error or Ctrl-C: Flower's own `:local:` SuperLink would
outlive the run and keep the working directory of whichever app started it. Every Flower
process gets the offline environment of `server.ops.supervisor` (no telemetry, no update
check, no Ray usage stats, no runtime dependency installation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pathspec  # Flower's own dependency, for the same .gitignore rules as `flwr run`

from server.ops.flower_commands import simulation_superlink_command, write_connection
from server.ops.processes import FlowerError, address, free_port
from server.ops.supervisor import Supervisor
from simulations.config import SimulationConfig
from simulations.experiments.context import SimulationError

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONNECTION = "medfuse-simulation"
CONFIG_FILE = "config.toml"  # the resolved config in the output folder
FLOWER_DIR = "flower"

# glibc's allocator settings for every process of the simulation (the SuperLink, the
# simulation process that runs the ServerApp and starts Ray, and Ray's workers, which
# inherit the environment of the raylet that the simulation process starts). A Ray actor
# serves one message after another, each building a model, an optimizer, Opacus' wrapper
# and its per-sample gradients (tensors of hundreds of kB to MBs): by default glibc raises
# its mmap threshold each time such a block is freed (up to 32 MB), so later ones come
# from the heap, which fragments and is never given back, and every thread may get an
# arena of its own (8 per core). Fixed thresholds (which also turn off the raising) and
# two arenas keep an actor near its first message's size. Flower's Ray backend passes its
# own `runtime_env` to `ray.init`, so its init-args cannot add environment variables:
# the processes' own environment is the way in. (A cluster that `ray start` began
# beforehand, `ray-address`, has workers started by its own raylets: export these there.)
ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}


def check_outside_app(out: Path, app_dir: Path = PROJECT_DIR) -> None:
    """`flwr run` bundles the app folder minus what its .gitignore ignores: an output
    folder inside it would be bundled (results, configs, model cards) into every run."""
    try:
        rel = out.resolve().relative_to(app_dir.resolve())
    except ValueError:
        return
    ignore = app_dir / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    if not spec.match_file(f"{rel.as_posix()}/{CONFIG_FILE}"):
        raise SimulationError(
            f"the output folder {out} is inside the Flower app ({app_dir}) and not ignored "
            "by its .gitignore, so `flwr run` would bundle its files into every federated "
            "run; use a folder under runs/ or outside the project"
        )


def simulation_link(workdir: Path, timeout: float = 120.0,
                    ray_address: str | None = None) -> Supervisor:
    """A simulation-mode SuperLink of this harness run (own FLWR_HOME, free port, logs).
    With `ray_address`, Flower's Ray backend joins that cluster: `ray.init()` reads
    RAY_ADDRESS (Flower 1.42's federation config has no address key for its init-args)."""
    # "local": a Ray instance of this run, even when `ray start` left a cluster running here
    extra = {**ALLOCATOR_ENV, "RAY_ADDRESS": ray_address or "local"}
    if ray_address and ray_address.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
        # a cluster of several machines: Ray's own rule for this node's address (the one
        # that routes towards the cluster), not the loopback of single-machine runs
        extra["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    link = Supervisor(workdir, CONNECTION, app_dir=PROJECT_DIR, extra_env=extra)
    port = free_port()
    write_connection(link.group.flwr_home, CONNECTION, address(port), None, insecure=True)
    try:
        link.start_superlink(simulation_superlink_command(port), port, timeout=timeout)
    except FlowerError:
        link.close()
        raise
    return link


def federation_config(num_nodes: int, cfg: SimulationConfig) -> str:
    """`flwr run --federation-config`: the simulated nodes and their Ray resources."""
    r = cfg.resources
    text = (f"num-supernodes={num_nodes} client-resources-num-cpus={r.client_cpus} "
            f"client-resources-num-gpus={r.client_gpus}")
    if r.ray_cpus is not None:  # not with a cluster: its nodes say what they give
        text += f" init-args-num-cpus={r.ray_cpus}"
    return text


class FlowerLink:
    """The simulation SuperLink of one harness run: started on first use, started again
    if it died, stopped by `close` (the runner's, at the end of the run)."""

    def __init__(self, out: Path, ray_address: str | None, echo: Callable[[str], None]):
        self.workdir, self.ray_address, self.echo = out / FLOWER_DIR, ray_address, echo
        self._link: Supervisor | None = None

    def get(self) -> Supervisor:
        if self._link is None or not self._link.superlink_alive():
            self.close()
            self.echo("starting a simulation SuperLink (Flower simulation engine, Ray)")
            self._link = simulation_link(self.workdir, ray_address=self.ray_address)
        return self._link

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
