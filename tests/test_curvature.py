"""Tests for jaxsparse.curvature against dense references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxsparse import blocks
from jaxsparse import curvature as cv


@pytest.fixture(autouse=True)
def float64_standard():
    """float64 for tight references; flax and optax need standard promotion."""
    with (
        jax.enable_x64(True),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
    ):
        yield


def mlp_model():
    k = jax.random.key(0)
    params = {
        "dense_0": {"kernel": jax.random.normal(k, (5, 4)) / 2, "bias": jnp.zeros(4)},
        "dense_1": {
            "kernel": jax.random.normal(jax.random.fold_in(k, 1), (4, 3)),
            "bias": jnp.full(3, 0.1),
        },
    }

    def logits(p, x):
        h = jnp.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
        return h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]

    return params, logits


def conv_model():
    k = jax.random.key(1)
    params = (
        jax.random.normal(k, (3, 3, 1, 2)) / 3,
        jax.random.normal(k, (2 * 4 * 4, 3)) / 4,
    )

    def logits(p, x):
        h = jax.lax.conv_general_dilated(
            x, p[0], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.tanh(h).reshape(x.shape[0], -1) @ p[1]

    return params, logits


def nnx_model():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def logits(s, x):
        return nnx.merge(graphdef, s)(x)

    return state, logits


MODELS = {"mlp-dict": mlp_model, "conv-tuple": conv_model, "nnx-state": nnx_model}


def data(kind):
    k = jax.random.key(2)
    x = jax.random.normal(k, (6, 4, 4, 1) if kind == "conv-tuple" else (6, 5))
    return x, jnp.arange(6) % 3


def setup(kind):
    params, logits = MODELS[kind]()
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x, y = data(kind)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

    flat, unravel = ravel_pytree(params)
    dense = jax.hessian(lambda f: loss(unravel(f), x, y))(flat)
    return params, logits, loss, x, y, flat, unravel, np.asarray(dense)


def everything(path, leaf):
    return True


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_hvp_equals_dense_hessian_times_v(kind):
    params, _, loss, x, y, flat, unravel, H = setup(kind)
    v = jax.random.normal(jax.random.key(3), flat.shape)
    got = ravel_pytree(
        jax.jit(cv.hvp, static_argnums=0)(loss, params, unravel(v), x, y)
    )[0]
    np.testing.assert_allclose(got, H @ np.asarray(v), rtol=1e-10, atol=1e-12)


def test_hvp_computes_the_primal_once():
    # Forward over reverse adds only tangent products to the gradient's. Even
    # so the exact HVP needs about 1.6x the gradient's FLOPs here (XLA's own
    # count), and the MLP and conv net of bench_curvature 1.64x and 2.26x.
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (256, 64)),
        "w2": jax.random.normal(k2, (64, 10)),
    }
    x = jax.random.normal(k3, (32, 256))

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2

    def grad(p):
        return jax.grad(loss)(p, x)

    def prod(p, v):
        return cv.hvp(loss, p, v, x)

    def dots_and_flops(fn, *args):
        lowered = jax.jit(fn).lower(*args)
        flops = lowered.compile().cost_analysis()["flops"]
        return lowered.as_text().count("stablehlo.dot_general"), flops

    g_dots, g_flops = dots_and_flops(grad, params)
    h_dots, h_flops = dots_and_flops(prod, params, params)
    # The gradient's 5 products, and 6 tangent ones; a recomputed primal
    # would add 5 more.
    assert (g_dots, h_dots) == (5, 11)
    assert 1.4 < h_flops / g_flops < 1.8


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_exact_diagonal(kind, chunk):
    params, _, loss, x, y, *_, H = setup(kind)
    diag = cv.hessian_diag(loss, params, x, y, include=everything, chunk_size=chunk)
    np.testing.assert_allclose(
        ravel_pytree(diag)[0], np.diag(H), rtol=1e-10, atol=1e-13
    )


def _coupled_models():
    k = jax.random.key(4)
    w = {"a": jax.random.normal(k, (5, 4)) / 2, "b": jax.random.normal(k, (4, 3))}

    def per_example(p, x):  # tokens (2 x 3) of a 5-dim input, all independent
        return jnp.tanh(x.reshape(2, 3, 5) @ p["a"]) @ p["b"]

    def batch_norm(p, x):  # training-mode batch norm couples the examples
        z = x @ p["a"]
        z = (z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-3)
        return jnp.tanh(z) @ p["b"]

    def token_mixing(p, x):  # an attention-like mean over tokens
        h = jnp.tanh(x.reshape(2, 3, 5) @ p["a"])
        return (h + h.mean(1, keepdims=True)) @ p["b"]

    def tied(p, x):  # one kernel used twice
        return jnp.tanh(x @ p["a"]) @ p["a"].T[:, :3] + jnp.tanh(x @ p["a"]) @ p["b"]

    return w, {
        "per-example": per_example,
        "batch-norm": batch_norm,
        "token-mixing": token_mixing,
        "tied": tied,
    }


@pytest.mark.parametrize("name", ["per-example", "batch-norm", "token-mixing", "tied"])
def test_diagonal_by_structure_or_fallback_equals_dense_hessian(name):
    """The dense-layer identity where positions are independent, the generic
    path where the probe finds them coupled or the kernel is used twice;
    both against jax.hessian, and the identity in use where it should be."""
    params, models = _coupled_models()
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = jax.random.normal(jax.random.key(5), (6, 5))

    def loss(p, x):
        return jnp.sum(jnp.sin(models[name](p, x)))

    flat, unravel = ravel_pytree(params)
    dense = np.diag(jax.hessian(lambda f: loss(unravel(f), x))(flat))
    for jit in (False, True):
        fn = jax.jit(cv.hessian_diag, static_argnums=0) if jit else cv.hessian_diag
        got = ravel_pytree(fn(loss, params, x))[0]
        np.testing.assert_allclose(got, dense, rtol=1e-10, atol=1e-12)
    # Each kernel taking the identity carries its probe-guarded switch.
    jaxpr = jax.make_jaxpr(lambda p: cv.hessian_diag(loss, p, x))(params)
    switches = sum(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns)
    assert switches == (1 if name == "tied" else 2)


def test_diagonal_by_structure_on_the_generic_path_agrees():
    params, _, loss, x, y, *_ = setup("mlp-dict")
    fast = cv.hessian_diag(loss, params, x, y)
    slow = cv.hessian_diag(loss, params, x, y, by_structure=False)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_diagonal_respects_include():
    params, _, loss, x, y, *_ = setup("mlp-dict")
    diag = cv.hessian_diag(loss, params, x, y)
    assert diag["dense_0"]["bias"] is None
    assert diag["dense_0"]["kernel"].shape == (5, 4)


def test_hessian_block_for_index_set():
    params, _, loss, x, y, *_, H = setup("mlp-dict")
    # ravel_pytree order: dense_0/bias (4), dense_0/kernel (20), dense_1/bias
    # (3), dense_1/kernel (12).
    idx = [0, 3, 7, 19]
    block = cv.hessian_block(
        loss, params, x, y, leaf="dense_0/kernel", indices=idx, chunk_size=3
    )
    np.testing.assert_allclose(
        block, H[np.ix_([4 + i for i in idx], [4 + i for i in idx])], atol=1e-13
    )
    whole = cv.hessian_block(loss, params, x, y, leaf="dense_1/kernel")
    np.testing.assert_allclose(whole, H[27:39, 27:39], atol=1e-13)
    with pytest.raises(ValueError, match="no leaf at path 'nope'"):
        cv.hessian_block(loss, params, x, y, leaf="nope")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_ggn_diagonal_matches_dense_jacobian_form(kind):
    params, logits, _, x, _, flat, unravel, _ = setup(kind)
    got = cv.ggn_diag_softmax_ce(logits, params, x, include=everything, chunk_size=4)
    J = np.asarray(jax.jacobian(lambda f: logits(unravel(f), x))(flat))
    p = np.asarray(jax.nn.softmax(logits(params, x)))
    G = sum(
        J[n].T @ (np.diag(p[n]) - np.outer(p[n], p[n])) @ J[n] for n in range(len(x))
    )
    np.testing.assert_allclose(
        ravel_pytree(got)[0], np.diag(G) / len(x), rtol=1e-10, atol=1e-14
    )


def test_hutchinson_is_unbiased_error_falls_with_samples():
    params, _, loss, x, y, *_, H = setup("mlp-dict")
    truth = np.diag(H)
    errors = []
    for samples in (10, 100, 1000):
        trials = [
            ravel_pytree(
                cv.hutchinson_diag(
                    loss,
                    params,
                    x,
                    y,
                    key=jax.random.key(s),
                    samples=samples,
                    include=everything,
                )
            )[0]
            for s in range(3)
        ]
        errors.append(np.mean([np.abs(t - truth).mean() for t in trials]))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * errors[0]


def test_block_diagonal_and_exact_hessian_inverse():
    params, _, loss, x, y, *_, H = setup("mlp-dict")
    inv = cv.hessian_inverse(loss, params, x, y, damping=0.5)
    ref = np.linalg.inv(H[4:24, 4:24] + 0.5 * np.eye(20))
    np.testing.assert_allclose(inv.blocks["dense_0"]["kernel"][0], ref, rtol=1e-9)
    diag = blocks.block_diagonal(inv, params)
    np.testing.assert_allclose(
        diag["dense_0"]["kernel"].ravel(), np.diag(ref), rtol=1e-9
    )
    small = cv.hessian_inverse(loss, params, x, y, damping=0.5, block_size=5)
    np.testing.assert_allclose(
        small.blocks["dense_0"]["kernel"][1],
        np.linalg.inv(H[9:14, 9:14] + 0.5 * np.eye(5)),
        rtol=1e-9,
    )


def test_cg_inverse_hvp():
    params, _, loss, x, y, flat, unravel, H = setup("mlp-dict")
    v = jax.random.normal(jax.random.key(4), flat.shape)
    got = cv.inverse_hvp_cg(loss, params, unravel(v), x, y, damping=1.0, tol=1e-12)
    ref = np.linalg.solve(H + np.eye(len(flat)), np.asarray(v))
    np.testing.assert_allclose(ravel_pytree(got)[0], ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda p, f, x, y: cv.hessian_diag(f, p, x, y, chunk_size=0),
            "chunk_size must be",
        ),
        (
            lambda p, f, x, y: cv.hvp(f, p, {"dense_0": p["dense_0"]}, x, y),
            "v tree does not match",
        ),
        (
            lambda p, f, x, y: cv.hessian_inverse(f, p, x, y, damping=0.0),
            "damping must be > 0",
        ),
    ],
)
def test_bad_input(call, message):
    params, _, loss, x, y, *_ = setup("mlp-dict")
    with pytest.raises(ValueError, match=message):
        call(params, loss, x, y)


def test_hessian_inverse_with_a_mask_is_the_survivors_inverse():
    params, _, loss, x, y, *_, H = setup("mlp-dict")
    keep = np.arange(20) % 3 != 0
    mask = {
        "dense_0": {"kernel": jnp.asarray(keep.reshape(5, 4)), "bias": None},
        "dense_1": {"kernel": None, "bias": None},
    }
    inv = cv.hessian_inverse(loss, params, x, y, damping=0.5, mask=mask)
    block = H[4:24, 4:24] * keep[:, None] * keep[None, :]
    ref = np.linalg.inv(block + 0.5 * np.eye(20))
    np.testing.assert_allclose(inv.blocks["dense_0"]["kernel"][0], ref, rtol=1e-9)
    # A dense (None) mask leaf keeps the whole block.
    plain = cv.hessian_inverse(loss, params, x, y, damping=0.5)
    np.testing.assert_allclose(
        inv.blocks["dense_1"]["kernel"], plain.blocks["dense_1"]["kernel"], rtol=1e-12
    )
