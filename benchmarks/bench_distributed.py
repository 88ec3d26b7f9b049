"""Sparse training over several devices, side by side in one run: the step
time of each transform against the dense step at 1, 2, 4 and 8 devices
(data parallel: params replicated, the batch split over a ``data`` axis),
and the exchange of a gradient in ``shard_map``: dense ``psum`` against
``sparse_allreduce`` at 99 % and 99.9 %, with the bits each device sends.

    python benchmarks/bench_distributed.py [--devices 1 2 4 8] [--repeats 30]

On CPU the devices are virtual (``--xla_force_host_platform_device_count``,
one process per count, so all share the same cores); on a GPU host the
same script runs over the real devices (``--devices`` up to their number).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODEL = (784, 300, 100, 10)  # LeNet-300-100's shape, 266k weights
BATCH = 256


def measure(devices: int, repeats: int) -> dict:
    """Runs in a process of its own with ``devices`` devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxsparse as js
    from jaxsparse import ephemeral as eph
    from jaxsparse.experiments.models import init_mlp, mlp

    available = jax.devices()
    if len(available) < devices:
        raise SystemExit(f"{devices} devices asked, {len(available)} present")
    mesh = jax.make_mesh((devices,), ("data",), devices=available[:devices])
    params = init_mlp(jax.random.key(0), MODEL)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, MODEL[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=BATCH), jnp.int32)
    replicated = NamedSharding(mesh, P())
    by_data = NamedSharding(mesh, P("data"))

    def loss(p, x, y):
        return optax.softmax_cross_entropy(mlp(p, x), jax.nn.one_hot(y, 10)).mean()

    adam = optax.adam(1e-3)
    prune = optax.chain(
        adam, js.prune(js.saliency.magnitude, js.schedules.constant(0.9, at=0))
    )
    rigl = js.rigl(adam, 0.9, every=2, end=10**6, key=0)
    # (transform, the step timed): step 0 of prune and of rigl (every 2)
    # updates the mask, step 1 is an ordinary step.
    transforms = {
        "dense (adam)": (adam, 1),
        "prune 90 %, ordinary step": (prune, 1),
        "prune 90 %, mask update": (prune, 0),
        "rigl 90 %, ordinary step": (rigl, 1),
        "rigl 90 %, drop and grow": (rigl, 2),
        "top-k gradients 99 %": (optax.chain(eph.topk_gradients(0.99), adam), 1),
        "DGC 99.9 %": (
            optax.chain(eph.deep_gradient_compression(0.999), optax.sgd(0.1)),
            1,
        ),
    }

    def timed(fn, *args):
        out = fn(*args)
        jax.block_until_ready(out)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn(*args)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    rows = {}
    with jax.set_mesh(mesh):
        p = jax.device_put(params, replicated)
        xb, yb = jax.device_put(x, by_data), jax.device_put(y, by_data)
        for name, (tx, at) in transforms.items():

            @jax.jit
            def step(p, state, x, y, tx=tx):
                updates, state = tx.update(jax.grad(loss)(p, x, y), state, p)
                return optax.apply_updates(p, updates), state

            state = jax.device_put(tx.init(p), replicated)
            for _ in range(at):
                state = step(p, state, xb, yb)[1]
            rows[name] = timed(step, p, state, xb, yb)

        grads = jax.tree.map(
            lambda a: jnp.asarray(rng.normal(size=(devices, *a.shape)), jnp.float32),
            params,
        )
        grads = jax.device_put(grads, by_data)

        def exchange(reduce):
            def body(g):
                g = jax.tree.map(lambda a: a[0], g)
                return jax.tree.map(lambda a: a[None], reduce(g))

            return jax.jit(
                jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
            )

        ex = {"psum": timed(exchange(lambda g: jax.lax.psum(g, "data")), grads)}
        for s in (0.99, 0.999):
            ex[f"top-k {s:.1%}"] = timed(
                exchange(lambda g, s=s: eph.sparse_allreduce(g, s, "data")), grads
            )
    bits = {
        f"{s:.1%}": eph.exchange_bits(params, s, devices)._asdict()
        for s in (0.99, 0.999)
    }
    return {"devices": devices, "steps": rows, "exchange": ex, "bits": bits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.repeats)))
        return
    import jax

    cpu = jax.default_backend() == "cpu"
    # Real devices (GPU, TPU): only the counts the host has.
    counts = [n for n in args.devices if cpu or n <= jax.device_count()]
    results = []
    for n in counts:
        env = dict(os.environ)
        if cpu:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--repeats",
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"backend {jax.default_backend()}, MLP {MODEL}, batch {BATCH}")
    names = list(results[0]["steps"])
    header = "".join(f"{r['devices']:>12} dev" for r in results)
    print(f"\n{'step time (median), / dense':<26}{header}")
    for name in names:
        cells = []
        for r in results:
            t = r["steps"][name]
            ratio = t / r["steps"]["dense (adam)"]
            cells.append(f"{t * 1e3:>8.2f} ms {ratio:4.2f}")
        print(f"{name:<26}" + "".join(f"{c:>16}" for c in cells))
    print(f"\n{'gradient exchange':<26}{header}")
    for name in results[0]["exchange"]:
        cells = [f"{r['exchange'][name] * 1e3:>8.2f} ms" for r in results]
        print(f"{name:<26}" + "".join(f"{c:>16}" for c in cells))
    print("\nbits each device sends per step (dense ring all-reduce / top-k values")
    print("and int32 indices / the same in COO with ceil(log2 n)-bit indices):")
    for r in results:
        for s, b in r["bits"].items():
            print(
                f"  {r['devices']} devices, {s}: dense {b['dense'] / 8e6:.3f} MB, "
                f"top-k {b['sparse'] / 8e6:.4f} MB "
                f"({b['dense'] / max(b['sparse'], 1):.0f}x less), "
                f"COO {b['coo'] / 8e6:.4f} MB"
            )


if __name__ == "__main__":
    main()
