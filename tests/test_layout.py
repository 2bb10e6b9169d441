"""The import graph the layout promises: rooms by role, arrows one way, Flower in the glue."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("client", "server", "shared_model", "simulations")
# who may import whom (besides itself)
ALLOWED = {
    "shared_model": set(),
    "client": {"shared_model"},
    "server": {"shared_model"},
    "simulations": {"client", "server", "shared_model"},
}
FLOWER_GLUE = {"client/app.py", "client/secure.py", "client/warm_exec.py", "server/app.py",
               "server/averaging.py", "server/download.py",
               "server/clock.py",
               "server/grid.py", "server/guard.py", "server/recorder.py", "server/replies.py",
               "server/secure.py", "server/strategy.py", "shared_model/contract/packing.py"}


def _imports(path: Path) -> set[str]:
    """Top-level package names imported anywhere in the file (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


@pytest.mark.parametrize("room", ROOMS)
def test_arrows_point_one_way(room: str):
    wrong = {
        str(f.relative_to(ROOT)): sorted((_imports(f) & set(ROOMS)) - ALLOWED[room] - {room})
        for f in _files(room)
    }
    assert {f: w for f, w in wrong.items() if w} == {}


def test_only_the_flower_glue_imports_flwr():
    users = {str(f.relative_to(ROOT)) for room in ROOMS for f in _files(room)
             if "flwr" in _imports(f)}
    assert users <= FLOWER_GLUE, sorted(users - FLOWER_GLUE)


def test_the_medfuse_command_composes_every_room():
    assert {"client", "server", "simulations"} <= _imports(ROOT / "medfuse.py")


def _function_imports(path: Path) -> list[int]:
    """Line numbers of the imports inside a function (a def, or a method) of `path`."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {sub.lineno for sub in ast.walk(node)
                      if isinstance(sub, (ast.Import, ast.ImportFrom))}
    return sorted(lines)


def test_an_import_inside_a_function_says_why():
    # An import belongs at the top of its module; one kept inside a function (to keep
    # `medfuse --help` or a ClientApp's start fast, or to break a cycle) says why in a
    # `# lazy:` comment on its line or the line above.
    offenders = []
    for room in ROOMS:
        for f in _files(room):
            text = f.read_text(encoding="utf-8").splitlines()
            for n in _function_imports(f):
                if not any("# lazy:" in line for line in text[max(n - 2, 0):n]):
                    offenders.append(f"{f.relative_to(ROOT)}:{n}")
    assert offenders == []
