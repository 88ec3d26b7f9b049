"""Tests for jaxsparse.regularizers: closed forms, finite differences
(float64), exact zeros from the proximal steps, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse import regularizers as rg


@pytest.fixture(autouse=True)
def float64_standard():
    with jax.enable_x64(True):
        yield


def params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(rng.normal(size=(4, 6))),
        "b": jnp.asarray(rng.normal(size=6)),
        "c": jnp.asarray(rng.normal(size=(3, 2, 4))),
    }


def finite_difference(fn, p, eps=1e-6):
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    grads = np.zeros(flat.size)
    for i in range(flat.size):
        e = np.zeros(flat.size)
        e[i] = eps
        grads[i] = (fn(unravel(flat + e)) - fn(unravel(flat - e))) / (2 * eps)
    return grads


SMOOTH = {
    "l1": lambda p: rg.l1(p),
    "sigmoid_l0": lambda p: rg.sigmoid_l0(p, 3.0),
    "hoyer": lambda p: rg.hoyer(p),
    "hoyer_square": lambda p: rg.hoyer_square(p),
    "group_lasso_channel": lambda p: rg.group_lasso(p, js.Channel(-1)),
    "group_lasso_block": lambda p: rg.group_lasso(p, js.Block((2,))),
    "polarization": lambda p: rg.polarization(
        p, 1.5, include=lambda path, x: x.ndim == 1
    ),
    "learned_threshold": lambda p: jnp.sum(
        jnp.square(rg.learned_threshold(p["a"], p["b"][0] ** 2, 4.0))
    ),
}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_gradients_match_finite_differences(name):
    fn = SMOOTH[name]
    p = params(1)
    got = jax.flatten_util.ravel_pytree(jax.grad(fn)(p))[0]
    np.testing.assert_allclose(got, finite_difference(fn, p), rtol=1e-5, atol=1e-7)


def test_closed_forms():
    p = params(2)
    a, c = np.asarray(p["a"]), np.asarray(p["c"])
    assert float(rg.l1(p)) == pytest.approx(np.abs(a).sum() + np.abs(c).sum())
    assert float(rg.hoyer_square(p)) == pytest.approx(
        sum(np.abs(w).sum() ** 2 / (w**2).sum() for w in (a, c))
    )
    col = np.sqrt((a**2).sum(0))
    assert float(rg.group_lasso({"a": p["a"]}, js.Channel(-1))) == pytest.approx(
        np.sqrt(4) * col.sum()
    )
    b = np.asarray(p["b"])
    assert float(
        rg.polarization(p, 2.0, include=lambda path, x: x.ndim == 1)
    ) == pytest.approx(2 * np.abs(b).sum() - np.abs(b - b.mean()).sum())
    x, t, beta = np.linspace(-2, 2, 9), 0.5, 3.0

    def sig(v):
        return 1 / (1 + np.exp(-v))

    v = (
        np.maximum(x - t, 0)
        + t * sig(beta * (x - t))
        - np.maximum(-x - t, 0)
        - t * sig(beta * (-x - t))
    )
    np.testing.assert_allclose(
        rg.learned_threshold(jnp.asarray(x), t, beta), v, atol=1e-12
    )


@pytest.mark.parametrize("fn", [rg.hoyer, rg.hoyer_square])
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0])
def test_hoyer_is_scale_invariant(fn, scale):
    p = params(3)
    scaled = jax.tree.map(lambda w: w * scale, p)
    assert float(fn(scaled)) == pytest.approx(float(fn(p)), rel=1e-12)


@pytest.mark.parametrize(
    "variant,expected",
    [
        ("identity", lambda u: np.ones_like(u)),
        ("softplus", lambda u: 1 / (1 + np.exp(-u))),
        ("leaky_relu", lambda u: np.where(u > 0, 1.0, 0.1)),
    ],
)
def test_l0_ste_counts_forward_and_uses_the_surrogate_backward(variant, expected):
    p = {"w": jnp.array([[0.05, -0.3, 0.0], [1.2, -0.01, 0.5]])}
    assert float(rg.l0_ste(p, 0.1, variant=variant)) == 3.0
    grad = np.asarray(jax.grad(lambda q: rg.l0_ste(q, 0.1, variant=variant))(p)["w"])
    w = np.asarray(p["w"])
    np.testing.assert_allclose(grad, expected(np.abs(w) - 0.1) * np.sign(w))


def test_soft_threshold_is_the_closed_form_and_yields_exact_zeros():
    w = jnp.array([-2.0, -0.3, 0.0, 0.2, 0.7])
    out = np.asarray(rg.soft_threshold(w, 0.5))
    np.testing.assert_allclose(out, [-1.5, 0.0, 0.0, 0.0, 0.2], atol=1e-15)
    assert np.all(out[1:4] == 0.0)
    tx = optax.chain(optax.sgd(0.1), rg.proximal_l1(3.0, 0.1))
    p = {"w": jnp.array([[0.05, -1.0, 0.31]])}
    g = {"w": jnp.array([[0.0, 0.0, 0.1]])}
    updates, _ = tx.update(g, tx.init(p), p)
    after = optax.apply_updates(p, updates)
    # Step: [0.05, -1.0, 0.30]; threshold 0.3: [0, -0.7, 0].
    np.testing.assert_allclose(after["w"], [[0.0, -0.7, 0.0]], atol=1e-12)
    assert float(after["w"][0, 0]) == 0.0 and float(after["w"][0, 2]) == 0.0


def test_block_soft_threshold_zeroes_groups_and_shrinks_the_rest():
    w = jnp.array([[3.0, 0.1], [4.0, 0.1]])
    out = rg.block_soft_threshold(w, 1.0, js.Channel(-1))
    # Column norms 5 and ~0.14; sqrt(n_g) = sqrt(2).
    factor = 1 - np.sqrt(2) / 5
    np.testing.assert_allclose(out[:, 0], np.array([3.0, 4.0]) * factor)
    np.testing.assert_array_equal(np.asarray(out[:, 1]), [0.0, 0.0])
    tx = optax.chain(optax.sgd(0.5), rg.proximal_group_lasso(2.0, 0.5, js.Channel(-1)))
    p = {"w": w}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    after = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(np.asarray(after["w"][:, 1]), [0.0, 0.0])
    np.testing.assert_allclose(
        after["w"][:, 0], np.array([3.0, 4.0]) * (1 - np.sqrt(2) / 5)
    )


def test_add_penalty_adds_scaled_gradient():
    p = params(4)
    tx = rg.add_penalty(rg.l1, 0.25)
    zeros = jax.tree.map(jnp.zeros_like, p)
    updates, _ = tx.update(zeros, tx.init(p), p)
    np.testing.assert_allclose(updates["a"], 0.25 * np.sign(np.asarray(p["a"])))
    np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)


def test_hard_concrete_samples_and_expected_l0():
    log_alpha = jnp.array([-6.0, -1.0, 0.0, 2.0, 6.0])
    keys = jax.random.split(jax.random.key(0), 20000)
    z = jax.vmap(lambda k: rg.hard_concrete_sample(log_alpha, k))(keys)
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    freq = np.asarray((z > 0).mean(0))
    shift = (2 / 3) * np.log(0.1 / 1.1)
    expected = 1 / (1 + np.exp(-(np.asarray(log_alpha) - shift)))
    # Binomial standard error of 20,000 draws: at most 0.0036.
    np.testing.assert_allclose(freq, expected, atol=4 * 0.0036)
    assert float(rg.hard_concrete_l0(log_alpha)) == pytest.approx(expected.sum())
    gates = np.asarray(rg.hard_concrete_gates(log_alpha))
    assert gates[0] == 0.0 and gates[-1] == 1.0 and 0 < gates[2] < 1


def test_learned_thresholds_train():
    p = {"w": jnp.array([[0.05, -0.02, 1.0, -2.0]])}
    t = rg.init_thresholds(p, 0.0)

    def loss(t):
        out = rg.apply_thresholds(p, t, 20.0)
        return jnp.sum(jnp.square(out["w"] - jnp.array([[0.0, 0.0, 1.0, -2.0]])))

    g = jax.grad(loss)(t)
    # Raising the threshold removes the small weights: the loss falls.
    assert float(g["w"]) < 0.0
    for _ in range(200):
        t = jax.tree.map(lambda a, b: a - 0.05 * b, t, jax.grad(loss)(t))
    assert float(loss(t)) < 0.2 * float(loss(rg.init_thresholds(p, 0.0)))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: rg.add_penalty(rg.l1, -1.0), "strength must be >= 0"),
        (lambda: rg.proximal_l1(-0.1, 0.1), "strength must be >= 0"),
        (lambda: rg.sigmoid_l0(params(), 0.0), "beta must be > 0"),
        (lambda: rg.learned_threshold(jnp.ones(2), 0.1, -1.0), "beta must be > 0"),
        (
            lambda: rg.hard_concrete_l0(jnp.ones(2), rg.HardConcrete(temperature=0.0)),
            "temperature must be > 0",
        ),
        (
            lambda: rg.hard_concrete_gates(jnp.ones(2), rg.HardConcrete(gamma=0.1)),
            "gamma < 0",
        ),
        (
            lambda: rg.group_lasso({"w": jnp.ones((4, 6))}, js.Block((3, 4))),
            r"w: shape \(4, 6\) is not divisible by Block",
        ),
        (lambda: rg.l0_ste(params(), 0.1, variant="relu"), "variant must be"),
    ],
)
def test_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_transforms_need_params():
    tx = rg.add_penalty(rg.l1, 0.1)
    with pytest.raises(ValueError, match="add_penalty needs the params"):
        tx.update(params(), tx.init(params()))
    prox = rg.proximal_l1(0.1, 0.1)
    with pytest.raises(ValueError, match="proximal_l1 needs the params"):
        prox.update(params(), prox.init(params()))


def test_hard_concrete_gates_per_group_expand_to_weights():
    # One gate per output neuron of a (3, 4) kernel: expand with the
    # granularity that defines the groups.
    log_alpha = jnp.array([-9.0, 9.0, -9.0, 9.0])
    gates = rg.hard_concrete_gates(log_alpha)
    weights = js.Channel(-1).expand(gates, (3, 4))
    np.testing.assert_array_equal(np.asarray(weights), [[0.0, 1.0, 0.0, 1.0]] * 3)
    sample = rg.hard_concrete_sample(log_alpha, jax.random.key(0))
    assert sample.shape == (4,)


def test_thresholds_per_group_broadcast():
    p = {"w": jnp.array([[0.2, 0.2], [-0.5, 0.5]])}
    t = {"w": jnp.array([[0.3, 0.1]])}  # one threshold per output neuron
    out = np.asarray(rg.apply_thresholds(p, t, 1000.0)["w"])
    assert abs(out[0, 0]) < 1e-3 and out[0, 1] == pytest.approx(0.2, abs=1e-3)
    assert out[1, 0] == pytest.approx(-0.5, abs=1e-3)


ZERO_SAFE = {
    "l1": rg.l1,
    "hoyer": rg.hoyer,
    "hoyer_square": rg.hoyer_square,
    "group_lasso": lambda p: rg.group_lasso(p, js.Channel(-1)),
    "polarization": lambda p: rg.polarization(p, 1.5),
    "polarization_per_leaf": lambda p: rg.polarization(p, 1.5, per_leaf=True),
    "sigmoid_l0": lambda p: rg.sigmoid_l0(p, 3.0),
}


@pytest.mark.parametrize("name", sorted(ZERO_SAFE))
def test_every_penalty_is_zero_with_zero_gradient_at_an_all_zero_leaf(name):
    """Regression: hoyer and hoyer_square returned NaN on an all-zero leaf."""
    fn = ZERO_SAFE[name]
    zero = {"w": jnp.zeros((3, 4))}
    assert float(fn(zero)) == 0.0
    grads = jax.grad(fn)(zero)["w"]
    np.testing.assert_array_equal(grads, np.zeros((3, 4)))


def test_exact_zero_entries_take_the_subgradient_zero():
    """Regression: hoyer_square's gradient at an exact zero entry was 0.857
    and polarization's t-term 0.5 (jnp.abs differentiates to 1 at 0)."""
    w = jnp.array([[0.0, 1.0, -2.0], [3.0, 0.0, 0.5]])
    p = {"w": w}
    zeros = np.asarray(w) == 0
    for name in ("l1", "hoyer", "hoyer_square"):
        g = np.asarray(jax.grad(ZERO_SAFE[name])(p)["w"])
        np.testing.assert_array_equal(g[zeros], 0.0, err_msg=name)
    # Polarization: the t-term contributes sign(0) = 0; the mean term stays.
    t = 1.5
    a = np.asarray(w).ravel()
    m = a.mean()
    expected = t * np.sign(a) - np.sign(a - m) + np.sign(a - m).mean()
    got = jax.grad(lambda p: rg.polarization(p, t))(p)["w"]
    np.testing.assert_allclose(np.asarray(got).ravel(), expected, atol=1e-6)


def test_polarization_takes_the_mean_over_all_factors():
    """Zhuang et al. 2020 subtract the mean of every scaling factor of the
    network, not of each layer."""
    g = {"bn1": jnp.array([0.1, 1.2, 0.0]), "bn2": jnp.array([2.0, 0.7])}
    every = lambda p, x: True  # noqa: E731
    a = np.concatenate([np.asarray(g["bn1"]), np.asarray(g["bn2"])])
    want = 2.0 * np.abs(a).sum() - np.abs(a - a.mean()).sum()
    got = float(rg.polarization(g, 2.0, include=every))
    assert got == pytest.approx(want, rel=1e-6)
    per_leaf = sum(
        2.0 * np.abs(x).sum() - np.abs(x - x.mean()).sum()
        for x in map(np.asarray, g.values())
    )
    assert float(
        rg.polarization(g, 2.0, include=every, per_leaf=True)
    ) == pytest.approx(per_leaf, rel=1e-6)
    assert abs(got - per_leaf) > 0.1
