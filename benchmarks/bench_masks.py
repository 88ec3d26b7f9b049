"""Mask selection cost, measured side by side in one run.

1. Recomputing a 90 % magnitude mask for an MLP 784-300-100-10 against one
   dense training step of that MLP (batch 128, Adam), against the bit
   bisection the search replaced (its reference), and against selection by
   argsort (what a sort-based pruning library does).
2. Global selection over 10^8 scores (four leaves of 2.5e7), against the
   small selections' search (one probe per pass), the bisection and a full
   sort of the same scores.

Run: python benchmarks/bench_masks.py [--large-repeats N] [--skip-large]
Timings interleave the contenders round by round so drift hits all alike.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jaxsparse as js
from jaxsparse._select import num_pruned, prune_lowest, prune_lowest_by_bisection
from jaxsparse.experiments.models import init_mlp, loss_fn


def _kernels(scores):
    """The leaves ``layerwise_mask`` selects by default (``ndim >= 2``)."""
    return [x for x in jax.tree.leaves(scores) if x.ndim >= 2]


def bisection_layerwise(scores, sparsity):
    """``layerwise_mask`` by the reference bisection (no tree handling)."""
    leaves = _kernels(scores)
    pruned = prune_lowest_by_bisection(
        [[x] for x in leaves], [num_pruned(sparsity, x.size) for x in leaves]
    )
    return [~p[0] for p in pruned]


def bisection_global(scores, sparsity):
    leaves = _kernels(scores)
    total = sum(x.size for x in leaves)
    return [
        ~p
        for p in prune_lowest_by_bisection([leaves], [num_pruned(sparsity, total)])[0]
    ]


def argsort_mask(params, sparsity):
    """Layer-wise selection by sorting every leaf's scores."""
    out = {}
    for name, layer in params.items():
        scores = jnp.abs(layer["kernel"]).ravel()
        k = round(sparsity * scores.size)
        order = jnp.argsort(scores)
        keep = jnp.ones(scores.size, bool).at[order[:k]].set(False)
        out[name] = keep.reshape(layer["kernel"].shape)
    return out


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each zero-arg callable, in interleaved
    rounds so that drift hits all alike.

    A contender's time depends on what ran before it: right after another
    one its caches are cold, which moved side-by-side ratios by 10-15 %
    depending on the order. So each round takes the contenders in a fresh
    random order, and with 100 repeats or more each runs once untimed and
    then five times back to back, as a training loop runs its step.
    """
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    order = random.Random(0)
    names = list(fns)
    block = 5 if repeats >= 100 else 1
    for _ in range(max(1, repeats // block)):
        order.shuffle(names)
        for name in names:
            f = fns[name]
            if block > 1:
                jax.block_until_ready(f())
            for _ in range(block):
                start = time.perf_counter()
                jax.block_until_ready(f())
                times[name].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_mlp(repeats: int) -> None:
    key = jax.random.PRNGKey(0)
    params = init_mlp(key, (784, 300, 100, 10))
    opt = optax.adam(1e-3)
    state = opt.init(params)
    x = jax.random.normal(key, (128, 784))
    y = jax.random.randint(key, (128,), 0, 10)

    @jax.jit
    def train_step(p, s):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    layerwise = jax.jit(lambda p, sp: js.layerwise_mask(js.saliency.magnitude(p), sp))
    global_ = jax.jit(lambda p, sp: js.global_mask(js.saliency.magnitude(p), sp))
    by_sort = jax.jit(lambda p: argsort_mask(p, 0.9))
    by_bisection = jax.jit(
        lambda p, sp: bisection_layerwise(js.saliency.magnitude(p), sp)
    )
    fast = jax.tree.leaves(layerwise(params, 0.9))
    assert all(bool((a == b).all()) for a, b in zip(fast, by_bisection(params, 0.9)))
    sp = jnp.float32(0.9)
    med = interleaved(
        {
            "train step": lambda: train_step(params, state),
            "layer-wise mask (jaxsparse)": lambda: layerwise(params, sp),
            "global mask (jaxsparse)": lambda: global_(params, sp),
            "layer-wise mask (bisection)": lambda: by_bisection(params, sp),
            "layer-wise mask (argsort)": lambda: by_sort(params),
        },
        repeats,
    )
    step = med["train step"]
    print(f"MLP 784-300-100-10, 90% magnitude mask, median of {repeats}:")
    for name, ms in med.items():
        print(f"  {name:<30} {ms:8.3f} ms   {ms / step:6.2f} train steps")


def bench_large(repeats: int) -> None:
    n_leaf = 25_000_000
    key = jax.random.PRNGKey(1)
    scores = {
        f"leaf_{i}": jax.random.normal(
            jax.random.fold_in(key, i), (5000, n_leaf // 5000)
        )
        for i in range(4)
    }
    select = jax.jit(lambda s, sp: js.global_mask(s, sp))
    by_bisection = jax.jit(bisection_global)
    one_probe = jax.jit(
        lambda s, sp: prune_lowest(
            [list(s.values())], [num_pruned(sp, 10**8)], paired=False
        )
    )
    sort_all = jax.jit(
        lambda s: jnp.sort(jnp.concatenate([v.ravel() for v in s.values()]))
    )
    sp = jnp.float32(0.9)
    med = interleaved(
        {
            "global mask (jaxsparse)": lambda: select(scores, sp),
            "one probe per pass": lambda: one_probe(scores, sp),
            "global mask (bisection)": lambda: by_bisection(scores, sp),
            "full sort (jnp.sort)": lambda: sort_all(scores),
        },
        repeats,
    )
    mask = select(scores, sp)
    kept = sum(int(jnp.sum(m)) for m in mask.values())
    assert kept == 10**8 - 90_000_000, kept
    print(f"Global selection over 1e8 scores (4 x 2.5e7), median of {repeats}:")
    for name, ms in med.items():
        print(f"  {name:<30} {ms / 1e3:8.3f} s")
    for other in (
        "full sort (jnp.sort)",
        "global mask (bisection)",
        "one probe per pass",
    ):
        ratio = med[other] / med["global mask (jaxsparse)"]
        print(f"  ratio {other} / jaxsparse: {ratio:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--large-repeats", type=int, default=5)
    p.add_argument("--skip-large", action="store_true")
    args = p.parse_args()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()}"
    )
    bench_mlp(args.repeats)
    if not args.skip_large:
        bench_large(args.large_repeats)


if __name__ == "__main__":
    main()
