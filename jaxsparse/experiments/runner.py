"""Compare pruning methods on the embedded digits dataset.

Train a dense MLP, prune a copy to each target sparsity with a saliency
criterion and a distribution, fine-tune it with the mask held fixed, and
report sparsity, non-zeros and test accuracy. Criteria and distributions
are looked up in :data:`CRITERIA` and :data:`DISTRIBUTIONS`; a new method
plugs in by adding an entry there.

References:
  Hoefler et al. 2021, §2.4.1 (train, sparsify, fine-tune).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import data
from jaxsparse._types import Params, Scores

Criterion = Callable[[Params, Params, jax.Array], Scores]
"""``criterion(params, grads, key) -> scores``; grads are of the training loss
on one batch at the params being pruned."""

CRITERIA: dict[str, Criterion] = {
    "magnitude": lambda params, grads, key: js.saliency.magnitude(params),
    "random": lambda params, grads, key: js.saliency.random(params, key),
    "taylor": lambda params, grads, key: js.saliency.taylor(params, grads),
}

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


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """ReLU MLP forward pass returning logits."""
    n = len(params)
    for i in range(n):
        layer = params[f"dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"][None, :]
        if i < n - 1:
            x = jax.nn.relu(x)
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
        scores = CRITERIA[name](params, grads, jax.random.fold_in(key, 2000 + c))
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


def _parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="python -m jaxsparse",
        description="Prune an MLP on the embedded digits dataset and compare.",
    )
    p.add_argument(
        "--experiment",
        choices=("one-shot", "schedules", "second-order", "regularized"),
        default="one-shot",
        help="one-shot: prune a trained model to several sparsities and "
        "fine-tune; schedules: compare dense, one-shot, gradual, IHT, RigL "
        "and SET at one sparsity with the same number of steps; "
        "second-order: one-shot pruning without fine-tuning by magnitude, "
        "Fisher diagonal, OBD, OBS and WoodFisher (MLP 64-64-10, 150 epochs; "
        "--seeds and --sparsities apply); regularized: penalties, proximal "
        "steps, L0 gates, learned thresholds, Sparse VD and SBP (--seeds "
        "applies)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="seeds of the schedules experiment",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.9,
        help="target of the schedules experiment",
    )
    p.add_argument("--hidden", type=int, nargs="+", default=list(defaults.hidden))
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument(
        "--sparsities", type=float, nargs="+", default=list(defaults.sparsities)
    )
    p.add_argument(
        "--criteria",
        nargs="+",
        choices=sorted(CRITERIA),
        default=list(defaults.criteria),
    )
    p.add_argument(
        "--distribution", choices=sorted(DISTRIBUTIONS), default=defaults.distribution
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    config = Config(
        seed=args.seed,
        hidden=tuple(args.hidden),
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        sparsities=tuple(args.sparsities),
        criteria=tuple(args.criteria),
        distribution=args.distribution,
    )
    start = time.perf_counter()
    model = f"digits MLP {'-'.join(map(str, (64, *config.hidden, 10)))}"
    if args.experiment == "regularized":
        from jaxsparse.experiments.regularized import (
            format_regularized,
            run_regularized,
        )

        rows = run_regularized(args.seeds)
        print(f"digits MLP 64-256-128-10, 120 epochs per method, seeds {args.seeds}")
        print(format_regularized(rows))
    elif args.experiment == "second-order":
        from jaxsparse.experiments.second_order import (
            format_second_order,
            run_second_order,
        )

        rows = run_second_order(args.seeds, args.sparsities)
        print(
            "digits MLP 64-64-10 trained 150 epochs, one-shot pruning without "
            f"fine-tuning, test accuracy (mean of seeds {args.seeds})"
        )
        print(format_second_order(rows))
    elif args.experiment == "schedules":
        rows = run_schedules(config, args.seeds, args.sparsity)
        print(
            f"{model}, {args.sparsity:.0%} target, "
            f"{config.epochs + config.finetune_epochs} epochs each, seeds {args.seeds}"
        )
        print(format_schedule_summary(rows))
    else:
        rows = run(config)
        print(f"{model}, {config.distribution} distribution, seed {config.seed}")
        print(format_table(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
