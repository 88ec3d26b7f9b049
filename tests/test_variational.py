"""Tests for jaxsparse.variational: limits, the paper's constants, Monte
Carlo agreement, masks and the nnx modules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsparse as js
from jaxsparse import variational as vr


@pytest.fixture(autouse=True)
def float64_standard():
    with jax.enable_x64(True):
        yield


def test_svd_dense_tends_to_deterministic_layer():
    k = jax.random.key(0)
    x = jax.random.normal(k, (5, 4))
    theta = jax.random.normal(jax.random.fold_in(k, 1), (4, 3))
    tiny = jnp.full((4, 3), -60.0)
    np.testing.assert_allclose(vr.svd_dense(x, theta, tiny, k), x @ theta, atol=1e-6)
    np.testing.assert_allclose(
        vr.svd_dense(x, theta, tiny, None), x @ theta, atol=1e-12
    )


def test_svd_conv_tends_to_deterministic_conv():
    k = jax.random.key(1)
    x = jax.random.normal(k, (2, 5, 5, 3))
    theta = jax.random.normal(jax.random.fold_in(k, 1), (3, 3, 3, 4))
    ref = jax.lax.conv_general_dilated(
        x, theta, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    out = vr.svd_conv(x, theta, jnp.full(theta.shape, -60.0), k)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_local_reparameterization_moments():
    k = jax.random.key(2)
    x = jnp.array([[1.0, -2.0, 0.5]])
    theta = jnp.array([[0.3], [0.1], [-0.4]])
    log_sigma2 = jnp.log(jnp.array([[0.04], [0.01], [0.09]]))
    draws = jax.vmap(lambda kk: vr.svd_dense(x, theta, log_sigma2, kk))(
        jax.random.split(k, 100000)
    )
    mean = float((x @ theta)[0, 0])
    var = float((x**2 @ jnp.exp(log_sigma2))[0, 0])
    assert float(draws.mean()) == pytest.approx(mean, abs=4 * math.sqrt(var / 1e5))
    assert float(draws.var()) == pytest.approx(var, rel=0.02)


def paper_kl(la):
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    return -(k1 / (1 + np.exp(-(k2 + k3 * la))) - 0.5 * np.log1p(np.exp(-la)) - k1)


@pytest.mark.parametrize("la", [-8.0, -2.0, 0.0, 3.0, 8.0])
def test_kl_matches_the_papers_formula(la):
    theta = jnp.asarray([1.0])
    log_sigma2 = jnp.asarray([la])  # log alpha = log sigma^2 - log 1
    assert float(vr.svd_kl(theta, log_sigma2)) == pytest.approx(paper_kl(la), rel=1e-6)


def test_kl_values_and_monotone():
    # Large log alpha: the KL tends to 0 (the posterior matches the prior);
    # small log alpha: it grows like -0.5 log alpha.
    assert paper_kl(20.0) == pytest.approx(0.0, abs=1e-6)
    la = np.linspace(-10, 10, 201)
    kl = np.array([float(vr.svd_kl(jnp.ones(1), jnp.asarray([v]))) for v in la])
    assert np.all(np.diff(kl) < 0)
    assert kl[0] == pytest.approx(paper_kl(-10.0), rel=1e-6)


def test_mask_follows_threshold():
    theta = jnp.array([1.0, 1.0, 1.0, 0.1])
    log_sigma2 = jnp.array([2.0, 3.5, -1.0, -1.0])  # log alpha: 2, 3.5, -1, ~3.6
    np.testing.assert_array_equal(
        np.asarray(vr.svd_mask(theta, log_sigma2)), [True, False, True, False]
    )
    np.testing.assert_array_equal(
        np.asarray(vr.svd_mask(theta, log_sigma2, 4.0)), [True, True, True, True]
    )
    x = jnp.ones((1, 4))
    out = vr.svd_dense(x, theta[:, None], log_sigma2[:, None], None)
    assert float(out[0, 0]) == pytest.approx(2.0)


@pytest.mark.parametrize("mu,log_sigma", [(-1.0, -0.5), (-3.0, 0.3), (0.5, -1.0)])
def test_sbp_kl_snr_and_mean_agree_with_monte_carlo(mu, log_sigma):
    a, b = -20.0, 0.0
    mu, ls = jnp.asarray([mu]), jnp.asarray([log_sigma])
    draws = jax.vmap(lambda k: vr.sbp_sample(mu, ls, k, a, b))(
        jax.random.split(jax.random.key(3), 200000)
    )[:, 0]
    assert float(draws.max()) <= 1.0 + 1e-12
    assert float(vr.sbp_mean(mu, ls)[0]) == pytest.approx(float(draws.mean()), rel=0.01)
    assert float(vr.sbp_snr(mu, ls)[0]) == pytest.approx(
        float(draws.mean() / draws.std()), rel=0.02
    )
    sigma = math.exp(log_sigma)
    z = jax.scipy.special.ndtr((b - mu) / sigma) - jax.scipy.special.ndtr(
        (a - mu) / sigma
    )
    log_q = jax.scipy.stats.norm.logpdf(jnp.log(draws), mu, sigma) - jnp.log(z)
    mc = float(jnp.mean(log_q) + math.log(b - a))
    assert float(vr.sbp_kl(mu, ls)) == pytest.approx(mc, abs=0.01)


def test_sbp_mask_by_snr():
    mu = jnp.array([0.0, 0.0])
    ls = jnp.array([-3.0, 1.5])
    np.testing.assert_array_equal(np.asarray(vr.sbp_mask(mu, ls)), [True, False])


def test_nnx_modules():
    rngs = nnx.Rngs(0)
    layer = vr.SVDLinear(4, 3, rngs=rngs)
    x = jnp.ones((2, 4))
    assert layer(x, jax.random.key(0)).shape == (2, 3)
    np.testing.assert_allclose(
        layer(x), x @ layer.theta[...] + layer.bias[...][None, :], atol=1e-12
    )
    assert layer.mask().all() and float(layer.kl()) > 0
    conv = vr.SVDConv(3, 2, rngs=rngs)
    assert conv(jnp.ones((1, 4, 4, 3)), jax.random.key(1)).shape == (1, 4, 4, 2)
    gate = vr.SBP(3)
    y = gate(jnp.ones((2, 3)))
    np.testing.assert_allclose(
        y,
        np.broadcast_to(
            np.asarray(vr.sbp_mean(gate.mu[...], gate.log_sigma[...])), (2, 3)
        ),
    )
    assert gate(jnp.ones((2, 3)), jax.random.key(2)).shape == (2, 3)
    assert float(gate.kl()) > 0


def test_svd_pruned_gives_the_deterministic_network_and_counts_right():
    """Regression: js.sparsity counted log_sigma2 as a weight leaf (0.05 %),
    and nothing turned (theta, log sigma^2) into pruned kernels."""
    theta = jnp.array([[1.0, 0.1, -2.0], [0.5, -0.01, 3.0]])
    log_sigma2 = jnp.array([[-8.0, 0.0, -8.0], [-8.0, -3.0, 10.0]])
    params = {"fc": {"theta": theta, "log_sigma2": log_sigma2, "bias": jnp.ones(3)}}
    pruned = vr.svd_pruned(params)
    keep = np.asarray(vr.svd_mask(theta, log_sigma2))
    np.testing.assert_array_equal(
        pruned["fc"]["theta"], np.where(keep, np.asarray(theta), 0.0)
    )
    assert pruned["fc"]["log_sigma2"] is None
    assert float(js.sparsity(pruned)) == pytest.approx((~keep).mean())
    with pytest.raises(ValueError, match="no 'log_sigma2' sibling"):
        vr.svd_pruned({"fc": {"theta": theta}})


def test_svd_modules_mask_and_prune_alike():
    rngs = nnx.Rngs(0)
    conv = vr.SVDConv(2, 3, (3, 3), rngs=rngs)
    conv.log_sigma2[...] = conv.log_sigma2[...].at[0, 0].set(20.0)
    assert conv.mask().shape == conv.theta[...].shape
    assert not np.asarray(conv.mask()[0, 0]).any()
    np.testing.assert_array_equal(
        conv.pruned_kernel(), np.where(conv.mask(), conv.theta[...], 0.0)
    )
    conv.bias[...] = jnp.arange(3.0)
    x = jnp.ones((1, 4, 4, 2))
    no_bias = vr.SVDConv(2, 3, (3, 3), rngs=nnx.Rngs(0), use_bias=False)
    no_bias.log_sigma2[...] = conv.log_sigma2[...]
    np.testing.assert_allclose(
        conv(x) - no_bias(x), jnp.broadcast_to(jnp.arange(3.0), (1, 4, 4, 3))
    )
    linear = vr.SVDLinear(4, 2, rngs=rngs)
    np.testing.assert_array_equal(
        linear.pruned_kernel(), np.where(linear.mask(), linear.theta[...], 0.0)
    )
