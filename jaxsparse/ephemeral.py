"""Ephemeral sparsity: activations and backpropagated errors that are
sparse for one step only.

- :func:`topk_activations` keeps the ``k`` largest entries of each example
  (k-winners-take-all), :func:`threshold_activations` those above a
  threshold; both optionally pass the whole gradient through
  (straight-through). :class:`KWinners` is the flax nnx layer.
- :func:`activation_sparsity` measures how many outputs of every ReLU in
  any function are exactly zero, found in its jaxpr.
- :func:`topk_backward` (meProp) is the identity going forward and keeps
  only the ``k`` largest-magnitude entries of each example's error going
  backward.

References:
  Hoefler et al. 2021, §2.3 (ephemeral sparsity); Ahmad & Scheinkman 2019,
  "How can we be so dense?" (k-winners-take-all); Makhzani & Frey 2014
  (k-sparse autoencoders); Sun et al. 2017, "meProp", §2.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from flax import nnx
from jax import lax


def _check_k(k: Any, size: int, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise ValueError(f"{where}: k must be an integer in [1, {size}], got {k!r}")


def _topk_mask(x: jax.Array, k: int, axis: int, by_magnitude: bool) -> jax.Array:
    """Exactly ``k`` entries along ``axis`` per index of the other axes (the
    largest; ties go to the lower index)."""
    moved = jnp.moveaxis(x, axis, -1)
    _, idx = lax.top_k(jnp.abs(moved) if by_magnitude else moved, k)
    mask = jnp.put_along_axis(
        jnp.zeros(moved.shape, bool), idx, True, axis=-1, inplace=False
    )
    return jnp.moveaxis(mask, -1, axis)


def _straight_through(x: jax.Array, sparse: jax.Array) -> jax.Array:
    """``sparse`` going forward, the identity's gradient going backward."""
    return x + lax.stop_gradient(sparse - x)


def topk_activations(
    x: jax.Array, k: int, *, axis: int = -1, straight_through: bool = False
) -> jax.Array:
    """k-winners-take-all: keeps the ``k`` largest entries along ``axis``
    of every example, zeroes the rest.

    Args:
      x: activations, e.g. ``(batch, features)``.
      k: entries kept per example, in ``[1, x.shape[axis]]``.
      axis: the axis competed over (the others index examples).
      straight_through: pass the whole gradient back (the identity's);
        by default only the winners receive gradient.

    Returns:
      ``x`` with all but ``k`` entries per example set to 0.

    Raises:
      ValueError: ``k`` out of range or ``axis`` out of bounds.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> ephemeral.topk_activations(jnp.array([[0.5, -2.0, 3.0, 1.0]]), 2)
      Array([[0., 0., 3., 1.]], dtype=float32)

    References:
      Ahmad & Scheinkman 2019, §2; Hoefler et al. 2021, §2.3.
    """
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"topk_activations: axis {axis} is out of range for {x.shape}")
    _check_k(k, x.shape[axis], "topk_activations")
    sparse = jnp.where(_topk_mask(x, k, axis, by_magnitude=False), x, 0.0)
    return _straight_through(x, sparse) if straight_through else sparse


def threshold_activations(
    x: jax.Array, threshold: float | jax.Array, *, straight_through: bool = False
) -> jax.Array:
    """Keeps the entries of ``x`` above ``threshold``, zeroes the rest.

    Args:
      x: activations.
      threshold: a scalar (may be traced).
      straight_through: pass the whole gradient back.

    Returns:
      ``where(x > threshold, x, 0)``.

    References:
      Hoefler et al. 2021, §2.3 (ReLU is the threshold 0).
    """
    sparse = jnp.where(x > threshold, x, 0.0)
    return _straight_through(x, sparse) if straight_through else sparse


