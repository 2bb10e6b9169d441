"""The secret that makes a node's records tamper-evident (no Flower).

A hash chain without a key proves nothing against the person it is meant to catch: an
insider who edits a ledger or an audit log recomputes every digest and the file verifies.
So every chained file here (the privacy ledgers, their store index, the pixel-digest
cache, the audit logs) is an HMAC-SHA256 chain under a 32-byte secret the editor lacks.

Where the secret comes from, per folder of keyed files:

- `chain.key` in that folder (a node's ledger store, where its audit log also lives; a
  run's output folder for the coordinator's log): created on first use from
  `os.urandom(32)`, mode 0600. It stops an editor who recomputes plain digests; anyone
  who can read it, or replace it and rewrite every file it keys, can still forge.
- or derived from the SuperNode's private authentication key (`key_from_node_key`):
  the secret is then not in the folder it protects, and a copied store folder is useless
  without the node's key.

A deleted key is never a reset: while any file it keys is in the folder, `folder_key`
refuses to make a new one and names the file to restore. What no local key can stop:
whoever can read the key, or can write the folder and its configuration (the node's OS
account, root), can re-key and rewrite what it keys; deleting the folder as a whole (key
included) leaves no trace; putting back an older copy of every keyed file and the key
together (a rollback) verifies. Only a record kept off the node catches those.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared_model.files import PRIVATE, atomic_create_bytes

log = logging.getLogger(__name__)

KEY_FILE = "chain.key"
KEY_BYTES = 32
NODE_KEY_INFO = b"medfuse ledger chain"
# Every file a folder's key authenticates (globs, relative to the folder): while any of
# them exists, a missing key is refused, never made anew.
KEYED_FILES = ("store.json", "*/privacy-ledger.json", "audit-log.jsonl",
               "audit-log.jsonl.head")


class ChainKeyError(RuntimeError):
    """No key can be had without forgetting what the existing files vouch for."""


def mac(key: bytes, *parts: str | bytes) -> str:
    """HMAC-SHA256 (hex) over the parts, each prefixed by its length (no ambiguity)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two MACs."""
    return hmac.compare_digest(str(a).encode(), str(b).encode())


def key_id(key: bytes) -> str:
    """A public name for a key (it reveals nothing of it): a file written under another key
    says so, instead of looking edited."""
    return mac(key, "medfuse key id")[:16]


def folder_key(folder: Path, *, create: bool, also_keyed: Iterable[Path] = ()) -> bytes:
    """The key in `folder/chain.key`; with `create`, made on first use (0600).

    `ChainKeyError` when there is none and `create` is false, or when there is none while
    a file it keyed (`KEYED_FILES`, `also_keyed`) exists: a new key would make those
    files unverifiable, which is a reset, not a repair."""
    folder = Path(folder)
    path = folder / KEY_FILE
    if path.is_file():
        return _read_key(path)
    keyed = sorted({str(p) for pattern in KEYED_FILES for p in folder.glob(pattern)}
                   | {str(p) for p in also_keyed if Path(p).exists()})
    if keyed:
        raise ChainKeyError(
            f"the key {path} is missing but {keyed[0]}"
            f"{f' and {len(keyed) - 1} more file(s)' if len(keyed) > 1 else ''} were "
            f"written under it: restore {path} from a backup of this node (a new key would "
            "make them unverifiable, and the privacy they record would be forgotten)"
        )
    if not create:
        raise ChainKeyError(f"no key {path}: nothing in {folder} was written under one")
    folder.mkdir(parents=True, exist_ok=True)
    return _create_key(path)


def key_from_node_key(path: Path) -> bytes:
    """A chain key derived from the SuperNode's private authentication key (OpenSSH or
    PEM): HKDF-SHA256 of its PKCS#8 bytes, info b"medfuse ledger chain". The same node key
    always gives the same chain key; it is never written anywhere."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ChainKeyError(f"cannot read the node key {path}: {exc}") from None
    private = None
    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
            private = load(data, None)
            break
    if private is None:
        raise ChainKeyError(f"{path} is not an unencrypted private key (OpenSSH or PEM)")
    material = private.private_bytes(serialization.Encoding.DER,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=NODE_KEY_INFO).derive(material)


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise ChainKeyError(f"cannot read the key {path}: {exc}") from None
    if len(key) != KEY_BYTES:
        raise ChainKeyError(f"the key {path} holds {len(key)} bytes, not {KEY_BYTES}: it "
                            "was damaged; restore it from a backup of this node")
    if mode & 0o077:
        log.warning("the key %s is readable by others (mode %o): chmod 600 it", path, mode)
    return key


def _create_key(path: Path) -> bytes:
    """A fresh key, never written over an existing one: of two processes starting at once,
    both end up with the key that got there first."""
    if atomic_create_bytes(path, os.urandom(KEY_BYTES), mode=PRIVATE):
        log.info("created the chain key %s", path)
    return _read_key(path)
