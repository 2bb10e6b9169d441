"""An append-only, hash-chained log of what crossed the network, for both sides.

A hospital's privacy officer wants to see exactly what left the building; the
coordinator wants the same record of what each node sent. Each line is one JSON entry
holding the digest of the previous line, and its own digest over everything else in it;
a sidecar `NAME.head` holds the number of entries and the last digest, so an edited,
reordered, truncated or emptied log is detected by `verify`. (Deleting the log and its
sidecar together leaves no trace: keep a copy of the head elsewhere if that matters.)

What an entry says about arrays is their names, shapes, dtypes, byte counts and one
digest of their contents, never the values.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from shared_model.files import PRIVATE, atomic_write_text

GENESIS = "0" * 64
LOG_FILE = "audit-log.jsonl"


class AuditLogError(ValueError):
    """The log does not verify; the message names the first bad line."""


def arrays_summary(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Names, shapes, dtypes and bytes of the arrays, and one SHA-256 over their contents
    (name, dtype, shape and bytes of each, in name order)."""
    h = hashlib.sha256()
    items = []
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
        items.append({"name": name, "shape": list(a.shape), "dtype": str(a.dtype),
                      "bytes": int(a.nbytes)})
    return {"count": len(items), "bytes": sum(i["bytes"] for i in items),
            "sha256": h.hexdigest(), "arrays": items}


def scalar_or_digest(value: Any) -> Any:
    """A config value as the log keeps it: bytes (or a list of them) as size and sha256."""
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        h = hashlib.sha256()
        for b in value:
            h.update(b)
        return {"count": len(value), "bytes": sum(len(b) for b in value),
                "sha256": h.hexdigest()}
    return value


def _digest(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True,
                                     default=str).encode()).hexdigest()


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def append(path: Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Append one entry (chained to the last), under a file lock; returns it as written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        count, prev = _head(path)
        full = {**entry, "seq": count + 1, "prev": prev}
        full["digest"] = _digest(full)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(full, sort_keys=True, allow_nan=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_text(_head_path(path), json.dumps({"entries": count + 1,
                                                        "head": full["digest"]}) + "\n",
                          mode=PRIVATE)
    return full


def _head(path: Path) -> tuple[int, str]:
    head = _head_path(path)
    if not head.is_file():
        if path.is_file() and path.stat().st_size:
            raise AuditLogError(f"{head} is missing: {path} cannot be extended or verified")
        return 0, GENESIS
    data = json.loads(head.read_text(encoding="utf-8"))
    return int(data["entries"]), str(data["head"])


def read(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def verify(path: Path) -> list[dict[str, Any]]:
    """Every entry, checked: each digest, each link to the previous one, and the count
    and last digest against the head file. `AuditLogError` at the first problem."""
    path = Path(path)
    try:
        entries = read(path)
    except json.JSONDecodeError as exc:
        raise AuditLogError(f"{path}: line {exc.lineno} is not JSON (edited?)") from None
    prev = GENESIS
    for i, e in enumerate(entries, start=1):
        if e.get("digest") != _digest(e):
            raise AuditLogError(f"{path}: entry {i} was changed after it was written")
        if e.get("prev") != prev or e.get("seq") != i:
            raise AuditLogError(f"{path}: entry {i} does not follow entry {i - 1} "
                                "(a line was removed, inserted or reordered)")
        prev = e["digest"]
    count, head = _head(path)
    if count != len(entries) or (entries and head != prev) or (not entries and count):
        raise AuditLogError(f"{path}: the head file says {count} entries ending in "
                            f"{head[:12]}, the log has {len(entries)} ending in {prev[:12]} "
                            "(truncated or replaced)")
    return entries


@dataclass(frozen=True)
class Shown:
    seq: int
    time: str
    who: str
    what: str
    arrays: str
    metrics: str


def rows_for_display(entries: Iterable[Mapping[str, Any]]) -> list[Shown]:
    out = []
    for e in entries:
        arr = e.get("arrays") or {}
        arrays = (f"{arr.get('count', 0)} arrays, {arr.get('bytes', 0) / 1e6:.2f} MB, "
                  f"sha256 {str(arr.get('sha256', ''))[:12]}") if arr else "-"
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in sorted((e.get("metrics") or {}).items()))
        out.append(Shown(int(e.get("seq", 0)), str(e.get("time", "")),
                         str(e.get("who", "")), str(e.get("what", "")), arrays,
                         metrics or "-"))
    return out
