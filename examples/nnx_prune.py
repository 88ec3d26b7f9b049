"""Gradual magnitude pruning of a flax nnx model with ``nnx.Optimizer``."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxsparse as js


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def main(steps: int = 300, sparsity: float = 0.8) -> float:
    split = js.data.digits(0)
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(
        optax.adamw(1e-3, weight_decay=1e-4),
        js.prune(
            js.saliency.magnitude,
            js.schedules.polynomial(0.0, sparsity, begin=0, end=steps // 2, every=10),
        ),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)

    for t in range(steps):
        i = (t * 64) % (len(split.y_train) - 64)
        train_step(
            model, optimizer, split.x_train[i : i + 64], split.y_train[i : i + 64]
        )
    state = nnx.state(model, nnx.Param)
    achieved = float(js.sparsity(state))
    accuracy = float(jnp.mean(jnp.argmax(model(split.x_test), -1) == split.y_test))
    print(js.sparsity_report(state))
    print(f"test accuracy {accuracy:.2%}")
    return achieved


if __name__ == "__main__":
    main()
