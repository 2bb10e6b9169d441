"""check_update: every way an update can be refused, and the ones that pass."""

from __future__ import annotations

import numpy as np
import pytest

from server.checks import as_float64, check_update, inspect_update, update_norm


@pytest.fixture
def reference() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.zeros((4, 1, 3, 3), dtype=np.float32),
        "fc.bias": np.zeros(5, dtype=np.float32),
        "steps": np.zeros((), dtype=np.int64),
    }


def _copy(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in ref.items()}


def test_identical_update_passes(reference):
    # Execute
    reason = check_update(_copy(reference), reference, max_norm=1.0)
    # Assert
    assert reason is None


def test_update_within_norm_passes_and_norm_is_exact(reference):
    # Prepare: one entry of 3 and one of 4 -> norm 5
    update = _copy(reference)
    update["conv.weight"][0, 0, 0, 0] = 3.0
    update["fc.bias"][2] = 4.0
    # Execute
    result = inspect_update(update, reference, max_norm=5.0)
    # Assert
    assert result.reason is None
    assert result.norm == pytest.approx(5.0)
    assert update_norm(update, reference) == pytest.approx(5.0)


def test_norm_just_beyond_bound_is_refused(reference):
    # Prepare
    update = _copy(reference)
    update["fc.bias"][0] = 5.0 + 1e-3
    # Execute
    reason = check_update(update, reference, max_norm=5.0)
    # Assert
    assert reason is not None and "norm" in reason and "5.001" in reason


def test_norm_is_taken_over_all_arrays_together(reference):
    # Prepare: each array alone is within 1, together sqrt(0.8^2 + 0.8^2) = 1.13 > 1
    update = _copy(reference)
    update["conv.weight"][0, 0, 0, 0] = 0.8
    update["fc.bias"][0] = 0.8
    # Execute / Assert
    assert check_update(update, reference, max_norm=1.0) is not None
    assert check_update(update, reference, max_norm=1.2) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(reference, bad):
    # Prepare
    update = _copy(reference)
    update["fc.bias"][3] = bad
    # Execute
    reason = check_update(update, reference, max_norm=1e30)
    # Assert
    assert reason is not None and "'fc.bias'" in reason and "non-finite" in reason


def test_wrong_shape_is_refused(reference):
    # Prepare
    update = _copy(reference)
    update["fc.bias"] = np.zeros(6, dtype=np.float32)
    # Execute
    reason = check_update(update, reference, max_norm=1.0)
    # Assert
    assert reason == "array 'fc.bias' has shape (6,), expected (5,)"


def test_same_size_other_shape_is_refused(reference):
    # Prepare: 36 values either way, but (4,9) is not (4,1,3,3)
    update = _copy(reference)
    update["conv.weight"] = np.zeros((4, 9), dtype=np.float32)
    # Execute / Assert
    assert "shape" in check_update(update, reference, max_norm=1.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_wrong_dtype_is_refused(reference, dtype):
    # Prepare
    update = _copy(reference)
    update["fc.bias"] = np.zeros(5, dtype=dtype)
    # Execute
    reason = check_update(update, reference, max_norm=1.0)
    # Assert
    assert reason == f"array 'fc.bias' has dtype {np.dtype(dtype)}, expected float32"


def test_missing_name_is_refused(reference):
    # Prepare
    update = _copy(reference)
    del update["fc.bias"]
    # Execute
    reason = check_update(update, reference, max_norm=1.0)
    # Assert
    assert reason == "missing arrays: fc.bias"


def test_extra_name_is_refused(reference):
    # Prepare
    update = _copy(reference)
    update["leaked.vocab"] = np.zeros(3, dtype=np.float32)
    # Execute
    reason = check_update(update, reference, max_norm=1.0)
    # Assert
    assert reason == "unexpected arrays: leaked.vocab"


def test_renamed_array_reports_both_sides(reference):
    # Prepare
    update = _copy(reference)
    update["fc.b"] = update.pop("fc.bias")
    # Execute
    reason = check_update(update, reference, max_norm=1.0)
    # Assert
    assert reason == "missing arrays: fc.bias; unexpected arrays: fc.b"


def test_many_missing_names_are_abbreviated():
    # Prepare
    reference = {f"a{i}": np.zeros(1, dtype=np.float32) for i in range(9)}
    # Execute
    reason = check_update({}, reference, max_norm=1.0)
    # Assert
    assert reason == "missing arrays: a0, a1, a2, a3, a4 and 4 more"


def test_integer_buffers_count_in_the_norm(reference):
    # Prepare
    update = _copy(reference)
    update["steps"] = np.array(7, dtype=np.int64)
    # Execute / Assert
    assert inspect_update(update, reference, max_norm=100.0).norm == pytest.approx(7.0)


def test_checks_are_pure(reference):
    # Prepare
    update = _copy(reference)
    update["fc.bias"][0] = np.nan
    before = {k: v.copy() for k, v in update.items()}
    # Execute
    check_update(update, reference, max_norm=1.0)
    # Assert
    for k in before:
        np.testing.assert_array_equal(update[k], before[k])


def test_a_float64_reference_made_once_gives_the_very_same_norm(reference):
    # Prepare: the server converts the round's global model once, for every reply
    rng = np.random.default_rng(3)
    ref = {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in reference.items()}
    update = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
              for k, v in ref.items()}
    want = 0.0  # the norm as it was always taken: both sides cast to float64 first
    for name, r in ref.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(r, dtype=np.float64)
        want += float(np.dot(diff.ravel(), diff.ravel()))
    # Execute
    once = inspect_update(update, ref, max_norm=1e3, reference64=as_float64(ref))
    # Assert: equal to the last bit, with and without the float64 reference
    assert once.norm == inspect_update(update, ref, max_norm=1e3).norm == float(np.sqrt(want))
    assert update_norm(update, as_float64(ref)) == once.norm
