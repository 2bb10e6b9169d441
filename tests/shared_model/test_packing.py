"""Packing a message's arrays into one: the same arrays back, and nothing trusted."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.contract.packing import array_record, pack, unpack


def test_every_dtype_and_shape_comes_back_the_same():
    # Prepare: what a model state holds (floats of every size, integers, a bool, a 0-d
    # array, bfloat16 updates as raw int16 bits, an empty array)
    arrays = {
        "w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "h": np.arange(5, dtype=np.float16), "d": np.array([1.5, -2.0]),
        "steps": np.array(12, dtype=np.int64), "bf16": np.arange(-3, 3, dtype=np.int16),
        "mask": np.array([True, False]), "empty": np.zeros((0, 2), dtype=np.float32),
    }
    # Execute
    buf, layout = pack(arrays)
    back = unpack(buf, layout)
    # Assert
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        assert np.array_equal(back[name], a), name
        assert back[name].flags.writeable


@pytest.mark.parametrize("layout, match", [
    ({"names": ["w"], "dtypes": ["<f4"], "shapes": ["3"]}, "ends before"),
    ({"names": ["w"], "dtypes": ["<f4"], "shapes": ["1"]}, "accounts for 4 of 8"),
    ({"names": ["w"], "dtypes": ["|O"], "shapes": ["1"]}, "refused"),
    ({"names": ["w"], "dtypes": ["<f4"], "shapes": ["-2"]}, "refused"),
    ({"names": ["w"], "dtypes": ["nonsense"], "shapes": ["2"]}, "bad dtype"),
    ({"names": ["w", "w"], "dtypes": ["<f4", "<f4"], "shapes": ["1", "1"]}, "twice"),
    ({"names": ["w"], "dtypes": ["<f4", "<f4"], "shapes": ["1"]}, "1 names, 2 dtypes"),
])
def test_a_layout_that_does_not_add_up_is_refused(layout, match):
    with pytest.raises(ValueError, match=match):
        unpack(np.zeros(8, dtype=np.uint8), layout)


def test_an_array_record_keeps_each_arrays_shape_a_scalar_too():
    # Prepare: a scalar buffer, a Fortran-ordered matrix, a vector
    arrays = {"count": np.array(3, dtype=np.int64),
              "w": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
              "b": np.zeros(4, dtype=np.float16)}
    # Execute
    record = array_record(arrays)
    # Assert: same names in order, same values and shapes (np.ascontiguousarray made the
    # scalar shape (1,))
    assert list(record) == ["count", "w", "b"]
    for name, a in arrays.items():
        back = record[name].numpy()
        assert back.shape == a.shape and back.dtype == a.dtype, name
        assert np.array_equal(back, a), name
