"""Checks on one site's update before it may join the aggregate (NumPy only, no Flower).

A site's reply carries its new full state (every tensor of `MedFuseModel.state_dict()`).
It is compared with the global state the server sent: the same names, shapes and dtypes,
only finite values, and an update (new - global) whose L2 norm over all arrays stays
within a bound. A reply that fails any check is left out of the round; the reason is
returned as a sentence for the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_MAX_NAMES_LISTED = 5


@dataclass(frozen=True)
class UpdateCheck:
    """What `inspect_update` found: `reason` is None when the update may be used."""

    reason: str | None
    norm: float | None  # L2 norm of (update - reference); None when not computed


def _names(names: set[str]) -> str:
    shown = sorted(names)[:_MAX_NAMES_LISTED]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def inspect_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_norm: float,
    *,
    reference64: Mapping[str, np.ndarray] | None = None,
) -> UpdateCheck:
    """Check `update` against `reference`; also give the update's L2 norm when it is known.

    The checks run in order (names, then shapes and dtypes, then finiteness, then the norm)
    and the first failure is the reason. `reference64`: `as_float64(reference)`, when the
    caller checks many updates against one reference (the server, every reply of a round).
    """
    missing = set(reference) - set(update)
    extra = set(update) - set(reference)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing arrays: {_names(missing)}")
        if extra:
            parts.append(f"unexpected arrays: {_names(extra)}")
        return UpdateCheck("; ".join(parts), None)

    for name, ref in reference.items():
        new = np.asarray(update[name])
        if new.shape != ref.shape:
            return UpdateCheck(
                f"array {name!r} has shape {new.shape}, expected {ref.shape}", None
            )
        if new.dtype != ref.dtype:
            return UpdateCheck(
                f"array {name!r} has dtype {new.dtype}, expected {ref.dtype}", None
            )

    for name in reference:
        new = np.asarray(update[name])
        if new.dtype.kind in "fc" and not np.all(np.isfinite(new)):
            n_nan = int(np.isnan(new).sum())
            n_inf = int(np.isinf(new).sum())
            return UpdateCheck(
                f"array {name!r} holds non-finite values ({n_nan} NaN, {n_inf} Inf)", None
            )

    norm = update_norm(update, reference if reference64 is None else reference64)
    if not np.isfinite(norm):
        return UpdateCheck(f"update norm is not finite ({norm})", norm)
    if norm > max_norm:
        return UpdateCheck(
            f"update norm {norm:.4g} exceeds update-max-norm={max_norm:g}", norm
        )
    return UpdateCheck(None, norm)


def check_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_norm: float,
) -> str | None:
    """None when `update` may join the aggregate, else why not.

    Refused: a missing, extra or renamed array; a wrong shape or dtype; NaN or Inf; an
    L2 norm of (update - reference) over all arrays together beyond `max_norm`.
    """
    return inspect_update(update, reference, max_norm).reason


def as_float64(reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference as `update_norm` subtracts it, in float64: made once for a round's
    global model instead of once a reply (a float32 model converted per update cost as
    much as the norm itself)."""
    return {name: np.asarray(ref, dtype=np.float64) for name, ref in reference.items()}


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update - reference) over all arrays together, in float64.

    A float64 `reference` (`as_float64`) is used as it is, not converted again; the update
    is cast to float64 inside the subtraction (the same values as casting it first, one
    temporary array fewer)."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.subtract(update[name], np.asarray(ref, dtype=np.float64), dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))
