"""Update compression on the wire: a hospital may send its update (trained - global) in a
16-bit float type instead of its trained weights in float32, and the server adds it back
onto the global model it sent that round.

Rounding the update, not the weights, is what keeps the error small: an update is a
thousandth of a weight's size, so half precision rounds away a thousandth of the update
rather than of the weight. bfloat16 (8 mantissa bits) travels as its 16 raw bits: NumPy,
which Flower's arrays are, has no bfloat16. Non-float arrays travel as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from shared_model.config import UpdateDtype

WEIGHTS = ""  # the encoding of a reply that carries its trained weights (no compression)


def encoding_of(dtype: UpdateDtype) -> str:
    """What a reply says it carries (`wire.SITE_UPDATE`)."""
    return WEIGHTS if dtype == "float32" else f"delta-{dtype}"


def encode(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
           dtype: UpdateDtype) -> dict[str, torch.Tensor]:
    """The arrays a reply carries: the trained weights (float32), or each float array's
    update in `dtype` (bfloat16 as int16 bits)."""
    if dtype == "float32":
        return dict(trained)
    out = {}
    for name, t in trained.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        delta = (t.float() - start[name].float()).to(getattr(torch, dtype))
        out[name] = delta.view(torch.int16) if dtype == "bfloat16" else delta
    return out


def decode(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
           encoding: str) -> dict[str, np.ndarray]:
    """The trained weights a reply stands for, in the reference's dtypes; `ValueError` on an
    encoding this server does not know (the reply is then left out with the reason)."""
    if encoding == WEIGHTS:
        return dict(arrays)
    if encoding not in ("delta-float16", "delta-bfloat16"):
        raise ValueError(f"unknown update encoding {encoding!r}")
    deltas, out = {}, {}
    for name, ref in reference.items():
        a = arrays[name]
        if ref.dtype.kind != "f":
            out[name] = a  # travelled as its value
        elif encoding == "delta-bfloat16":
            deltas[name] = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(
                torch.bfloat16).float().numpy()
        else:
            deltas[name] = a
    out.update(apply_update({k: reference[k] for k in deltas}, deltas))
    return {k: out[k] for k in reference}


def apply_update(reference: Mapping[str, np.ndarray],
                 deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """reference + delta, array by array, in the reference's dtypes (integers rounded):
    how a server turns an update back into weights (a 16-bit update here, the unmasked
    mean of SecAgg+ in server/secure.py)."""
    out = {}
    for name, ref in reference.items():
        total = ref.astype(np.float64) + np.asarray(deltas[name], dtype=np.float64)
        out[name] = (np.rint(total) if ref.dtype.kind in "iu" else total).astype(ref.dtype)
    return out
