"""One-shot pruning without fine-tuning on the digits, side by side:
magnitude, OBD, block WoodFisher, M-FAC, OBC and SparseGPT (unstructured),
and magnitude, OBC and SparseGPT at 2:4; test accuracy and wall time.

    python benchmarks/bench_layerwise.py [--seed 0] [--sparsities 0.5 0.7 ...]

Models: an MLP 64-256-128-10 (60 epochs) and LeNet-5 on 8x8 digits (30
epochs), Adam 1e-3, batch 64. Every method prunes each kernel to the same
fraction (uniform); OBC and SparseGPT calibrate on 512 training digits in
sequence, layer after layer; OBD uses the exact Hessian diagonal, block
WoodFisher empirical-Fisher blocks of 64 (joint OBS), M-FAC the whole
model's inverse empirical Fisher of 512 per-example gradients (independent
OBS); both Fisher dampings are the mean diagonal. OBD takes the MLP's
exact Hessian diagonal on 128 of those digits (``--obd-examples``; one HVP
per weight), and LeNet-5's Gauss-Newton diagonal on all 512 (LeCun et
al.'s own approximation; the exact one through 131k HVPs takes too long
here until the diagonal is computed by layer structure). At 2:4 the first
convolution (25 inputs per output, not a multiple of 4) stays dense for
every method. "median
time" is one prune (OBC and SparseGPT: their calibration included) after a
first call that compiles (the others are one jitted call, the sparsity
traced); "curvature" is the one-off time of OBD's
diagonal, WoodFisher's blocks and M-FAC's factor, shared by every
sparsity.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse.experiments import post_training
from jaxsparse.experiments.models import init_lenet5, init_mlp, lenet5, mlp


def train(apply, params, split, epochs, seed):
    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    adam = optax.adam(1e-3)
    state = adam.init(params)
    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    steps = len(y) // 64

    @jax.jit
    def epoch(params, state, key):
        order = jax.random.permutation(key, len(y))[: steps * 64].reshape(steps, 64)

        def step(carry, idx):
            p, s = carry
            g = jax.grad(loss)(p, x[idx], y[idx])
            u, s = adam.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, state), order)[0]

    key = jax.random.key(seed)
    for e in range(epochs):
        params, state = epoch(params, state, jax.random.fold_in(key, e))
    return params


def accuracy(apply, params, split):
    logits = apply(params, jnp.asarray(split.x_test))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(split.y_test)))


LABELS = {
    "magnitude": "magnitude",
    "obd": "OBD",
    "woodfisher": "WoodFisher (blocks of 64)",
    "mfac": "M-FAC (whole model)",
    "obc": "OBC",
    "sparsegpt": "SparseGPT",
}


def methods(apply, params, split, obd_examples=128):
    """Every pruner made ready on 512 training digits, the 2:4 ones too;
    ``{label: (OneShot, fixed sparsity)}``."""
    x, y = jnp.asarray(split.x_train[:512]), jnp.asarray(split.y_train[:512])
    nm = js.NM(2, 4, axis=0)
    nm_include = None if apply is mlp else r"(conv_1|dense_\d)/kernel"
    table = {}
    for name in post_training.PRUNERS:
        options = {"block_size": 64}
        if name == "obd":
            # The MLP's exact diagonal on fewer digits (one HVP per weight).
            exact = apply is mlp
            options["obd_diagonal"] = "exact" if exact else "gauss-newton"
            label = "OBD (exact diagonal)" if exact else "OBD (Gauss-Newton diagonal)"
            xs, ys = (x[:obd_examples], y[:obd_examples]) if exact else (x, y)
        else:
            label, xs, ys = LABELS[name], x, y
        table[label] = (
            post_training.one_shot_pruner(name, apply, params, xs, ys, **options),
            False,
        )
    for name in ("magnitude", "obc", "sparsegpt"):
        table[f"{LABELS[name]} 2:4"] = (
            post_training.one_shot_pruner(
                name,
                apply,
                params,
                x,
                y,
                pattern=nm,
                include=nm_include,
                block_size=64,
            ),
            True,
        )
    return table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95]
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet-5"])
    parser.add_argument(
        "--obd-examples", type=int, default=128, help="digits in OBD's exact diagonal"
    )
    args = parser.parse_args()
    split = js.data.digits(args.seed)
    key = jax.random.key(args.seed)
    models = {
        "mlp": ("MLP 64-256-128-10", mlp, init_mlp(key, (64, 256, 128, 10)), 60),
        "lenet-5": ("LeNet-5 (8x8)", lenet5, init_lenet5(key, 8, 10), 30),
    }
    for choice in args.models:
        name, apply, params, epochs = models[choice]
        params = train(apply, params, split, epochs, args.seed)
        print(f"\n{name}: dense test accuracy {accuracy(apply, params, split):.2%}")
        header = " ".join(f"{s:>7.0%}" for s in args.sparsities)
        print(f"{'method':<27} {header}  {'median time':>11}  curvature")
        table = methods(apply, params, split, args.obd_examples)
        for label, (pruner, fixed) in table.items():
            targets = [None] if fixed else args.sparsities
            prune = pruner.prune
            prune(targets[0])  # compile
            cells, times = [], []
            for s in targets:
                start = time.perf_counter()
                pruned = jax.block_until_ready(prune(s))
                times.append(time.perf_counter() - start)
                cells.append(f"{accuracy(apply, pruned, split):>7.2%}")
            if fixed:
                cells = [cells[0]] + ["" for _ in args.sparsities[1:]]
                cells = [f"{c:>7}" for c in cells]
            curvature = f"  {pruner.seconds:.1f} s" if pruner.seconds else ""
            print(
                f"{label:<27} {' '.join(cells)}  {np.median(times) * 1e3:>9.0f} ms"
                + curvature
            )


if __name__ == "__main__":
    main()
