"""arrays_summary: the digest hashes each array's bytes in place, and is the very digest
the tobytes() copy gave (the digests already in audit logs stay comparable)."""

from __future__ import annotations

import hashlib

import numpy as np

from shared_model.audit_log import arrays_summary


def _digest_by_copy(arrays: dict[str, np.ndarray]) -> str:
    """The digest as arrays_summary made it before: every array copied with tobytes()."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def test_the_digest_is_the_one_the_tobytes_copy_gave_for_every_kind_of_array():
    # Prepare: the dtypes a model and its updates hold, and the odd shapes and layouts
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((6, 5)).astype(np.float32)
    odd = {
        "float32": rng.standard_normal((3, 4)).astype(np.float32),
        "float16": rng.standard_normal(7).astype(np.float16),
        "int64": np.arange(5, dtype=np.int64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),
        "int-scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(grid),
        "strided": grid[::2, 1:],
        "big-endian": np.arange(4, dtype=">f4"),
    }
    for name, a in odd.items():
        # Execute
        summary = arrays_summary({name: a})
        # Assert
        assert summary["sha256"] == _digest_by_copy({name: a}), name
    assert arrays_summary(odd)["sha256"] == _digest_by_copy(odd)


def test_the_summary_lists_names_shapes_dtypes_and_bytes():
    # Execute
    summary = arrays_summary({"b": np.zeros(3, np.float16), "a": np.array(1.0, np.float32)})
    # Assert: name order; a 0-d array counts as shape (1,), as it always did
    assert summary["count"] == 2 and summary["bytes"] == 10
    assert summary["arrays"] == [
        {"name": "a", "shape": [1], "dtype": "float32", "bytes": 4},
        {"name": "b", "shape": [3], "dtype": "float16", "bytes": 6},
    ]
