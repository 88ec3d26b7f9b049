"""Parameter trees of every kind the library must accept."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx


class Layer(NamedTuple):
    kernel: object
    bias: object


def _arrays(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


SHAPES = [(6, 5), (5,), (3, 3, 2, 4), (4,)]


def make_tree(kind: str, dtype=jnp.float32, seed: int = 0):
    a, b, c, d = _arrays(SHAPES, dtype, seed)
    if kind == "dict":
        return {"dense": {"kernel": a, "bias": b}, "conv": {"kernel": c, "bias": d}}
    if kind == "tuple":
        return ((a, b), [c, d])
    if kind == "namedtuple":
        return (Layer(a, b), Layer(c, d))
    if kind == "linen":
        return {
            "params": {
                "Dense_0": {"kernel": a, "bias": b},
                "Conv_0": {"kernel": c, "bias": d},
            }
        }
    if kind == "nnx":
        state = nnx.State(
            {
                "dense": {"kernel": nnx.Param(a), "bias": nnx.Param(b)},
                "conv": {"kernel": nnx.Param(c), "bias": nnx.Param(d)},
            }
        )
        return state
    raise ValueError(kind)


KINDS = ["dict", "tuple", "namedtuple", "linen", "nnx"]
