"""Tests for jaxsparse.data."""

import numpy as np
import pytest

from jaxsparse import data


def test_digits_split_is_deterministic_stratified_and_standardized():
    a, b = data.digits(0), data.digits(0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a.x_train.shape[1] == 64 and a.num_classes == 10
    assert len(a.y_train) + len(a.y_test) == 1797
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert set(np.unique(a.y_test)) == set(range(10))
    assert abs(len(a.y_test) / 1797 - 0.25) < 0.01
    assert np.abs(a.x_train.mean(0)).max() < 1e-4
    c = data.digits(1)
    assert not np.array_equal(a.y_test, c.y_test) or not np.array_equal(
        a.x_test, c.x_test
    )


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5])
def test_digits_bad_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits(0, bad)
