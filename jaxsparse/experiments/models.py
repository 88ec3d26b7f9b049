"""The model and training helpers every experiment shares: a ReLU MLP on
the digits, its loss and accuracy, and a jitted epoch of any optax
transform."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse._types import Params


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialized dense layers ``{"dense_i": {"kernel", "bias"}}``."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = jax.random.normal(jax.random.fold_in(key, i), (fan_in, fan_out))
        params[f"dense_{i}"] = {
            "kernel": w * jnp.sqrt(2.0 / fan_in),
            "bias": jnp.zeros((fan_out,)),
        }
    return params


def mlp(
    params: Params,
    x: jax.Array,
    *,
    gates: Sequence[jax.Array] | None = None,
    noise: Sequence[jax.Array] | None = None,
) -> jax.Array:
    """ReLU MLP forward pass returning logits.

    Args:
      params: ``{"dense_i": {"kernel", "bias"}}``.
      x: inputs, batch first.
      gates: optional multiplicative gates, one per kernel (its shape).
      noise: optional multiplicative noise, one per hidden layer's units.
    """
    n = len(params)
    for i in range(n):
        layer = params[f"dense_{i}"]
        kernel = layer["kernel"] if gates is None else layer["kernel"] * gates[i]
        x = x @ kernel + layer["bias"][None, :]
        if i < n - 1:
            x = jax.nn.relu(x)
            if noise is not None:
                x = x * noise[i][None, :]
    return x


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def make_epoch(tx: optax.GradientTransformation, batch_size: int):
    """A jitted epoch of ``tx`` over shuffled mini-batches (one compilation
    for every state of ``tx``, so masks may change between calls)."""

    @jax.jit
    def epoch(params, opt_state, x, y, key):
        steps = x.shape[0] // batch_size
        order = jax.random.permutation(key, x.shape[0])[: steps * batch_size]
        batches = (
            x[order].reshape(steps, batch_size, -1),
            y[order].reshape(steps, batch_size),
        )

        def step(carry, batch):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state

    return epoch


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of correct predictions."""
    return float(jnp.mean(jnp.argmax(mlp(params, x), -1) == y))
