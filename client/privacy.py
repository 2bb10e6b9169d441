"""The hospital's privacy ledger, the store that keeps it, and the accounting on it (no Flower).

Privacy loss composes across everything ever released from the same records, so a node
keeps, on its own disk, every release it made from its data: each DP-SGD round
(noise multiplier, sample rate, steps), the one noised count of the training split, every
evaluation release, and every release made without DP (recorded as infinite epsilon).
The epsilon it reports is always that whole history run through an Opacus accountant.

What keeps the figure honest:

- The ledger follows the data, not a name or a path: it is keyed by a digest of the
  site's records (the bytes of every image the manifest names). A renamed site or a
  copied folder finds the same ledger; a folder that shares cases with a ledger already
  in the store starts from that ledger's history (its cases have already been released).
- One store per node install (`~/.medfuse/privacy`, or the node's `state-dir`). The store
  keeps an index of every ledger it ever held, with each ledger's length and last digest:
  a ledger file that went missing, was truncated or edited is refused until a person
  restores it (the message says how); it is never silently recreated.
- Entries form a hash chain (each holds the digest of the one before), every field is
  validated (finite, positive, plausible), and each entry's `epsilon_after` is recomputed
  on load: a changed noise multiplier or step count no longer matches and is refused.
- A budget, once written into a ledger, may only go down; delta too.

There are two budgets. `train` covers everything computed from the training split (the
weights, the count); `evaluation` covers the val and test splits, which hold other cases:
a case is in exactly one split (its own column, or a hash of its case id), so the two
compose in parallel and each case's loss is bounded by its split's epsilon.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from rich.table import Table

from shared_model.config import MANIFEST
from shared_model.files import PRIVATE, atomic_write_text

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
LOCK_FILE = ".store.lock"
LEDGER_VERSION = 2
STORE_ENV = "MEDFUSE_PRIVACY_STORE"
DEFAULT_STATE_ROOT = Path("~/.medfuse/privacy")
# Above this noise multiplier an update carries no useful signal: a derived noise beyond
# it means the budget is, for practical purposes, spent. No entry may hold more.
MAX_USEFUL_NOISE = 50.0
MAX_STEPS = 10_000_000  # an entry with more steps than this is not a real round
RECORD_DIGEST_CHARS = 16  # 64 bits of sha256 per record: collisions are not a concern

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


def data_identity(data_path: Path) -> DataIdentity:
    """Digest the bytes of every image the manifest names (missing files are skipped).

    The image is the patient's record: a renamed site, a moved or copied folder or an
    edited report keep the identity; adding or removing cases changes it (and the store
    then finds the overlap). Reads every image once: milliseconds for a few hundred files.
    """
    folder = Path(data_path)
    manifest = folder / MANIFEST
    try:
        images = pd.read_csv(manifest, usecols=["image"], dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise LedgerError(f"cannot read {manifest} to identify the data: {exc}") from None
    digests = set()
    for rel in images["image"]:
        path = folder / rel.strip()
        if rel.strip() and path.is_file():
            digests.add(hashlib.sha256(path.read_bytes()).hexdigest()[:RECORD_DIGEST_CHARS])
    if not digests:
        raise LedgerError(f"{folder}: no readable image to identify the data by")
    records = tuple(sorted(digests))
    return DataIdentity(hashlib.sha256("\n".join(records).encode()).hexdigest(), records)


# ----------------------------------------------------------------- the ledger


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
    prev: str = Field(pattern=r"^[0-9a-f]{64}$", description="digest of the entry before")
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

    def digest(self) -> str:
        return _digest(self.model_dump_json())


class Ledger(BaseModel):
    """Everything released from one set of records, with the budgets that bound it.

    `path` (where it lives) is not part of the JSON: a ledger belongs to its data digest.
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

    _path: Path | None = PrivateAttr(default=None)
    # one-step RDP per (noise, sample rate): a pure function's values, never stale
    _rdp_cache: RdpCache = PrivateAttr(default_factory=dict)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def key(self) -> str:
        return self.data_digest[:16]

    def genesis(self) -> str:
        """What the first entry chains to: the data it is about."""
        return _digest(f"medfuse-ledger/{self.data_digest}")

    def head(self) -> str:
        return self.entries[-1].digest() if self.entries else self.genesis()

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
        """`LedgerError` unless the chain is whole and every epsilon recomputes."""
        prev = self.genesis()
        history: dict[Bucket, list[HistoryItem]] = {"train": [], "evaluation": []}
        for i, e in enumerate(self.entries):
            if e.prev != prev:
                raise LedgerError(f"entry {i + 1} does not follow entry {i}: an entry was "
                                  "removed, inserted or altered")
            history[e.bucket].append((e.noise_multiplier, e.sample_rate, e.steps))
            again = history_epsilon(history[e.bucket], self.delta, e.accountant,
                                    self._rdp_cache)
            if not _same_epsilon(again, e.epsilon_after):
                raise LedgerError(
                    f"entry {i + 1} says epsilon {e.epsilon_after:.6g} but its history gives "
                    f"{again:.6g}: the entry was edited"
                )
            prev = e.digest()


