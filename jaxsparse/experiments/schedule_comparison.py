"""Training schedules compared on the embedded digits: dense, one shot at
half time then fine-tuning, gradual polynomial, IHT, RigL and SET, each
spending the same number of steps.

References:
  Hoefler et al. 2021, §2.4 (when to sparsify), §4 (dynamic sparsity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import data
from jaxsparse.experiments.models import accuracy, init_mlp, make_epoch
from jaxsparse.experiments.one_shot import Config


class ScheduleRow(NamedTuple):
    """One training run of the schedule comparison."""

    method: str
    seed: int
    sparsity: float
    accuracy: float


def schedule_methods(
    sparsity: float, steps: int, learning_rate: float, seed: int
) -> dict[str, optax.GradientTransformation]:
    """The compared schedules, each spending ``steps`` steps in total.

    Dense; one shot at half time then fine-tuning; gradual polynomial from
    10 % to 60 % of the run; IHT (dense warm-up, two sparse/dense cycles,
    sparse end); RigL and SET from a random mask, updates every 2.5 % of the
    run until 75 %.
    """
    adam = optax.adam(learning_rate)
    magnitude = js.saliency.magnitude
    every = max(steps // 40, 1)
    return {
        "dense": adam,
        "one-shot": optax.chain(
            adam, js.prune(magnitude, js.schedules.constant(sparsity, at=steps // 2))
        ),
        "gradual": optax.chain(
            adam,
            js.prune(
                magnitude,
                js.schedules.polynomial(
                    0.0,
                    sparsity,
                    begin=steps // 10,
                    end=6 * steps // 10,
                    every=max(steps // 50, 1),
                ),
            ),
        ),
        "IHT": optax.chain(
            adam,
            js.prune(
                magnitude,
                js.schedules.iht(
                    sparsity,
                    warmup=steps // 5,
                    sparse_steps=steps // 5,
                    dense_steps=steps // 10,
                    cycles=2,
                ),
            ),
        ),
        "RigL": js.rigl(adam, sparsity, every=every, end=3 * steps // 4, key=seed),
        "SET": js.sparse_evolutionary(
            adam, sparsity, every=every, end=3 * steps // 4, key=seed
        ),
    }


def run_schedules(
    config: Config, seeds: Sequence[int], sparsity: float
) -> list[ScheduleRow]:
    """Trains every method of :func:`schedule_methods` for the same number of
    steps (``epochs + finetune_epochs`` epochs) on each seed."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    rows = []
    epochs = config.epochs + config.finetune_epochs
    for seed in seeds:
        split = data.digits(seed)
        key = jax.random.PRNGKey(seed)
        sizes = (split.x_train.shape[1], *config.hidden, split.num_classes)
        init = init_mlp(jax.random.fold_in(key, 0), sizes)
        steps = epochs * (len(split.y_train) // config.batch_size)
        methods = schedule_methods(sparsity, steps, config.learning_rate, seed)
        for name, tx in methods.items():
            epoch = make_epoch(tx, config.batch_size)
            params, state = init, tx.init(init)
            for e in range(epochs):
                params, state = epoch(
                    params,
                    state,
                    split.x_train,
                    split.y_train,
                    jax.random.fold_in(key, 1000 + e),
                )
            rows.append(
                ScheduleRow(
                    name,
                    seed,
                    float(js.sparsity(params)),
                    accuracy(params, split.x_test, split.y_test),
                )
            )
    return rows


def format_schedule_summary(rows: Sequence[ScheduleRow]) -> str:
    """Mean and spread (sample standard deviation) over seeds per method."""
    methods = list(dict.fromkeys(r.method for r in rows))
    lines = [
        f"{'method':<10} {'sparsity':>9} {'test acc (mean ± std)':>24} {'seeds':>6}"
    ]
    for name in methods:
        acc = np.array([r.accuracy for r in rows if r.method == name])
        sp = np.mean([r.sparsity for r in rows if r.method == name])
        std = acc.std(ddof=1) if acc.size > 1 else 0.0
        lines.append(
            f"{name:<10} {sp:>9.2%} {f'{acc.mean():.2%} ± {std:.2%}':>24} {acc.size:>6}"
        )
    return "\n".join(lines)
