"""What structured pruning buys: parameters and forward latency of the
dense, masked and shrunk models, side by side in one run.

MLP 784-300-100-10 and a conv net (3x3 convolutions of 32 and 64 channels
with 2x2 average pooling on 28x28x1 inputs, flattened into a dense head;
the flatten ties each channel of the last convolution to a strided set of
the head's rows), batch 256, forward pass only, at 50 % and 75 % of every
hidden layer's units removed by magnitude (the whole unit's L2 norm).
Contenders run round-robin; medians in ms. Also the time to trace the
units and to shrink.

Run: python benchmarks/bench_shrink.py [--repeats N]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
from bench_masks import interleaved

import jaxsparse as js
from jaxsparse.experiments.models import init_mlp, mlp


def init_conv(key):
    k = [jax.random.fold_in(key, i) for i in range(3)]
    return {
        "conv_0": {
            "kernel": jax.random.normal(k[0], (3, 3, 1, 32)) / 3.0,
            "bias": jnp.zeros((32,)),
        },
        "conv_1": {
            "kernel": jax.random.normal(k[1], (3, 3, 32, 64)) / 17.0,
            "bias": jnp.zeros((64,)),
        },
        "head": {
            "kernel": jax.random.normal(k[2], (7 * 7 * 64, 10)) / 56.0,
            "bias": jnp.zeros((10,)),
        },
    }


def conv_net(params, x):
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
    flat = x.reshape(x.shape[0], -1)
    return flat @ params["head"]["kernel"] + params["head"]["bias"][None, :]


def _size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def bench(name, apply, params, x, repeats):
    start = time.perf_counter()
    groups = js.trace(apply, params, x)
    traced = time.perf_counter() - start
    forward = jax.jit(apply)
    print(
        f"\n{name}: {len(groups.sets)} unit sets "
        f"({', '.join(f'{s.name} x{s.size}' for s in groups.sets)}), "
        f"traced in {1e3 * traced:.0f} ms, {_size(params)} params"
    )
    print(
        "| removed | params shrunk | dense ms | masked ms | shrunk ms "
        "| shrunk / dense | shrink ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fraction in (0.5, 0.75):
        mask = js.layerwise_mask(
            js.saliency.magnitude(params), fraction, granularity=groups, reduce="l2"
        )
        masked = js.apply_mask(params, mask)
        start = time.perf_counter()
        small = jax.block_until_ready(js.shrink(masked, groups, mask))
        shrink_ms = 1e3 * (time.perf_counter() - start)
        diff = float(jnp.max(jnp.abs(forward(small, x) - forward(masked, x))))
        assert diff < 1e-4, diff
        med = interleaved(
            {
                "dense": lambda: forward(params, x),
                "masked": lambda m=masked: forward(m, x),
                "shrunk": lambda s=small: forward(s, x),
            },
            repeats,
        )
        print(
            f"| {fraction:.0%} | {_size(small)} | {med['dense']:.3f} | "
            f"{med['masked']:.3f} | {med['shrunk']:.3f} | "
            f"{med['shrunk'] / med['dense']:.2f} | {shrink_ms:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {jax.device_count()} device(s)"
    )
    key = jax.random.key(0)
    bench(
        "MLP 784-300-100-10",
        mlp,
        init_mlp(key, (784, 300, 100, 10)),
        jax.random.normal(key, (256, 784)),
        args.repeats,
    )
    bench(
        "conv net 32-64, 28x28",
        conv_net,
        init_conv(key),
        jax.random.normal(key, (256, 28, 28, 1)),
        args.repeats,
    )


if __name__ == "__main__":
    main()