def _same_epsilon(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# ----------------------------------------------------------------- files


def read_ledger_file(path: Path) -> Ledger:
    """Parse and verify one ledger file (no index check: see `LedgerStore.load`)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LedgerError(f"no privacy ledger at {path}") from None
    except OSError as exc:
        raise LedgerError(f"cannot read the privacy ledger {path}: {exc}") from None
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("version") != LEDGER_VERSION:
            raise LedgerError(f"{path}: ledger version {data.get('version')}, expected "
                              f"{LEDGER_VERSION}")
        ledger = Ledger.model_validate(data)
        ledger.verify()
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


class LedgerStore:
    """One node install's ledgers, one per data digest, and the index that vouches for them.

        STORE/store.json                     every ledger ever held: entries and last digest
        STORE/<digest[:16]>/privacy-ledger.json
        STORE/.store.lock                    one round's read-check-train-append at a time
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------ files

    def ledger_path(self, key: str) -> Path:
        return self.root / key / LEDGER_FILE

    def _index(self) -> dict[str, dict]:
        path = self.root / INDEX_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return dict(data["ledgers"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LedgerError(f"the ledger store index {path} cannot be read ({exc}); "
                              "restore it from a backup") from None

    def _write_index(self, index: dict[str, dict]) -> None:
        text = json.dumps({"version": 1, "ledgers": index}, indent=2, sort_keys=True)
        atomic_write_text(self.root / INDEX_FILE, text + "\n", mode=PRIVATE)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive over the whole store: two runs on overlapping data must not both
        spend the same remaining budget; the second waits for the first's entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / LOCK_FILE)):
            yield

    # ------------------------------------------------------------ reading

    def keys(self) -> list[str]:
        return sorted(self._index())

    def load(self, key: str) -> Ledger:
        """A ledger the index knows, checked against the index (length and last digest)."""
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
                f"'{key}' from {self.root / INDEX_FILE} by hand."
            )
        ledger = read_ledger_file(path)
        want = index[key]
        if ledger.data_digest[:16] != key or len(ledger.entries) != want.get("entries") \
                or ledger.head() != want.get("head"):
            raise LedgerError(
                f"the privacy ledger {path} does not match the store index (it holds "
                f"{len(ledger.entries)} entries, the index {want.get('entries')}): entries "
                "were removed or the file was replaced. Restore it from a backup."
            )
        return ledger

    def ledgers(self) -> list[Ledger]:
        return [self.load(k) for k in self.keys()]

    # ------------------------------------------------------------ writing

    def save(self, ledger: Ledger) -> Path:
        """Ledger first, then the index: a crash between leaves a ledger the index
        undercounts, which `load` refuses (safe: nothing is forgotten)."""
        path = self.ledger_path(ledger.key)
        atomic_write_text(path, ledger.model_dump_json(indent=2) + "\n", mode=PRIVATE)
        index = self._index()
        index[ledger.key] = {"entries": len(ledger.entries), "head": ledger.head(),
                             "records": len(ledger.records)}
        self._write_index(index)
        ledger._path = path
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
        ledger = Ledger(
            data_digest=identity.digest, records=list(identity.records),
            epsilon_budget=epsilon_budget, eval_epsilon_budget=eval_epsilon_budget, delta=delta,
        )
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
                # compute_rdp(steps=n) is compute_rdp(steps=1) * n, bit for bit
                cache[(s, q)] = rdp_analysis.compute_rdp(
                    q=q, noise_multiplier=s, steps=1, orders=orders
                )
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


def _summary_lines(ledger: Ledger) -> list[str]:
    accountant = _accountant_of(ledger)
    lines = []
    for bucket, what in (("train", "training split"), ("evaluation", "val/test splits")):
        spent = ledger.epsilon(bucket, accountant)
        left = max(ledger.budget(bucket) - spent, 0.0)
        lines.append(f"{what}: epsilon {spent:.4f} of {ledger.budget(bucket):g} "
                     f"(delta {ledger.delta:g}, {accountant.upper()}); left {left:.4f}")
    return lines


def render_ledger(ledger: Ledger) -> Table:
    """A rich table: one row per release, and each budget's spent and left."""
    names = ", ".join(ledger.site_names) or "-"
    table = Table(
        title=f"privacy ledger {ledger.key} ({names})",
        caption="\n".join([f"data {', '.join(ledger.data_paths)} "
                           f"({len(ledger.records)} records)", *_summary_lines(ledger)]),
    )
    for column in ("kind", "run", "round", "noise", "sample rate", "steps", "epsilon after",
                   "time"):
        table.add_column(column, justify="left" if column in ("kind", "time") else "right")
    for e in ledger.entries:
        table.add_row(
            e.kind, str(e.run_id), str(e.server_round), f"{e.noise_multiplier:.4f}",
            f"{e.sample_rate:.4f}", str(e.steps), f"{e.epsilon_after:.4f}", e.time,
        )
    return table


def ledger_text(ledger: Ledger) -> str:
    """The same as `render_ledger`, as plain text (logs, files)."""
    lines = [
        f"ledger {ledger.key}  sites {', '.join(ledger.site_names)}  "
        f"data {', '.join(ledger.data_paths)}",
        f"{'kind':<17} {'run':>20} {'round':>6} {'noise':>9} {'rate':>8} {'steps':>7} "
        f"{'eps after':>10}",
    ]
    for e in ledger.entries:
        lines.append(
            f"{e.kind:<17} {e.run_id:>20} {e.server_round:>6} {e.noise_multiplier:>9.4f} "
            f"{e.sample_rate:>8.4f} {e.steps:>7} {e.epsilon_after:>10.4f}"
        )
    return "\n".join(lines + _summary_lines(ledger))


def find_stores(root: Path | None = None) -> list[LedgerStore]:
    """Stores at `root` or one level below (a folder of simulated nodes' stores)."""
    base = Path(root).expanduser() if root is not None else default_store_root()
    if (base / INDEX_FILE).exists():
        return [LedgerStore(base)]
    return [LedgerStore(p.parent) for p in sorted(base.glob(f"*/{INDEX_FILE}"))]
