"""`make readme-demo` / `make readme-bench`: the README's demo and benchmark tables
rewritten from what `make demo` and `make bench` wrote.

A figure in the README is only worth what the command behind it prints, so the tables
are not typed by hand: this copies the "Mean over hospitals" table of the demo's
`summary.md`, or every figure of the bench's `bench.json` beside its goal, between two
markers in README.md, with the date of the run and the commit checked out when it was
copied. Run it right after the run, on the commit the run measured, and commit the two
together.

    python -m simulations.readme runs/simulate README.md
    python -m simulations.readme --bench runs/bench README.md
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from shared_model.files import atomic_write_text

START = "<!-- demo-table: written by `make readme-demo` from runs/simulate/summary.md -->"
END = "<!-- /demo-table -->"
SECTION = "## Mean over hospitals"
BENCH_START = "<!-- bench-table: written by `make readme-bench` from runs/bench/bench.json -->"
BENCH_END = "<!-- /bench-table -->"
BENCH_FILE = "bench.json"
# settings a reader of the table does not need (bench.json keeps them)
BENCH_QUIET = ("plot", "points", "round_wall_s", "slowest_site_compute_s",
               "secure_round_wall_s", "plain_round_wall_s")


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


def bench_table(bench: dict) -> str:
    """A markdown table of every figure in a `bench.json`: its value, its goal (with met
    / not met) and the settings it was measured under; a scaling figure's points as one
    line per size."""
    lines = ["| figure | measured | goal | measured under |", "| --- | ---: | --- | --- |"]
    for key, fig in bench.items():
        if not isinstance(fig, dict) or "value" not in fig:
            continue  # machine, measured
        lines.append(f"| `{key}` | {fig['value']:.3f} | {fig.get('goal') or ''} | "
                     f"{_settings_text(fig.get('settings') or {})} |")
    return "\n".join(lines)


def _settings_text(settings: dict) -> str:
    parts = [f"{k} {_value_text(v)}" for k, v in settings.items()
             if k not in BENCH_QUIET and v is not None]
    points = settings.get("points") or []
    parts += [f"{p['hospitals']} hospitals: {p.get('trained', '?')} trained, peak "
              f"{p['peak_gb']:.2f} GB (PSS {p.get('peak_pss_gb', float('nan')):.2f}), "
              f"round {p['round_s']:.0f} s" + (" FAILED" if p.get("failed") else "")
              for p in points]
    return "; ".join(parts).replace("|", "/")


def _value_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return str(value)


def bench_block(table: str, bench: dict, commit: str) -> str:
    machine = bench.get("machine", {})
    return "\n".join([
        BENCH_START,
        f"`make bench` of {str(bench.get('measured', '?'))[:10]} ({machine.get('platform', '?')}, "
        f"Python {machine.get('python', '?')}, torch {machine.get('torch', '?')}), copied here "
        f"on commit {commit} (timings are measurements on a possibly shared machine, never "
        "tests):",
        "",
        table,
        BENCH_END,
    ])


def rewrite(readme: str, block: str, start: str = START, end: str = END) -> str:
    """`readme` with the text between the markers (markers included) replaced by `block`;
    `ValueError` unless each marker stands exactly once, in order."""
    if readme.count(start) != 1 or readme.count(end) != 1:
        raise ValueError(f"README must hold each marker once: {start!r} ... {end!r}")
    head, rest = readme.split(start)
    _, tail = rest.split(end)
    return head + block + tail


def _commit(folder: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder,
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "(not a git checkout)"


def _demo_text(run_dir: Path, readme: Path) -> tuple[str, Path]:
    summary = run_dir / "summary.md"
    table = mean_table(summary.read_text(encoding="utf-8"))
    measured = datetime.fromtimestamp(summary.stat().st_mtime, UTC).strftime("%Y-%m-%d")
    return rewrite(readme.read_text(encoding="utf-8"),
                   demo_block(table, measured, _commit(readme.parent))), summary


def _bench_text(run_dir: Path, readme: Path) -> tuple[str, Path]:
    source = run_dir / BENCH_FILE
    try:
        bench = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not JSON: {exc}") from None
    block = bench_block(bench_table(bench), bench, _commit(readme.parent))
    return rewrite(readme.read_text(encoding="utf-8"), block, BENCH_START, BENCH_END), source


def main(argv: list[str]) -> int:
    bench = argv[:1] == ["--bench"]
    args = argv[1:] if bench else argv
    if len(args) != 2:
        print("usage: python -m simulations.readme [--bench] RUN_DIR README.md", file=sys.stderr)
        return 2
    run_dir, readme = Path(args[0]), Path(args[1])
    try:
        text, source = (_bench_text if bench else _demo_text)(run_dir, readme)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    atomic_write_text(readme, text)
    print(f"rewrote the {'bench' if bench else 'demo'} table in {readme} from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
