"""Where a local federation lives: its ports on 127.0.0.1, its working folder, and the
command lines that follow from them.

Apart from `LocalFederation` (`server/ops/federation.py`) because all of it is settled
once, before any process starts, and must not change while processes come and go: a
SuperLink or SuperNode restarted after a crash has to come back on the same port, with
the same database, key and privacy ledger, or Flower no longer knows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server.ops.flower_commands import superlink_command, supernode_command, write_connection
from server.ops.handouts import CONNECTION_NAME, node_config_string
from server.ops.pki import Provisioned
from server.ops.processes import LOOPBACK, address, free_ports
from server.ops.provision import provision


@dataclass(frozen=True)
class LocalLayout:
    """A throwaway federation's fixed coordinates; `lay_out()` makes one."""

    workdir: Path
    sites: dict[str, Path]
    port: int
    node_ports: dict[str, int]
    prov: Provisioned
    epsilon_budget: float | None = None
    timed_nodes: bool = False

    @property
    def database(self) -> Path:
        return self.workdir / "superlink.db"

    def state_dir(self, name: str) -> Path:
        """Per hospital, so that a restarted SuperNode finds its own privacy ledger."""
        return self.workdir / "state" / name

    def run_config_path(self, number: int) -> Path:
        return self.workdir / f"run-config-{number}.toml"

    def superlink_command(self) -> list[str]:
        return superlink_command(port=self.port, database=self.database,
                                 ca_cert=self.prov.ca_cert, cert=self.prov.superlink_cert,
                                 key=self.prov.superlink_key, auth=True)  # fmt: skip

    def node_command(
        self,
        name: str,
        *,
        private_key: Path | None = None,
        root_cert: Path | None | bool = True,
        port: int | None = None,
        max_retries: int | None = None,
    ) -> list[str]:
        """The overrides exist for the refusal tests: another key, no CA, another port."""
        ca = self.prov.hospital_ca_cert(name) if root_cert is True else root_cert or None
        return supernode_command(
            superlink=address(self.port),
            port=port if port is not None else self.node_ports[name],
            root_cert=ca,
            private_key=private_key or self.prov.private_key(name),
            node_config=self._node_config(name),
            max_retries=max_retries,
        )

    def _node_config(self, name: str) -> str:
        return node_config_string(
            str(self.sites[name]), name, "auto", self.epsilon_budget, str(self.state_dir(name)),
            release_compute_time=self.timed_nodes,
        )


def lay_out(
    workdir: Path,
    sites: Mapping[str, Path],
    flwr_home: Path,
    *,
    epsilon_budget: float | None = None,
    timed_nodes: bool = False,
) -> LocalLayout:
    """Ports are picked first because provisioning writes the SuperLink's address into
    every hospital's hand-out; the flwr connection needs the same port and CA, so it is
    written here too."""
    sites = {n: Path(p).resolve() for n, p in sites.items()}
    ports = free_ports(1 + len(sites))
    prov = provision(workdir / "provision", list(sites), [], ports[0], bind_host=LOOPBACK)
    write_connection(flwr_home, CONNECTION_NAME, address(ports[0]), prov.ca_cert)
    return LocalLayout(
        workdir=workdir, sites=sites, port=ports[0],
        node_ports=dict(zip(sites, ports[1:], strict=True)), prov=prov,
        epsilon_budget=epsilon_budget, timed_nodes=timed_nodes,
    )  # fmt: skip
