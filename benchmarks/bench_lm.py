"""SparseGPT's setting on a small language model: train a byte-level
decoder on the standard library's source, prune every linear layer of its
blocks one-shot (no fine-tuning), and compare validation perplexity.

    python benchmarks/bench_lm.py [--width 192] [--depth 4] [--steps 600]

Rows: dense; magnitude 50 % (each layer); SparseGPT 50 %; magnitude 2:4;
SparseGPT 2:4. SparseGPT calibrates on 64 training windows of 128 bytes,
layer after layer in sequence. Then the cost of calibrating and pruning one
layer against its forward pass on the calibration tokens, with the
compiled peak memory, at two widths.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as js
from jaxsparse import layerwise
from jaxsparse.experiments import lm


def magnitude(params, sparsity=None, pattern=None):
    """Each block's linear layers pruned by magnitude (per layer or N:M)."""
    out = jax.tree.map(lambda x: x, params)
    for block in out["blocks"].values():
        for name in ("wq", "wk", "wv", "wo", "w1", "w2"):
            w = block[name]
            if pattern is None:
                keep = js.layerwise_mask({"w": jnp.abs(w)}, sparsity)["w"]
            else:
                keep = pattern.keep(jnp.abs(w))
            block[name] = jnp.where(keep, w, 0.0)
    return out


def timed(fn, *args, repeats=3):
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def layer_cost(width: int, tokens: int) -> None:
    """Calibrate + prune one (width, 4 width) layer against its forward."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(tokens, width)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(width, 4 * width)), jnp.float32)
    forward = jax.jit(lambda x, w: x @ w)
    calibrate = jax.jit(
        lambda x: layerwise.damped(
            layerwise.hessian_update(layerwise.hessian_init(width), x)
        )
    )
    h = calibrate(x)

    def prune():
        return layerwise.sparsegpt_prune(w, h, 0.5)[0]

    t_forward = timed(forward, x, w)
    t_calibrate = timed(calibrate, x)
    t_prune = timed(prune)
    # The jitted core of sparsegpt_prune, whose compiled memory is the cost.
    solve = layerwise._sparsegpt_solve
    fraction = jnp.asarray(0.5, jnp.float32)
    memory = solve.lower(w, h, fraction, js.Element(), 128).compile().memory_analysis()
    peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes
    print(
        f"width {width:>4} (kernel {width}x{4 * width}, {tokens} tokens): forward "
        f"{t_forward * 1e3:7.2f} ms, H {t_calibrate * 1e3:7.2f} ms, SparseGPT "
        f"{t_prune * 1e3:8.1f} ms ({t_prune / t_forward:6.0f}x forward), "
        f"peak {peak / 2**20:6.1f} MiB"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    context = 128
    train, valid = lm.split_corpus(lm.corpus())
    params = lm.init_lm(jax.random.key(0), width=args.width, depth=args.depth)
    size = sum(x.size for x in jax.tree.leaves(params))
    start = time.perf_counter()
    params, losses = lm.train_lm(
        params, train, steps=args.steps, batch=args.batch, context=context
    )
    print(
        f"byte-level decoder, width {args.width}, depth {args.depth}, {size:,} "
        f"params, corpus {len(train):,} + {len(valid):,} bytes; {args.steps} "
        f"steps of {args.batch}x{context} in {time.perf_counter() - start:.0f} s; "
        f"train loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}"
    )
    tenths = np.array_split(np.asarray(losses), 10)
    print(
        "train loss by tenth of training:",
        " ".join(f"{np.mean(t):.3f}" for t in tenths),
    )
    calibration = [jnp.asarray(lm.windows(train, context, 64, 1)[:, :context])]
    nm = js.NM(2, 4, axis=0)
    rows = {"dense": lambda: params}
    rows["magnitude 50 %"] = lambda: magnitude(params, 0.5)
    rows["SparseGPT 50 %"] = lambda: layerwise.prune_layers(
        lm.lm_apply, params, calibration, 0.5, include=lm.BLOCK_KERNELS
    )[0]
    rows["magnitude 2:4"] = lambda: magnitude(params, pattern=nm)
    rows["SparseGPT 2:4"] = lambda: layerwise.prune_layers(
        lm.lm_apply, params, calibration, pattern=nm, include=lm.BLOCK_KERNELS
    )[0]
    print(f"{'model':<16} {'valid perplexity':>16} {'prune time':>11}")
    for name, make in rows.items():
        start = time.perf_counter()
        pruned = jax.block_until_ready(make())
        seconds = time.perf_counter() - start
        print(
            f"{name:<16} {lm.perplexity(pruned, valid, context):>16.3f} "
            f"{seconds:>9.1f} s"
        )
    for width in (128, 256, 512):
        layer_cost(width, 64 * context)


if __name__ == "__main__":
    main()
