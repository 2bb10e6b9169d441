"""The hospital's privacy ledger and the accounting on it (no Flower here).

Privacy loss composes across everything ever released from the same data, so the site
keeps, on its own disk, every (noise multiplier, sample rate, steps) it trained with, for
every run. The epsilon it reports is always that whole history run through an Opacus
accountant: neither a SuperNode restart (which wipes Flower's `context.state`) nor a new
run resets it. The ledger is a small JSON file written atomically after every round; a
ledger that cannot be read is an error, never a silent reset (a reset would hide privacy
already spent).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from rich.table import Table

log = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]
LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = ".privacy-ledger.lock"
LEDGER_VERSION = 1
DEFAULT_STATE_ROOT = Path("~/.medfuse/privacy")
# Above this noise multiplier an update carries no useful signal: a derived noise beyond
# it means the budget is, for practical purposes, spent.
MAX_USEFUL_NOISE = 50.0

HistoryItem = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus' form
RdpCache = dict[tuple[float, float], np.ndarray]


class LedgerError(RuntimeError):
    """A ledger that cannot be read or written; the message says which file and why."""


class BudgetError(RuntimeError):
    """No noise level keeps the site within its budget (nothing can be released)."""


class LedgerEntry(BaseModel):
    """One round of private training at this site: what the accountant needs, and when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: int
    server_round: int = Field(ge=0)
    noise_multiplier: float = Field(ge=0.0)
    sample_rate: float = Field(gt=0.0, le=1.0)
    steps: int = Field(ge=0)
    epsilon_after: float = Field(ge=0.0, description="cumulative epsilon after this round")
    accountant: AccountantName = "rdp"
    time: str = Field(description="UTC, ISO 8601")


class Ledger(BaseModel):
    """Everything released from one site's data, with the budget that bounds it.

    `path` (where it lives) is not part of the JSON: the same ledger can be moved.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    version: int = LEDGER_VERSION
    site_name: str
    data_path: str = Field(description="absolute path of the site folder")
    manifest_sha256: str = Field(description="fingerprint of manifest.csv; '' when unknown")
    epsilon_budget: float = Field(gt=0.0)
    delta: float = Field(gt=0.0, lt=1.0)
    entries: list[LedgerEntry] = Field(default_factory=list)

    _path: Path | None = PrivateAttr(default=None)
    # one-step RDP per (noise, sample rate): a pure function's values, never stale
    _rdp_cache: RdpCache = PrivateAttr(default_factory=dict)

    @property
    def path(self) -> Path | None:
        return self._path

    def history(self) -> list[HistoryItem]:
        """Opacus accountant history over ALL entries (all runs): privacy composes."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if e.steps]

    def save(self, path: Path | None = None) -> Path:
        """Write atomically: temp file in the same folder, fsync, os.replace, fsync folder."""
        target = Path(path) if path is not None else self._path
        if target is None:
            raise LedgerError("this ledger has no file yet: pass a path to save()")
        atomic_write_text(target, self.model_dump_json(indent=2) + "\n")
        self._path = target
        return target


# ----------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def manifest_fingerprint(data_path: Path) -> str:
    """sha256 of the site's manifest.csv ('' when there is none to read)."""
    manifest = Path(data_path) / "manifest.csv"
    try:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    except OSError:
        return ""


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir).expanduser() / LEDGER_FILE


