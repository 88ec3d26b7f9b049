"""The Hessian's spectrum through Hessian-vector products: its top
eigenvalues (Lanczos) and its spectral density (stochastic Lanczos
quadrature, as PyHessian computes it).

Both work on the whole parameter vector (``jax.flatten_util.ravel_pytree``)
and never form the Hessian: ``iterations`` HVPs per Lanczos run, with full
reorthogonalization against the ``iterations`` stored basis vectors
(``iterations x params`` floats of memory).

References:
  Lanczos 1950; Golub & Meurant 2010 (Gauss quadrature from Lanczos);
  Ubaru, Chen & Saad 2017 (stochastic Lanczos quadrature); Ghorbani,
  Krishnan & Xiao 2019 and Yao et al. 2020 (PyHessian); Hoefler et al.
  2021, §3.5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxsparse import _tree
from jaxsparse._types import LossFn, Params
from jaxsparse.curvature import hvp


class Tridiagonal(NamedTuple):
    """The Lanczos tridiagonal ``T = Q^T A Q``: ``alpha`` on the diagonal,
    ``beta`` beside it, and the orthonormal basis ``Q`` (rows)."""

    alpha: jax.Array
    beta: jax.Array
    basis: jax.Array

    def matrix(self) -> jax.Array:
        """``T`` as a dense ``(m, m)`` matrix."""
        return jnp.diag(self.alpha) + jnp.diag(self.beta, 1) + jnp.diag(self.beta, -1)


def lanczos(
    matvec: Callable[[jax.Array], jax.Array], start: jax.Array, iterations: int
) -> Tridiagonal:
    """``iterations`` Lanczos steps of a symmetric operator from ``start``,
    with full reorthogonalization (twice, Gram-Schmidt), so the Ritz values
    are accurate without spurious copies. Jittable.

    An invariant subspace found early (``beta`` = 0) ends the basis: the
    further steps add zero rows and columns to ``T``, whose eigenvalue 0
    carries no weight in the start vector.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([3.0, 1.0, -2.0]))
      >>> t = lanczos(lambda v: a @ v, jnp.ones(3), 3)
      >>> jnp.round(jnp.linalg.eigvalsh(t.matrix()), 4)
      Array([-2.,  1.,  3.], dtype=float32)
    """
    _tree.check_positive_int(iterations, "iterations")
    n = start.shape[0]
    if iterations > n:
        raise ValueError(
            f"iterations must be at most the dimension {n}, got {iterations}"
        )
    dtype = start.dtype
    tiny = jnp.finfo(dtype).tiny ** 0.5

    def step(j, carry):
        q, q_prev, beta_prev, basis, alpha, beta = carry
        basis = basis.at[j].set(q)
        w = matvec(q) - beta_prev * q_prev
        a = jnp.vdot(q, w)
        w = w - a * q
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        b = jnp.linalg.norm(w)
        alive = b > tiny * jnp.maximum(jnp.abs(a), 1.0)
        nxt = jnp.where(alive, w / jnp.where(alive, b, 1.0), jnp.zeros_like(w))
        b = jnp.where(alive, b, 0.0)
        return nxt, q, b, basis, alpha.at[j].set(a), beta.at[j].set(b)

    q0 = start / jnp.linalg.norm(start)
    init = (
        q0,
        jnp.zeros_like(q0),
        jnp.zeros((), dtype),
        jnp.zeros((iterations, n), dtype),
        jnp.zeros((iterations,), dtype),
        jnp.zeros((iterations,), dtype),
    )
    _, _, _, basis, alpha, beta = lax.fori_loop(0, iterations, step, init)
    return Tridiagonal(alpha, beta[:-1], basis)


def _flat_hvp(loss_fn: LossFn, params: Params, args: tuple):
    flat, unravel = ravel_pytree(params)

    def matvec(v):
        return ravel_pytree(hvp(loss_fn, params, unravel(v.astype(flat.dtype)), *args))[
            0
        ]

    return flat, matvec


def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Params,
    *args: Any,
    key: jax.Array,
    k: int = 5,
    iterations: int | None = None,
) -> jax.Array:
    """The ``k`` largest eigenvalues of the Hessian (by value, descending),
    as the Ritz values of a Lanczos run from a Rademacher vector.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point.
      *args: the batch.
      key: PRNG key of the start vector.
      k: how many eigenvalues.
      iterations: Lanczos steps (HVPs); default ``min(n, max(4 k, 40))``.
        The extreme eigenvalues converge first; ``n`` steps are exact.

    Returns:
      ``(k,)`` eigenvalues, largest first.

    References:
      Lanczos 1950; Yao et al. 2020 (PyHessian's top eigenvalues);
      Hoefler et al. 2021, §3.5.
    """
    _tree.check_positive_int(k, "k")
    flat, matvec = _flat_hvp(loss_fn, params, args)
    n = flat.shape[0]
    m = min(n, max(4 * k, 40)) if iterations is None else iterations
    if k > m:
        raise ValueError(f"k={k} eigenvalues need at least k iterations, got {m}")
    start = jax.random.rademacher(key, (n,), flat.dtype)
    t = lanczos(matvec, start, m)
    return jnp.linalg.eigvalsh(t.matrix())[::-1][:k]


class SpectralDensity(NamedTuple):
    """Gauss quadrature of the Hessian's spectral measure, one rule per
    probe: ``v^T f(H) v / ||v||^2 ~ sum_i weights_i f(nodes_i)``.

    Attributes:
      nodes: ``(probes, m)`` Ritz values.
      weights: ``(probes, m)`` squared first components of the Ritz
        vectors (each row sums to 1).
    """

    nodes: jax.Array
    weights: jax.Array

    def density(self, grid: jax.Array, sigma: float) -> jax.Array:
        """The spectral density on ``grid``, each node a Gaussian of width
        ``sigma``, averaged over probes (integrates to 1)."""
        z = (grid[:, None, None] - self.nodes[None]) / sigma
        bumps = jnp.exp(-0.5 * z * z) / (sigma * jnp.sqrt(2.0 * jnp.pi))
        return jnp.mean(jnp.sum(self.weights[None] * bumps, axis=-1), axis=-1)

    def moment(self, power: int) -> jax.Array:
        """``(probes,)``: the quadrature of ``v^T H^power v / ||v||^2``,
        exact for ``power < 2 m``."""
        return jnp.sum(self.weights * self.nodes**power, axis=-1)


def spectral_density(
    loss_fn: LossFn,
    params: Params,
    *args: Any,
    key: jax.Array,
    probes: int = 4,
    iterations: int = 64,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the Hessian's spectral density:
    ``probes`` Lanczos runs from Rademacher vectors, each giving a Gauss
    rule (nodes: the Ritz values; weights: squared first components of the
    Ritz vectors).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point.
      *args: the batch.
      key: PRNG key of the probes.
      probes: how many start vectors.
      iterations: Lanczos steps per probe (at most the parameter count).

    Returns:
      A :class:`SpectralDensity`.

    References:
      Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019; Yao et al.
      2020 (PyHessian); Hoefler et al. 2021, §3.5.
    """
    _tree.check_positive_int(probes, "probes")
    flat, matvec = _flat_hvp(loss_fn, params, args)
    n = flat.shape[0]
    iterations = min(iterations, n)
    starts = jax.random.rademacher(key, (probes, n), flat.dtype)

    def rule(start):
        t = lanczos(matvec, start, iterations)
        nodes, vectors = jnp.linalg.eigh(t.matrix())
        return nodes, vectors[0] ** 2

    nodes, weights = lax.map(rule, starts)
    return SpectralDensity(nodes, weights)
