"""Curvature cost, measured side by side in one run.

1. HVP time over gradient time (forward-over-reverse), MLP 784-300-100-10
   and the small conv net of bench_transforms, batch 128, beside the ratio
   of their FLOPs as XLA counts them.
2. Exact Hessian diagonal of a 100,352-parameter leaf (784x128 kernel of an
   MLP 784-128-10, batch 32): by the dense-layer structure, against the
   chunked, vmapped generic ``hessian_diag`` (its reference) and the
   estimate for 100,352 single HVPs (median of single restricted HVPs times
   the count), and compiled peak memory against ``jax.hessian``.
3. WoodFisher block inverse: FLOP rate of the Sherman-Morrison scan as a
   fraction of ``jnp.matmul``'s on the same machine.

Run: python benchmarks/bench_curvature.py
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
from bench_masks import interleaved
from bench_transforms import conv_loss, init_conv

from jaxsparse import curvature as cv
from jaxsparse import fisher
from jaxsparse.experiments.models import init_mlp
from jaxsparse.experiments.models import loss_fn as mlp_loss


def hvp_ratio(name, params, loss, x, y):
    grad = jax.jit(lambda p: jax.grad(loss)(p, x, y))
    v = jax.tree.map(jnp.ones_like, params)
    prod = jax.jit(lambda p, v: cv.hvp(loss, p, v, x, y))
    med = interleaved(
        {"grad": lambda: grad(params), "hvp": lambda: prod(params, v)}, 300
    )
    # XLA's FLOP count: an exact HVP cannot take less time than this ratio
    # where the products dominate.
    flops = [
        fn.lower(*args).compile().cost_analysis()["flops"]
        for fn, args in ((grad, (params,)), (prod, (params, v)))
    ]
    print(
        f"  {name:<22} grad {med['grad']:.3f} ms, hvp {med['hvp']:.3f} ms, "
        f"ratio {med['hvp'] / med['grad']:.2f} (FLOPs {flops[1] / flops[0]:.2f})"
    )


def temp_bytes(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def exact_diagonal():
    key = jax.random.key(0)
    params = init_mlp(key, (784, 128, 10))
    x = jax.random.normal(key, (32, 784))
    y = jax.random.randint(key, (32,), 0, 10)
    leaf = params["dense_0"]["kernel"]
    include = "dense_0/kernel"

    def diag(p):
        return cv.hessian_diag(
            mlp_loss, p, x, y, include=include, chunk_size=512, by_structure=False
        )

    def by_structure(p):
        return cv.hessian_diag(mlp_loss, p, x, y, include=include)

    run = jax.jit(diag)
    generic = jax.block_until_ready(run(params))
    start = time.perf_counter()
    jax.block_until_ready(run(params))
    batched = time.perf_counter() - start
    structured = jax.jit(by_structure)
    fast = jax.block_until_ready(structured(params))
    fast_s = interleaved({"s": lambda: structured(params)}, 20)["s"] / 1e3
    gap = jnp.max(
        jnp.abs(
            fast[include.split("/")[0]]["kernel"]
            - generic[include.split("/")[0]]["kernel"]
        )
    )
    scale = jnp.max(jnp.abs(generic["dense_0"]["kernel"]))
    print(
        f"  by structure (one HVP per output unit, median of 20): {fast_s:.3f} s, "
        f"{batched / fast_s:.0f}x faster; max |difference| / max |diag| "
        f"{float(gap / scale):.1e}"
    )

    def single(p, i):
        def leaf_grad(w):
            q = {**p, "dense_0": {**p["dense_0"], "kernel": w}}
            return jax.grad(mlp_loss)(q, x, y)["dense_0"]["kernel"]

        basis = jnp.zeros(leaf.size).at[i].set(1.0).reshape(leaf.shape)
        return jax.jvp(leaf_grad, (leaf,), (basis,))[1].reshape(-1)[i]

    one = jax.jit(single)
    med = interleaved({"single": lambda: one(params, 17)}, 200)["single"] / 1e3
    print(
        f"  exact diagonal of {leaf.size} entries: batched {batched:.2f} s; "
        f"{leaf.size} single HVPs ~ {med * leaf.size:.1f} s "
        f"(speed-up {med * leaf.size / batched:.1f}x)"
    )

    def full_hessian(w):
        def f(w):
            return mlp_loss(
                {**params, "dense_0": {**params["dense_0"], "kernel": w}}, x, y
            )

        return jax.hessian(f)(w)

    mine = temp_bytes(diag, params)
    theirs = temp_bytes(full_hessian, leaf)
    print(
        f"  compiled memory (temp + output): hessian_diag {mine / 2**20:.1f} MiB, "
        f"jax.hessian of the leaf {theirs / 2**30:.1f} GiB ({theirs / mine:.0f}x)"
    )


def woodbury_rate():
    blocks, n, b = 64, 256, 128
    key = jax.random.key(1)
    grads = {"w": jax.random.normal(key, (n, blocks * b, 1))}
    params = {"w": jnp.zeros((blocks * b, 1))}
    start = fisher.woodbury_init(params, block_size=b, damping=1e-3)

    def fold_with(rank):
        return jax.jit(
            lambda s, g: fisher.woodbury_update(s, g, num_samples=n, rank=rank).blocks[
                "w"
            ]
        )

    fold, fold1 = fold_with(64), fold_with(1)
    m = 1024
    a = jax.random.normal(key, (m, m))
    matmul = jax.jit(lambda a: a @ a)
    med = interleaved(
        {
            "woodbury": lambda: fold(start, grads),
            "rank-one": lambda: fold1(start, grads),
            "matmul": lambda: matmul(a),
        },
        20,
    )
    # The Sherman-Morrison count per gradient and block: a @ v (2 B^2),
    # v . av (2 B), outer update (2 B^2); the blocked form does the same work.
    flops_w = blocks * n * (4 * b * b + 2 * b)
    rate_w = flops_w / (med["woodbury"] / 1e3) / 1e9
    rate_1 = flops_w / (med["rank-one"] / 1e3) / 1e9
    rate_m = 2 * m**3 / (med["matmul"] / 1e3) / 1e9
    print(
        f"  woodbury {blocks} blocks x {b}^2, {n} gradients: {med['woodbury']:.1f} ms, "
        f"{rate_w:.1f} GFLOP/s; matmul {m}^3: {rate_m:.1f} GFLOP/s; "
        f"fraction {rate_w / rate_m:.0%} (rank-64 steps; one gradient per step: "
        f"{med['rank-one']:.1f} ms, {rate_1 / rate_m:.0%})"
    )


def stacked_inverse():
    """Fisher blocks of 640 for an MLP 64-40-20-10 (kernels of 2,560, 800
    and 200 entries: 7 blocks), 1,347 per-example gradients: every leaf's
    blocks in one jitted batch, against one jitted call per leaf run one
    after another (jitting the leaves together as separate batches is what
    deadlocked XLA's 2-thread CPU pool)."""
    key = jax.random.key(2)
    params = init_mlp(key, (64, 40, 20, 10))
    x = jax.random.normal(key, (1347, 64))
    y = jax.random.randint(key, (1347,), 0, 10)
    grads = jax.jit(lambda p: fisher.per_example_grads(mlp_loss, p, x, y))(params)
    kernels = {k: {"kernel": v["kernel"]} for k, v in grads.items()}
    together = jax.jit(
        lambda g: fisher.fisher_inverse(g, block_size=640, damping=1e-4).blocks
    )
    one = jax.jit(
        lambda g: fisher.fisher_inverse(g, block_size=640, damping=1e-4).blocks
    )

    def per_leaf():
        return [one({k: v}) for k, v in kernels.items()]

    med = interleaved({"stacked": lambda: together(kernels), "per leaf": per_leaf}, 20)
    print(
        f"  Fisher inverse, 7 blocks of 640 over 3 leaves: stacked "
        f"{med['stacked']:.1f} ms, per leaf in turn {med['per leaf']:.1f} ms "
        f"({med['per leaf'] / med['stacked']:.2f}x)"
    )


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.machine()}")
    key = jax.random.key(0)
    x = jax.random.normal(key, (128, 784))
    y = jax.random.randint(key, (128,), 0, 10)
    print("HVP / gradient time, batch 128, median of 300:")
    hvp_ratio("MLP 784-300-100-10", init_mlp(key, (784, 300, 100, 10)), mlp_loss, x, y)
    hvp_ratio("conv net 28x28", init_conv(key), conv_loss, x.reshape(128, 28, 28, 1), y)
    print("Exact Hessian diagonal:")
    exact_diagonal()
    print("WoodFisher inverse:")
    woodbury_rate()
    stacked_inverse()


if __name__ == "__main__":
    main()
