"""Test helper: optax's own optimizers mix Python floats with int32 counts,
which the suite's strict dtype promotion rejects. ``standard(tx)`` confines
standard promotion to the optax calls, so the library code around them is
still exercised under strict promotion."""

import jax
import optax


def standard(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its init and update run under standard dtype promotion."""

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None, **extra):
        with jax.numpy_dtype_promotion("standard"):
            return optax.with_extra_args_support(tx).update(
                updates, state, params, **extra
            )

    return optax.GradientTransformationExtraArgs(init, update)
