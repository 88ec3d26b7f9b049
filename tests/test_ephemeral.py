"""Tests for jaxsparse/ephemeral.py against numpy: exactly k winners per
example and where the gradient goes, meProp's unchanged forward pass and
top-k backward pass, ReLU sparsity found in any model's jaxpr, and the
errors for bad k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import ephemeral as eph


def winners(x, k, axis):
    """Brute force: per example, the k largest (ties to the lower index)."""
    moved = np.moveaxis(x, axis, -1)
    order = np.argsort(-moved, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(moved.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return np.moveaxis(mask, -1, axis)


@pytest.mark.parametrize(
    "shape, axis, k",
    [((6, 10), -1, 3), ((6, 10), 0, 2), ((4, 5, 7), 1, 1), ((9,), 0, 9)],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_activations_keep_exactly_k_winners_per_example(shape, axis, k, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    x[..., 0] = x[..., 1] if x.ndim > 0 and shape[-1] > 1 else x[..., 0]  # a tie
    x = jnp.asarray(x, dtype)
    got = jax.jit(eph.topk_activations, static_argnums=1, static_argnames="axis")(
        x, k, axis=axis
    )
    want = winners(np.asarray(x, np.float32), k, axis)
    np.testing.assert_array_equal(np.asarray(got != 0), want & (np.asarray(x) != 0))
    np.testing.assert_array_equal(np.asarray(got)[want], np.asarray(x)[want])
    assert got.dtype == dtype
    assert np.all(np.asarray(want).sum(axis=axis) == k)


def test_gradient_reaches_the_winners_only_or_everything_straight_through():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)), jnp.float32)
    mask = winners(np.asarray(x), 3, -1)
    g = jax.grad(lambda x: jnp.sum(eph.topk_activations(x, 3) * c))(x)
    np.testing.assert_array_equal(np.asarray(g), np.where(mask, c, 0.0))
    g = jax.grad(
        lambda x: jnp.sum(eph.topk_activations(x, 3, straight_through=True) * c)
    )(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))
    out = eph.topk_activations(x, 3, straight_through=True)
    np.testing.assert_array_equal(np.asarray(out), np.where(mask, x, 0.0))


def test_threshold_activations():
    x = jnp.array([[-1.0, 0.2, 0.7, 3.0]])
    np.testing.assert_array_equal(
        eph.threshold_activations(x, 0.5), jnp.array([[0.0, 0.0, 0.7, 3.0]])
    )
    threshold = jnp.asarray(0.1)  # traced under jit
    got = jax.jit(eph.threshold_activations)(x, threshold)
    np.testing.assert_array_equal(got, jnp.array([[0.0, 0.2, 0.7, 3.0]]))
    g = jax.grad(
        lambda x: eph.threshold_activations(x, 0.5, straight_through=True).sum()
    )(x)
    np.testing.assert_array_equal(g, jnp.ones_like(x))


def test_kwinners_is_an_nnx_layer_under_jit():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.kwta = eph.KWinners(fraction=0.25)
            self.b = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(self.kwta(self.a(x)))

    net = Net(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 16)), jnp.float32)
    hidden = eph.activation_sparsity(lambda x: net.kwta(net.a(x)), x)
    assert hidden == {}  # no ReLU there: k-WTA is a selection, not max(x, 0)
    kept = jax.jit(lambda m, x: m.kwta(m.a(x)))(net, x)
    assert np.all(np.sum(np.asarray(kept) != 0, axis=-1) == 8)
    assert jax.jit(lambda m, x: m(x))(net, x).shape == (5, 4)
    assert eph.KWinners(3)(x).shape == x.shape
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        eph.KWinners()
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        eph.KWinners(2, fraction=0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        eph.KWinners(fraction=0.0)


def test_meprop_leaves_the_forward_pass_and_keeps_k_errors_per_example():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(10, 12)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(6, 12)), jnp.float32)

    def loss(w, sparse):
        z = x @ w
        if sparse:
            z = eph.topk_backward(z, 4)
        return 0.5 * jnp.sum((jnp.tanh(z) - target) ** 2)

    assert float(loss(w, True)) == float(loss(w, False))
    np.testing.assert_array_equal(eph.topk_backward(x, 3), x)
    # By hand: the error at z, its 4 largest |entries| per example, and the
    # weight gradient x^T delta from those alone.
    z = np.asarray(x @ w, np.float64)
    delta = (np.tanh(z) - np.asarray(target)) * (1 - np.tanh(z) ** 2)
    order = np.argsort(-np.abs(delta), axis=1, kind="stable")[:, :4]
    kept = np.zeros_like(delta)
    np.put_along_axis(kept, order, np.take_along_axis(delta, order, 1), 1)
    grad = jax.jit(jax.grad(loss), static_argnums=1)(w, True)
    np.testing.assert_allclose(grad, np.asarray(x).T @ kept, rtol=1e-5, atol=1e-5)
    # One example: at most 4 nonzero columns of the weight gradient.
    one = jax.grad(lambda w: eph.topk_backward(x[:1] @ w, 4).sum() ** 2)(w)
    assert np.sum(np.any(np.asarray(one) != 0, axis=0)) == 4


def test_activation_sparsity_finds_every_relu_of_any_model():
    rng = np.random.default_rng(5)
    w1 = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)

    @jax.jit
    def inner(h):
        return jnp.maximum(h @ w2, 0.0)

    def model(x):
        return inner(jax.nn.relu(x @ w1)).sum(-1)

    h1 = np.maximum(np.asarray(x @ w1), 0)
    h2 = np.maximum(h1 @ np.asarray(w2), 0)
    for measure in (
        eph.activation_sparsity,
        jax.jit(eph.activation_sparsity, static_argnums=0),
    ):
        got = measure(model, x)
        assert list(got) == ["relu_0 (20, 16)", "relu_1 (20, 6)"]
        assert float(got["relu_0 (20, 16)"]) == pytest.approx(np.mean(h1 == 0))
        assert float(got["relu_1 (20, 6)"]) == pytest.approx(np.mean(h2 == 0))


@pytest.mark.parametrize("k", [0, 11, 2.5, True])
def test_bad_k_is_refused(k):
    x = jnp.ones((3, 10))
    with pytest.raises(
        ValueError, match=r"topk_activations: k must be an integer in \[1, 10\]"
    ):
        eph.topk_activations(x, k)
    with pytest.raises(
        ValueError, match=r"topk_backward: k must be an integer in \[1, 10\]"
    ):
        jax.grad(lambda x: eph.topk_backward(x, k).sum())(x)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        eph.topk_activations(x, 1, axis=2)
