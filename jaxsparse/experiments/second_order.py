"""One-shot pruning without fine-tuning: magnitude against second order.

Train an MLP on the digits to convergence, then prune a copy to each
sparsity by magnitude, the empirical-Fisher diagonal, OBD (exact Hessian
diagonal), OBS with the exact Hessian block of each layer (joint
compensation, in one step and in five with the inverse of the survivors
recomputed), and WoodFisher (empirical-Fisher blocks of 64, joint
compensation, in one step and in five). Nothing is
fine-tuned, so the table shows what each criterion and its compensation
preserve. Layer-wise (uniform) selection for every method.

Damping is relative: ``1 x`` the mean diagonal of the matrix inverted
(the empirical Fisher of a converged model is tiny, about 1e-6 here, so an
absolute damping of 1e-3 would turn WoodFisher into magnitude pruning).

References:
  Hoefler et al. 2021, §3.5; LeCun et al. 1990; Hassibi & Stork 1992;
  Singh & Alistarh 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import curvature as cv
from jaxsparse import data, fisher, obs
from jaxsparse.experiments.models import accuracy, init_mlp, loss_fn, make_epoch

METHODS = (
    "magnitude",
    "fisher-diag",
    "OBD",
    "OBS",
    "OBS x5",
    "WoodFisher",
    "WoodFisher x5",
)


class SecondOrderRow(NamedTuple):
    """Test accuracy of one method at one sparsity and seed."""

    method: str
    seed: int
    sparsity: float
    accuracy: float


def _mean_diagonal(tree) -> float:
    leaves = jax.tree.leaves(tree)
    return float(np.mean(np.concatenate([np.ravel(x) for x in leaves])))


def prune_methods(params, x, y) -> dict[str, Callable[[float], dict]]:
    """For each method, a function from sparsity to pruned params."""
    hess_diag = cv.hessian_diag(loss_fn, params, x, y)
    per_example = fisher.per_example_grads(loss_fn, params, x, y)
    fisher_diag = fisher.fisher_diag(per_example)
    hess_damping = _mean_diagonal(hess_diag)
    fisher_damping = _mean_diagonal(fisher_diag)

    # Each later step inverts the curvature of the survivors only.
    @jax.jit
    def exact_at(p, mask=None):
        return cv.hessian_inverse(loss_fn, p, x, y, damping=hess_damping, mask=mask)

    @jax.jit
    def woodfisher_at(p, mask=None):
        g = fisher.per_example_grads(loss_fn, p, x, y)
        return fisher.fisher_inverse(
            g, block_size=64, damping=fisher_damping, mask=mask
        )

    def by_scores(scores):
        return lambda s: js.apply_mask(params, js.topk_mask(scores, s))

    def by_obs(inverse, steps=1):
        return lambda s: (
            obs.obs_prune(
                params, inverse, s, steps=steps, distribution=js.Uniform()
            ).params
        )

    return {
        "magnitude": by_scores(js.saliency.magnitude(params)),
        "fisher-diag": by_scores(obs.obd_saliency(params, fisher_diag)),
        "OBD": by_scores(obs.obd_saliency(params, hess_diag)),
        "OBS": by_obs(exact_at(params)),
        "OBS x5": by_obs(exact_at, steps=5),
        "WoodFisher": by_obs(woodfisher_at(params)),
        "WoodFisher x5": by_obs(woodfisher_at, steps=5),
    }


def run_second_order(
    seeds: Sequence[int],
    sparsities: Sequence[float],
    *,
    hidden: Sequence[int] = (64,),
    epochs: int = 150,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
) -> list[SecondOrderRow]:
    """Trains to convergence on each seed and prunes one-shot with each method."""
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsities must be in [0, 1), got {s!r}")
    rows = []
    for seed in seeds:
        split = data.digits(seed)
        key = jax.random.PRNGKey(seed)
        sizes = (split.x_train.shape[1], *hidden, split.num_classes)
        params = init_mlp(jax.random.fold_in(key, 0), sizes)
        adam = optax.adam(learning_rate)
        epoch = make_epoch(adam, batch_size)
        state = adam.init(params)
        for e in range(epochs):
            params, state = epoch(
                params, state, split.x_train, split.y_train, jax.random.fold_in(key, e)
            )
        x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
        rows.append(
            SecondOrderRow(
                "dense", seed, 0.0, accuracy(params, split.x_test, split.y_test)
            )
        )
        for name, prune in prune_methods(params, x, y).items():
            for s in sparsities:
                pruned = prune(s)
                rows.append(
                    SecondOrderRow(
                        name, seed, s, accuracy(pruned, split.x_test, split.y_test)
                    )
                )
    return rows


def format_second_order(rows: Sequence[SecondOrderRow]) -> str:
    """Mean test accuracy over seeds, a column per sparsity."""
    sparsities = sorted({r.sparsity for r in rows if r.method != "dense"})
    methods = list(dict.fromkeys(r.method for r in rows))
    header = f"{'method':<12}" + "".join(f"{s:>9.0%}" for s in sparsities)
    lines = [header]
    for name in methods:
        cells = []
        for s in sparsities:
            accs = [
                r.accuracy
                for r in rows
                if r.method == name and (r.sparsity == s or name == "dense")
            ]
            cells.append(f"{np.mean(accs):>9.2%}")
        lines.append(f"{name:<12}" + "".join(cells))
    return "\n".join(lines)
