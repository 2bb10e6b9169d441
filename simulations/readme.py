"""`make readme-demo`: the README's demo table rewritten from what `make demo` wrote.

A figure in the README is only worth what the command behind it prints, so the table is
not typed by hand: this copies the "Mean over hospitals" table of the demo's
`summary.md` between two markers in README.md, with the date of that summary and the
commit checked out when it was copied. Run it right after `make demo`, on the commit the
demo ran on, and commit the two together.

    python -m simulations.readme runs/simulate README.md
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from shared_model.files import atomic_write_text

START = "<!-- demo-table: written by `make readme-demo` from runs/simulate/summary.md -->"
END = "<!-- /demo-table -->"
SECTION = "## Mean over hospitals"


def mean_table(summary_md: str) -> str:
    """The markdown table under "Mean over hospitals" in a summary.md; `ValueError` if the
    summary has none (not a simulation's summary, or one that ran no experiment)."""
    lines = summary_md.splitlines()
    try:
        start = lines.index(SECTION) + 1
    except ValueError:
        raise ValueError(f"no {SECTION!r} section in the summary") from None
    table = []
    for line in lines[start:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    if not table:
        raise ValueError(f"the {SECTION!r} section holds no table")
    return "\n".join(table)


def demo_block(table: str, measured: str, commit: str) -> str:
    """What stands between the markers: the table and where it comes from."""
    return "\n".join([
        START,
        f"`make demo`'s summary of {measured}, copied here on commit {commit} (mean over "
        "the hospitals' test splits; DP noise is drawn from secret seeds, so a re-run "
        "moves the DP rows by a point or two):",
        "",
        table,
        END,
    ])


def rewrite(readme: str, block: str) -> str:
    """`readme` with the text between the markers (markers included) replaced by `block`;
    `ValueError` unless each marker stands exactly once, in order."""
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise ValueError(f"README must hold each marker once: {START!r} ... {END!r}")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return head + block + tail


def _commit(folder: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder,
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "(not a git checkout)"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m simulations.readme RUN_DIR README.md", file=sys.stderr)
        return 2
    summary, readme = Path(argv[0]) / "summary.md", Path(argv[1])
    try:
        table = mean_table(summary.read_text(encoding="utf-8"))
        measured = datetime.fromtimestamp(summary.stat().st_mtime, UTC).strftime("%Y-%m-%d")
        text = rewrite(readme.read_text(encoding="utf-8"),
                       demo_block(table, measured, _commit(readme.parent)))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    atomic_write_text(readme, text)
    print(f"rewrote the demo table in {readme} from {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
