"""What every room's commands share: the consoles, the label-set option, one error exit.

Each role's commands live in its own room (`client/cli.py`, `server/ops/cli.py`,
`simulations/cli.py`); `medfuse.py` composes them into one `medfuse` command.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from shared_model.config import DEFAULT_LABELS, parse_label_set

console = Console()
err = Console(stderr=True)

LabelsOpt = Annotated[
    str,
    typer.Option("--labels", help="the federation's label set, comma separated"),
]
DEFAULT_LABELS_TEXT = ",".join(DEFAULT_LABELS)


def parse_labels(text: str) -> tuple[str, ...]:
    try:
        return parse_label_set(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def fail(message: object, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code` (2: bad input, 1: failed)."""
    # plain text (an exception may hold brackets), never wrapped: logs are grepped
    err.print(Text.assemble(("error:", "red"), f" {message}"), soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt while inside: a command stopped by a
    scheduler or a closed terminal cleans up (stops its processes) as on Ctrl-C. SIGINT
    too, even where it was inherited as ignored (a shell starts background jobs so, and
    Python then leaves it ignored): `kill -INT` stops such a run cleanly."""
    def _term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, _term) for s in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
