"""Variational sparsity: sparse variational dropout and structured Bayesian
pruning, as pure functions and flax nnx modules.

References:
  Hoefler et al. 2021, §3.7; Molchanov, Ashukha & Vetrov 2017 (Sparse VD);
  Kingma, Salimans & Welling 2015 (local reparameterization);
  Neklyudov et al. 2017 (structured Bayesian pruning).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import tree_util
from jax.scipy.special import ndtr, ndtri

from jaxsparse import _tree
from jaxsparse._types import Params

K1, K2, K3 = 0.63576, 1.87320, 1.48695
"""Constants of Molchanov et al.'s approximation of the KL divergence."""


def log_alpha(theta: jax.Array, log_sigma2: jax.Array) -> jax.Array:
    """``log alpha = log sigma^2 - log theta^2`` of ``w ~ N(theta, alpha theta^2)``.

    Example:
      >>> import jax.numpy as jnp
      >>> log_alpha(jnp.array([2.0]), jnp.log(jnp.array([4.0])))  # alpha = 4 / 2^2
      Array([0.], dtype=float32)
    """
    return log_sigma2 - jnp.log(jnp.square(theta) + 1e-8)


def svd_kl(theta: jax.Array, log_sigma2: jax.Array) -> jax.Array:
    """Molchanov et al.'s approximation of ``KL(q(w) || p(w))`` under the
    log-uniform prior, summed:
    ``-KL ~ k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1``.

    References:
      Molchanov et al. 2017, eq. 14.
    """
    la = log_alpha(theta, log_sigma2)
    neg_kl = K1 * jax.nn.sigmoid(K2 + K3 * la) - 0.5 * jax.nn.softplus(-la) - K1
    return -jnp.sum(neg_kl)


def svd_mask(
    theta: jax.Array, log_sigma2: jax.Array, threshold: float = 3.0
) -> jax.Array:
    """Keep where ``log alpha <= threshold`` (3 in the paper).

    Example:
      >>> import jax.numpy as jnp
      >>> theta = jnp.array([1.0, 1.0])
      >>> svd_mask(theta, jnp.array([-8.0, 4.0]))  # log alpha = -8, 4
      Array([ True, False], dtype=bool)
    """
    return log_alpha(theta, log_sigma2) <= threshold


def svd_pruned(
    params: Params,
    threshold: float = 3.0,
    *,
    theta: str = "theta",
    log_sigma2: str = "log_sigma2",
) -> Params:
    """The deterministic pruned network of Sparse VD params.

    Every leaf whose last key is ``theta`` becomes ``where(log alpha <=
    threshold, theta, 0)`` with its sibling ``log_sigma2``, and that sibling
    becomes ``None``; other leaves pass. The result is what test time uses,
    and what :func:`jaxsparse.sparsity` and
    :func:`jaxsparse.sparsity_report` should count (on the raw params they
    also count ``log_sigma2`` as a weight).

    Args:
      params: a pytree holding ``theta`` / ``log_sigma2`` pairs (dicts, nnx
        State, ...).
      threshold: ``log alpha`` above which a weight is pruned (3 in the paper).
      theta, log_sigma2: the key names of the two leaves.

    Returns:
      The params with pruned kernels in place of ``theta`` and ``None`` in
      place of ``log_sigma2``.

    Raises:
      ValueError: a ``theta`` leaf without a ``log_sigma2`` sibling of its
        shape.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"fc": {"theta": jnp.array([[1.0, 0.1]]),
      ...             "log_sigma2": jnp.array([[-8.0, 0.0]]), "bias": jnp.zeros(2)}}
      >>> pruned = svd_pruned(p)
      >>> pruned["fc"]["theta"].tolist(), pruned["fc"]["log_sigma2"]
      ([[1.0, 0.0]], None)

    References:
      Molchanov et al. 2017, §4.3 (log alpha > 3); Hoefler et al. 2021, §3.7.
    """
    leaves = dict(_tree.leaves_with_path(params))

    def last(path):
        key = path[-1] if path else None
        return _tree.path_str((key,)) if key is not None else ""

    def sibling(path):
        found = [p for p in leaves if p[:-1] == path[:-1] and last(p) == log_sigma2]
        return found[0] if found else None

    def leaf(path, x):
        name = last(path)
        if name == log_sigma2:
            return None
        if name != theta:
            return x
        other = sibling(path)
        if other is None or jnp.shape(leaves[other]) != jnp.shape(x):
            raise ValueError(
                f"{_tree.path_str(path)}: no {log_sigma2!r} sibling of shape "
                f"{jnp.shape(x)}"
            )
        keep = svd_mask(x, leaves[other], threshold)
        return jnp.where(keep, x, jnp.zeros((), x.dtype))

    return tree_util.tree_map_with_path(leaf, params)


