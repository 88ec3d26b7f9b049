"""Tests for the second-order experiment (jaxsparse/experiments/second_order.py)."""

import jax
import numpy as np
import pytest

from jaxsparse.experiments import second_order


@pytest.fixture(autouse=True)
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_every_method_runs_and_prunes_exactly(monkeypatch):
    seen = []
    original = second_order.prune_methods

    def spy(params, x, y):
        methods = original(params, x, y)
        return {
            name: (
                lambda s, f=f, name=name: seen.append((name, s, f(s))) or seen[-1][2]
            )
            for name, f in methods.items()
        }

    monkeypatch.setattr(second_order, "prune_methods", spy)
    rows = second_order.run_second_order([0], [0.5, 0.9], hidden=(8,), epochs=40)
    assert [r.method for r in rows[:1]] == ["dense"]
    assert {r.method for r in rows} == {"dense", *second_order.METHODS}
    for name, s, params in seen:
        for layer in params.values():
            kernel = np.asarray(layer["kernel"])
            assert (kernel == 0).sum() >= round(s * kernel.size), (name, s)
    dense = rows[0].accuracy
    assert dense > 0.8
    for r in rows[1:]:
        if r.sparsity == 0.5 and r.method != "magnitude":
            assert r.accuracy > 0.5 * dense, r
    table = second_order.format_second_order(rows)
    assert "OBS x5" in table and "90%" in table
    with pytest.raises(ValueError, match="sparsities must be in"):
        second_order.run_second_order([0], [1.0])
