"""Step time of the sparse-training transforms, side by side in one run.

MLP 784-300-100-10 and a small conv net (two 3x3 conv layers and a dense
head on 28x28x1 inputs), batch 128, Adam, on CPU: a dense step against
``keep_masked``, ``prune`` (magnitude, polynomial, update every 100 steps)
and ``rigl`` (update every 100 steps), each on an ordinary step and on a
mask-update step. Contenders run round-robin; medians in ms.

Run: python benchmarks/bench_transforms.py [--repeats N]
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import optax
from bench_masks import interleaved

import jaxsparse as js
from jaxsparse.experiments.models import init_mlp
from jaxsparse.experiments.models import loss_fn as mlp_loss


def init_conv(key):
    k = [jax.random.fold_in(key, i) for i in range(3)]
    return {
        "conv_0": {
            "kernel": jax.random.normal(k[0], (3, 3, 1, 16)) / 3.0,
            "bias": jnp.zeros((16,)),
        },
        "conv_1": {
            "kernel": jax.random.normal(k[1], (3, 3, 16, 32)) / 12.0,
            "bias": jnp.zeros((32,)),
        },
        "dense": {
            "kernel": jax.random.normal(k[2], (7 * 7 * 32, 10)) / 40.0,
            "bias": jnp.zeros((10,)),
        },
    }


def conv_loss(params, x, y):
    for name in ("conv_0", "conv_1"):
        layer = params[name]
        x = jax.lax.conv_general_dilated(
            x,
            layer["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = jax.nn.relu(x + layer["bias"][None, None, None, :])
        x = (
            jax.lax.reduce_window(
                x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
            )
            / 4
        )
    x = (
        x.reshape(x.shape[0], -1) @ params["dense"]["kernel"]
        + params["dense"]["bias"][None, :]
    )
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def bench(name, params, loss, x, y, repeats):
    mask = js.layerwise_mask(js.saliency.magnitude(params), 0.9)
    schedule = js.schedules.polynomial(0.0, 0.9, begin=0, end=10_000, every=100)
    contenders = {
        "dense": optax.adam(1e-3),
        "keep_masked": optax.chain(optax.adam(1e-3), js.keep_masked(mask)),
        "prune": optax.chain(
            optax.adam(1e-3), js.prune(js.saliency.magnitude, schedule)
        ),
        "rigl": js.rigl(optax.adam(1e-3), 0.9, every=100, end=10_000, key=0),
    }

    def with_count(state, count):
        """The same state with its mask-transform count set to ``count``."""

        def set_count(s):
            if isinstance(s, (js.PruneState, js.SparsifyState)):
                return s._replace(count=jnp.asarray(count, jnp.int32))
            return s

        return jax.tree.map(
            set_count,
            state,
            is_leaf=lambda s: isinstance(s, (js.PruneState, js.SparsifyState)),
        )

    fns = {}
    for label, tx in contenders.items():

        @jax.jit
        def step(p, s, tx=tx):
            g = jax.grad(loss)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = tx.init(params)
        ordinary, update = with_count(state, 150), with_count(state, 200)
        fns[label] = lambda step=step, s=ordinary: step(params, s)
        if label in ("prune", "rigl"):
            fns[f"{label} (mask update)"] = lambda step=step, s=update: step(params, s)
    med = interleaved(fns, repeats)
    dense = med["dense"]
    print(f"{name}, batch 128, Adam, median of {repeats}:")
    for label, ms in med.items():
        print(f"  {label:<22} {ms:8.3f} ms   {ms / dense:6.3f} x dense")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.machine()}")
    key = jax.random.key(0)
    x = jax.random.normal(key, (128, 784))
    y = jax.random.randint(key, (128,), 0, 10)
    bench(
        "MLP 784-300-100-10",
        init_mlp(key, (784, 300, 100, 10)),
        mlp_loss,
        x,
        y,
        args.repeats,
    )
    bench(
        "conv net 28x28 (16, 32 filters, dense head)",
        init_conv(key),
        conv_loss,
        x.reshape(128, 28, 28, 1),
        y,
        args.repeats,
    )


if __name__ == "__main__":
    main()
