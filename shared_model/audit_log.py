"""An append-only, keyed hash chain of what crossed the network, for both sides.

A hospital's privacy officer wants to see exactly what left the building; the
coordinator wants the same record of what each node sent. Each line is one JSON entry
holding the MAC of the previous line and its own MAC over everything else in it, an
HMAC-SHA256 under the chain key of the log's folder (`shared_model/chain_key.py`: the
node's ledger store, where its log lives, or the run's output folder); a sidecar
`NAME.head` holds the number of entries and the last MAC, under a MAC of its own. An
edited, reordered, truncated or emptied log is detected by `verify`, also when the editor
recomputed the chain: without the key no MAC can be made. Log, head and key are 0600.

What the key does not cover: deleting the log and its head together leaves no trace, and
an older copy of both put back together verifies (keep a copy of the head elsewhere if
that matters); whoever can read the key can rewrite the log.

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

from shared_model import chain_key
from shared_model.files import PRIVATE, atomic_write_text

GENESIS = "0" * 64
LOG_FILE = "audit-log.jsonl"
LOG_VERSION = 2  # 1: unkeyed sha256 digests (before any deployment; not migrated)


class AuditLogError(ValueError):
    """The log does not verify; the message names the first bad line."""


def arrays_summary(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Names, shapes, dtypes and bytes of the arrays, and one SHA-256 over their contents
    (name, dtype, shape and bytes of each, in name order). A 0-d array counts as shape
    (1,), as `np.ascontiguousarray` gives it (kept: the digests already written)."""
    h = hashlib.sha256()
    items = []
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(_raw_bytes(a))
        items.append({"name": name, "shape": list(a.shape), "dtype": str(a.dtype),
                      "bytes": int(a.nbytes)})
    return {"count": len(items), "bytes": sum(i["bytes"] for i in items),
            "sha256": h.hexdigest(), "arrays": items}


def _raw_bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a flat uint8 view, to hash without a copy:
    the same bytes as `a.tobytes()`, which copies them first (a 4 MB update is hashed
    once a reply at the server, and the copy took longer than the hash)."""
    return a.reshape(-1).view(np.uint8)


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


def _mac(key: bytes, entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "mac"}
    return chain_key.mac(key, "medfuse-audit-log/entry", _line(body))


def _line(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, allow_nan=True, default=str)


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _folder_key(path: Path, *, create: bool) -> bytes:
    try:
        return chain_key.folder_key(path.parent, create=create,
                                    also_keyed=(path, _head_path(path)))
    except chain_key.ChainKeyError as exc:
        raise AuditLogError(f"{path}: {exc}") from None


def append(path: Path, entry: Mapping[str, Any], *, key: bytes | None = None) -> dict[str, Any]:
    """Append one entry (chained to the last), under a file lock; returns it as written.

    `key`: the chain key; None for the key file beside the log (made on first use)."""
    return append_many(path, [entry], key=key)[0]


def append_many(path: Path, entries: Iterable[Mapping[str, Any]], *,
                key: bytes | None = None) -> list[dict[str, Any]]:
    """Append entries in order, each chained to the one before, under one file lock and
    with one write, fsync and head update for them all (a server's replies of a round:
    each `append` costs three fsyncs); returns them as written. What it writes is what
    as many `append` calls would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _folder_key(path, create=True) if key is None else key
    with FileLock(str(path) + ".lock", mode=PRIVATE):
        count, prev = _head(path, key)
        written = []
        for entry in entries:
            # as it reads back (tuples as lists, anything else as text): what the MAC covers
            full = json.loads(_line({**entry, "seq": count + 1, "prev": prev}))
            full["mac"] = prev = _mac(key, full)
            count += 1
            written.append(full)
        if written:
            _write(path, written)
            head = {"version": LOG_VERSION, "key_id": chain_key.key_id(key),
                    "entries": count, "head": prev, "mac": _head_mac(key, count, prev)}
            atomic_write_text(_head_path(path), json.dumps(head) + "\n", mode=PRIVATE)
    return written


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    """The lines, on disk before the head that counts them is written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        os.fchmod(fd, PRIVATE)  # also a log written 0644 by an earlier version
        fh.write("".join(_line(e) + "\n" for e in entries))
        fh.flush()
        os.fsync(fh.fileno())


def _head_mac(key: bytes, count: int, last: str) -> str:
    return chain_key.mac(key, "medfuse-audit-log/head", str(count), last)


def _head(path: Path, key: bytes) -> tuple[int, str]:
    """(entries, last MAC) from the head file, whose own MAC, version and key are checked."""
    head = _head_path(path)
    if not head.is_file():
        if path.is_file() and path.stat().st_size:
            raise AuditLogError(f"{head} is missing: {path} cannot be extended or verified")
        return 0, GENESIS
    try:
        data = json.loads(head.read_text(encoding="utf-8"))
        version = data.get("version")
        count, last = int(data["entries"]), str(data["head"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AuditLogError(f"{head} cannot be read ({exc}): it was edited or damaged; "
                            "restore it from a backup") from None
    if version != LOG_VERSION:
        raise AuditLogError(
            f"{path} is a version {version or 1} audit log (unkeyed digests, written by an "
            f"earlier medfuse); this one keeps and verifies only version {LOG_VERSION} "
            "(HMAC-chained) logs. No deployment predates the keyed format, so there is no "
            "migration: move the old log and its .head aside"
        )
    if data.get("key_id") != chain_key.key_id(key):
        raise AuditLogError(
            f"{path} was written under another chain key (key id {data.get('key_id')}, "
            f"this key {chain_key.key_id(key)}): restore the key it was written with "
            f"({path.parent / chain_key.KEY_FILE}, or the node key it was derived from)"
        )
    if not chain_key.same(data.get("mac", ""), _head_mac(key, count, last)):
        raise AuditLogError(f"{head} was changed after it was written (its MAC does not "
                            "check): the log may have been cut; restore both from a backup")
    return count, last


def read(path: Path) -> list[dict[str, Any]]:
    """Every entry as written, unchecked (`verify` checks)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def verify(path: Path, *, key: bytes | None = None) -> list[dict[str, Any]]:
    """Every entry, checked: each MAC, each link to the previous one, and the count and
    last MAC against the head file. `AuditLogError` at the first problem, and for a log
    that is not there or holds nothing (nothing verified is not "verified").

    `key`: the chain key; None for the key file beside the log (never made here)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AuditLogError(f"{path.parent} does not exist: there is no audit log to verify")
    if not path.is_file():
        raise AuditLogError(f"no audit log at {path} (this folder holds none)")
    try:
        entries = read(path)
    except json.JSONDecodeError as exc:
        raise AuditLogError(f"{path}: line {exc.lineno} is not JSON (edited?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditLogError(f"cannot read {path}: {exc}") from None
    if not entries and not _head_path(path).is_file():
        raise AuditLogError(f"{path} is empty and has no head file: nothing to verify")
    key = _folder_key(path, create=False) if key is None else key
    count, head = _head(path, key)
    prev = GENESIS
    for i, e in enumerate(entries, start=1):
        if not isinstance(e, dict) or not chain_key.same(e.get("mac", ""), _mac(key, e)):
            raise AuditLogError(f"{path}: entry {i} was changed after it was written")
        if e.get("prev") != prev or e.get("seq") != i:
            raise AuditLogError(f"{path}: entry {i} does not follow entry {i - 1} "
                                "(a line was removed, inserted or reordered)")
        prev = e["mac"]
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