def load_ledger(state_dir: Path) -> Ledger:
    """Read an existing ledger; `LedgerError` when it is missing or cannot be read."""
    path = ledger_path(state_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LedgerError(f"no privacy ledger at {path}") from None
    except OSError as exc:
        raise LedgerError(f"cannot read the privacy ledger {path}: {exc}") from None
    try:
        ledger = Ledger.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise LedgerError(
            f"the privacy ledger {path} is corrupt ({first}). It records the privacy this "
            "site has already spent, so it is never reset automatically: restore it from a "
            "backup or repair it; only move it away if you accept that the spent budget is "
            "forgotten."
        ) from None
    if ledger.version != LEDGER_VERSION:
        raise LedgerError(f"{path}: ledger version {ledger.version}, expected {LEDGER_VERSION}")
    ledger._path = path
    return ledger


def open_ledger(
    state_dir: Path,
    *,
    site_name: str,
    data_path: Path,
    epsilon_budget: float,
    delta: float,
) -> Ledger:
    """Load this site's ledger, or create it on first use.

    The budget recorded is the one in force now (federation's, capped by the node's). A
    ledger whose data identity differs (another folder, a changed manifest) keeps its
    entries: the new data most likely overlaps the old, and forgetting spent privacy is
    the one unsafe choice. The change is logged and recorded.
    """
    path = ledger_path(state_dir)
    data_abs = str(Path(data_path).expanduser().resolve())
    fingerprint = manifest_fingerprint(Path(data_abs))
    if not path.exists():
        ledger = Ledger(
            site_name=site_name,
            data_path=data_abs,
            manifest_sha256=fingerprint,
            epsilon_budget=epsilon_budget,
            delta=delta,
        )
        ledger.save(path)
        log.info("privacy ledger created at %s (budget epsilon=%g delta=%g)",
                 path, epsilon_budget, delta)
        return ledger
    ledger = load_ledger(state_dir)
    changed = False
    if ledger.data_path != data_abs or ledger.manifest_sha256 != fingerprint:
        log.warning(
            "privacy ledger %s was kept for %s (manifest %s) and is now used for %s "
            "(manifest %s): its spent privacy still counts",
            path, ledger.data_path, ledger.manifest_sha256[:12] or "-", data_abs,
            fingerprint[:12] or "-",
        )
        ledger.data_path, ledger.manifest_sha256 = data_abs, fingerprint
        changed = True
    if ledger.site_name != site_name:
        log.warning("privacy ledger %s: site name %r is now %r", path, ledger.site_name, site_name)
        ledger.site_name = site_name
        changed = True
    if (ledger.epsilon_budget, ledger.delta) != (epsilon_budget, delta):
        log.info("privacy ledger %s: budget epsilon=%g delta=%g (was epsilon=%g delta=%g)",
                 path, epsilon_budget, delta, ledger.epsilon_budget, ledger.delta)
        ledger.epsilon_budget, ledger.delta = epsilon_budget, delta
        changed = True
    if changed:
        ledger.save(path)
    return ledger


@contextlib.contextmanager
def ledger_lock(state_dir: Path) -> Iterator[None]:
    """Exclusive lock over one round's read-check-train-append on this ledger.

    Two runs training on the same data at once must not both spend the same remaining
    budget; the second waits until the first has written its entry.
    """
    folder = Path(state_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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
    """Epsilon of a history at `delta`; 0 for nothing released, inf for a noiseless step.

    RDP: exactly Opacus' `RDPAccountant.get_epsilon` (same orders, same sums in the same
    order), with each (noise, sample rate)'s one-step RDP computed once per `cache`: the
    accountant recomputes it for every entry, which costs seconds on a long ledger. PRV:
    Opacus' `PRVAccountant` on the history.
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
            return float(make_accountant(accountant, items).get_epsilon(delta))
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
        return float(eps)


def epsilon_spent(ledger: Ledger, accountant: AccountantName = "rdp") -> float:
    """The site's cumulative epsilon over every entry of every run, at the ledger's delta."""
    return history_epsilon(ledger.history(), ledger.delta, accountant, ledger._rdp_cache)


def round_cost(
    ledger: Ledger,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
) -> float:
    """Cumulative epsilon if one more round of `steps` at (noise, sample_rate) is added."""
    return history_epsilon(
        [*ledger.history(), (noise_multiplier, sample_rate, steps)], ledger.delta, accountant,
        ledger._rdp_cache,
    )


def noise_for_budget(
    ledger: Ledger,
    sample_rate: float,
    steps_per_round: int,
    rounds_left: int,
    target_epsilon: float | None = None,
    accountant: AccountantName = "rdp",
    *,
    rel_tol: float = 5e-3,
    max_noise: float = MAX_USEFUL_NOISE,
) -> float:
    """The smallest noise multiplier such that the ledger's history plus `rounds_left`
    rounds of `steps_per_round` steps stays within `target_epsilon` (default: the
    ledger's budget). Rounded up, so the plan never overshoots.

    `BudgetError` when the history alone is at or past the budget, or when what is left
    would need a noise multiplier above `max_noise`: any sliver of budget "fits" with
    enough noise, but an update that is all noise is worth nothing to the federation and
    would only spend the last of the budget, so the site says its budget is spent."""
    target = ledger.epsilon_budget if target_epsilon is None else target_epsilon
    history = ledger.history()
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
            f"multiplier above {max_noise:g} for {rounds_left} more round(s) of "
            f"{steps_per_round} steps at sample rate {sample_rate:.4g} (an update that "
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


def effective_budget(run_epsilon: float, node_epsilon: float | None) -> float:
    """A site may lower the federation's budget, never raise it."""
    return _at_most("epsilon-budget", "epsilon", run_epsilon, node_epsilon)


def effective_delta(run_delta: float, node_delta: float | None) -> float:
    """Same rule for delta: the node may only make it smaller (stricter)."""
    return _at_most("delta", "delta", run_delta, node_delta)


def _at_most(node_key: str, run_key: str, run_value: float, node_value: float | None) -> float:
    if node_value is None:
        return run_value
    if node_value > run_value:
        log.warning(
            "node config %s=%g is above the federation's %s=%g: a site may only lower it "
            "(stricter), so %g is used", node_key, node_value, run_key, run_value, run_value,
        )
        return run_value
    return node_value


def new_entry(
    *,
    run_id: int,
    server_round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    epsilon_after: float,
    accountant: AccountantName,
) -> LedgerEntry:
    return LedgerEntry(
        run_id=run_id,
        server_round=server_round,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        epsilon_after=epsilon_after,
        accountant=accountant,
        time=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# ----------------------------------------------------------------- display


def _accountant_of(ledger: Ledger) -> AccountantName:
    return ledger.entries[-1].accountant if ledger.entries else "rdp"


def render_ledger(ledger: Ledger) -> Table:
    """A rich table: one row per round, and the total spent, budget and what is left."""
    accountant = _accountant_of(ledger)
    spent = epsilon_spent(ledger, accountant)
    left = max(ledger.epsilon_budget - spent, 0.0)
    table = Table(
        title=f"privacy ledger of {ledger.site_name}",
        caption=(
            f"data {ledger.data_path}\n"
            f"spent epsilon {spent:.4f} of {ledger.epsilon_budget:g} "
            f"(delta {ledger.delta:g}, {accountant.upper()}); left {left:.4f}"
        ),
    )
    for column in ("run", "round", "noise", "sample rate", "steps", "epsilon after", "time"):
        table.add_column(column, justify="left" if column == "time" else "right")
    for e in ledger.entries:
        table.add_row(
            str(e.run_id), str(e.server_round), f"{e.noise_multiplier:.4f}",
            f"{e.sample_rate:.4f}", str(e.steps), f"{e.epsilon_after:.4f}", e.time,
        )
    return table


def ledger_text(ledger: Ledger) -> str:
    """The same as `render_ledger`, as plain text (logs, files)."""
    accountant = _accountant_of(ledger)
    spent = epsilon_spent(ledger, accountant)
    lines = [
        f"site {ledger.site_name}  data {ledger.data_path}",
        f"{'run':>20} {'round':>6} {'noise':>9} {'rate':>8} {'steps':>7} {'eps after':>10}",
    ]
    for e in ledger.entries:
        lines.append(
            f"{e.run_id:>20} {e.server_round:>6} {e.noise_multiplier:>9.4f} "
            f"{e.sample_rate:>8.4f} {e.steps:>7} {e.epsilon_after:>10.4f}"
        )
    lines.append(
        f"spent epsilon {spent:.4f} of {ledger.epsilon_budget:g} (delta {ledger.delta:g}, "
        f"{accountant}); left {max(ledger.epsilon_budget - spent, 0.0):.4f}"
    )
    return "\n".join(lines)


def find_ledgers(root: Path = DEFAULT_STATE_ROOT) -> list[Path]:
    """State folders under `root` that hold a ledger (for `medfuse privacy show`)."""
    base = Path(root).expanduser()
    if ledger_path(base).exists():
        return [base]
    return sorted(p.parent for p in base.glob(f"*/{LEDGER_FILE}"))
