"""Real Flower processes on 127.0.0.1 for the deployment tests, always stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from server.ops.federation import LocalFederation


@pytest.fixture(scope="session")
def two_sites(tiny_federation: list[Path]) -> dict[str, Path]:
    """The suite's tiny synthetic federation (2 sites, 40 cases, 32 px) as h0 and h1."""
    return {f"h{i}": p for i, p in enumerate(tiny_federation)}


@pytest.fixture
def make_federation(tmp_path: Path) -> Iterator[Callable[..., LocalFederation]]:
    """Build LocalFederations whose processes are stopped even when the test fails."""
    made: list[LocalFederation] = []

    def make(sites: Mapping[str, Path], **kwargs: object) -> LocalFederation:
        fed = LocalFederation(
            tmp_path / f"fed{len(made)}", sites, echo=lambda _line: None, **kwargs  # type: ignore[arg-type]
        )
        made.append(fed)
        return fed

    try:
        yield make
    finally:
        leftovers = []
        for fed in made:
            fed.close()
            leftovers += fed.group.leftovers()
            _dump(fed)  # shown by pytest only when the test failed
        assert not leftovers, f"processes left running: {leftovers}"


def _dump(fed: LocalFederation) -> None:
    print("\n".join(f"{t:7.1f} {line}" for t, line in fed.transcript[-200:]))
    for proc in fed.group.procs:
        print(f"----- {proc.name} (exit {proc.returncode()}) {proc.log_path}")
        print(proc.tail(25))