def svd_dense(
    x: jax.Array,
    theta: jax.Array,
    log_sigma2: jax.Array,
    key: jax.Array | None,
    *,
    threshold: float = 3.0,
) -> jax.Array:
    """A dense layer ``x @ w`` with ``w ~ N(theta, sigma^2)``.

    With a key, the local reparameterization trick samples the
    pre-activations: ``mean = x theta``, ``var = x^2 sigma^2``. Without one
    (test time) it uses ``theta`` masked where ``log alpha > threshold``.

    References:
      Kingma et al. 2015, §2.3; Molchanov et al. 2017, §4.1.
    """
    if key is None:
        return x @ jnp.where(svd_mask(theta, log_sigma2, threshold), theta, 0.0)
    mean = x @ theta
    var = jnp.square(x) @ jnp.exp(log_sigma2)
    return mean + jnp.sqrt(var + 1e-16) * jax.random.normal(key, mean.shape, mean.dtype)


def svd_conv(
    x: jax.Array,
    theta: jax.Array,
    log_sigma2: jax.Array,
    key: jax.Array | None,
    *,
    strides: tuple[int, int] = (1, 1),
    padding: str = "SAME",
    threshold: float = 3.0,
) -> jax.Array:
    """A 2-D convolution (NHWC inputs, HWIO kernel) with the local
    reparameterization: ``mean = conv(x, theta)``, ``var = conv(x^2,
    sigma^2)``; deterministic and masked without a key.

    References:
      Molchanov et al. 2017, §4.2 (convolutional layers).
    """

    def conv(a, k):
        return jax.lax.conv_general_dilated(
            a, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    if key is None:
        return conv(x, jnp.where(svd_mask(theta, log_sigma2, threshold), theta, 0.0))
    mean = conv(x, theta)
    var = conv(jnp.square(x), jnp.exp(log_sigma2))
    return mean + jnp.sqrt(var + 1e-16) * jax.random.normal(key, mean.shape, mean.dtype)


class SVDLinear(nnx.Module):
    """Dense layer with sparse variational dropout on its weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rngs: nnx.Rngs,
        log_sigma2: float = -10.0,
    ):
        scale = 1.0 / math.sqrt(in_features)
        self.theta = nnx.Param(
            jax.random.normal(rngs.params(), (in_features, out_features)) * scale
        )
        self.log_sigma2 = nnx.Param(jnp.full((in_features, out_features), log_sigma2))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        out = svd_dense(x, self.theta[...], self.log_sigma2[...], key)
        return out + self.bias[...][None, :]

    def kl(self) -> jax.Array:
        return svd_kl(self.theta[...], self.log_sigma2[...])

    def mask(self, threshold: float = 3.0) -> jax.Array:
        return svd_mask(self.theta[...], self.log_sigma2[...], threshold)

    def pruned_kernel(self, threshold: float = 3.0) -> jax.Array:
        """``theta`` with the weights of ``log alpha > threshold`` at 0."""
        return jnp.where(self.mask(threshold), self.theta[...], 0.0)


class SVDConv(nnx.Module):
    """2-D convolution (NHWC, HWIO) with sparse variational dropout."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, int] = (3, 3),
        *,
        rngs: nnx.Rngs,
        log_sigma2: float = -10.0,
        use_bias: bool = True,
    ):
        fan_in = in_features * kernel_size[0] * kernel_size[1]
        shape = (*kernel_size, in_features, out_features)
        self.theta = nnx.Param(
            jax.random.normal(rngs.params(), shape) / math.sqrt(fan_in)
        )
        self.log_sigma2 = nnx.Param(jnp.full(shape, log_sigma2))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        out = svd_conv(x, self.theta[...], self.log_sigma2[...], key)
        if self.bias is not None:
            out = out + self.bias[...].reshape((1,) * (out.ndim - 1) + (-1,))
        return out

    def kl(self) -> jax.Array:
        return svd_kl(self.theta[...], self.log_sigma2[...])

    def mask(self, threshold: float = 3.0) -> jax.Array:
        return svd_mask(self.theta[...], self.log_sigma2[...], threshold)

    def pruned_kernel(self, threshold: float = 3.0) -> jax.Array:
        """``theta`` with the weights of ``log alpha > threshold`` at 0."""
        return jnp.where(self.mask(threshold), self.theta[...], 0.0)


def _truncation(mu, log_sigma, a, b):
    sigma = jnp.exp(log_sigma)
    lo, hi = (a - mu) / sigma, (b - mu) / sigma
    return sigma, lo, hi, ndtr(hi) - ndtr(lo)


