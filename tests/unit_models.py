"""Small models of every kind whose units the tests trace, with the units
each one has written out by hand: ``{set name: [(path, axis, stride)]}``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HEAD_DIM = 4


def mlp_params(seed=0):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "l1": {"w": arr(5, 7), "b": arr(7)},
        "l2": {"w": arr(7, 6), "b": arr(6)},
        "l3": {"w": arr(6, 3), "b": arr(3)},
    }


def mlp(p, x):
    h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"][None])
    h = jax.nn.sigmoid(h @ p["l2"]["w"] + p["l2"]["b"][None])
    return h @ p["l3"]["w"] + p["l3"]["b"][None]


MLP_UNITS = {
    "l1/w:1": [("l1/b", 0, 1), ("l1/w", 1, 1), ("l2/w", 0, 1)],
    "l2/w:1": [("l2/b", 0, 1), ("l2/w", 1, 1), ("l3/w", 0, 1)],
}


def mha_params(seed=0, d=8):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=(d, d)), jnp.float32) for k in "qkvo"}


def mha(p, x):
    """Heads made by reshaping, their count read from the kernels' width."""
    b, n, _ = x.shape

    def heads(w):
        return (x @ w).reshape(b, n, -1, HEAD_DIM)

    q, k, v = heads(p["q"]), heads(p["k"]), heads(p["v"])
    logits = jnp.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(HEAD_DIM)
    out = jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(logits, -1), v)
    return out.reshape(b, n, -1) @ p["o"]


MHA_UNITS = {
    "k:1": [
        ("k", 1, HEAD_DIM),
        ("o", 0, HEAD_DIM),
        ("q", 1, HEAD_DIM),
        ("v", 1, HEAD_DIM),
    ],
}


class CNN(nnx.Module):
    """A stem, a residual block with batch norm, global pooling, a head."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.c1 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
        self.c2 = nnx.Conv(6, 8, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.stem(x)))
        r = nnx.relu(self.bn1(self.c1(h)))
        h = nnx.relu(h + self.bn2(self.c2(r)))
        return self.head(h.mean(axis=(1, 2)))


def _v(path):
    return f"{path}/value"


CNN_UNITS = {
    "c2/kernel/value:3": [
        (_v("bn0/bias"), 0, 1),
        (_v("bn0/scale"), 0, 1),
        (_v("bn2/bias"), 0, 1),
        (_v("bn2/scale"), 0, 1),
        (_v("c1/kernel"), 2, 1),
        (_v("c2/bias"), 0, 1),
        (_v("c2/kernel"), 3, 1),
        (_v("head/kernel"), 0, 1),
        (_v("stem/bias"), 0, 1),
        (_v("stem/kernel"), 3, 1),
    ],
    "c1/kernel/value:3": [
        (_v("bn1/bias"), 0, 1),
        (_v("bn1/scale"), 0, 1),
        (_v("c1/bias"), 0, 1),
        (_v("c1/kernel"), 3, 1),
        (_v("c2/kernel"), 2, 1),
    ],
}


class Block(nnx.Module):
    """A pre-norm transformer block: attention and an MLP, both residual."""

    def __init__(self, d, heads, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=d, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


BLOCK_UNITS = {
    "attn/key/kernel/value:1": [
        (_v("attn/key/bias"), 0, 1),
        (_v("attn/key/kernel"), 1, 1),
        (_v("attn/out/kernel"), 0, 1),
        (_v("attn/query/bias"), 0, 1),
        (_v("attn/query/kernel"), 1, 1),
        (_v("attn/value/bias"), 0, 1),
        (_v("attn/value/kernel"), 1, 1),
    ],
    "fc1/kernel/value:1": [
        (_v("fc1/bias"), 0, 1),
        (_v("fc1/kernel"), 1, 1),
        (_v("fc2/kernel"), 0, 1),
    ],
}


class LinenCNN(nn.Module):
    width: int = 6
    inner: int = 5

    @nn.compact
    def __call__(self, x):
        stem = nn.Conv(self.width, (3, 3))(x)
        h = nn.relu(nn.BatchNorm(use_running_average=True)(stem))
        r = nn.relu(nn.Conv(self.inner, (3, 3))(h))
        h = nn.relu(h + nn.Conv(self.width, (3, 3))(r))
        return nn.Dense(4)(h.mean(axis=(1, 2)))


LINEN_UNITS = {
    "Conv_0/kernel:3": [
        ("BatchNorm_0/bias", 0, 1),
        ("BatchNorm_0/scale", 0, 1),
        ("Conv_0/bias", 0, 1),
        ("Conv_0/kernel", 3, 1),
        ("Conv_1/kernel", 2, 1),
        ("Conv_2/bias", 0, 1),
        ("Conv_2/kernel", 3, 1),
        ("Dense_0/kernel", 0, 1),
    ],
    "Conv_1/kernel:3": [
        ("Conv_1/bias", 0, 1),
        ("Conv_1/kernel", 3, 1),
        ("Conv_2/kernel", 2, 1),
    ],
}


def randomize_batch_stats(model, seed=0):
    """Non-trivial running statistics, so that slicing them is tested."""
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            n = module.mean.get_value().shape
            module.mean.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
            module.var.set_value(
                jnp.asarray(rng.uniform(0.5, 2.0, size=n), jnp.float32)
            )
            module.bias.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
    return model


def linen_cnn(seed=0, **widths):
    """``(apply(params, state, x), params, state, x)`` for the linen CNN."""
    model = LinenCNN(**widths)
    x = jax.random.normal(jax.random.key(seed + 1), (2, 6, 6, 1))
    variables = model.init(jax.random.key(seed), x)
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 2.0, size=a.shape), jnp.float32),
        variables["batch_stats"],
    )

    def apply(params, state, x):
        return model.apply({"params": params, **state}, x)

    return apply, variables["params"], {"batch_stats": stats}, x


def flat_cnn_params(seed=0):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(
            rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32
        )

    return {
        "conv": {"kernel": arr(3, 3, 1, 4), "bias": arr(4)},
        "head": {"kernel": arr(3 * 3 * 4, 5), "bias": arr(5)},
    }


def flat_cnn(p, x):
    """A convolution, 2x2 average pooling, and a flatten into the head: the
    head's rows of one channel are every 4th (the channel is the fastest)."""
    h = jax.lax.conv_general_dilated(
        x,
        p["conv"]["kernel"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    h = jax.nn.relu(h + p["conv"]["bias"][None, None, None, :])
    h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h.reshape(h.shape[0], -1) @ p["head"]["kernel"] + p["head"]["bias"][None]


FLAT_CNN_UNITS = {
    "conv/kernel:3": [
        ("conv/bias", 0, 1),
        ("conv/kernel", 3, 1),
        ("head/kernel", 0, 1),
    ],
}
