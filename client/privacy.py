"""The hospital's privacy ledger, the store that keeps it, and the accounting on it (no Flower).

Privacy loss composes across everything ever released from the same records, so a node
keeps, on its own disk, every release it made from its data: each DP-SGD round
(noise multiplier, sample rate, steps), the one noised count of the training split, every
evaluation release, and every release made without DP (recorded as infinite epsilon).
The epsilon it reports is always that whole history run through an Opacus accountant.

What keeps the figure honest:

- The ledger follows the data, not a name, a path or a file's bytes: it is keyed by a
  digest of the site's records, each record the decoded pixels of one image the manifest
  names (`record_digest`). A renamed site, a copied folder or images re-encoded without
  loss find the same ledger; a folder that shares cases with a ledger already in the
  store starts from that ledger's history (its cases have already been released).
- One store per node install (`~/.medfuse/privacy`, or the node's `state-dir`). The store
  keeps an index of every ledger it ever held, with each ledger's length and last MAC:
  a ledger file that went missing, was truncated or edited is refused until a person
  restores it (the message says how); it is never silently recreated.
- Everything is authenticated under the node's chain key (`shared_model/chain_key.py`:
  `STORE/chain.key`, or a key derived from the SuperNode's private key): entries form an
  HMAC-SHA256 chain (each holds the MAC of the one before, the first a MAC of the data
  digest), the whole ledger file (budgets, delta, released count, records, names, entries)
  carries a MAC, and so do the store index, the pixel-digest cache and the cache of
  one-step RDPs. Someone who edits a file and recomputes plain digests is refused; forging
  needs the key. Every field is validated (finite, positive, plausible), and each entry's
  `epsilon_after` is recomputed on load: a changed noise multiplier or step count no
  longer matches and is refused. Every load checks every MAC; a process recomputes an
  entry's epsilon once (`VERIFIED`: a later load whose chain holds the same MAC at the
  same place, at the same delta, recomputes only the entries after it).
- A budget, once written into a ledger, may only go down; delta too.

What the key does not stop: whoever can read or replace the key file (the node's OS
account, root) can rewrite the whole store consistently, unless the key is derived from a
SuperNode key they cannot read; deleting the whole store (key included) starts afresh; an
older copy of the whole store put back verifies (a rollback). Only a record outside the
node (backups, the coordinator's log of what each site reported) catches these.

There are two budgets. `train` covers everything computed from the training split (the
weights, the count); `evaluation` covers the val and test splits, which hold other cases:
a case is in exactly one split (its own column, or a hash of its case id), so the two
compose in parallel and each case's loss is bounded by its split's epsilon.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from filelock import FileLock
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.version import __version__ as OPACUS_VERSION
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from shared_model import chain_key
from shared_model.config import MANIFEST
from shared_model.dataset import decode_pixels
from shared_model.files import PRIVATE, atomic_write_text
from shared_model.tokenizer import split_words

log = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]
Bucket = Literal["train", "evaluation"]
EntryKind = Literal["dp-sgd", "count", "non-private", "evaluation", "exact-evaluation"]
BUCKET_OF: dict[str, Bucket] = {
    "dp-sgd": "train", "count": "train", "non-private": "train",
    "evaluation": "evaluation", "exact-evaluation": "evaluation",
}
LEDGER_FILE = "privacy-ledger.json"
INDEX_FILE = "store.json"
PIXEL_CACHE_FILE = "pixel-digests.json"
RDP_CACHE_FILE = "rdp-steps.json"
LOCK_FILE = ".store.lock"
# 2: unkeyed sha256 chain, budgets outside it, records the digest of each file's bytes.
# Not migrated: no deployment predates version 3.
LEDGER_VERSION = 3
INDEX_VERSION = 2
PIXEL_CACHE_VERSION = 1
RDP_CACHE_VERSION = 1
RDP_CACHE_LIMIT = 4096  # (noise, sample rate) pairs a store keeps the RDP of
STORE_ENV = "MEDFUSE_PRIVACY_STORE"
DEFAULT_STATE_ROOT = Path("~/.medfuse/privacy")
# Above this noise multiplier an update carries no useful signal: a derived noise beyond
# it means the budget is, for practical purposes, spent. No entry may hold more.
MAX_USEFUL_NOISE = 50.0
MAX_STEPS = 10_000_000  # an entry with more steps than this is not a real round
RECORD_DIGEST_CHARS = 16  # 64 bits of sha256 per record: collisions are not a concern
PIXELS_TAG = b"medfuse-pixels/1\n"  # what a record digest is of: decoded pixels
BYTES_TAG = b"medfuse-bytes/1\n"  # a file no decoder reads: its bytes
REPORT_TAG = b"medfuse-report/1\n"  # a row without an image (text-only): case id and words

HistoryItem = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus' form
RdpCache = dict[tuple[float, float], np.ndarray]


class LedgerError(RuntimeError):
    """A ledger that cannot be read, trusted or written; the message says what a person does."""


class BudgetError(RuntimeError):
    """No noise level keeps the site within its budget (nothing can be released)."""


def default_store_root() -> Path:
    """The node install's store: `$MEDFUSE_PRIVACY_STORE`, else `~/.medfuse/privacy`."""
    env = os.environ.get(STORE_ENV)
    return Path(env).expanduser() if env else DEFAULT_STATE_ROOT.expanduser()


# ----------------------------------------------------------------- data identity


@dataclass(frozen=True)
class DataIdentity:
    """What a ledger is tied to: the digest of a site's records and the records themselves."""

    digest: str  # sha256 over the sorted record digests
    records: tuple[str, ...]  # sorted, one per distinct image file

    @property
    def key(self) -> str:
        return self.digest[:16]


