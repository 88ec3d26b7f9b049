"""Run in a subprocess with 8 virtual CPU devices (see test_masks_sharded.py):
selection over sharded params must equal the unsharded selection exactly,
and masks must keep the params' sharding. Exits non-zero on a mismatch."""

import functools
import os
import sys

if __name__ == "__main__":  # pytest's doctest collection imports this file too
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import jaxsparse as js
from jaxsparse._select import prune_lowest, prune_lowest_by_bisection


def main(axis_type: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    rng = np.random.default_rng(0)
    specs = {
        "a": ((64, 48), PartitionSpec("data", "model")),
        "b": ((40, 16), PartitionSpec(None, "model")),
        "c": ((8, 6, 4, 4), PartitionSpec("data")),
        "d": ((30, 12), PartitionSpec()),
    }
    host = {}
    for name, (shape, _) in specs.items():
        values = rng.normal(size=shape).astype(np.float32)
        values.ravel()[::7] = 0.5  # ties across shards
        host[name] = values
    plain = {k: jnp.asarray(v) for k, v in host.items()}
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, specs[k][1])) for k, v in host.items()
    }
    cases = {
        "global": lambda s, sp: js.global_mask(s, sp),
        "global-floor": lambda s, sp: js.global_mask(s, sp, min_density=0.2),
        "layerwise": lambda s, sp: js.layerwise_mask(s, sp),
        "erk": lambda s, sp: js.topk_mask(s, sp, distribution=js.ERK()),
        "channel": lambda s, sp: js.global_mask(s, sp, granularity=js.Channel()),
        "nm": lambda s, sp: js.layerwise_mask(s, None, granularity=js.NM(2, 4)),
    }
    with jax.set_mesh(mesh):
        for name, select in cases.items():
            f = jax.jit(select)
            for sparsity in (0.5, 0.9):
                sp = jnp.float32(sparsity)
                want = f(js.saliency.magnitude(plain), sp)
                got = f(js.saliency.magnitude(sharded), sp)
                for leaf in host:
                    np.testing.assert_array_equal(
                        np.asarray(got[leaf]),
                        np.asarray(want[leaf]),
                        err_msg=f"{axis_type} {name} {leaf} {sparsity}",
                    )
                    if axis_type == "Auto" and name == "channel":
                        continue  # group masks: XLA picks the layout under Auto
                    assert got[leaf].sharding.is_equivalent_to(
                        sharded[leaf].sharding, got[leaf].ndim
                    ), (axis_type, name, leaf, got[leaf].sharding)
            applied = jax.jit(js.apply_mask)(sharded, got)
            assert applied["a"].sharding.is_equivalent_to(sharded["a"].sharding, 2)
        # Both searches, grouped globally and per leaf (the replicated leaf
        # may finish by gathering; the sharded ones keep searching).
        for paired in (False, True):
            for groups in ([list(host)], [[k] for k in host]):
                counts = [sum(host[k].size for k in g) * 9 // 10 for g in groups]

                def select(tree, fn, groups=groups, counts=counts):
                    return fn([[tree[k] for k in g] for g in groups], counts)

                search = functools.partial(prune_lowest, paired=paired)
                got = jax.jit(select, static_argnums=1)(sharded, search)
                want = jax.jit(select, static_argnums=1)(
                    plain, prune_lowest_by_bisection
                )
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                    np.testing.assert_array_equal(
                        np.asarray(a), np.asarray(b), err_msg=f"{axis_type} {paired}"
                    )
    print(f"{axis_type}: sharded selection identical")


if __name__ == "__main__":
    main(sys.argv[1])
