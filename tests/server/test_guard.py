"""in_dtypes: the aggregate in the global model's dtypes, an array already in its dtype
passed on as it is (not deserialised and serialised again)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from server.guard import in_dtypes


def test_the_aggregate_comes_back_in_the_global_dtypes_and_order():
    # Prepare: float32 as aggregated, float64 (FedAdam), an int buffer averaged to float
    agg = ArrayRecord({
        "count": Array(np.array([2.6, -1.5])),
        "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "b": Array(np.array([0.1, 0.2], dtype=np.float64)),
        "s": Array(np.array(1.5, dtype=np.float64)),
    })
    dtypes = {"w": np.dtype(np.float32), "b": np.dtype(np.float32),
              "count": np.dtype(np.int64), "s": np.dtype(np.float32)}
    # Execute
    out = in_dtypes(agg, dtypes)
    # Assert
    assert list(out) == ["w", "b", "count", "s"]
    assert out["w"].data is agg["w"].data  # already float32: its bytes kept as they came
    assert {k: v.numpy().dtype for k, v in out.items()} == dtypes
    assert np.array_equal(out["b"].numpy(), np.array([0.1, 0.2], dtype=np.float32))
    assert np.array_equal(out["count"].numpy(), [3, -2])
    assert out["s"].numpy().shape == ()  # a 0-d array stays 0-d
