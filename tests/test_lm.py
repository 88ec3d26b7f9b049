"""Tests for the small transformer language model (experiments/lm.py): the
corpus ships with Python, training lowers the loss, the causal mask holds,
and layer-wise pruning finds exactly the blocks' linear layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse import layerwise
from jaxsparse.experiments import lm


@pytest.fixture(autouse=True)
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_the_corpus_is_python_source_and_deterministic():
    data = lm.corpus()
    assert data.dtype == np.uint8 and len(data) > 500_000
    assert b"def " in data[:20_000].tobytes()
    np.testing.assert_array_equal(data[:1000], lm.corpus()[:1000])
    train, valid = lm.split_corpus(data)
    assert len(train) + len(valid) == len(data)


def test_causal_training_and_pruning_of_the_blocks():
    params = lm.init_lm(jax.random.key(0), width=32, depth=2, heads=2, context=16)
    tokens = jnp.asarray(lm.windows(lm.corpus()[:50_000], 16, 4, 0))
    # Causal: changing a later byte leaves earlier logits unchanged.
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
    a, b = lm.lm_apply(params, tokens[:, :16]), lm.lm_apply(params, changed[:, :16])
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])
    train, _ = lm.split_corpus(lm.corpus()[:200_000])
    trained, losses = lm.train_lm(params, train, steps=40, batch=8, context=16)
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    calibration = [jnp.asarray(lm.windows(train, 16, 8, 1)[:, :16])]
    pruned, mask = layerwise.prune_layers(
        lm.lm_apply, trained, calibration, 0.5, include=lm.BLOCK_KERNELS, block_size=16
    )
    report = {leaf.path: leaf.sparsity for leaf in js.sparsity_report(mask).leaves}
    for i in range(2):
        for name in ("wq", "wk", "wv", "wo", "w1", "w2"):
            assert report[f"blocks/{i}/{name}"] == 0.5
    assert report["head"] == 0.0
    assert np.isfinite(lm.perplexity(pruned, train[:5000], context=16))