def _moment(mu, log_sigma, a, b, k: int) -> jax.Array:
    """``E[theta^k]`` of the truncated log-normal, as ``Phi(hi - k sigma) -
    Phi(lo - k sigma)`` rather than its mirror image, which cancels in
    floating point when ``k sigma`` is large."""
    sigma, lo, hi, z = _truncation(mu, log_sigma, a, b)
    mass = ndtr(hi - k * sigma) - ndtr(lo - k * sigma)
    return mass / z * jnp.exp(k * mu + jnp.square(k * sigma) / 2)


def sbp_kl(
    mu: jax.Array, log_sigma: jax.Array, a: float = -20.0, b: float = 0.0
) -> jax.Array:
    """KL from the log-normal noise ``log theta ~ N(mu, sigma^2)`` truncated
    to ``[a, b]`` to the log-uniform prior on the same interval, summed:
    ``log(b - a) - log(sigma sqrt(2 pi e)) - log Z - (alpha phi(alpha) -
    beta phi(beta)) / (2 Z)``.

    References:
      Neklyudov et al. 2017, "Structured Bayesian pruning via log-normal
      multiplicative noise", eq. 8.
    """
    sigma, lo, hi, z = _truncation(mu, log_sigma, a, b)

    def phi(t):
        return jnp.exp(-0.5 * jnp.square(t)) / math.sqrt(2 * math.pi)

    kl = (
        math.log(b - a)
        - jnp.log(sigma * math.sqrt(2 * math.pi * math.e))
        - jnp.log(z)
        - (lo * phi(lo) - hi * phi(hi)) / (2 * z)
    )
    return jnp.sum(kl)


def sbp_snr(
    mu: jax.Array, log_sigma: jax.Array, a: float = -20.0, b: float = 0.0
) -> jax.Array:
    """Signal-to-noise ratio ``E[theta] / sqrt(Var[theta])`` of the truncated
    log-normal noise, per group.

    References:
      Neklyudov et al. 2017, eq. 10.
    """
    mean = _moment(mu, log_sigma, a, b, 1)
    second = _moment(mu, log_sigma, a, b, 2)
    return mean / jnp.sqrt(jnp.maximum(second - jnp.square(mean), 1e-30))


def sbp_sample(
    mu: jax.Array,
    log_sigma: jax.Array,
    key: jax.Array,
    a: float = -20.0,
    b: float = 0.0,
) -> jax.Array:
    """Samples ``theta = exp(mu + sigma Phi^-1(Phi(alpha) + Z u))``."""
    sigma, lo, _, z = _truncation(mu, log_sigma, a, b)
    u = jax.random.uniform(key, jnp.shape(mu), jnp.result_type(mu), 1e-6, 1 - 1e-6)
    return jnp.exp(mu + sigma * ndtri(jnp.clip(ndtr(lo) + z * u, 1e-7, 1 - 1e-7)))


def sbp_mean(
    mu: jax.Array, log_sigma: jax.Array, a: float = -20.0, b: float = 0.0
) -> jax.Array:
    """``E[theta]`` of the truncated log-normal noise (test-time multiplier)."""
    return _moment(mu, log_sigma, a, b, 1)


def sbp_mask(
    mu: jax.Array,
    log_sigma: jax.Array,
    threshold: float = 1.0,
    a: float = -20.0,
    b: float = 0.0,
) -> jax.Array:
    """Keep the groups whose SNR exceeds ``threshold`` (1 in the paper)."""
    return sbp_snr(mu, log_sigma, a, b) > threshold


class SBP(nnx.Module):
    """Log-normal multiplicative noise on ``features`` units (neurons or
    channels, the last axis of the input); noisy in training (with a key),
    ``E[theta]`` masked by SNR at test time."""

    def __init__(self, features: int, *, a: float = -20.0, b: float = 0.0):
        self.mu = nnx.Param(jnp.zeros((features,)))
        self.log_sigma = nnx.Param(jnp.full((features,), -5.0))
        self.a, self.b = a, b

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        mu, log_sigma = self.mu[...], self.log_sigma[...]
        if key is None:
            keep = sbp_mask(mu, log_sigma, 1.0, self.a, self.b)
            mean = sbp_mean(mu, log_sigma, self.a, self.b)
            theta = jnp.where(keep, mean, jnp.zeros((), mean.dtype))
        else:
            theta = sbp_sample(mu, log_sigma, key, self.a, self.b)
        return x * theta.reshape((1,) * (x.ndim - 1) + theta.shape)

    def kl(self) -> jax.Array:
        return sbp_kl(self.mu[...], self.log_sigma[...], self.a, self.b)

    def mask(self, threshold: float = 1.0) -> jax.Array:
        return sbp_mask(self.mu[...], self.log_sigma[...], threshold, self.a, self.b)