def data_identity(data_path: Path, cache: dict[str, str] | None = None) -> DataIdentity:
    """The records of every image the manifest names (missing files are skipped), and of
    every row without an image (a text-only site) its report (`report_record_digest`).

    The image is the patient's record: a renamed site, a moved or copied folder, an edited
    report or an image re-encoded without loss keep the identity (`record_digest`);
    adding or removing cases changes it (and the store then finds the overlap). Where a
    row has no image, its report is all the model reads of the patient, so the report
    and its case id are the record (many patients share a word-for-word "normal"
    report: the words alone would merge them, and their hospitals' ledgers with them).

    `cache` maps the sha256 of a file's bytes to its record: a file already in it is only
    read and hashed, never decoded again (`LedgerStore.identify` keeps one per store).
    Without it every image is decoded: seconds for a few hundred full-size radiographs.
    """
    folder = Path(data_path)
    manifest = folder / MANIFEST
    try:
        images = pd.read_csv(manifest, usecols=lambda c: c in ("case_id", "image", "report"),
                             dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise LedgerError(f"cannot read {manifest} to identify the data: {exc}") from None
    if "image" not in images.columns:
        raise LedgerError(f"cannot read {manifest} to identify the data: no image column")
    blank = [""] * len(images)
    reports = images["report"] if "report" in images.columns else blank
    case_ids = images["case_id"] if "case_id" in images.columns else blank
    digests = set()
    for rel, report, case_id in zip(images["image"], reports, case_ids, strict=True):
        path = folder / rel.strip()
        if not rel.strip() and (record := report_record_digest(case_id, report)):
            digests.add(record)
            continue
        if not (rel.strip() and path.is_file()):
            continue
        raw = path.read_bytes()
        if cache is None:
            digests.add(record_digest(path, raw))
            continue
        by_bytes = hashlib.sha256(raw).hexdigest()
        record = cache.get(by_bytes)
        if record is None:
            record = cache[by_bytes] = record_digest(path, raw)
        digests.add(record)
    if not digests:
        raise LedgerError(f"{folder}: no readable image (nor report of a row without one) "
                          "to identify the data by")
    records = tuple(sorted(digests))
    return DataIdentity(hashlib.sha256("\n".join(records).encode()).hexdigest(), records)


def report_record_digest(case_id: str, report: str) -> str:
    """The record of a row without an image: sha256 of its case id and its report's words
    as the model's tokenizer splits them, so a re-spaced or re-cased report keeps its
    record; '' for a report with no word (nothing the model reads of the patient)."""
    words = " ".join(split_words(report))
    if not words:
        return ""
    text = f"{case_id.strip()}\n{words}".encode()
    return hashlib.sha256(REPORT_TAG + text).hexdigest()[:RECORD_DIGEST_CHARS]


def record_digest(path: Path, raw: bytes | None = None) -> str:
    """One image's record: sha256 of its decoded pixels, as the model reads them.

    The dataset's own decoders (`shared_model.dataset`, as `load_image` uses them) give
    float32 in [0, 1] scaled by the file's real bit depth, at the image's own size; the
    digest is over that array's shape and values (an RGB image whose three channels are
    equal counts as grey). So these keep the record: another PNG compression level or
    encoder, other or fewer ancillary PNG chunks (text, time, dpi), an 8-bit PNG
    saved as 16-bit with the same intensities (v * 257), grey saved as RGB, a PNG turned
    into a DICOM holding the same values at the same bit depth, edited DICOM tags that do
    not touch the pixels.

    These do NOT keep it (a local administrator can still do them, and the data then
    finds a fresh ledger): lossy re-encoding (JPEG at any quality, or a JPEG decoded by
    another decoder version), resizing, cropping, padding, rotating or flipping, changing
    the bit depth's scale (8-bit values stored unscaled in 16 bits), windowing or
    rescaling intensities, adding noise or a single changed pixel. A file no decoder reads
    is recorded by its bytes.
    """
    path = Path(path)
    try:
        pixels, _ = decode_pixels(path)
    except Exception:  # whatever a decoder raises: the file is not an image it reads
        data = path.read_bytes() if raw is None else raw
        return hashlib.sha256(BYTES_TAG + data).hexdigest()[:RECORD_DIGEST_CHARS]
    pixels = np.asarray(pixels, dtype="<f4")
    if pixels.ndim == 3 and pixels.shape[2] == 3 and np.array_equal(
            pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
        pixels = pixels[..., 0]
    h = hashlib.sha256(PIXELS_TAG)
    h.update(repr(tuple(pixels.shape)).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()[:RECORD_DIGEST_CHARS]


# ----------------------------------------------------------------- the ledger


class LedgerEntry(BaseModel):
    """One release from this site's data: what the accountant needs, when, and the chain."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    kind: EntryKind
    run_id: int
    server_round: int = Field(ge=0)
    noise_multiplier: float = Field(ge=0.0, le=MAX_USEFUL_NOISE)
    sample_rate: float = Field(gt=0.0, le=1.0)
    steps: int = Field(ge=1, le=MAX_STEPS)
    epsilon_after: float = Field(ge=0.0, description="its bucket's epsilon after this entry")
    accountant: AccountantName = "rdp"
    time: str = Field(description="UTC, ISO 8601")
    prev: str = Field(pattern=r"^[0-9a-f]{64}$", description="MAC of the entry before")
    note: str = ""

    @model_validator(mode="after")
    def _plausible(self) -> LedgerEntry:
        if not math.isfinite(self.noise_multiplier) or math.isnan(self.epsilon_after):
            raise ValueError("noise multiplier must be finite and epsilon a number")
        noiseless = self.kind in ("non-private", "exact-evaluation")
        if noiseless != (self.noise_multiplier == 0.0):
            raise ValueError(f"a {self.kind} entry with noise multiplier {self.noise_multiplier}")
        if self.kind != "dp-sgd" and (self.sample_rate, self.steps) != (1.0, 1):
            raise ValueError(f"a {self.kind} entry is one release of the whole split")
        return self

    @property
    def bucket(self) -> Bucket:
        return BUCKET_OF[self.kind]

    def mac(self, key: bytes) -> str:
        """HMAC-SHA256 of the entry (its `prev` included) under the node's chain key."""
        return chain_key.mac(key, "medfuse-ledger/entry", self.model_dump_json())


class Ledger(BaseModel):
    """Everything released from one set of records, with the budgets that bound it.

    `path` (where it lives) is not part of the JSON: a ledger belongs to its data digest.
    `mac` covers every other field; the chain key it is under comes from the store
    (`LedgerStore.open`/`load`), never from the file, which names it only by `key_id`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              ser_json_inf_nan="constants")

    version: int = LEDGER_VERSION
    data_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    records: list[str] = Field(description="digest of every record (image) it covers")
    site_names: list[str] = Field(default_factory=list, description="names it was used under")
    data_paths: list[str] = Field(default_factory=list, description="folders it was used at")
    epsilon_budget: float = Field(gt=0.0, allow_inf_nan=False)
    eval_epsilon_budget: float = Field(gt=0.0, allow_inf_nan=False)
    delta: float = Field(gt=0.0, lt=1.0)
    released_count: int | None = Field(None, ge=1, description="the noised train-split size")
    inherited_from: list[str] = Field(default_factory=list)
    entries: list[LedgerEntry] = Field(default_factory=list)
    key_id: str = Field("", description="which chain key the MACs are under (not the key)")
    mac: str = Field("", pattern=r"^([0-9a-f]{64})?$",
                     description="HMAC-SHA256 of every other field, as written")

    _path: Path | None = PrivateAttr(default=None)
    _key: bytes | None = PrivateAttr(default=None)
    # one-step RDP per (noise, sample rate): a pure function's values, never stale
    _rdp_cache: RdpCache = PrivateAttr(default_factory=dict)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def key(self) -> str:
        return self.data_digest[:16]

    def _chain_key(self) -> bytes:
        if self._key is None:
            raise LedgerError(f"ledger {self.key} has no chain key: open or load it through "
                              "its LedgerStore")
        return self._key

    def genesis(self) -> str:
        """What the first entry chains to: a MAC of the data it is about."""
        return chain_key.mac(self._chain_key(), "medfuse-ledger/genesis", self.data_digest)

    def head(self) -> str:
        return self.entries[-1].mac(self._chain_key()) if self.entries else self.genesis()

    def file_mac(self) -> str:
        """The MAC of the whole ledger as it stands (every field but `mac`)."""
        return chain_key.mac(self._chain_key(), "medfuse-ledger/file",
                             self.model_dump_json(exclude={"mac"}))

    def sealed_json(self) -> str:
        """The file's text: key id and MAC set for what the ledger holds now."""
        self.key_id = chain_key.key_id(self._chain_key())
        self.mac = self.file_mac()
        return self.model_dump_json(indent=2) + "\n"

    def history(self, bucket: Bucket = "train") -> list[HistoryItem]:
        """Opacus accountant history of one bucket over ALL entries (all runs)."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries
                if e.bucket == bucket]

    def budget(self, bucket: Bucket = "train") -> float:
        return self.epsilon_budget if bucket == "train" else self.eval_epsilon_budget

    def epsilon(self, bucket: Bucket = "train", accountant: AccountantName = "rdp") -> float:
        return history_epsilon(self.history(bucket), self.delta, accountant, self._rdp_cache)

    def cost_with(self, item: HistoryItem, bucket: Bucket = "train",
                  accountant: AccountantName = "rdp") -> float:
        """The bucket's epsilon if one more release `item` is added."""
        return history_epsilon([*self.history(bucket), item], self.delta, accountant,
                               self._rdp_cache)

    def append(self, kind: EntryKind, *, run_id: int, server_round: int,
               noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1,
               accountant: AccountantName = "rdp", note: str = "") -> LedgerEntry:
        """Chain a new entry, its `epsilon_after` computed here (never taken from a caller)."""
        bucket = BUCKET_OF[kind]
        eps = self.cost_with((noise_multiplier, sample_rate, steps), bucket, accountant)
        entry = LedgerEntry(
            kind=kind, run_id=run_id, server_round=server_round,
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
            epsilon_after=eps, accountant=accountant, prev=self.head(), note=note,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.entries.append(entry)
        return entry

    def verify(self) -> None:
        """`LedgerError` unless the chain is whole, every epsilon recomputes and the file's
        MAC covers what it holds (budgets, delta, records, names and entries)."""
        self.verify_chain()
        self.verify_mac()

    def verify_chain(self, known: VerifiedPrefix | None = None) -> None:
        """`LedgerError` unless each entry follows the one before and every epsilon
        recomputes from the history up to it.

        Every link is checked on every call (HMACs: cheap). `known`: entries whose epsilons
        this process already recomputed (`VERIFIED`); where this chain holds the same MAC
        at the same place under the same delta, its entries up to there are those same
        entries (each MAC covers the one before), and only the epsilons after them are
        recomputed: the dear part (RDP per entry), paid once per entry and process."""
        macs = self._checked_links()
        start = known.entries if known is not None and known.fits(self.delta, macs) else 0
        self._check_epsilons(start)

    def _checked_links(self) -> list[str]:
        """Each entry's MAC, once each entry is checked to follow the one before."""
        key = self._chain_key()
        prev, macs = self.genesis(), []
        for i, e in enumerate(self.entries):
            if not chain_key.same(e.prev, prev):
                raise LedgerError(f"entry {i + 1} does not follow entry {i}: an entry was "
                                  "removed, inserted or altered")
            prev = e.mac(key)
            macs.append(prev)
        return macs

    def _check_epsilons(self, start: int = 0) -> None:
        """`LedgerError` unless the epsilon of every entry from `start` on recomputes from
        its bucket's history up to it (the entries before `start` count in the history)."""
        history: dict[Bucket, list[HistoryItem]] = {"train": [], "evaluation": []}
        for i, e in enumerate(self.entries):
            history[e.bucket].append((e.noise_multiplier, e.sample_rate, e.steps))
            if i < start:
                continue
            again = history_epsilon(history[e.bucket], self.delta, e.accountant,
                                    self._rdp_cache)
            if not _same_epsilon(again, e.epsilon_after):
                raise LedgerError(
                    f"entry {i + 1} says epsilon {e.epsilon_after:.6g} but its history gives "
                    f"{again:.6g}: the entry was edited"
                )

    def verify_mac(self) -> None:
        """`LedgerError` unless the file's MAC covers what it holds."""
        if not chain_key.same(self.mac, self.file_mac()):
            raise LedgerError("its MAC does not match what it holds: the file was edited "
                              "(budgets, delta, count, records, names or entries)")


def _same_epsilon(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class VerifiedPrefix:
    """What this process has verified of one ledger file: its first `entries` entries,
    the last of them with MAC `head`, each epsilon recomputed at `delta`."""

    delta: float
    entries: int
    head: str

    def fits(self, delta: float, macs: Sequence[str]) -> bool:
        """Whether a chain whose entries have `macs` (each link checked) starts with these
        entries: the same delta, and the same MAC at the same place. A shorter chain, an
        earlier entry changed (its MAC, and so every later one, differs) or a file under
        another key (every MAC differs) does not fit, and is verified from the start."""
        return (delta == self.delta and 0 < self.entries <= len(macs)
                and chain_key.same(macs[self.entries - 1], self.head))


class VerifiedPrefixes:
    """Per process, ledger file -> its `VerifiedPrefix`, so that a node that reads the
    same ledger for every message (training, evaluation, the audit log's epsilon before)
    recomputes each entry's epsilon once, not once a read: each entry's recompute sums
    its history's RDP, so a whole ledger costs time quadratic in its length (measured:
    35 ms at 200 entries, 1 s at 1000), and a ledger grows by a few entries a round.
    Only `read_ledger_file` records, after a file passed every check; nothing is kept on
    disk (an attacker who can edit the files cannot edit this)."""

    LIMIT = 10_000  # ledgers a process remembers (it starts over beyond)

    def __init__(self) -> None:
        self._known: dict[str, VerifiedPrefix] = {}

    def get(self, path: Path) -> VerifiedPrefix | None:
        return self._known.get(os.path.abspath(path))

    def remember(self, path: Path, ledger: Ledger) -> None:
        if not ledger.entries:
            return
        if len(self._known) >= self.LIMIT:
            self._known.clear()
        self._known[os.path.abspath(path)] = VerifiedPrefix(
            ledger.delta, len(ledger.entries), ledger.head())

    def forget(self) -> None:
        self._known.clear()


VERIFIED = VerifiedPrefixes()


# ----------------------------------------------------------------- files


def read_ledger_file(path: Path, key: bytes, *, indexed: dict | None = None,
                     rdp: RdpCache | None = None) -> Ledger:
    """Parse and verify one ledger file under the chain `key`; with `indexed` (its entry
    in the store index, see `LedgerStore.load`) first check that it holds as many entries
    as the index says, ending in the same MAC. `rdp`: one-step RDPs already known (the
    store's `RdpFile`), so that verifying does not compute them again."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LedgerError(f"no privacy ledger at {path}") from None
    except OSError as exc:
        raise LedgerError(f"cannot read the privacy ledger {path}: {exc}") from None
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("version") != LEDGER_VERSION:
            raise _Refused(_old_version(path, "privacy ledger", data.get("version"),
                                        LEDGER_VERSION))
        if isinstance(data, dict) and data.get("key_id") != chain_key.key_id(key):
            raise _Refused(_other_key(path, data.get("key_id"), key, path.parent.parent))
        ledger = Ledger.model_validate(data)
        ledger._key = key
        ledger._rdp_cache = dict(rdp or {})
        ledger.verify_chain(VERIFIED.get(path))
        if indexed is not None and (
                ledger.key != path.parent.name or len(ledger.entries) != indexed.get("entries")
                or not chain_key.same(ledger.head(), str(indexed.get("head")))):
            raise _Refused(
                f"the privacy ledger {path} does not match the store index (it holds "
                f"{len(ledger.entries)} entries, the index {indexed.get('entries')}): entries "
                "were removed or the file was replaced. Restore it from a backup.")
        ledger.verify_mac()
        VERIFIED.remember(path, ledger)
    except _Refused as exc:
        raise LedgerError(str(exc)) from None
    except (json.JSONDecodeError, ValidationError, LedgerError) as exc:
        first = str(exc).splitlines()[0]
        raise LedgerError(
            f"the privacy ledger {path} cannot be trusted ({first}). It records the "
            "privacy this site has already spent, so it is never reset automatically: "
            "restore it from a backup; `medfuse privacy show --state-dir STORE` lists what "
            "the store holds."
        ) from None
    ledger._path = path
    return ledger


class _Refused(Exception):
    """A refusal whose message says it all (an earlier format, another key, not what the
    index vouches for), raised as is instead of "cannot be trusted"."""


def _old_version(path: Path, what: str, found: object, want: int) -> str:
    return (f"{path} is a version {found} {what}, written by an earlier medfuse whose "
            f"chains carried no key; this medfuse reads only version {want}. No deployment "
            "predates the keyed format, so there is no migration: move the store folder "
            "aside (or give the node another state-dir) and start a new store")


def _other_key(path: Path, found: object, key: bytes, root: Path) -> str:
    return (f"{path} was written under another chain key (key id {found}; this store's key "
            f"is {chain_key.key_id(key)}): restore the key it was written with "
            f"({root / chain_key.KEY_FILE} from a backup of this node, or the node-key it "
            "was derived from); if the key is the right one, the file itself was replaced: "
            "restore it from a backup")


def _rdp_tag() -> str:
    """What cached RDPs are values of: Opacus' version and its orders (another version or
    other orders make them another function's values, which are then not used)."""
    orders = hashlib.sha256(repr(list(RDPAccountant.DEFAULT_ALPHAS)).encode()).hexdigest()
    return f"opacus {OPACUS_VERSION} orders {orders[:16]}"


class RdpFile:
    """The one-step RDP of every (noise, sample rate) the store's ledgers hold, on disk.

    Verifying a ledger recomputes every entry's epsilon, and RDP costs some 0.25 s per new
    (noise, sample rate) on a busy core; each process (a Flower message, a simulation
    actor) would compute it again. The values are a pure function's, MACed under the
    store's key like the rest: a file that does not check, or of another Opacus, is not
    used (each value is computed again), so an editor without the key can change no
    epsilon through it. Read again only when the file changed (what was read had checked)."""

    _read: dict[str, tuple[tuple[int, int, int], RdpCache]] = {}  # per process

    def __init__(self, root: Path, key: bytes) -> None:
        self.path, self._key = root / RDP_CACHE_FILE, key

    def values(self) -> RdpCache:
        try:
            st = self.path.stat()
        except OSError:
            return {}
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        which = f"{self.path}\0{chain_key.key_id(self._key)}"  # checked under this key
        seen = self._read.get(which)
        if seen is None or seen[0] != stamp:
            seen = (stamp, self._checked())
            self._read[which] = seen
        return dict(seen[1])

    def _checked(self) -> RdpCache:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            steps = {str(k): [float(x) for x in v] for k, v in dict(data["steps"]).items()}
            ok = (data.get("version") == RDP_CACHE_VERSION and data.get("tag") == _rdp_tag()
                  and chain_key.same(data.get("mac", ""), self._mac(steps)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            log.warning("%s does not check (edited, damaged, under another key or of another "
                        "Opacus): not used, every RDP is computed again", self.path)
            return {}
        return {_pair(k): _frozen(v) for k, v in steps.items()}

    def keep(self, ledger: Ledger) -> None:
        """Add the RDPs of `ledger`'s entries that the file lacks (a no-op when none)."""
        known = self.values()
        pairs = {(e.noise_multiplier, e.sample_rate) for e in ledger.entries}
        new = {p: ledger._rdp_cache[p] for p in pairs
               if p not in known and p in ledger._rdp_cache}
        if not new or len(known) + len(new) > RDP_CACHE_LIMIT:
            return
        steps = {f"{s!r} {q!r}": [float(x) for x in v] for (s, q), v in {**known, **new}.items()}
        atomic_write_text(self.path, json.dumps({
            "version": RDP_CACHE_VERSION, "tag": _rdp_tag(), "steps": steps,
            "mac": self._mac(steps)}) + "\n", mode=PRIVATE)

    def _mac(self, steps: dict[str, list[float]]) -> str:
        return chain_key.mac(self._key, "medfuse-ledger/rdp-steps", _rdp_tag(),
                             json.dumps(steps, sort_keys=True))


def _pair(text: str) -> tuple[float, float]:
    s, q = text.split()
    return float(s), float(q)


def _frozen(values: Sequence[float]) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    out.setflags(write=False)
    return out


class LedgerStore:
    """One node install's ledgers, one per data digest, and the index that vouches for them.

        STORE/store.json                     every ledger ever held: entries and last MAC
        STORE/<digest[:16]>/privacy-ledger.json
        STORE/chain.key                      the secret every MAC is under (0600)
        STORE/pixel-digests.json             sha256 of an image file -> its record
        STORE/rdp-steps.json                 (noise, sample rate) -> one step's RDP
        STORE/.store.lock                    one round's read-check-train-append at a time

    `key`: the chain key; None for `STORE/chain.key`, made on first write where the store
    holds nothing it keyed, and refused (with what to restore) where it does. Every file
    is written 0600.
    """

    def __init__(self, root: Path, key: bytes | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self._key = key

    # ------------------------------------------------------------ files

    def mac_key(self, *, create: bool = False) -> bytes:
        """The key every MAC in this store is under (read once per store object)."""
        if self._key is None:
            try:
                self._key = chain_key.folder_key(self.root, create=create)
            except chain_key.ChainKeyError as exc:
                raise LedgerError(f"the ledger store {self.root}: {exc}") from None
        return self._key

    def ledger_path(self, key: str) -> Path:
        return self.root / key / LEDGER_FILE

    def _index(self) -> dict[str, dict]:
        path = self.root / INDEX_FILE
        if not path.exists():
            orphans = sorted(self.root.glob(f"*/{LEDGER_FILE}"))
            if orphans:
                raise LedgerError(
                    f"the ledger store index {path} is missing but the store holds "
                    f"{len(orphans)} ledger(s) ({orphans[0]}): without the index a deleted "
                    "ledger would go unnoticed, so nothing is trained on; restore it from "
                    "a backup")
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = data.get("version")
            ledgers = dict(data["ledgers"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
                ValueError) as exc:
            raise LedgerError(f"the ledger store index {path} cannot be read ({exc}); "
                              "restore it from a backup") from None
        if version != INDEX_VERSION:
            raise LedgerError(_old_version(path, "ledger store index", version,
                                           INDEX_VERSION))
        key = self.mac_key()
        if data.get("key_id") != chain_key.key_id(key):
            raise LedgerError(_other_key(path, data.get("key_id"), key, self.root))
        if not chain_key.same(data.get("mac", ""), _index_mac(key, ledgers)):
            raise LedgerError(f"the ledger store index {path} was edited after it was "
                              "written (its MAC does not check: a ledger removed from it, or "
                              "a count or head changed); restore it from a backup")
        return ledgers

    def _write_index(self, index: dict[str, dict]) -> None:
        key = self.mac_key(create=True)
        text = json.dumps({"version": INDEX_VERSION, "key_id": chain_key.key_id(key),
                           "ledgers": index, "mac": _index_mac(key, index)},
                          indent=2, sort_keys=True)
        atomic_write_text(self.root / INDEX_FILE, text + "\n", mode=PRIVATE)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive over the whole store: two runs on overlapping data must not both
        spend the same remaining budget; the second waits for the first's entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / LOCK_FILE), mode=PRIVATE):
            yield

    # ------------------------------------------------------------ identity

    def identify(self, data_path: Path) -> DataIdentity:
        """`data_identity` with this store's cache of records: an image file seen before
        is only hashed (its bytes), never decoded again. The cache is MACed like the rest:
        one that does not check is ignored and rebuilt (decoding every image once)."""
        key = self.mac_key(create=True)
        cache = self._pixel_cache(key)
        known = len(cache)
        identity = data_identity(data_path, cache)
        if len(cache) != known:
            atomic_write_text(self.root / PIXEL_CACHE_FILE, json.dumps({
                "version": PIXEL_CACHE_VERSION, "key_id": chain_key.key_id(key),
                "records": cache, "mac": _cache_mac(key, cache)}) + "\n", mode=PRIVATE)
        return identity

    def _pixel_cache(self, key: bytes) -> dict[str, str]:
        path = self.root / PIXEL_CACHE_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records = {str(k): str(v) for k, v in dict(data["records"]).items()}
            ok = (data.get("version") == PIXEL_CACHE_VERSION
                  and data.get("key_id") == chain_key.key_id(key)
                  and chain_key.same(data.get("mac", ""), _cache_mac(key, records)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            log.warning("%s does not check (edited, damaged or under another key): ignored, "
                        "every image is decoded again", path)
            return {}
        return records

    # ------------------------------------------------------------ reading

    def keys(self) -> list[str]:
        return sorted(self._index())

    def load(self, key: str) -> Ledger:
        """A ledger the index knows, checked against the index (length and last MAC)."""
        index = self._index()
        path = self.ledger_path(key)
        if key not in index:
            raise LedgerError(f"the store {self.root} holds no ledger {key}")
        if not path.exists():
            raise LedgerError(
                f"the privacy ledger of this data ({key}) is missing from {path}, but the "
                f"store {self.root} held it: the privacy spent on this data is not known, so "
                f"this node will not train or evaluate on it. Restore {path} from a backup. "
                f"Only if you accept that its spent privacy is forgotten, remove the entry "
                f"'{key}' from {self.root / INDEX_FILE} (which needs this store's key)."
            )
        key_bytes = self.mac_key()
        return read_ledger_file(path, key_bytes, indexed=index[key],
                                rdp=RdpFile(self.root, key_bytes).values())

    def ledgers(self) -> list[Ledger]:
        return [self.load(k) for k in self.keys()]

    # ------------------------------------------------------------ writing

    def save(self, ledger: Ledger) -> Path:
        """Ledger first, then the index: a crash between leaves a ledger the index
        undercounts, which `load` refuses (safe: nothing is forgotten)."""
        key = self.mac_key(create=True)
        if ledger._key is not None and ledger._key != key:
            raise LedgerError(f"ledger {ledger.key} is under another store's key; it can "
                              f"not be saved in {self.root}")
        ledger._key = key
        path = self.ledger_path(ledger.key)
        index = self._index()  # read first: a new ledger is not in it yet
        atomic_write_text(path, ledger.sealed_json(), mode=PRIVATE)
        index[ledger.key] = {"entries": len(ledger.entries), "head": ledger.head(),
                             "records": len(ledger.records)}
        self._write_index(index)
        ledger._path = path
        RdpFile(self.root, key).keep(ledger)
        return path

    def open(
        self,
        identity: DataIdentity,
        *,
        site_name: str,
        data_path: Path,
        epsilon_budget: float,
        eval_epsilon_budget: float,
        delta: float,
    ) -> Ledger:
        """This data's ledger, created on first use. Call under `lock()`.

        Budgets and delta only go down: an existing ledger keeps the smaller of what it
        holds and what is asked. New data whose records overlap ledgers already in the
        store starts from their whole history (their cases were released there).
        """
        index = self._index()
        if identity.key in index:
            ledger = self.load(identity.key)
            changed = _note_use(ledger, site_name, data_path)
            for field, asked in (("epsilon_budget", epsilon_budget),
                                 ("eval_epsilon_budget", eval_epsilon_budget),
                                 ("delta", delta)):
                if asked < getattr(ledger, field):
                    log.info("privacy ledger %s: %s lowered from %g to %g", ledger.key, field,
                             getattr(ledger, field), asked)
                    setattr(ledger, field, asked)
                    changed = True
            if changed:
                self.save(ledger)
            return ledger
        if self.ledger_path(identity.key).exists():
            raise LedgerError(
                f"{self.ledger_path(identity.key)} is a privacy ledger the store index "
                f"{self.root / INDEX_FILE} does not list: the index was replaced or edited. "
                "Restore the index from a backup; the ledger is never written over.")
        ledger = Ledger(
            data_digest=identity.digest, records=list(identity.records),
            epsilon_budget=epsilon_budget, eval_epsilon_budget=eval_epsilon_budget, delta=delta,
        )
        ledger._key = self.mac_key(create=True)
        _note_use(ledger, site_name, data_path)
        mine = set(identity.records)
        for key in sorted(index):
            other = self.load(key)
            shared = mine.intersection(other.records)
            if not shared:
                continue
            log.warning("privacy ledger %s: %d of its cases were released under ledger %s "
                        "(%s); that history counts here too", ledger.key, len(shared), key,
                        ", ".join(other.site_names))
            ledger.inherited_from.append(key)
            ledger.epsilon_budget = min(ledger.epsilon_budget, other.epsilon_budget)
            ledger.eval_epsilon_budget = min(ledger.eval_epsilon_budget,
                                             other.eval_epsilon_budget)
            ledger.delta = min(ledger.delta, other.delta)
            if ledger.released_count is None and other.released_count is not None \
                    and set(other.records) == mine:
                ledger.released_count = other.released_count
            for e in other.entries:
                ledger.append(e.kind, run_id=e.run_id, server_round=e.server_round,
                              noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate,
                              steps=e.steps, accountant=e.accountant,
                              note=f"inherited from {key}")
        self.save(ledger)
        log.info("privacy ledger %s created in %s (budget epsilon=%g, evaluation %g, "
                 "delta=%g)", ledger.key, self.root, ledger.epsilon_budget,
                 ledger.eval_epsilon_budget, ledger.delta)
        return ledger


def _index_mac(key: bytes, ledgers: dict[str, dict]) -> str:
    return chain_key.mac(key, "medfuse-ledger/index", json.dumps(ledgers, sort_keys=True))


def _cache_mac(key: bytes, records: dict[str, str]) -> str:
    return chain_key.mac(key, "medfuse-ledger/pixel-digests",
                         json.dumps(records, sort_keys=True))


def _note_use(ledger: Ledger, site_name: str, data_path: Path) -> bool:
    path = str(Path(data_path).expanduser().resolve())
    changed = False
    if site_name not in ledger.site_names:
        ledger.site_names = [*ledger.site_names, site_name]
        changed = True
    if path not in ledger.data_paths:
        ledger.data_paths = [*ledger.data_paths, path]
        changed = True
    return changed


# ----------------------------------------------------------------- accounting


def make_accountant(name: AccountantName, history: Sequence[HistoryItem] = ()) -> IAccountant:
    """An Opacus accountant holding `history` (its whole, serialisable state)."""
    accountant: IAccountant = RDPAccountant() if name == "rdp" else PRVAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


@functools.lru_cache(maxsize=4096)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at Opacus' default orders (read-only): a pure function of the two,
    kept for the process, as every message verifies its ledger (each entry's epsilon
    recomputed) and a round's entries share a few settings. compute_rdp(steps=n) is
    compute_rdp(steps=1) * n, bit for bit."""
    rdp = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                              steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))
    rdp.setflags(write=False)
    return rdp


def history_epsilon(
    history: Sequence[HistoryItem],
    delta: float,
    accountant: AccountantName = "rdp",
    cache: RdpCache | None = None,
) -> float:
    """Epsilon of a history at `delta`; 0 for nothing released, inf for a noiseless release.

    RDP: exactly Opacus' `RDPAccountant.get_epsilon` (same orders, same sums in the same
    order), with each (noise, sample rate)'s one-step RDP computed once per `cache`: the
    accountant recomputes it for every entry, which costs seconds on a long ledger. A
    release of the whole split (sample rate 1, one step) is the Gaussian mechanism, whose
    RDP Opacus gives exactly. PRV: Opacus' `PRVAccountant` on the history.
    """
    items = [(s, q, n) for s, q, n in history if n > 0]
    if not items:
        return 0.0
    if any(s <= 0.0 for s, _, _ in items):
        return math.inf
    with warnings.catch_warnings():
        # a very large noise multiplier puts RDP's optimum at the largest order; the bound
        # is then looser, never wrong
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "prv":
            return max(float(make_accountant(accountant, items).get_epsilon(delta)), 0.0)
        cache = {} if cache is None else cache
        orders = RDPAccountant.DEFAULT_ALPHAS
        terms = []
        for s, q, n in items:
            if (s, q) not in cache:
                cache[(s, q)] = _step_rdp(float(s), float(q))
            terms.append(cache[(s, q)] * n)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=sum(terms), delta=delta)
        return max(float(eps), 0.0)  # a large delta can make the bound negative


def noise_for_budget(
    ledger: Ledger,
    sample_rate: float,
    steps_per_round: int,
    rounds_left: int,
    *,
    bucket: Bucket = "train",
    accountant: AccountantName = "rdp",
    rel_tol: float = 5e-3,
    max_noise: float = MAX_USEFUL_NOISE,
    target: float | None = None,
) -> float:
    """The smallest noise multiplier such that the bucket's history plus `rounds_left`
    releases of `steps_per_round` steps stays within the bucket's budget. Rounded up, so
    the plan never overshoots.

    `BudgetError` when the history alone is at or past the budget, or when what is left
    would need a noise multiplier above `max_noise`: any sliver of budget "fits" with
    enough noise, but a release that is all noise is worth nothing to the federation and
    would only spend the last of the budget, so the site says its budget is spent.
    `target`: a lower epsilon to plan for than the bucket's budget (a node's reserve)."""
    target = ledger.budget(bucket) if target is None else min(target, ledger.budget(bucket))
    history = ledger.history(bucket)
    planned = steps_per_round * max(rounds_left, 1)

    def eps(sigma: float) -> float:
        return history_epsilon([*history, (sigma, sample_rate, planned)], ledger.delta,
                               accountant, ledger._rdp_cache)

    spent = history_epsilon(history, ledger.delta, accountant, ledger._rdp_cache)
    if spent >= target:
        raise BudgetError(
            f"epsilon {spent:.4g} already spent of a budget of {target:.4g}: nothing is left"
        )
    if eps(max_noise) > target:
        raise BudgetError(
            f"epsilon {spent:.4g} spent of {target:.4g}: what is left would need a noise "
            f"multiplier above {max_noise:g} for {rounds_left} more release(s) of "
            f"{steps_per_round} steps at sample rate {sample_rate:.4g} (a release that "
            "would be all noise)"
        )
    hi = min(1.0, max_noise)
    while eps(hi) > target:
        hi = min(hi * 2.0, max_noise)
    lo = 0.0
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def at_most(node_key: str, run_key: str, run_value: float, node_value: float | None) -> float:
    """A site may lower what the federation asks (budget, delta), never raise it."""
    if node_value is None:
        return run_value
    if node_value > run_value:
        log.warning(
            "node config %s=%g is above the federation's %s=%g: a site may only lower it "
            "(stricter), so %g is used", node_key, node_value, run_key, run_value, run_value,
        )
        return run_value
    return node_value


# ----------------------------------------------------------------- display


def _accountant_of(ledger: Ledger) -> AccountantName:
    return ledger.entries[-1].accountant if ledger.entries else "rdp"


# What each section of `privacy show` is, and what its figures mean (one sentence each).
_SECTIONS: tuple[tuple[Bucket, str, str], ...] = (
    ("train", "training budget (training split)",
     "caps what every release from the training split (model updates, the label count, "
     "non-private rounds) can tell about any one record in it"),
    ("evaluation", "evaluation budget (val/test splits)",
     "caps what the metrics released from the val and test splits can tell about any one "
     "record in them"),
)
LEDGER_NOTE = (
    "Epsilon is summed over every run on this data, at the stated delta (the chance that "
    "the bound fails); lower is more private. \"inf\" is a release made without DP noise "
    "(a non-private round or exact metrics): nothing bounds what it tells, and its budget "
    "has nothing left."
)


def _summary_lines(ledger: Ledger) -> list[str]:
    accountant = _accountant_of(ledger)
    lines = []
    for bucket, *_ in _SECTIONS:
        spent = ledger.epsilon(bucket, accountant)
        left = max(ledger.budget(bucket) - spent, 0.0)
        lines.append(f"epsilon {spent:.4f} spent of {ledger.budget(bucket):g}, left "
                     f"{left:.4f} (delta {ledger.delta:g}, {accountant.upper()})")
    return lines


def render_ledger(ledger: Ledger) -> Group:
    """One ledger as rich output that fits 80 columns and a pipe (cells wrap, none is cut):
    a header, then the training and the evaluation budget, each with its spent and left
    and a table of its releases, and a note on what epsilon and "inf" mean."""
    names = ", ".join(ledger.site_names) or "-"
    parts: list[RenderableType] = [
        Text(f"privacy ledger {ledger.key} ({names})", style="bold"),
        Text(f"data {', '.join(ledger.data_paths)} ({len(ledger.records)} records)"),
    ]
    for (bucket, what, meaning), summary in zip(_SECTIONS, _summary_lines(ledger),
                                                 strict=True):
        entries = [e for e in ledger.entries if e.bucket == bucket]
        parts += [Text(""), Text(what.capitalize(), style="bold underline"),
                  Text(summary, style="bold"), Text(f"It {meaning}.")]
        parts.append(_release_table(entries) if entries else Text("no release yet"))
    parts += [Text(""), Text(LEDGER_NOTE)]
    return Group(*parts)


def _release_table(entries: Sequence[LedgerEntry]) -> Table:
    """A section's releases; "eps after": the section's epsilon with this release in it."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 0, 0, 1))
    for column in ("kind", "run", "round", "noise", "rate", "steps", "eps after", "UTC"):
        table.add_column(column, overflow="fold",
                         justify="left" if column in ("kind", "UTC") else "right")
    for e in entries:
        table.add_row(
            e.kind, str(e.run_id), str(e.server_round), f"{e.noise_multiplier:.4f}",
            f"{e.sample_rate:.4f}", str(e.steps), f"{e.epsilon_after:.4f}",
            e.time[:16].replace("T", " "),
        )
    return table


def ledger_text(ledger: Ledger, width: int = 80) -> str:
    """The same as `render_ledger`, as plain text `width` columns wide (logs, files)."""
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(render_ledger(ledger))
    return console.export_text(styles=False).rstrip("\n")


def find_stores(root: Path | None = None, key: bytes | None = None) -> list[LedgerStore]:
    """Stores at `root` or one level below (a folder of simulated nodes' stores); `key`:
    their chain key when it is not the stores' own key file (node config node-key)."""
    base = Path(root).expanduser() if root is not None else default_store_root()
    if (base / INDEX_FILE).exists():
        return [LedgerStore(base, key=key)]
    return [LedgerStore(p.parent, key=key) for p in sorted(base.glob(f"*/{INDEX_FILE}"))]
