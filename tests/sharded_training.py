"""Run in a subprocess with 8 virtual CPU devices (see test_ephemeral.py):
sparse training (prune and rigl) of the MLP and LeNet-5 with params sharded
over a (data, model) mesh equals the one-device run, with every device's
copy of the mask identical at every step and one compilation. Exits
non-zero on a mismatch."""

import os
import sys

if __name__ == "__main__":  # pytest's doctest collection imports this file too
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js
from jaxsparse.experiments.models import init_lenet5, init_mlp, lenet5, mlp

STEPS = 24


def spec(path, leaf):
    """Dense kernels' output axis and biases over the model axis; the
    convolutions replicated (their batch goes over the data axis)."""
    if "conv" in jax.tree_util.keystr(path):
        return P()
    if leaf.ndim == 1:
        return P("model")
    return P(*([None] * (leaf.ndim - 1)), "model")


def transform(name):
    if name == "prune":
        schedule = js.schedules.polynomial(0.0, 0.9, begin=4, end=16, every=4)
        return optax.chain(optax.adam(1e-3), js.prune(js.saliency.magnitude, schedule))
    return js.rigl(optax.adam(1e-3), 0.9, every=5, end=20, key=0)


def replicas_agree(mask):
    """Every device holding the same part of a mask leaf holds the same bits."""
    for leaf in jax.tree.leaves(mask):
        seen = {}
        for shard in leaf.addressable_shards:
            key = str(shard.index)
            bits = np.asarray(shard.data)
            if key in seen and not np.array_equal(seen[key], bits):
                return False
            seen.setdefault(key, bits)
    return True


def train(apply, params, tx, batches, mesh=None):
    traces = []

    def loss(p, x, y):
        # One-hot labels: a gather of logits sharded over both axes needs an
        # output sharding under Explicit axes; this is the same loss.
        logits = apply(p, x)
        return optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 10)).mean()

    @jax.jit
    def step(params, state, x, y):
        traces.append(1)
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    masks = []
    for x, y in batches:
        if mesh is not None:
            x = jax.device_put(x, NamedSharding(mesh, P("data")))
            y = jax.device_put(y, NamedSharding(mesh, P("data")))
        params, state = step(params, state, x, y)
        mask = js.effective_mask(state)
        if mesh is not None and not replicas_agree(mask):
            raise AssertionError("devices disagree on the mask")
        masks.append(jax.tree.map(np.asarray, mask))
    return jax.tree.map(np.asarray, params), masks, len(traces)


def main(axis_type: str, names: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    split = js.data.digits(0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(split.y_train))[: STEPS * 32].reshape(STEPS, 32)
    batches = [
        (jnp.asarray(split.x_train[i]), jnp.asarray(split.y_train[i])) for i in order
    ]
    models = {
        "mlp": (mlp, init_mlp(jax.random.key(0), (64, 256, 128, 10))),
        "lenet-5": (lenet5, init_lenet5(jax.random.key(0), 8, 10)),
    }
    for model in names:
        apply, params = models[model]
        for name in ("prune", "rigl"):
            tx = transform(name)
            alone, alone_masks, _ = train(apply, params, tx, batches)
            shardings = jax.tree.map_with_path(
                lambda p, a: NamedSharding(mesh, spec(p, a)), params
            )
            with jax.set_mesh(mesh):
                sharded, masks, traces = train(
                    apply, jax.device_put(params, shardings), tx, batches, mesh
                )
            where = f"{axis_type} {model} {name}"
            assert traces == 1, f"{where}: {traces} compilations"
            for t, (a, b) in enumerate(zip(alone_masks, masks)):
                jax.tree.map(
                    lambda a, b, t=t, where=where: np.testing.assert_array_equal(
                        a, b, err_msg=f"{where} step {t}"
                    ),
                    a,
                    b,
                )
            sparsity = float(js.sparsity(sharded))
            assert abs(sparsity - 0.9) < 0.01, f"{where}: sparsity {sparsity}"
            # Sharded matmuls sum in another order: float32 rounding only.
            jax.tree.map(
                lambda a, b, where=where: np.testing.assert_allclose(
                    a, b, rtol=2e-4, atol=2e-5, err_msg=where
                ),
                alone,
                sharded,
            )
            print(f"{where}: masks identical at every step, params equal")
    print(f"{axis_type}: sharded training matches")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["mlp", "lenet-5"])
