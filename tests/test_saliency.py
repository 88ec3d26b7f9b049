"""Tests for jaxsparse.saliency against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import KINDS, make_tree

import jaxsparse as js


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_magnitude(kind, dtype):
    params = make_tree(kind, dtype)
    scores = js.saliency.magnitude(params)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(scores)):
        assert s.dtype == dtype
        np.testing.assert_array_equal(np.asarray(s), np.abs(np.asarray(p)))


def test_random_is_keyed_uniform_and_per_leaf():
    params = {"a": jnp.zeros((50, 40)), "b": jnp.zeros((50, 40))}
    key = jax.random.PRNGKey(3)
    s1, s2 = js.saliency.random(params, key), js.saliency.random(params, key)
    np.testing.assert_array_equal(np.asarray(s1["a"]), np.asarray(s2["a"]))
    assert not np.array_equal(np.asarray(s1["a"]), np.asarray(s1["b"]))
    other = js.saliency.random(params, jax.random.PRNGKey(4))
    assert not np.array_equal(np.asarray(s1["a"]), np.asarray(other["a"]))
    a = np.asarray(s1["a"])
    assert a.min() >= 0.0 and a.max() < 1.0 and abs(a.mean() - 0.5) < 0.03


def test_taylor_closed_form():
    w = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]])}
    g = {"w": jnp.array([[0.5, 0.5], [-1.0, 4.0]])}
    np.testing.assert_allclose(
        np.asarray(js.saliency.taylor(w, g)["w"]), [[0.5, 1.0], [3.0, 2.0]]
    )
    with pytest.raises(ValueError, match="grads tree does not match"):
        js.saliency.taylor(w, {"v": g["w"]})
    with pytest.raises(ValueError, match=r"w: grads shape \(2,\)"):
        js.saliency.taylor(w, {"w": jnp.ones(2)})


def test_snip_linear_regression_closed_form():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 3))
    w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}

    def loss(p, x, y):
        return 0.5 * jnp.sum((x @ p["w"] + p["b"][None, :] - y) ** 2)

    scores = js.saliency.snip(
        loss, params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    )
    grad_w = x.T @ (x @ w + b - y)
    expected = np.abs(grad_w * w)
    expected /= expected.sum()
    np.testing.assert_allclose(np.asarray(scores["w"]), expected, rtol=1e-4)
    assert abs(float(jnp.sum(scores["w"])) - 1.0) < 1e-5


def test_non_float_params_are_not_scored():
    params = {"layer": {"w": jnp.ones((2, 2), jnp.int32), "v": jnp.ones((2, 2))}}
    assert js.saliency.magnitude(params)["layer"]["w"] is None
    taylor = js.saliency.taylor(params, params)
    assert taylor["layer"]["w"] is None and taylor["layer"]["v"].shape == (2, 2)
    with pytest.raises(TypeError, match="layer/w: snip needs floating point"):
        js.saliency.snip(lambda p: jnp.sum(p["layer"]["v"]), params)
