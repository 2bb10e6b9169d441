"""A message's model arrays packed into one byte array on the wire, and back.

Flower 1.42 moves each array of a message as an object of its own, one remote call per
array at each hand-off of a deployed round (ServerApp -> SuperLink -> SuperNode ->
ClientApp, and back). medfuse's model has 69 arrays, so a round made some 800 calls over
TLS; measured on 2 cores, a node took 3.6 s to send one 3.76 MB reply. Packed, a
message carries one array whatever the model, with its layout (names, dtypes, shapes) as
three lists of strings beside it. `packed` and `unpacked` do it to a Flower message; the
server's Grid (`server/grid.py`) and the ClientApp's outermost mod (`client/app.py`) call
them on what they send and receive, so strategies, handlers, checks and audit logs only
ever see the arrays by name. (The one module of `shared_model` that imports Flower: both
sides need the same two functions.)

`unpack` trusts nothing it is given: a layout that does not account for every byte, an
unknown dtype or a bad shape is a `ValueError`, never a wrong array.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from shared_model.contract import wire

log = logging.getLogger(__name__)

NAMES = "names"
DTYPES = "dtypes"
SHAPES = "shapes"
Layout = dict[str, list[str]]  # NAMES, DTYPES, SHAPES: one string per array, in order

_KINDS = "fiub"  # float, signed and unsigned integer, bool: what a model's arrays are


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Every array's bytes one after the other (uint8), and the layout to undo it."""
    layout: Layout = {NAMES: [], DTYPES: [], SHAPES: []}
    parts = []
    for name, a in arrays.items():
        a = np.asarray(a, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if a.dtype.kind not in _KINDS:
            raise ValueError(f"array {name!r}: dtype {a.dtype} cannot be packed")
        layout[NAMES].append(name)
        layout[DTYPES].append(a.dtype.str)
        layout[SHAPES].append(",".join(str(d) for d in a.shape))
        parts.append(a.reshape(-1).view(np.uint8))
    buf = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return buf, layout


def unpack(buf: np.ndarray, layout: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """The arrays `pack` packed, by name and in order (each a copy: writeable)."""
    names, dtypes, shapes = (list(layout.get(k, ())) for k in (NAMES, DTYPES, SHAPES))
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"packed layout: {len(names)} names, {len(dtypes)} dtypes, "
                         f"{len(shapes)} shapes")
    if len(set(names)) != len(names):
        raise ValueError("packed layout: an array name appears twice")
    raw = np.asarray(buf, order="C").reshape(-1).view(np.uint8)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype_str, shape_str in zip(names, dtypes, shapes, strict=True):
        try:
            dtype = np.dtype(str(dtype_str))
            shape = tuple(int(d) for d in str(shape_str).split(",")) if shape_str else ()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"packed array {name!r}: bad dtype or shape ({exc})") from None
        if dtype.kind not in _KINDS or any(d < 0 for d in shape):
            raise ValueError(f"packed array {name!r}: dtype {dtype} shape {shape} refused")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > raw.size:
            raise ValueError(f"packed array {name!r}: the buffer ends before it does")
        out[str(name)] = raw[offset:offset + size].view(dtype).reshape(shape).copy()
        offset += size
    if offset != raw.size:
        raise ValueError(f"packed layout accounts for {offset} of {raw.size} bytes")
    return out


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Flower's ArrayRecord of `arrays`, in their order, each C-ordered and of its own
    shape: `np.ascontiguousarray` would make a 0-d array (a scalar buffer) 1-d, and the
    next round's replies, still 0-d, would then fail the server's shape check."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def packed(msg: Message) -> Message:
    """The message with its model arrays (record `wire.ARRAYS`) as one packed array."""
    if msg.has_error() or not msg.content.array_records.get(wire.ARRAYS):
        return msg
    buf, layout = pack({k: v.numpy() for k, v in
                        msg.content.array_records[wire.ARRAYS].items()})
    content = RecordDict({k: v for k, v in msg.content.items() if k != wire.ARRAYS})
    content[wire.PACKED] = ArrayRecord({wire.PACKED: Array(buf)})
    content[wire.PACKED_LAYOUT] = ConfigRecord(layout)  # type: ignore[arg-type]
    msg.content = content
    return msg


def unpacked(msg: Message) -> Message:
    """The message with its packed arrays back under `wire.ARRAYS`. One whose packing does
    not hold together loses its arrays (a server leaves such a reply out; a node answers
    such a message with an error) and is logged."""
    if msg.has_error() or wire.PACKED not in msg.content.array_records:
        return msg
    content = RecordDict({k: v for k, v in msg.content.items()
                          if k not in (wire.PACKED, wire.PACKED_LAYOUT)})
    try:
        layout = msg.content.config_records.get(wire.PACKED_LAYOUT) or {}
        arrays = unpack(msg.content.array_records[wire.PACKED][wire.PACKED].numpy(),
                        layout)  # type: ignore[arg-type]
        content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("message from node %d: packed arrays cannot be read (%s); dropped",
                    msg.metadata.src_node_id, exc)
    msg.content = content
    return msg
