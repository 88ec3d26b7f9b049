"""Regularized and variational sparsity on the digits: each method trains an
MLP from scratch and reports the sparsity it reaches and its test accuracy.

Methods (MLP 64-256-128-10, 120 epochs of mini-batches of 64):

- ``dense``: Adam, cross-entropy.
- ``l1-prox``: SGD (0.05) with the proximal L1 step, strength 3e-3
  (exact zeros).
- ``group-lasso``: SGD (0.05) with block soft-thresholding of hidden
  neurons (``Channel(-1)`` of the hidden kernels), strength 5e-3.
- ``hoyer``: Adam with a Hoyer-Square penalty; weights below 1 % of their
  leaf's largest magnitude are set to 0 at the end (Hoyer drives weights
  towards 0 but not exactly to it).
- ``hard-concrete``: a hard-concrete L0 gate per weight; test time uses the
  deterministic gates.
- ``learned-threshold``: one trainable threshold per kernel through
  Manessi et al.'s soft threshold, with an L1 penalty on the thresholded
  weights; at test, weights within their threshold are zero.
- ``sparse-vd``: sparse variational dropout (KL weight warmed up over the
  first third), pruned at ``log alpha > 3``.
- ``sbp``: structured Bayesian pruning of the hidden neurons (log-normal
  noise from log sigma = -2, KL to the truncated log-uniform prior, Adam
  3e-3), pruned at SNR < 1 with the test-time means folded into the next
  layer.

Strengths were picked on seed 0 (a few values each) for high sparsity at a
small accuracy cost; "weights pruned" counts exact zeros in all kernels,
"neurons pruned" hidden units with no incoming weight (SBP: the masked
units).

References:
  Hoefler et al. 2021, §3.6 and §3.7.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import data
from jaxsparse import regularizers as rg
from jaxsparse import variational as vr
from jaxsparse.experiments.models import init_mlp, mlp

HIDDEN_KERNELS = "dense_[01]/kernel"


class RegularizedRow(NamedTuple):
    """One trained model: sparsity of the kernels and of the hidden neurons."""

    method: str
    seed: int
    weight_sparsity: float
    neuron_sparsity: float
    accuracy: float


class Method(NamedTuple):
    """How one method trains and how its trained model is read out.

    ``init(params, key)`` gives the trained variables; ``loss(v, x, y, key,
    progress)`` the training loss; ``tx`` the optimizer; ``readout(v)`` the
    effective (pruned) MLP params and the hidden-neuron keep masks.
    """

    init: Callable[[Any, jax.Array], Any]
    loss: Callable[..., jax.Array]
    tx: optax.GradientTransformation
    readout: Callable[[Any], tuple[Any, list[jax.Array]]]


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _kernels(params):
    return [params[f"dense_{i}"]["kernel"] for i in range(len(params))]


def _alive_neurons(params):
    """Hidden units whose incoming column is not all zero."""
    return [jnp.any(k != 0, axis=0) for k in _kernels(params)[:-1]]


def _with_kernels(params, kernels):
    return {
        name: {**layer, "kernel": k}
        for (name, layer), k in zip(sorted(params.items()), kernels)
    }


def methods(n_train: int, lr: float = 1e-3) -> dict[str, Method]:
    """The compared methods; ``n_train`` scales the KL terms (per example)."""
    adam = optax.adam(lr)

    def plain(v, x, y, key, progress):
        return _ce(mlp(v, x), y)

    def as_is(v):
        return v, _alive_neurons(v)

    def hoyer_loss(v, x, y, key, progress):
        return _ce(mlp(v, x), y) + 2e-4 * rg.hoyer_square(v)

    def hoyer_readout(v):
        kernels = [
            jnp.where(jnp.abs(k) < 0.01 * jnp.max(jnp.abs(k)), 0.0, k)
            for k in _kernels(v)
        ]
        pruned = _with_kernels(v, kernels)
        return pruned, _alive_neurons(pruned)

    gate = rg.HardConcrete()

    def hc_init(params, key):
        return {
            "w": params,
            "log_alpha": [jnp.full(k.shape, 2.0) for k in _kernels(params)],
        }

    def hc_loss(v, x, y, key, progress):
        keys = jax.random.split(key, len(v["log_alpha"]))
        gates = [
            rg.hard_concrete_sample(la, k, gate) for la, k in zip(v["log_alpha"], keys)
        ]
        l0 = sum(rg.hard_concrete_l0(la, gate) for la in v["log_alpha"])
        return _ce(mlp(v["w"], x, gates=gates), y) + 0.5 * l0 / n_train

    def hc_readout(v):
        gates = [rg.hard_concrete_gates(la, gate) for la in v["log_alpha"]]
        pruned = _with_kernels(v["w"], [k * g for k, g in zip(_kernels(v["w"]), gates)])
        return pruned, _alive_neurons(pruned)

    beta = 50.0

    def lt_init(params, key):
        return {"w": params, "t": rg.init_thresholds(params, 0.0)}

    def lt_loss(v, x, y, key, progress):
        shown = rg.apply_thresholds(v["w"], v["t"], beta)
        return _ce(mlp(shown, x), y) + 3e-4 * rg.l1(shown)

    def lt_readout(v):
        thresholds = [v["t"][f"dense_{i}"]["kernel"] for i in range(len(v["w"]))]
        kernels = [
            jnp.where(jnp.abs(k) <= t, 0.0, k)
            for k, t in zip(_kernels(v["w"]), thresholds)
        ]
        pruned = _with_kernels(v["w"], kernels)
        return pruned, _alive_neurons(pruned)

    def svd_init(params, key):
        return {
            "w": params,
            "log_sigma2": [jnp.full(k.shape, -8.0) for k in _kernels(params)],
        }

    def svd_loss(v, x, y, key, progress):
        keys = jax.random.split(key, len(v["w"]))
        h = x
        for i, k in enumerate(keys):
            layer = v["w"][f"dense_{i}"]
            h = vr.svd_dense(h, layer["kernel"], v["log_sigma2"][i], k)
            h = h + layer["bias"][None, :]
            if i < len(keys) - 1:
                h = jax.nn.relu(h)
        kl = sum(vr.svd_kl(k, s) for k, s in zip(_kernels(v["w"]), v["log_sigma2"]))
        return _ce(h, y) + jnp.minimum(3.0 * progress, 1.0) * kl / n_train

    def svd_readout(v):
        masks = [vr.svd_mask(k, s) for k, s in zip(_kernels(v["w"]), v["log_sigma2"])]
        pruned = _with_kernels(v["w"], [k * m for k, m in zip(_kernels(v["w"]), masks)])
        return pruned, _alive_neurons(pruned)

    def sbp_init(params, key):
        hidden = [k.shape[1] for k in _kernels(params)[:-1]]
        return {
            "w": params,
            "mu": [jnp.zeros((h,)) for h in hidden],
            "log_sigma": [jnp.full((h,), -2.0) for h in hidden],
        }

    def sbp_loss(v, x, y, key, progress):
        keys = jax.random.split(key, len(v["mu"]))
        noise = [
            vr.sbp_sample(m, s, k) for m, s, k in zip(v["mu"], v["log_sigma"], keys)
        ]
        kl = sum(vr.sbp_kl(m, s) for m, s in zip(v["mu"], v["log_sigma"]))
        return (
            _ce(mlp(v["w"], x, noise=noise), y)
            + jnp.minimum(3.0 * progress, 1.0) * kl / n_train
        )

    def sbp_readout(v):
        keep = [vr.sbp_mask(m, s) for m, s in zip(v["mu"], v["log_sigma"])]
        scale = [
            vr.sbp_mean(m, s) * k for m, s, k in zip(v["mu"], v["log_sigma"], keep)
        ]
        # Fold the test-time multipliers into the next layer's kernel, so the
        # pruned model is a plain MLP with whole neurons removed.
        kernels = _kernels(v["w"])
        folded = [kernels[0] * keep[0][None, :]]
        for i in range(1, len(kernels)):
            k = kernels[i] * scale[i - 1][:, None]
            folded.append(k * keep[i][None, :] if i < len(keep) else k)
        return _with_kernels(v["w"], folded), keep

    def identity(params, key):
        return params

    sgd = 0.05
    return {
        "dense": Method(identity, plain, adam, as_is),
        "l1-prox": Method(
            identity,
            plain,
            optax.chain(optax.sgd(sgd), rg.proximal_l1(3e-3, sgd)),
            as_is,
        ),
        "group-lasso": Method(
            identity,
            plain,
            optax.chain(
                optax.sgd(sgd),
                rg.proximal_group_lasso(
                    5e-3, sgd, js.Channel(-1), include=HIDDEN_KERNELS
                ),
            ),
            as_is,
        ),
        "hoyer": Method(identity, hoyer_loss, adam, hoyer_readout),
        "hard-concrete": Method(hc_init, hc_loss, optax.adam(1e-2), hc_readout),
        "learned-threshold": Method(lt_init, lt_loss, adam, lt_readout),
        "sparse-vd": Method(svd_init, svd_loss, adam, svd_readout),
        "sbp": Method(sbp_init, sbp_loss, optax.adam(3e-3), sbp_readout),
    }


def train_method(
    method: Method,
    variables,
    split: data.Split,
    key: jax.Array,
    epochs: int,
    batch_size: int,
):
    """Trains ``method`` from ``variables`` for ``epochs`` epochs of shuffled
    mini-batches under one jitted epoch; returns the trained variables."""
    steps = len(split.y_train) // batch_size
    total = epochs * steps

    @jax.jit
    def epoch(variables, state, e):
        order = jax.random.permutation(jax.random.fold_in(key, e), len(split.y_train))
        xs = split.x_train[order[: steps * batch_size]].reshape(steps, batch_size, -1)
        ys = split.y_train[order[: steps * batch_size]].reshape(steps, batch_size)

        def step(carry, batch):
            variables, state, i = carry
            x, y, k = batch
            progress = (e * steps + i) / total
            grads = jax.grad(method.loss)(variables, x, y, k, progress)
            updates, state = method.tx.update(grads, state, variables)
            return (optax.apply_updates(variables, updates), state, i + 1), None

        batch_keys = jax.random.split(jax.random.fold_in(key, 10**6 + e), steps)
        (variables, state, _), _ = jax.lax.scan(
            step, (variables, state, 0), (xs, ys, batch_keys)
        )
        return variables, state

    state = method.tx.init(variables)
    for e in range(epochs):
        variables, state = epoch(variables, state, e)
    return variables


def run_regularized(
    seeds: Sequence[int],
    *,
    names: Sequence[str] | None = None,
    hidden: Sequence[int] = (256, 128),
    epochs: int = 120,
    batch_size: int = 64,
) -> list[RegularizedRow]:
    """Trains every method on each seed and reads out sparsity and accuracy."""
    rows = []
    for seed in seeds:
        split = data.digits(seed)
        split = split._replace(
            x_train=jnp.asarray(split.x_train), y_train=jnp.asarray(split.y_train)
        )
        key = jax.random.PRNGKey(seed)
        params = init_mlp(jax.random.fold_in(key, 0), (64, *hidden, split.num_classes))
        table = methods(len(split.y_train))
        for name in names or table:
            method = table[name]
            trained = train_method(
                method, method.init(params, key), split, key, epochs, batch_size
            )
            pruned, keep = method.readout(trained)
            kernels = _kernels(pruned)
            zeros = sum(int(jnp.sum(k == 0)) for k in kernels)
            size = sum(k.size for k in kernels)
            units = sum(k.size for k in keep)
            dead = sum(int(jnp.sum(~k)) for k in keep)
            logits = mlp(pruned, split.x_test)
            acc = float(jnp.mean(jnp.argmax(logits, -1) == split.y_test))
            rows.append(RegularizedRow(name, seed, zeros / size, dead / units, acc))
    return rows


def format_regularized(rows: Sequence[RegularizedRow]) -> str:
    """Mean (and spread over seeds) of sparsity and accuracy per method."""
    lines = [
        f"{'method':<18} {'weights pruned':>15} {'neurons pruned':>15} "
        f"{'test acc (mean ± std)':>22}"
    ]
    for name in dict.fromkeys(r.method for r in rows):
        sel = [r for r in rows if r.method == name]
        acc = np.array([r.accuracy for r in sel])
        std = acc.std(ddof=1) if acc.size > 1 else 0.0
        lines.append(
            f"{name:<18} {np.mean([r.weight_sparsity for r in sel]):>15.2%} "
            f"{np.mean([r.neuron_sparsity for r in sel]):>15.2%} "
            f"{f'{acc.mean():.2%} ± {std:.2%}':>22}"
        )
    return "\n".join(lines)
