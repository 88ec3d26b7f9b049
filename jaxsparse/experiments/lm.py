"""A small decoder-only transformer language model over bytes, trained on
Python's own standard library source (shipped with every Python, read
through :mod:`inspect`; nothing is downloaded).

The model is a pure function of a params dict so that every linear layer
is a 2-D kernel read as ``x @ kernel``: the query, key, value and output
projections and the two MLP matrices of each block, which
:func:`jaxsparse.layerwise.prune_layers` finds and prunes (the embeddings,
positions and output head stay dense, as in SparseGPT).

References:
  Vaswani et al. 2017 (the transformer); Radford et al. 2019 (pre-norm
  decoder); Frantar & Alistarh 2023 (SparseGPT's setting: one-shot pruning
  of every linear layer of a trained language model).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse._types import Params

CORPUS_MODULES = (
    "argparse",
    "collections",
    "dataclasses",
    "functools",
    "inspect",
    "json.decoder",
    "json.encoder",
    "pathlib",
    "textwrap",
    "typing",
    "enum",
    "string",
    "fractions",
    "statistics",
    "shlex",
    "calendar",
    "difflib",
    "heapq",
    "bisect",
    "queue",
)
"""The standard-library modules whose source makes the corpus, in order."""

BLOCK_KERNELS = r"blocks/\d+/(wq|wk|wv|wo|w1|w2)"
"""The linear layers of the blocks (what SparseGPT prunes)."""


def corpus() -> np.ndarray:
    """The source of :data:`CORPUS_MODULES`, concatenated, as ``uint8`` bytes
    (about 1.3 MB on Python 3.11)."""
    parts = []
    for name in CORPUS_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        parts.append(source.encode("utf-8"))
    return np.frombuffer(b"\n".join(parts), np.uint8)


def split_corpus(data: np.ndarray, valid_fraction: float = 0.1):
    """``(train, valid)``: the last ``valid_fraction`` of the bytes held out."""
    cut = int(len(data) * (1 - valid_fraction))
    return data[:cut], data[cut:]


def init_lm(
    key: jax.Array,
    *,
    width: int = 256,
    depth: int = 4,
    heads: int = 4,
    context: int = 128,
    vocab: int = 256,
) -> Params:
    """Parameters of a pre-norm decoder with ``depth`` blocks of ``width``
    (MLP ``4 * width``)."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    keys = iter(jax.random.split(key, 4 + 6 * depth))

    def dense(fan_in, fan_out, scale=1.0):
        w = jax.random.normal(next(keys), (fan_in, fan_out))
        return w * (scale / math.sqrt(fan_in))

    def norm():
        return {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}

    out_scale = 1 / math.sqrt(2 * depth)
    blocks = {
        str(i): {
            "ln1": norm(),
            "wq": dense(width, width),
            "wk": dense(width, width),
            "wv": dense(width, width),
            "wo": dense(width, width, out_scale),
            "ln2": norm(),
            "w1": dense(width, 4 * width),
            "w2": dense(4 * width, width, out_scale),
        }
        for i in range(depth)
    }
    return {
        "embed": jax.random.normal(next(keys), (vocab, width)) * 0.02,
        "position": jax.random.normal(next(keys), (context, width)) * 0.02,
        "blocks": blocks,
        "ln_f": norm(),
        "head": dense(width, vocab),
    }


def _layer_norm(x, p):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"][None, None] + p["bias"][
        None, None
    ]


def lm_apply(params: Params, tokens: jax.Array, *, heads: int = 4) -> jax.Array:
    """Next-byte logits ``(batch, time, vocab)`` for ``tokens (batch, time)``."""
    b, t = tokens.shape
    x = params["embed"][tokens] + params["position"][None, :t]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for i in range(len(params["blocks"])):
        p = params["blocks"][str(i)]
        h = _layer_norm(x, p["ln1"])
        d = h.shape[-1]

        def split(y, d=d):
            return y.reshape(b, t, heads, d // heads)

        q, k, v = split(h @ p["wq"]), split(h @ p["wk"]), split(h @ p["wv"])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
        scores = jnp.where(causal[None, None], scores, -1e9)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
        x = x + attn.reshape(b, t, d) @ p["wo"]
        h = _layer_norm(x, p["ln2"])
        x = x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]
    return _layer_norm(x, params["ln_f"]) @ params["head"]


def lm_loss(params: Params, tokens: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy (nats) over ``tokens (batch, time)``."""
    logits = lm_apply(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:].astype(jnp.int32)
    ).mean()


def windows(data: np.ndarray, context: int, count: int, seed: int) -> np.ndarray:
    """``count`` random windows of ``context + 1`` bytes (input and target)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - context - 1, size=count)
    return np.stack([data[s : s + context + 1] for s in starts]).astype(np.int32)


def perplexity(params: Params, data: np.ndarray, context: int = 128) -> float:
    """``exp`` of the mean next-byte loss over consecutive windows of
    ``data`` (every byte after the first of a window is predicted once)."""
    n = (len(data) - 1) // context
    tokens = np.stack(
        [data[i * context : i * context + context + 1] for i in range(n)]
    ).astype(np.int32)
    loss = jax.jit(lm_loss)
    total = 0.0
    for i in range(0, n, 64):
        chunk = jnp.asarray(tokens[i : i + 64])
        total += float(loss(params, chunk)) * len(chunk)
    return math.exp(total / n)


def train_lm(
    params: Params,
    train: np.ndarray,
    *,
    steps: int,
    batch: int = 32,
    context: int = 128,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> tuple[Params, list[float]]:
    """Adam with a linear warm-up (5 % of the steps) and cosine decay on
    random windows of ``train``; returns the params and the loss every
    step."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 20), steps, learning_rate / 10
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state = tx.init(params)

    @jax.jit
    def step(params, state, tokens):
        value, grads = jax.value_and_grad(lm_loss)(params, tokens)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses: list[Any] = []
    data = windows(train, context, steps * batch, seed).reshape(steps, batch, -1)
    for i in range(steps):
        params, state, value = step(params, state, jnp.asarray(data[i]))
        losses.append(value)
    return params, [float(v) for v in losses]