class KWinners(nnx.Module):
    """A k-winners-take-all layer: :func:`topk_activations` along the last
    axis, ``k`` given as a count or as the fraction kept.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> layer = ephemeral.KWinners(fraction=0.25)
      >>> layer(jnp.arange(8.0)[None]).tolist()
      [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0]]
    """

    def __init__(
        self,
        k: int | None = None,
        *,
        fraction: float | None = None,
        straight_through: bool = False,
    ):
        if (k is None) == (fraction is None):
            raise ValueError("KWinners: give exactly one of k and fraction")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"KWinners: fraction must be in (0, 1], got {fraction!r}")
        self.k = k
        self.fraction = fraction
        self.straight_through = straight_through

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.k
        if k is None:
            k = max(1, round(self.fraction * x.shape[-1]))
        return topk_activations(x, k, straight_through=self.straight_through)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def topk_backward(x: jax.Array, k: int, axis: int = -1) -> jax.Array:
    """meProp: the identity going forward; going backward, each example's
    error keeps only its ``k`` entries of largest magnitude along ``axis``.

    Put it on a layer's pre-activation (``topk_backward(x @ w, k)``): the
    weight gradient then has at most ``k`` nonzero columns per example.

    Args:
      x: a layer's output.
      k: error entries kept per example, in ``[1, x.shape[axis]]``.
      axis: the axis selected over.

    Returns:
      ``x`` itself.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> g = jax.grad(lambda x: (ephemeral.topk_backward(x, 1) * jnp.array(
      ...     [[1.0, -3.0, 2.0]])).sum())(jnp.ones((1, 3)))
      >>> g.tolist()
      [[0.0, -3.0, 0.0]]

    References:
      Sun et al. 2017, "meProp", §2 (top-k of the output gradient).
    """
    _check_k(k, x.shape[axis], "topk_backward")
    return x


def _topk_backward_fwd(x, k, axis):
    _check_k(k, x.shape[axis], "topk_backward")
    return x, None


def _topk_backward_bwd(k, axis, _, g):
    return (jnp.where(_topk_mask(g, k, axis, by_magnitude=True), g, 0.0),)


topk_backward.defvjp(_topk_backward_fwd, _topk_backward_bwd)


def _is_relu(eqn) -> bool:
    """``max(x, 0)`` with a literal zero (what ``jax.nn.relu`` lowers to)."""
    if eqn.primitive.name != "max":
        return False
    return any(
        isinstance(v, jex.Literal) and jnp.ndim(v.val) == 0 and v.val == 0
        for v in eqn.invars
    )


def _eval_recording(closed, args: list, found: list) -> list:
    """Evaluates a closed jaxpr, appending every ReLU output to ``found``;
    enters ``jit`` and ``custom_jvp_call`` (``jax.nn.relu``'s wrapper)."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, c in zip(closed.jaxpr.constvars, closed.consts):
        env[v] = c
    for v, a in zip(closed.jaxpr.invars, args):
        env[v] = a
    for eqn in closed.jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "jit":
            outs = _eval_recording(eqn.params["jaxpr"], ins, found)
        elif name == "custom_jvp_call":
            outs = _eval_recording(eqn.params["call_jaxpr"], ins, found)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*ins, **params)
            outs = ans if eqn.primitive.multiple_results else [ans]
            if _is_relu(eqn):
                found.append(outs[0])
        for v, value in zip(eqn.outvars, outs):
            env[v] = value
    return [read(v) for v in closed.jaxpr.outvars]


def activation_sparsity(fn: Any, *args: Any) -> dict[str, jax.Array]:
    """The fraction of exactly-zero outputs of every ReLU in ``fn(*args)``.

    The ReLUs are found in ``fn``'s jaxpr (``jax.nn.relu``, or any
    ``max(x, 0)``, inside ``jit`` calls too), so any model can be measured
    without changing it. Jittable; the keys are static.

    Args:
      fn: any function of arrays, e.g. ``lambda x: model(x)``.
      *args: its arguments.

    Returns:
      ``{"relu_0 (shape)": fraction, ...}`` in the order the ReLUs run.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> x = jnp.array([[-1.0, 2.0, -3.0, 4.0]])
      >>> found = ephemeral.activation_sparsity(jax.nn.relu, x)
      >>> {k: float(v) for k, v in found.items()}
      {'relu_0 (1, 4)': 0.5}

    References:
      Hoefler et al. 2021, §2.3 (ReLU activations are sparse for free).
    """
    closed = jax.make_jaxpr(fn)(*args)
    found: list = []
    _eval_recording(closed, jax.tree.leaves(args), found)
    return {
        f"relu_{i} {tuple(out.shape)}": jnp.mean((out == 0).astype(jnp.float32))
        for i, out in enumerate(found)
    }
