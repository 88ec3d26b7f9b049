"""One-shot pruning on the embedded digits: train a dense MLP, prune a copy
to each target sparsity with a saliency criterion and a distribution,
fine-tune it with the mask held fixed, and report sparsity, non-zeros and
test accuracy. Criteria and distributions are looked up in
:data:`CRITERIA` and :data:`DISTRIBUTIONS`; a new method plugs in by adding
an entry there.

References:
  Hoefler et al. 2021, §2.4.1 (train, sparsify, fine-tune).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import optax

import jaxsparse as js
from jaxsparse import _tree, data
from jaxsparse._types import Criterion
from jaxsparse.experiments.models import accuracy, init_mlp, loss_fn, make_epoch

CRITERIA: dict[str, Criterion] = {
    "magnitude": js.saliency.magnitude,
    "random": js.saliency.random,
    "taylor": js.saliency.taylor,
}
"""Criteria by name, called by keyword as the transforms call them
(``params``, ``grads`` of the training loss at the params, ``key``)."""

DISTRIBUTIONS: dict[str, js.Distribution] = {
    "uniform": js.Uniform(),
    "erk": js.ERK(),
    "global": js.Global(),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: the model, the training and the methods compared."""

    seed: int = 0
    hidden: tuple[int, ...] = (256, 128)
    epochs: int = 40
    finetune_epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95)
    criteria: tuple[str, ...] = ("magnitude",)
    distribution: str = "uniform"


class Row(NamedTuple):
    """One line of the result table."""

    criterion: str
    target: float
    sparsity: float
    nonzeros: int
    size: int
    accuracy: float


def run(config: Config) -> list[Row]:
    """Trains, prunes and fine-tunes as ``config`` says; returns the rows."""
    for name in config.criteria:
        if name not in CRITERIA:
            raise ValueError(f"unknown criterion {name!r}; known: {sorted(CRITERIA)}")
    if config.distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {config.distribution!r}; "
            f"known: {sorted(DISTRIBUTIONS)}"
        )
    for s in config.sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsities must be in [0, 1), got {s!r}")
    split = data.digits(config.seed)
    key = jax.random.PRNGKey(config.seed)
    sizes = (split.x_train.shape[1], *config.hidden, split.num_classes)
    params = init_mlp(jax.random.fold_in(key, 0), sizes)
    adam = optax.adam(config.learning_rate)
    # The mask lives in keep_masked's state: one compiled epoch serves every
    # sparsity.
    finetune = optax.chain(adam, js.keep_masked(js.dense_mask(params)))
    dense_epoch = make_epoch(adam, config.batch_size)
    finetune_epoch = make_epoch(finetune, config.batch_size)

    def train(epoch, params, opt_state, epochs, stream):
        for e in range(epochs):
            batch_key = jax.random.fold_in(key, stream + e)
            params, opt_state = epoch(
                params, opt_state, split.x_train, split.y_train, batch_key
            )
        return params

    params = train(dense_epoch, params, adam.init(params), config.epochs, 1000)
    grads = jax.grad(loss_fn)(params, split.x_train, split.y_train)
    distribution = DISTRIBUTIONS[config.distribution]
    rows = []
    for c, name in enumerate(config.criteria):
        criterion, _ = _tree.keyword_caller(CRITERIA[name], name)
        scores = criterion(
            params=params, grads=grads, key=jax.random.fold_in(key, 2000 + c)
        )
        for target in config.sparsities:
            mask = js.topk_mask(scores, target, distribution=distribution)
            state = optax.tree.set(finetune.init(params), mask=mask)
            masked = js.apply_mask(params, mask)
            pruned = train(finetune_epoch, masked, state, config.finetune_epochs, 3000)
            report = js.sparsity_report(pruned)
            rows.append(
                Row(
                    name,
                    target,
                    report.sparsity,
                    report.nonzeros,
                    report.size,
                    accuracy(pruned, split.x_test, split.y_test),
                )
            )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table."""
    lines = [
        f"{'criterion':<10} {'target':>7} {'sparsity':>9} {'non-zeros':>15} "
        f"{'test acc':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r.criterion:<10} {r.target:>7.0%} {r.sparsity:>9.2%} "
            f"{f'{r.nonzeros}/{r.size}':>15} {r.accuracy:>9.2%}"
        )
    return "\n".join(lines)
