"""Run in a subprocess with 8 virtual CPU devices (see test_ephemeral.py):
sparse_allreduce inside shard_map against psum and a numpy sum of each
device's top-k, in float64, on Explicit and Auto meshes. Exits non-zero on
a mismatch."""

import os
import sys

if __name__ == "__main__":  # pytest's doctest collection imports this file too
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsparse import ephemeral as eph


def device_topk(x, sparsity):
    """Numpy: each device's leaf with all but its kept entries zeroed."""
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    keep = max(1, n - round(sparsity * n))
    out = np.zeros_like(flat)
    for d in range(flat.shape[0]):
        top = np.argsort(-np.abs(flat[d]), kind="stable")[:keep]
        out[d, top] = flat[d, top]
    return out.reshape(x.shape)


def main(axis_type: str) -> None:
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    rng = np.random.default_rng(0)
    host = {"w": rng.normal(size=(8, 33, 17)), "b": rng.normal(size=(8, 17))}
    grads = jax.device_put(host, NamedSharding(mesh, P("data")))

    def run(fn):
        def body(g):
            out = fn(jax.tree.map(lambda x: x[0], g))
            return jax.tree.map(lambda x: x[None], out)

        f = jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        with jax.set_mesh(mesh):
            return jax.tree.map(np.asarray, jax.jit(f)(grads))

    dense = run(lambda g: jax.lax.psum(g, "data"))
    full = run(lambda g: eph.sparse_allreduce(g, 0.0, "data"))
    for leaf in host:
        # Bitwise: the same sum as the dense all-reduce, on every device.
        np.testing.assert_array_equal(full[leaf], dense[leaf], err_msg=leaf)
    for sparsity in (0.9, 0.99):
        got = run(lambda g, s=sparsity: eph.sparse_allreduce(g, s, "data"))
        mean = run(lambda g, s=sparsity: eph.sparse_allreduce(g, s, "data", mean=True))
        for leaf, x in host.items():
            want = device_topk(x, sparsity).sum(axis=0)
            for d in range(8):
                np.testing.assert_allclose(got[leaf][d], want, rtol=1e-13, atol=1e-13)
                np.testing.assert_array_equal(got[leaf][d], got[leaf][0])
                np.testing.assert_allclose(mean[leaf][d], want / 8, rtol=1e-13)
    try:
        run(lambda g: eph.sparse_allreduce(g, 0.5, "model"))
    except ValueError as err:
        assert "'model' is not a mesh axis" in str(err), err
    else:
        raise AssertionError("an unknown axis name was accepted")
    print(f"{axis_type}: sparse all-reduce exact")


if __name__ == "__main__":
    main(sys.argv[1])
