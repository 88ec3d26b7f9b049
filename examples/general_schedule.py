"""The survey's general sparse-training schedule, composed from jaxsparse pieces.

Choose a structure (2-wide column blocks, ERK allocation), initialize, train
dense, prune, train with the structure fixed, prune again (the mask is
recomputed from scratch, so weights may also come back, restarting from 0),
and repeat, all in one optax transform and one compiled step
(Hoefler et al. 2021, §2.4.4, Fig. 8).
"""

import jax
import jax.numpy as jnp
import optax

import jaxsparse as js
from jaxsparse.experiments.models import init_mlp, loss_fn, mlp
from jaxsparse.schedules import Phase


def main(steps_per_phase: int = 200) -> js.SparsityReport:
    split = js.data.digits(0)
    params = init_mlp(jax.random.key(0), (64, 128, 64, 10))
    schedule = js.schedules.phases(
        [
            Phase(steps_per_phase, None),  # train dense
            Phase(steps_per_phase, 0.5),  # prune, train with the structure fixed
            Phase(steps_per_phase, 0.75),  # prune / regrow, train fixed
            Phase(1, 0.9),  # final structure, held
        ]
    )
    tx = js.sparsify(
        optax.adam(1e-3),
        lambda params, grads: jax.tree.map(
            lambda w, g: jnp.abs(w) + jnp.abs(g), params, grads
        ),
        schedule,
        granularity=js.Block((1, 2)),
        distribution=js.ERK(),
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(4 * steps_per_phase):
        i = (t * 64) % (len(split.y_train) - 64)
        params, state = step(
            params, state, split.x_train[i : i + 64], split.y_train[i : i + 64]
        )
    report = js.sparsity_report(params)
    accuracy = jnp.mean(jnp.argmax(mlp(params, split.x_test), -1) == split.y_test)
    print(report)
    print(f"test accuracy {float(accuracy):.2%}")
    return report


if __name__ == "__main__":
    main()
