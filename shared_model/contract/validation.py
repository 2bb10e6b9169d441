"""The one way medfuse tells a person what is wrong with a config they wrote.

pydantic's own message is written for programmers; this one names each bad key the way
the person wrote it (`experiment[2] (fedavg-dp).epsilon`, `data-path`), says what is
wrong and what was given, one line per problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import ValidationError


def messages(exc: ValidationError) -> list[str]:
    """The bare messages (for a validator that re-raises them as its own ValueError)."""
    return [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]


def _key(loc: Sequence[object], item_names: Mapping[str, Sequence[str | None]]) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, int):
            names = item_names.get(str(loc[i - 1])) if i > 0 else None
            name = names[p] if names is not None and p < len(names) else None
            parts.append(f"[{p}]" + (f" ({name})" if name else ""))
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def describe(exc: ValidationError, what: str,
             item_names: Mapping[str, Sequence[str | None]] | None = None) -> str:
    """'invalid WHAT:' and a line `  key: message (got value)` per problem.

    `item_names`: names of the items of a list key (e.g. each experiment's name), so a
    person reads `experiment[2] (fedavg-dp)` rather than an index alone."""
    errors = exc.errors()
    # a tuple whose items failed also reports "too short": only the items' errors matter
    failed = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    failed |= {e["loc"][:1] for e in errors if len(e["loc"]) > 1}
    lines = []
    for e in errors:
        loc = tuple(e["loc"])
        if e["type"] == "too_short" and loc in failed:
            continue
        key = _key(loc, item_names or {})
        msg = str(e["msg"]).removeprefix("Value error, ")
        shown = "input" in e and loc and e["type"] != "missing"
        got = f" (got {e['input']!r})" if shown and not isinstance(e["input"], dict) else ""
        lines.append(f"  {key}: {msg}{got}" if key else f"  {msg}")
    return f"invalid {what}:\n" + "\n".join(lines)
