"""Tests for the regularized-sparsity experiment (experiments/regularized.py)."""

import jax
import pytest

from jaxsparse.experiments import regularized


@pytest.fixture(autouse=True)
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


# About 250 s on 2 cores; notebooks/regularized.ipynb, run by default, trains
# every method through the same train_method.
@pytest.mark.slow
def test_every_method_trains_and_reads_out():
    rows = regularized.run_regularized([0], hidden=(32, 16), epochs=6)
    by_name = {r.method: r for r in rows}
    assert list(by_name) == list(regularized.methods(100))
    assert by_name["dense"].weight_sparsity == 0.0
    for r in rows:
        assert 0.0 <= r.weight_sparsity <= 1.0 and 0.0 <= r.neuron_sparsity <= 1.0
        assert r.accuracy > 0.1, r
    # The proximal steps give exact zeros even after a few epochs.
    assert by_name["l1-prox"].weight_sparsity > 0.005
    table = regularized.format_regularized(rows)
    assert "sparse-vd" in table and "neurons pruned" in table
