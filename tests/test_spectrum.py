"""The Hessian's spectrum against numpy's eigvalsh of jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxsparse import spectrum


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

    def loss(p, x, y):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w1"]) @ p["w2"] - y))

    flat, unravel = ravel_pytree(params)
    dense = jax.hessian(lambda f: loss(unravel(f), x, y))(flat)
    return loss, params, x, y, np.linalg.eigvalsh(np.asarray(dense, np.float64)), dense


def test_lanczos_of_every_dimension_is_exact():
    a = np.random.default_rng(1).normal(size=(12, 12))
    a = jnp.asarray(a + a.T, jnp.float32)
    t = jax.jit(spectrum.lanczos, static_argnums=(0, 2))(
        lambda v: a @ v, jnp.ones(12), 12
    )
    np.testing.assert_allclose(
        np.linalg.eigvalsh(t.matrix()), np.linalg.eigvalsh(a), rtol=1e-4, atol=1e-4
    )
    q = np.asarray(t.basis)
    np.testing.assert_allclose(q @ q.T, np.eye(12), atol=1e-5)


def test_lanczos_stops_cleanly_on_an_invariant_subspace():
    a = jnp.diag(jnp.array([5.0, 5.0, 1.0, 1.0]))
    t = spectrum.lanczos(lambda v: a @ v, jnp.ones(4), 4)
    # The Krylov space of ones is 2-dimensional: T holds 1 and 5, then zeros.
    assert np.all(np.isfinite(np.asarray(t.matrix())))
    np.testing.assert_allclose(
        np.linalg.eigvalsh(t.matrix()), [0.0, 0.0, 1.0, 5.0], atol=1e-5
    )


def test_top_eigenvalues_match_the_dense_hessian():
    loss, params, x, y, eigenvalues, _ = _problem()
    n = eigenvalues.size
    exact = spectrum.hessian_eigenvalues(
        loss, params, x, y, key=jax.random.key(0), k=5, iterations=n
    )
    np.testing.assert_allclose(exact, eigenvalues[::-1][:5], rtol=1e-4, atol=1e-5)
    # The extreme ones converge long before n steps.
    few = spectrum.hessian_eigenvalues(
        loss, params, x, y, key=jax.random.key(1), k=2, iterations=25
    )
    np.testing.assert_allclose(few, eigenvalues[::-1][:2], rtol=1e-3)


def test_quadrature_reproduces_the_probes_moments():
    loss, params, x, y, eigenvalues, dense = _problem(2)
    n = eigenvalues.size
    key = jax.random.key(3)
    sld = spectrum.spectral_density(
        loss, params, x, y, key=key, probes=3, iterations=10
    )
    np.testing.assert_allclose(np.sum(sld.weights, axis=-1), 1.0, rtol=1e-5)
    starts = np.asarray(jax.random.rademacher(key, (3, n), jnp.float32), np.float64)
    h = np.asarray(dense, np.float64)
    for power in (1, 2, 3):
        want = np.einsum(
            "pi,ij,pj->p", starts, np.linalg.matrix_power(h, power), starts
        )
        np.testing.assert_allclose(sld.moment(power), want / n, rtol=2e-3)
    grid = jnp.linspace(eigenvalues.min() - 1, eigenvalues.max() + 1, 4001)
    density = sld.density(grid, sigma=0.05)
    area = float(jnp.sum(density) * (grid[1] - grid[0]))
    np.testing.assert_allclose(area, 1.0, rtol=1e-3)


def test_bad_arguments_are_named():
    loss, params, x, y, _, _ = _problem()
    with pytest.raises(ValueError, match="iterations must be at most"):
        spectrum.lanczos(lambda v: v, jnp.ones(3), 4)
    with pytest.raises(ValueError, match="k=5 eigenvalues need"):
        spectrum.hessian_eigenvalues(
            loss, params, x, y, key=jax.random.key(0), k=5, iterations=3
        )
    with pytest.raises(ValueError, match="probes must be a positive int"):
        spectrum.spectral_density(loss, params, x, y, key=jax.random.key(0), probes=0)
