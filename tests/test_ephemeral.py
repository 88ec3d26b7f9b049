"""Tests for jaxsparse/ephemeral.py against numpy: exactly k winners per
example and where the gradient goes, meProp's unchanged forward pass and
top-k backward pass, ReLU sparsity found in any model's jaxpr, and the
errors for bad k."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from virtual_devices import run_script

import jaxsparse as js
from jaxsparse import ephemeral as eph


def winners(x, k, axis):
    """Brute force: per example, the k largest (ties to the lower index)."""
    moved = np.moveaxis(x, axis, -1)
    order = np.argsort(-moved, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(moved.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return np.moveaxis(mask, -1, axis)


@pytest.mark.parametrize(
    "shape, axis, k",
    [((6, 10), -1, 3), ((6, 10), 0, 2), ((4, 5, 7), 1, 1), ((9,), 0, 9)],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_activations_keep_exactly_k_winners_per_example(shape, axis, k, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    x[..., 0] = x[..., 1] if x.ndim > 0 and shape[-1] > 1 else x[..., 0]  # a tie
    x = jnp.asarray(x, dtype)
    got = jax.jit(eph.topk_activations, static_argnums=1, static_argnames="axis")(
        x, k, axis=axis
    )
    want = winners(np.asarray(x, np.float32), k, axis)
    np.testing.assert_array_equal(np.asarray(got != 0), want & (np.asarray(x) != 0))
    np.testing.assert_array_equal(np.asarray(got)[want], np.asarray(x)[want])
    assert got.dtype == dtype
    assert np.all(np.asarray(want).sum(axis=axis) == k)


def test_gradient_reaches_the_winners_only_or_everything_straight_through():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)), jnp.float32)
    mask = winners(np.asarray(x), 3, -1)
    g = jax.grad(lambda x: jnp.sum(eph.topk_activations(x, 3) * c))(x)
    np.testing.assert_array_equal(np.asarray(g), np.where(mask, c, 0.0))
    g = jax.grad(
        lambda x: jnp.sum(eph.topk_activations(x, 3, straight_through=True) * c)
    )(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))
    out = eph.topk_activations(x, 3, straight_through=True)
    np.testing.assert_array_equal(np.asarray(out), np.where(mask, x, 0.0))


def test_threshold_activations():
    x = jnp.array([[-1.0, 0.2, 0.7, 3.0]])
    np.testing.assert_array_equal(
        eph.threshold_activations(x, 0.5), jnp.array([[0.0, 0.0, 0.7, 3.0]])
    )
    threshold = jnp.asarray(0.1)  # traced under jit
    got = jax.jit(eph.threshold_activations)(x, threshold)
    np.testing.assert_array_equal(got, jnp.array([[0.0, 0.2, 0.7, 3.0]]))
    g = jax.grad(
        lambda x: eph.threshold_activations(x, 0.5, straight_through=True).sum()
    )(x)
    np.testing.assert_array_equal(g, jnp.ones_like(x))


def test_kwinners_is_an_nnx_layer_under_jit():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.kwta = eph.KWinners(fraction=0.25)
            self.b = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(self.kwta(self.a(x)))

    net = Net(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 16)), jnp.float32)
    hidden = eph.activation_sparsity(lambda x: net.kwta(net.a(x)), x)
    assert hidden == {}  # no ReLU there: k-WTA is a selection, not max(x, 0)
    kept = jax.jit(lambda m, x: m.kwta(m.a(x)))(net, x)
    assert np.all(np.sum(np.asarray(kept) != 0, axis=-1) == 8)
    assert jax.jit(lambda m, x: m(x))(net, x).shape == (5, 4)
    assert eph.KWinners(3)(x).shape == x.shape
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        eph.KWinners()
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        eph.KWinners(2, fraction=0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        eph.KWinners(fraction=0.0)


def test_meprop_leaves_the_forward_pass_and_keeps_k_errors_per_example():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(10, 12)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(6, 12)), jnp.float32)

    def loss(w, sparse):
        z = x @ w
        if sparse:
            z = eph.topk_backward(z, 4)
        return 0.5 * jnp.sum((jnp.tanh(z) - target) ** 2)

    assert float(loss(w, True)) == float(loss(w, False))
    np.testing.assert_array_equal(eph.topk_backward(x, 3), x)
    # By hand: the error at z, its 4 largest |entries| per example, and the
    # weight gradient x^T delta from those alone.
    z = np.asarray(x @ w, np.float64)
    delta = (np.tanh(z) - np.asarray(target)) * (1 - np.tanh(z) ** 2)
    order = np.argsort(-np.abs(delta), axis=1, kind="stable")[:, :4]
    kept = np.zeros_like(delta)
    np.put_along_axis(kept, order, np.take_along_axis(delta, order, 1), 1)
    grad = jax.jit(jax.grad(loss), static_argnums=1)(w, True)
    np.testing.assert_allclose(grad, np.asarray(x).T @ kept, rtol=1e-5, atol=1e-5)
    # One example: at most 4 nonzero columns of the weight gradient.
    one = jax.grad(lambda w: eph.topk_backward(x[:1] @ w, 4).sum() ** 2)(w)
    assert np.sum(np.any(np.asarray(one) != 0, axis=0)) == 4


def test_activation_sparsity_finds_every_relu_of_any_model():
    rng = np.random.default_rng(5)
    w1 = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)

    @jax.jit
    def inner(h):
        return jnp.maximum(h @ w2, 0.0)

    def model(x):
        return inner(jax.nn.relu(x @ w1)).sum(-1)

    h1 = np.maximum(np.asarray(x @ w1), 0)
    h2 = np.maximum(h1 @ np.asarray(w2), 0)
    for measure in (
        eph.activation_sparsity,
        jax.jit(eph.activation_sparsity, static_argnums=0),
    ):
        got = measure(model, x)
        assert list(got) == ["relu_0 (20, 16)", "relu_1 (20, 6)"]
        assert float(got["relu_0 (20, 16)"]) == pytest.approx(np.mean(h1 == 0))
        assert float(got["relu_1 (20, 6)"]) == pytest.approx(np.mean(h2 == 0))


@pytest.mark.parametrize("k", [0, 11, 2.5, True])
def test_bad_k_is_refused(k):
    x = jnp.ones((3, 10))
    with pytest.raises(
        ValueError, match=r"topk_activations: k must be an integer in \[1, 10\]"
    ):
        eph.topk_activations(x, k)
    with pytest.raises(
        ValueError, match=r"topk_backward: k must be an integer in \[1, 10\]"
    ):
        jax.grad(lambda x: eph.topk_backward(x, k).sum())(x)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        eph.topk_activations(x, 1, axis=2)


class Pair(NamedTuple):
    w: jax.Array
    b: jax.Array


def trees(kind, rng):
    """Integer-valued gradients: every sum is exact, so conservation is
    tested bitwise."""

    def draw(*shape):
        return jnp.asarray(rng.integers(-50, 50, size=shape), jnp.float32)

    if kind == "dict":
        return {"dense": {"kernel": draw(12, 8), "bias": draw(8)}, "out": draw(8, 3)}
    if kind == "tuple":
        return (draw(10, 6), draw(6), draw(6, 4))
    return Pair(draw(16, 5), draw(5))


@pytest.mark.parametrize("kind", ["dict", "tuple", "namedtuple"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: eph.topk_gradients(0.9),
        lambda: eph.topk_gradients(0.75, distribution=js.Global()),
        lambda: eph.threshold_gradients(60.0),
    ],
    ids=["topk", "topk-global", "threshold"],
)
def test_error_feedback_conserves_every_gradient_exactly(kind, make):
    rng = np.random.default_rng(6)
    tx = make()
    grads = [trees(kind, rng) for _ in range(6)]
    state = tx.init(grads[0])
    step = jax.jit(tx.update)
    total_sent = jax.tree.map(jnp.zeros_like, grads[0])
    for g in grads:
        before = state.residual
        sent, state = step(g, state)
        # What was sent and what is held back add up to what there was.
        jax.tree.map(
            lambda s, r, r0, g: np.testing.assert_array_equal(s + r, r0 + g),
            sent,
            state.residual,
            before,
            g,
        )
        total_sent = jax.tree.map(jnp.add, total_sent, sent)
    jax.tree.map(
        lambda s, r, *gs: np.testing.assert_array_equal(s + r, sum(gs)),
        total_sent,
        state.residual,
        *grads,
    )
    assert int(state.count) == 6


def test_topk_gradients_send_the_largest_of_residual_plus_gradient_per_leaf():
    rng = np.random.default_rng(7)
    tx = eph.topk_gradients(0.9)
    g1, g2 = (
        {
            "w": jnp.asarray(rng.normal(size=(20, 10)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=10), jnp.float32),
        }
        for _ in range(2)
    )
    sent1, state = tx.update(g1, tx.init(g1))
    sent2, state = tx.update(g2, state)
    acc = np.asarray(g2["w"]) + np.where(np.asarray(sent1["w"]) != 0, 0, g1["w"])
    top = np.argsort(-np.abs(acc).ravel(), kind="stable")[:20]
    want = np.zeros(200, np.float32)
    want[top] = acc.ravel()[top]
    np.testing.assert_array_equal(np.asarray(sent2["w"]).ravel(), want)
    np.testing.assert_array_equal(sent2["b"], g2["b"])  # biases go whole
    assert np.sum(np.asarray(sent1["w"]) != 0) == 20
    # Without memory nothing is kept back and each step is its own top-k.
    plain = eph.topk_gradients(0.9, error_feedback=False)
    state = plain.init(g1)
    _, state = plain.update(g1, state)
    sent, state = plain.update(g2, state)
    assert not np.any(np.asarray(state.residual["w"]))
    assert np.sum(np.asarray(sent["w"]) != 0) == 20
    np.testing.assert_array_equal(
        np.asarray(sent["w"]) != 0,
        np.asarray(js.layerwise_mask({"w": jnp.abs(g2["w"])}, 0.9)["w"]),
    )


def dgc_reference(grads, sparsity, momentum):
    """Lin et al.'s Algorithm 1 per leaf in numpy: momentum correction,
    top-k of the accumulated velocity, momentum factor masking."""
    u = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    sent = []
    for g in grads:
        u = momentum * u + g
        v = v + u
        keep = v.size - round(sparsity * v.size)  # the library's count rule
        top = np.argsort(-np.abs(v).ravel(), kind="stable")[:keep]
        mask = np.zeros(v.size, bool)
        mask[top] = True
        mask = mask.reshape(v.shape)
        sent.append(np.where(mask, v, 0.0))
        v = np.where(mask, 0.0, v)
        u = np.where(mask, 0.0, u)
    return sent


def test_deep_gradient_compression_follows_the_paper_step_by_step(x64):
    rng = np.random.default_rng(8)
    grads = [rng.normal(size=(30, 8)) for _ in range(8)]
    tx = eph.deep_gradient_compression(0.95, momentum=0.9)
    state = tx.init({"w": jnp.asarray(grads[0])})
    want = dgc_reference(grads, 0.95, 0.9)
    for g, w in zip(grads, want):
        sent, state = tx.update({"w": jnp.asarray(g)}, state)
        np.testing.assert_allclose(np.asarray(sent["w"]), w, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(sent["w"]) != 0, w != 0)


def test_a_scheduled_sparsity_compiles_once():
    tx = eph.topk_gradients(optax.linear_schedule(0.5, 0.99, 10))
    g = {"w": jnp.asarray(np.random.default_rng(9).normal(size=(40, 25)), jnp.float32)}
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)
        return tx.update(g, state)

    state = tx.init(g)
    counts = []
    for _ in range(12):
        sent, state = step(state)
        counts.append(int(np.sum(np.asarray(sent["w"]) != 0)))
    assert len(traces) == 1
    assert counts[0] == 500 and counts[-1] == 10
    assert counts == sorted(counts, reverse=True)


def test_compressed_training_at_99_percent_reaches_the_dense_accuracy():
    from jaxsparse.experiments.models import accuracy, init_mlp, make_epoch

    split = js.data.digits(0)

    def train(tx):
        params = init_mlp(jax.random.key(0), (64, 256, 128, 10))
        state = tx.init(params)
        epoch = make_epoch(tx, 32)
        for e in range(60):
            params, state = epoch(
                params,
                state,
                split.x_train,
                split.y_train,
                jax.random.fold_in(jax.random.key(1), e),
            )
        return accuracy(params, split.x_test, split.y_test)

    with jax.numpy_dtype_promotion("standard"):
        dense = train(optax.sgd(0.05, momentum=0.9))
        dgc = train(optax.chain(eph.deep_gradient_compression(0.99), optax.sgd(0.05)))
    # Measured: 97.78 % dense, 98.00 % with 1 % of each kernel's entries sent.
    assert dgc >= dense - 0.01, (dense, dgc)


def test_on_support_keeps_adam_on_the_kept_entries_only():
    rng = np.random.default_rng(10)
    params = {
        "w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
        "b": jnp.zeros(32, jnp.float32),
    }
    mask = js.layerwise_mask(js.saliency.magnitude(params), 0.9)
    tx = eph.on_support(optax.adam(1e-2), mask)
    dense = optax.adam(1e-2)
    state, dense_state = tx.init(params), dense.init(params)
    step = jax.jit(tx.update)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(4):
            g = {
                "w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=32), jnp.float32),
            }
            u, state = step(g, state, params)
            masked = js.apply_mask(g, mask)
            want, dense_state = dense.update(masked, dense_state, params)
            np.testing.assert_allclose(
                u["w"], js.apply_mask(want, mask)["w"], rtol=1e-5
            )
            np.testing.assert_allclose(u["b"], want["b"], rtol=1e-5)
            assert not np.any(np.asarray(u["w"])[~np.asarray(mask["w"])])

    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    # Adam's two moments: 205 of 2,048 kernel entries, the 32 bias entries.
    assert nbytes(state) == nbytes(
        optax.adam(1e-2).init({"w": jnp.zeros(205), "b": jnp.zeros(32)})
    )
    assert nbytes(state) < 0.15 * nbytes(dense_state)
    with pytest.raises(ValueError, match="mask"):
        tx.init({"w": params["w"][:3], "b": params["b"]})


def test_compression_errors_name_what_is_wrong():
    with pytest.raises(
        ValueError, match=r"topk_gradients: sparsity must be in \[0, 1\)"
    ):
        eph.topk_gradients(1.0)
    with pytest.raises(ValueError, match=r"deep_gradient_compression: sparsity"):
        eph.deep_gradient_compression(-0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        eph.deep_gradient_compression(0.9, momentum=1.0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        eph.threshold_gradients(-1.0)
    tx = eph.topk_gradients(0.5)
    state = tx.init({"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))})
    with pytest.raises(ValueError, match="b"):
        tx.update({"a": jnp.ones((4, 4)), "b": jnp.ones((4, 3))}, state)
    with pytest.raises(TypeError, match="must be concrete"):
        jax.jit(lambda m: eph.on_support(optax.sgd(1.0), m).init({"w": m}))(
            jnp.ones((2, 2), bool)
        )


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sparse_allreduce_in_shard_map_is_exact(axis_type):
    """8 virtual devices need their own process (XLA fixes the count at
    start): tests/sharded_exchange.py checks the dense all-reduce bitwise
    and the top-k exchange against numpy, in float64."""
    out = run_script("sharded_exchange.py", axis_type)
    assert f"{axis_type}: sparse all-reduce exact" in out


def test_exchange_bits_count_values_and_indices():
    tree = {"w": jnp.zeros((300, 100)), "b": jnp.zeros(100, jnp.bfloat16)}
    bits = eph.exchange_bits(tree, 0.99, 4)
    # w: 300 of 30,000 float32 entries sent; b: 1 of 100 bfloat16 entries.
    assert bits.dense == 2 * 3 * 30_000 * 32 // 4 + 2 * 3 * 100 * 16 // 4
    assert bits.sparse == 3 * (300 * (32 + 32) + 1 * (16 + 32))
    assert bits.coo == 3 * (300 * (32 + 15) + 1 * (16 + 7))
    assert eph.exchange_bits(tree, 0.0, 1).dense == 0
    with pytest.raises(ValueError, match=r"exchange_bits: sparsity must be in"):
        eph.exchange_bits(tree, 1.0, 4)
    with pytest.raises(ValueError, match="devices"):
        eph.exchange_bits(tree, 0.5, 0)
