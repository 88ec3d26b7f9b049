"""One of two processes of a sparse training run through JAX's own
multi-process runtime (see test_transforms_sharded.py): each process has 2
virtual CPU devices, together a (data, model) mesh of 4; both train the
MLP with prune and rigl on batches split over the data axis and write
their masks and params. ``disagree`` makes process 1 start from another
mask, which the consistency check must refuse before any step.

    python multiprocess_training.py PROCESS_ID PORT OUT_DIR [disagree]
"""

import os
import sys

if __name__ == "__main__":  # pytest's doctest collection imports this file too
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js
from jaxsparse.experiments.models import init_mlp, mlp

STEPS = 12


def main(pid: int, port: str, out: str, disagree: bool) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
    )
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    split = js.data.digits(0)
    order = np.random.default_rng(0).permutation(len(split.y_train))
    params = init_mlp(jax.random.key(0), (64, 128, 64, 10))

    def place(tree, spec_of):
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(
                a.shape,
                NamedSharding(mesh, spec_of(a)),
                lambda i, a=a: np.asarray(a)[i],
            ),
            tree,
        )

    def param_spec(a):
        return P("model") if a.ndim == 1 else P(None, "model")

    def loss(p, x, y):
        return optax.softmax_cross_entropy(mlp(p, x), jax.nn.one_hot(y, 10)).mean()

    transforms = {
        "prune": optax.chain(
            optax.adam(1e-3),
            js.prune(
                js.saliency.magnitude,
                js.schedules.polynomial(0.0, 0.9, begin=2, end=8, every=2),
            ),
        ),
        "rigl": js.rigl(
            optax.adam(1e-3), 0.9, every=3, end=9, key=1 if disagree and pid else 0
        ),
    }
    if disagree:
        del transforms["prune"]  # the check comes before rigl's first step
    results = {}
    with jax.set_mesh(mesh):
        for name, tx in transforms.items():
            p = place(params, param_spec)
            state = tx.init(p)
            try:
                js.masks.check_same_across_processes(js.effective_mask(state))
            except ValueError as err:
                # Stop at once: a clean shutdown of the distributed runtime
                # would wait for the peer's heartbeat to time out.
                print(f"ValueError: {err}", flush=True)
                os._exit(3)
            traces = []

            @jax.jit
            def step(p, state, x, y, tx=tx, traces=traces):
                traces.append(1)
                updates, state = tx.update(jax.grad(loss)(p, x, y), state, p)
                return optax.apply_updates(p, updates), state

            for t in range(STEPS):
                idx = order[t * 32 : (t + 1) * 32]
                x = place(split.x_train[idx], lambda a: P("data"))
                y = place(split.y_train[idx], lambda a: P("data"))
                p, state = step(p, state, x, y)
            assert len(traces) == 1, traces
            gathered = multihost_utils.process_allgather(
                {"params": p, "mask": js.effective_mask(state)}, tiled=True
            )
            for kind, tree in gathered.items():
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                    results[f"{name}/{kind}/{jax.tree_util.keystr(path)}"] = leaf
    np.savez(os.path.join(out, f"process{pid}.npz"), **results)
    print(f"process {pid}: done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], "disagree" in sys.argv[4:])
