"""Ephemeral sparsity on the digits, side by side in one run: ReLU
activation sparsity through training, k-winners-take-all and meProp
against the dense MLP, gradient sparsification with and without error
feedback and DGC at 99 % and 99.9 %, and the optimizer memory kept on a
mask's support.

    python benchmarks/bench_ephemeral.py [--epochs 60] [--seeds 0 1 2]

MLP 64-256-128-10, batch 32; accuracies are the test set's, mean over the
seeds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import ephemeral as eph
from jaxsparse.experiments.models import init_mlp, mlp

SIZES = (64, 256, 128, 10)


def forward(kind: str, k: int):
    """The MLP with its hidden layers changed by ``kind``."""

    def apply(params, x):
        for i in range(3):
            layer = params[f"dense_{i}"]
            z = x @ layer["kernel"] + layer["bias"][None]
            if i == 2:
                return z
            if kind == "meprop":
                z = eph.topk_backward(z, k)
            x = jax.nn.relu(z)
            if kind == "kwta":
                x = eph.topk_activations(x, k)
        return x

    return apply


def train(apply, tx, split, epochs, seed, every=None):
    params = init_mlp(jax.random.key(seed), SIZES)
    state = tx.init(params)
    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    steps = len(y) // 32

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()

    @jax.jit
    def epoch(params, state, key):
        order = jax.random.permutation(key, len(y))[: steps * 32].reshape(steps, 32)

        def step(carry, idx):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p, x[idx], y[idx]), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, state), order)[0]

    trace = []
    for e in range(epochs):
        if every and e % every == 0:
            trace.append(eph.activation_sparsity(mlp, params, x))
        params, state = epoch(
            params, state, jax.random.fold_in(jax.random.key(seed), e)
        )
    if every:
        trace.append(eph.activation_sparsity(mlp, params, x))
    logits = apply(params, jnp.asarray(split.x_test))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(split.y_test)))
    return acc, trace, state


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    start = time.perf_counter()
    splits = {s: js.data.digits(s) for s in args.seeds}
    dense = forward("dense", 0)
    sgd = optax.sgd(0.05, momentum=0.9)
    adam = optax.adam(1e-3)

    print("ReLU activation sparsity of the dense MLP on the training digits")
    _, trace, _ = train(
        dense, adam, splits[args.seeds[0]], args.epochs, args.seeds[0], 10
    )
    names = list(trace[0])
    print(f"{'epoch':>6} " + " ".join(f"{n:>22}" for n in names))
    for i, record in enumerate(trace):
        epoch = min(i * 10, args.epochs)
        print(f"{epoch:>6} " + " ".join(f"{float(record[n]):>22.1%}" for n in names))

    steps_per_epoch = len(splits[args.seeds[0]].y_train) // 32

    def warm_up(count):
        """DGC's exponential warm-up: 75, 93.75, 98.4, 99.6 % in the first
        four epochs, then 99.9 %."""
        epoch = (count // steps_per_epoch).astype(jnp.float32)
        return jnp.minimum(1.0 - 0.25 * 0.25**epoch, 0.999)

    rows = {
        "dense, Adam": (dense, adam),
        "k-WTA, 32 of 256 / 16 of 128": (forward("kwta", 32), adam),
        "meProp, top-16 errors": (forward("meprop", 16), adam),
        "dense, SGD momentum 0.9": (dense, sgd),
        "top-k 99 % + SGD momentum": (
            dense,
            optax.chain(eph.topk_gradients(0.99), sgd),
        ),
        "top-k 99 %, no feedback": (
            dense,
            optax.chain(eph.topk_gradients(0.99, error_feedback=False), sgd),
        ),
        "top-k 99.9 % + SGD momentum": (
            dense,
            optax.chain(eph.topk_gradients(0.999), sgd),
        ),
        "DGC 99 %": (
            dense,
            optax.chain(eph.deep_gradient_compression(0.99), optax.sgd(0.05)),
        ),
        "DGC 99.9 %": (
            dense,
            optax.chain(eph.deep_gradient_compression(0.999), optax.sgd(0.05)),
        ),
        "DGC 99.9 %, warm-up": (
            dense,
            optax.chain(eph.deep_gradient_compression(warm_up), optax.sgd(0.05)),
        ),
        "top-k 99.9 % + SGD, warm-up": (
            dense,
            optax.chain(eph.topk_gradients(warm_up), sgd),
        ),
        "top-k 99 % + Adam": (dense, optax.chain(eph.topk_gradients(0.99), adam)),
        "top-k 99.9 % + Adam": (dense, optax.chain(eph.topk_gradients(0.999), adam)),
    }
    print(f"\n{'method':<32} {'test accuracy':>14}  seeds {args.seeds}")
    for name, (apply, tx) in rows.items():
        accs = [train(apply, tx, splits[s], args.epochs, s)[0] for s in args.seeds]
        print(f"{name:<32} {np.mean(accs):>13.2%} ± {np.std(accs, ddof=1):.2%}")

    print(
        "\nAdam's state on a fixed mask's support "
        "(LeNet-300-100, 266,200 kernel weights)"
    )
    params = init_mlp(jax.random.key(0), (784, 300, 100, 10))
    full = nbytes(optax.adam(1e-3).init(params))
    for s in (0.9, 0.99):
        mask = js.layerwise_mask(js.saliency.magnitude(params), s)
        kept = nbytes(eph.on_support(optax.adam(1e-3), mask).init(params))
        print(
            f"  {s:.0%} sparse: {kept / 2**20:.2f} MiB against "
            f"{full / 2**20:.2f} MiB ({full / kept:.1f}x less)"
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
