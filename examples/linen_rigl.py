"""RigL on a flax linen model trained with ``flax.training.train_state.TrainState``."""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

import jaxsparse as js


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def main(steps: int = 300, sparsity: float = 0.8) -> float:
    split = js.data.digits(0)
    model = MLP()
    params = model.init(jax.random.key(0), split.x_train[:1])["params"]
    tx = js.rigl(optax.adam(1e-3), sparsity, every=25, end=int(0.75 * steps), key=0)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def train_step(state, x, y):
        def loss(params):
            logits = state.apply_fn({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    for t in range(steps):
        i = (t * 64) % (len(split.y_train) - 64)
        state = train_step(state, split.x_train[i : i + 64], split.y_train[i : i + 64])
    achieved = float(js.sparsity(state.params))
    logits = model.apply({"params": state.params}, split.x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == split.y_test))
    print(js.sparsity_report(state.params))
    print(f"test accuracy {accuracy:.2%}")
    return achieved


if __name__ == "__main__":
    main()
