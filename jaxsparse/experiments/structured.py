"""Structured pruning that shrinks the model: units removed by each
criterion, accuracy before and after a short fine-tune, parameters and
latency of the dense, masked and shrunk models.

Two models on the digits, both plain functions of a params dict whose
units :func:`jaxsparse.groups.trace` finds: an MLP 64-128-64-10 and a CNN
(3x3 convolutions of 16 and 32 channels without padding, global average
pooling, a dense head). Each is trained, then a copy has 50 % or 75 % of
the units of every hidden layer removed by one criterion, is fine-tuned
with the mask held (``keep_masked``), and is shrunk; the shrunk model's
accuracy equals the masked one's (checked).

References:
  Hoefler et al. 2021, §3.2–3.4; Srinivas & Babu 2015; Molchanov et al.
  2017; Mozer & Smolensky 1989; Xu & Ho 2006; Hu et al. 2016 (APoZ).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import data, neurons
from jaxsparse.experiments.models import init_mlp, mlp

CRITERIA = (
    "random",
    "magnitude",
    "apoz",
    "variance+fold",
    "sensitivity",
    "taylor",
    "gate",
    "jacobian-qr",
    "similarity-merge",
    "correlation-merge",
)
MODELS = ("mlp", "cnn")


class StructuredRow(NamedTuple):
    """One criterion at one fraction of units removed, on one model and seed."""

    model: str
    criterion: str
    seed: int
    removed: float
    dense_accuracy: float
    pruned_accuracy: float
    finetuned_accuracy: float
    dense_params: int
    shrunk_params: int
    dense_ms: float
    masked_ms: float
    shrunk_ms: float


def init_cnn(key: jax.Array, channels: Sequence[int] = (16, 32), classes: int = 10):
    """He-initialized ``{"conv_i": {"kernel" (3, 3, in, out), "bias"},
    "head": {"kernel", "bias"}}``."""
    params, fan_in = {}, 1
    for i, out in enumerate(channels):
        w = jax.random.normal(jax.random.fold_in(key, i), (3, 3, fan_in, out))
        params[f"conv_{i}"] = {
            "kernel": w * jnp.sqrt(2.0 / (9 * fan_in)),
            "bias": jnp.zeros((out,)),
        }
        fan_in = out
    w = jax.random.normal(jax.random.fold_in(key, 99), (fan_in, classes))
    params["head"] = {
        "kernel": w * jnp.sqrt(1.0 / fan_in),
        "bias": jnp.zeros((classes,)),
    }
    return params


def cnn(params, x: jax.Array) -> jax.Array:
    """``x`` as flat 64 pixels (reshaped to 8x8x1), valid 3x3 convolutions
    with ReLU, global average pooling, logits."""
    h = x.reshape(x.shape[0], 8, 8, 1)
    for i in range(len(params) - 1):
        layer = params[f"conv_{i}"]
        h = jax.lax.conv_general_dilated(
            h,
            layer["kernel"],
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        h = jax.nn.relu(h + layer["bias"][None, None, None, :])
    h = jnp.mean(h, axis=(1, 2))
    return h @ params["head"]["kernel"] + params["head"]["bias"][None, :]


def _plain_mlp(params, x):
    return mlp(params, x)


def _model(name: str, key: jax.Array):
    if name == "mlp":
        return _plain_mlp, init_mlp(key, (64, 128, 64, 10))
    return cnn, init_cnn(key)


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _trainer(apply: Callable, tx: optax.GradientTransformation, batch_size: int = 64):
    def loss(params, x, y):
        return _ce(apply(params, x), y).mean()

    @jax.jit
    def epoch(params, opt_state, x, y, key):
        steps = x.shape[0] // batch_size
        order = jax.random.permutation(key, x.shape[0])[: steps * batch_size]
        xs = x[order].reshape(steps, batch_size, -1)
        ys = y[order].reshape(steps, batch_size)

        def step(carry, batch):
            params, opt_state = carry
            grads = jax.grad(loss)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (xs, ys))
        return params, opt_state

    return epoch


def _accuracy(apply, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(apply(params, x), -1) == y))


def _median_ms(fn, *args, repeats: int = 30) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _batches(x, y, size: int = 256):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def remove_units(
    criterion: str,
    apply: Callable,
    params,
    x: np.ndarray,
    y: np.ndarray,
    fraction: float,
    key: jax.Array,
):
    """Removes ``fraction`` of every hidden layer's units by ``criterion``.

    Returns:
      ``(params, unit mask, groups)``: the params after any folding,
      merging or refit, with the removed units masked.
    """
    view = neurons.view(apply, params, x[:8])
    groups = view.groups
    sizes = {s.name: s.size for s in groups.sets}
    counts = {k: round(fraction * n) for k, n in sizes.items()}
    labelled = _batches(x, y)
    inputs = [b[0] for b in labelled]
    if criterion in ("similarity-merge", "correlation-merge", "variance+fold"):
        stats = neurons.activation_stats(view, params, inputs)
        if criterion == "similarity-merge":
            return (*neurons.similarity_merge(view, params, counts), groups)
        if criterion == "correlation-merge":
            return (*neurons.correlation_merge(view, params, stats, counts), groups)
        keep = neurons.select_units({k: s.variance for k, s in stats.items()}, fraction)
        return (*neurons.fold_constant_units(view, params, stats, keep), groups)
    if criterion == "random":
        scores = {
            k: jax.random.uniform(jax.random.fold_in(key, i), (n,))
            for i, (k, n) in enumerate(sizes.items())
        }
    elif criterion == "magnitude":
        scores = groups.unit_scores(params, "l2")
    elif criterion == "apoz":
        stats = neurons.activation_stats(view, params, inputs, correlation=False)
        scores = {k: 1.0 - s.apoz for k, s in stats.items()}
    elif criterion == "sensitivity":
        scores = neurons.output_sensitivity(view, params, inputs)
    elif criterion == "taylor":
        scores = neurons.taylor_units(view, params, labelled, _ce)
    elif criterion == "gate":
        scores = neurons.gate_saliency(view, params, labelled, _ce)
    elif criterion == "jacobian-qr":
        scores = {k: r.scores for k, r in neurons.jacobian_qr(view, params, x).items()}
    else:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {CRITERIA}")
    units = neurons.select_units(scores, fraction)
    return js.apply_mask(params, groups.element_mask(units, params)), units, groups


def _size(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def run_structured(
    seeds: Sequence[int] = (0, 1, 2),
    fractions: Sequence[float] = (0.5, 0.75),
    criteria: Sequence[str] = CRITERIA,
    models: Sequence[str] = MODELS,
    *,
    epochs: int = 60,
    finetune_epochs: int = 10,
) -> list[StructuredRow]:
    """Trains each model per seed, then removes units by each criterion."""
    rows = []
    for model in models:
        for seed in seeds:
            split = data.digits(seed)
            x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
            xt, yt = jnp.asarray(split.x_test), jnp.asarray(split.y_test)
            key = jax.random.key(seed)
            apply, params = _model(model, key)
            tx = optax.adam(3e-3)
            epoch = _trainer(apply, tx)
            opt = tx.init(params)
            for e in range(epochs):
                params, opt = epoch(params, opt, x, y, jax.random.fold_in(key, e))
            forward = jax.jit(apply)
            dense_ms = _median_ms(forward, params, xt)
            dense_acc = _accuracy(forward, params, xt, yt)
            for fraction in fractions:
                for criterion in criteria:
                    pruned, units, groups = remove_units(
                        criterion,
                        apply,
                        params,
                        split.x_train,
                        split.y_train,
                        fraction,
                        jax.random.fold_in(key, 1000),
                    )
                    pruned_acc = _accuracy(forward, pruned, xt, yt)
                    mask = groups.element_mask(units, pruned)
                    ftx = optax.chain(optax.adam(1e-3), js.keep_masked(mask))
                    fine = _trainer(apply, ftx)
                    fopt = ftx.init(pruned)
                    tuned = pruned
                    for e in range(finetune_epochs):
                        tuned, fopt = fine(
                            tuned, fopt, x, y, jax.random.fold_in(key, 500 + e)
                        )
                    small = js.shrink(tuned, groups, units)
                    tuned_acc = _accuracy(forward, tuned, xt, yt)
                    shrunk_acc = _accuracy(forward, small, xt, yt)
                    if abs(shrunk_acc - tuned_acc) > 1e-9:
                        raise AssertionError(
                            f"{model}/{criterion}: shrunk accuracy {shrunk_acc} "
                            f"differs from the masked model's {tuned_acc}"
                        )
                    rows.append(
                        StructuredRow(
                            model,
                            criterion,
                            seed,
                            fraction,
                            dense_acc,
                            pruned_acc,
                            tuned_acc,
                            _size(params),
                            _size(small),
                            dense_ms,
                            _median_ms(forward, tuned, xt),
                            _median_ms(forward, small, xt),
                        )
                    )
    return rows


def format_structured(rows: Sequence[StructuredRow]) -> str:
    """A markdown table of means over seeds: accuracy (%) right after the
    removal and after fine-tuning, per model, criterion and fraction."""
    fractions = sorted({r.removed for r in rows})
    header = "| model | criterion | " + " | ".join(
        f"{f:.0%} pruned | {f:.0%} tuned" for f in fractions
    )
    lines = [header + " |", "| --- | --- |" + " ---: | ---: |" * len(fractions)]
    keys = dict.fromkeys((r.model, r.criterion) for r in rows)
    for model, criterion in keys:
        cells = []
        for f in fractions:
            sel = [
                r
                for r in rows
                if (r.model, r.criterion, r.removed) == (model, criterion, f)
            ]
            cells.append(f"{100 * np.mean([r.pruned_accuracy for r in sel]):.2f}")
            cells.append(f"{100 * np.mean([r.finetuned_accuracy for r in sel]):.2f}")
        lines.append(f"| {model} | {criterion} | " + " | ".join(cells) + " |")
    for model in dict.fromkeys(r.model for r in rows):
        dense = np.mean([r.dense_accuracy for r in rows if r.model == model])
        lines.append(
            f"| {model} | dense | {100 * dense:.2f} |" + " |" * (2 * len(fractions) - 1)
        )
    lines.append("")
    lines.append(
        "| model | removed | params dense | params shrunk "
        "| dense ms | masked ms | shrunk ms |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in dict.fromkeys(r.model for r in rows):
        for f in fractions:
            sel = [r for r in rows if r.model == model and r.removed == f]
            lines.append(
                f"| {model} | {f:.0%} | {sel[0].dense_params} "
                f"| {sel[0].shrunk_params} | "
                f"{np.median([r.dense_ms for r in sel]):.3f} | "
                f"{np.median([r.masked_ms for r in sel]):.3f} | "
                f"{np.median([r.shrunk_ms for r in sel]):.3f} |"
            )
    return "\n".join(lines)
