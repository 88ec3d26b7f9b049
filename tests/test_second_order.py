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
    rows = second_order.run_second_order([0], [0.5], hidden=(8,), epochs=40)
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
    assert "OBS x5" in table and "50%" in table
    with pytest.raises(ValueError, match="sparsities must be in"):
        second_order.run_second_order([0], [1.0])


# About 170 s; test_obs's k-step brute-force test guards every step by default.
@pytest.mark.slow
def test_multi_step_woodfisher_on_digits_beats_magnitude_by_far():
    """Regression for multi-step OBS scoring survivors with the full inverse:
    MLP 64-40-20-10, global selection over the kernels, Fisher blocks of 640,
    16 steps, no fine-tuning. With survivors' inverses it holds 0.93 / 0.73
    at 80 / 90 %; scoring with the full inverse gave 0.10 at 80 %."""
    import optax

    import jaxsparse as js
    from jaxsparse import data, fisher, obs
    from jaxsparse.experiments.models import accuracy, init_mlp, loss_fn, make_epoch

    split = data.digits(0)
    key = jax.random.PRNGKey(0)
    params = init_mlp(key, (64, 40, 20, 10))
    adam = optax.adam(1e-3)
    epoch = make_epoch(adam, 64)
    state = adam.init(params)
    for e in range(150):
        params, state = epoch(
            params, state, split.x_train, split.y_train, jax.random.fold_in(key, e)
        )
    x, y = jax.numpy.asarray(split.x_train), jax.numpy.asarray(split.y_train)

    @jax.jit
    def inverse(p, mask=None):
        g = fisher.per_example_grads(loss_fn, p, x, y)
        mean = jax.numpy.mean(
            jax.numpy.concatenate(
                [d.ravel() for d in jax.tree.leaves(fisher.fisher_diag(g))]
            )
        )
        return fisher.fisher_inverse(g, block_size=640, damping=1e-4 * mean, mask=mask)

    for s, floor in ((0.8, 0.9), (0.9, 0.65)):
        pruned = obs.obs_prune(params, inverse, s, steps=16).params
        got = accuracy(pruned, split.x_test, split.y_test)
        magnitude = accuracy(
            js.apply_mask(params, js.global_mask(js.saliency.magnitude(params), s)),
            split.x_test,
            split.y_test,
        )
        assert got > floor and got > magnitude + 0.15, (s, got, magnitude)
