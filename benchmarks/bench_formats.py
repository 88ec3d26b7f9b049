"""Sparse storage and compute, side by side in one run.

1. CSR encode and decode of a dense 4096x4096 float32 array at 90 %
   sparsity: jaxsparse against ``scipy.sparse.csr_array``.
2. Zero-padded delta encoding of 10^8 slots at 90 % sparsity against
   ``numpy.flatnonzero`` of the same array (the one pass it cannot avoid).
3. Matrix-vector and matrix-matrix (x 128) products with BCOO and BCSR
   against dense ``jnp`` at 50, 90, 95 and 99 % sparsity, jitted, on the
   default device.

Run: python benchmarks/bench_formats.py
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from bench_masks import interleaved

from jaxsparse import formats as F
from jaxsparse import sparse_export as X


def host_median(fn, repeats=7):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def csr_throughput():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 4096)).astype(np.float32)
    x[rng.random(x.shape) < 0.9] = 0
    enc = F.encode(x, "csr")
    ref = scipy.sparse.csr_array(x)
    assert np.array_equal(F.decode(enc), ref.toarray())
    t = interleaved(
        {
            "encode jaxsparse": lambda: F.encode(x, "csr"),
            "encode scipy": lambda: scipy.sparse.csr_array(x),
            "decode jaxsparse": lambda: F.decode(enc),
            "decode scipy": ref.toarray,
        },
        21,
    )
    mb = x.nbytes / 2**20
    print("CSR, 4096x4096 float32 at 90 %, median of 21 interleaved rounds:")
    for name, ms in t.items():
        print(f"  {name:<18} {ms:8.1f} ms  {mb / (ms / 1e3):8.0f} MiB/s")
    encode = t["encode jaxsparse"] / t["encode scipy"]
    decode = t["decode jaxsparse"] / t["decode scipy"]
    print(f"  ratio jaxsparse/scipy: encode {encode:.2f}, decode {decode:.2f}")
    dense_bits = x.size * 32
    print(f"  bits: {enc.bits}, dense {dense_bits} ({enc.bits / dense_bits:.1%})")


def padded_delta_throughput():
    rng = np.random.default_rng(2)
    x = rng.normal(size=10**8).astype(np.float32)
    x[rng.random(x.size, dtype=np.float32) < 0.9] = 0
    t = {
        "encode padded delta": host_median(lambda: F.encode(x, "padded_delta"), 5),
        "numpy.flatnonzero": host_median(lambda: np.flatnonzero(x), 5),
    }
    print("padded delta, 10^8 float32 slots at 90 %, median of 5:")
    for name, ms in t.items():
        print(f"  {name:<20} {ms:8.1f} ms")
    ratio = t["encode padded delta"] / t["numpy.flatnonzero"]
    print(f"  ratio encode / flatnonzero: {ratio:.2f}")


def _time_products(dense, bcoo, bcsr, rhs):
    product = jax.jit(lambda m, r: m @ r)
    return interleaved(
        {
            "dense": lambda: product(dense, rhs),
            "bcoo": lambda: product(bcoo, rhs),
            "bcsr": lambda: product(bcsr, rhs),
        },
        20,
    )


def products():
    rng = np.random.default_rng(1)
    n = 4096
    v = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(n, 128)), jnp.float32)
    where = jax.devices()[0].platform
    print(f"products with a {n}x{n} float32 matrix ({where}), median of 20:")
    print(f"  {'sparsity':>8} {'op':>7} {'dense ms':>9} {'BCOO':>14} {'BCSR':>14}")
    for s in (0.5, 0.9, 0.95, 0.99):
        a = rng.normal(size=(n, n)).astype(np.float32)
        a[rng.random(a.shape) < s] = 0
        dense = jnp.asarray(a)
        bcoo, bcsr = X.to_bcoo(dense), X.to_bcsr(dense)
        for op, rhs in (("matvec", v), ("matmul", b)):
            med = _time_products(dense, bcoo, bcsr, rhs)
            print(
                f"  {s:>8.0%} {op:>7} {med['dense']:>9.2f} "
                f"{med['bcoo']:>7.2f} ({med['dense'] / med['bcoo']:.2f}x) "
                f"{med['bcsr']:>7.2f} ({med['dense'] / med['bcsr']:.2f}x)"
            )


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.machine()}")
    csr_throughput()
    padded_delta_throughput()
    products()


if __name__ == "__main__":
    main()
