"""The one way medfuse replaces a file: checkpoints, model files, ledgers, results,
reports, keys and configs.

A temporary file in the same folder, fsync, `os.replace`, then fsync of the folder: a
crash or a concurrent reader sees the old file or the new one, never half of one, and
the rename survives a power cut. The temporary file is created 0600 (mkstemp) and given
its final mode before the rename, so a private key is never readable by others, not even
for a moment. `atomic_create_bytes` is the same for a file that must never be replaced
(a secret key): it is linked into place only where nothing is.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PUBLIC = 0o644
PRIVATE = 0o600


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _written_temp(path: Path, write: Callable[[BinaryIO], object], mode: int) -> str:
    """A temporary file beside `path`, at `mode`, holding what `write(fh)` wrote, on disk;
    removed again if writing fails. The caller moves or links it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, mode: int = PUBLIC) -> Path:
    """Replace `path` with what `write(fh)` writes into a binary file handle."""
    path = Path(path)
    tmp = _written_temp(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = PUBLIC) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), mode=mode)


def atomic_write_text(path: Path, text: str, *, mode: int = PUBLIC) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), mode=mode)


def atomic_create_bytes(path: Path, data: bytes, *, mode: int = PRIVATE) -> bool:
    """Create `path` holding `data` unless it exists (False then, and it is left alone):
    written in full to a temporary file, then hard-linked into place, so a reader never
    sees part of it and two processes creating it at once agree on one (a secret key)."""
    path = Path(path)
    tmp = _written_temp(path, lambda fh: fh.write(data), mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True
