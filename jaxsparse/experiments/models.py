"""The models and training helpers every experiment shares: a ReLU MLP
(LeNet-300-100 is one), LeNet-5, the MLP's loss and accuracy, and a jitted
epoch of any optax transform.

References:
  LeCun et al. 1998 (LeNet-5); Han et al. 2015, Table 1 (the LeNet-300-100
  and LeNet-5 they prune).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

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


def init_lenet5(key: jax.Array, side: int, classes: int) -> Params:
    """LeNet-5 as Caffe and Han et al. 2015 have it: conv 5x5x20, max-pool,
    conv 5x5x50, max-pool, dense 500, dense ``classes`` (431k weights on
    28x28 inputs; images smaller than 28 keep their size through SAME
    convolutions)."""
    params = {}
    for i, (c_in, c_out) in enumerate(((1, 20), (20, 50))):
        fan_in = 25 * c_in
        w = jax.random.normal(jax.random.fold_in(key, i), (5, 5, c_in, c_out))
        params[f"conv_{i}"] = {
            "kernel": w * jnp.sqrt(2.0 / fan_in),
            "bias": jnp.zeros((c_out,)),
        }
    flat = _lenet5_features(jnp.zeros((1, side * side)), params).shape[-1]
    dense = init_mlp(jax.random.fold_in(key, 2), (flat, 500, classes))
    return {**params, "dense_0": dense["dense_0"], "dense_1": dense["dense_1"]}


def _lenet5_features(x: jax.Array, params: Params) -> jax.Array:
    side = round(x.shape[-1] ** 0.5)
    padding = "VALID" if side >= 28 else "SAME"
    h = x.reshape(x.shape[0], side, side, 1)
    for i in range(2):
        layer = params[f"conv_{i}"]
        h = jax.lax.conv_general_dilated(
            h,
            layer["kernel"],
            (1, 1),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        h = h + layer["bias"][None, None, None, :]
        h = jax.lax.reduce_window(
            h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
        )
    return h.reshape(h.shape[0], -1)


def lenet5(params: Params, x: jax.Array) -> jax.Array:
    """LeNet-5 logits for flattened square images ``x`` (batch, side^2)."""
    h = _lenet5_features(x, params)
    return mlp({"dense_0": params["dense_0"], "dense_1": params["dense_1"]}, h)


class Model(NamedTuple):
    """A model by name: ``init(key, features, classes)`` and ``apply(params, x)``."""

    init: Callable[[jax.Array, int, int], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


def model(name: str, hidden: Sequence[int] = (256, 128)) -> Model:
    """``"mlp"`` (hidden sizes as given), ``"lenet-300-100"`` or ``"lenet-5"``."""
    if name == "lenet-5":
        return Model(
            lambda key, features, classes: init_lenet5(
                key, round(features**0.5), classes
            ),
            lenet5,
        )
    sizes = (300, 100) if name == "lenet-300-100" else tuple(hidden)
    if name not in ("mlp", "lenet-300-100"):
        raise ValueError(f"unknown model {name!r}; known: mlp, lenet-300-100, lenet-5")
    return Model(
        lambda key, features, classes: init_mlp(key, (features, *sizes, classes)),
        mlp,
    )
