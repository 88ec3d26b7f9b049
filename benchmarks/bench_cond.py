"""What an untaken ``lax.cond`` branch costs per call on this backend.

A jitted function doubles a 784x300 array; the variants add a
``lax.cond`` whose branch (never taken here) holds 200 small operations
of one kind, and the same 200 operations run unconditionally. On XLA's
CPU runtime the branch costs time on every call although it does not
run, in step with the buffer allocations it compiles to rather than with
its work: a reduction's combiner adds three, a float sort's comparator
about twenty, an unsigned sort's three, a dot none. This is what RigL's
ordinary step pays for its drop-and-grow branch (``benchmarks/RESULTS.md``).

Run: python benchmarks/bench_cond.py [--repeats N]
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
from bench_masks import interleaved
from jax import lax

N_OPS = 200
KINDS = ("sort", "unsigned sort", "dot", "reduce", "while")


def _chain(kind, acc, i):
    scale = 1.0 + i * 1e-3
    if kind == "sort":  # one sort thunk each, a float comparator
        return jnp.sort(acc * scale, axis=0)
    if kind == "unsigned sort":  # the same thunks, a one-compare comparator
        keys = lax.bitcast_convert_type(acc, jnp.uint32) ^ jnp.uint32(i)
        return lax.bitcast_convert_type(jnp.sort(keys, axis=0), jnp.float32)
    if kind == "dot":
        return jnp.tanh(acc @ acc.T * scale)
    if kind == "reduce":  # a reduction and an elementwise fusion each
        return jnp.tanh(acc * jnp.sum(acc * scale))
    return lax.while_loop(
        lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0]) * scale, c[1] + 1), (acc, 0)
    )[0]


def _variant(kind: str, mode: str):
    def heavy(w):
        acc = w[:4, :4]
        for i in range(N_OPS):
            acc = _chain(kind, acc, i)
        return w + acc[0, 0]

    @jax.jit
    def f(w, flag):
        if mode == "cond":
            w = lax.cond(flag, heavy, lambda w: w, w)
        elif mode == "run":
            w = heavy(w)
        return w * 2.0

    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.machine()}")
    w = jax.random.normal(jax.random.key(0), (784, 300))
    flag = jnp.asarray(False)
    fns = {"no cond": lambda f=_variant("", "none"): f(w, flag)}
    for kind in KINDS:
        for mode in ("cond", "run"):
            fns[f"{kind} {mode}"] = lambda f=_variant(kind, mode): f(w, flag)
    med = interleaved(fns, args.repeats)
    base = med["no cond"]
    print(f"median of {args.repeats}; {N_OPS} operations in the branch:")
    print(f"  {'no cond':<14} {base * 1e3:8.1f} us")
    for kind in KINDS:
        untaken, run = med[f"{kind} cond"], med[f"{kind} run"]
        per_op = (untaken - base) * 1e3 / N_OPS
        print(
            f"  {kind:<13} untaken branch {untaken * 1e3:8.1f} us "
            f"({per_op:5.2f} us per op), run {run * 1e3:8.1f} us"
        )


if __name__ == "__main__":
    main()
