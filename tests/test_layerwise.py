"""Tests for jaxsparse/layerwise.py against brute-force least squares: OBC's
every choice and its final weights, SparseGPT against a plain reference of
its sequential rule, N:M exactness, and errors naming the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse import layerwise as lw


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def problem(d_in=8, d_out=5, n=40, seed=0, correlated=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in))
    if correlated:  # correlated inputs make OBS's updates matter
        x = x @ rng.normal(size=(d_in, d_in)) * 0.5 + x
    w = rng.normal(size=(d_in, d_out))
    acc = lw.hessian_update(lw.hessian_init(d_in, jnp.float64), jnp.asarray(x))
    return w, np.asarray(lw.damped(acc, 0.0), np.float64)


def ls_error(h, w, keep):
    """The least layer-wise error with only ``keep`` nonzero, and the weights."""
    keep = np.asarray(keep, bool)
    best = np.zeros_like(w)
    if keep.any():
        hs = h[np.ix_(keep, keep)]
        best[keep] = np.linalg.solve(hs, h[keep] @ w)
    delta = w - best
    return float(delta @ h @ delta), best


def test_hessian_accumulates_over_batches_exactly():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 10, 6))  # (batch, positions, d_in): every row counts
    acc = lw.hessian_init(6)
    for part in (x[:1], x[1:]):
        acc = jax.jit(lw.hessian_update)(acc, jnp.asarray(part))
    rows = x.reshape(-1, 6)
    np.testing.assert_allclose(acc.xtx, rows.T @ rows, rtol=1e-5)
    assert int(acc.count) == 30
    h = np.asarray(lw.damped(acc, 0.1))
    plain = 2 * rows.T @ rows / 30
    np.testing.assert_allclose(
        h, plain + 0.1 * np.mean(np.diag(plain)) * np.eye(6), rtol=1e-5
    )


def test_obc_chooses_as_brute_force_step_by_step_and_ends_at_the_ls_optimum():
    w, h = problem()
    k = 5
    new, mask = lw.obc_prune(jnp.asarray(w), jnp.asarray(h), k / 8)
    for c in range(w.shape[1]):
        # Brute force: at each step remove the weight whose removal leaves
        # the least least-squares error given the support so far.
        keep = np.ones(8, bool)
        for _ in range(k):
            costs = {}
            for q in np.flatnonzero(keep):
                trial = keep.copy()
                trial[q] = False
                costs[q] = ls_error(h, w[:, c], trial)[0]
            keep[min(costs, key=costs.get)] = False
        np.testing.assert_array_equal(np.asarray(mask[:, c]), keep, err_msg=str(c))
        _, best = ls_error(h, w[:, c], keep)
        np.testing.assert_allclose(np.asarray(new[:, c]), best, atol=1e-9)
    assert np.all(np.asarray(new)[~np.asarray(mask)] == 0.0)


def test_obc_n_m_keeps_n_of_every_m_with_the_greedy_constrained_choice():
    w, h = problem(d_in=8, d_out=4, seed=2)
    new, mask = lw.obc_prune(
        jnp.asarray(w), jnp.asarray(h), pattern=js.NM(2, 4, axis=0)
    )
    mask = np.asarray(mask)
    assert np.all(mask.reshape(2, 4, 4).sum(axis=1) == 2)
    for c in range(4):
        keep = np.ones(8, bool)
        for _ in range(4):
            costs = {}
            for q in np.flatnonzero(keep):
                group = slice(q // 4 * 4, q // 4 * 4 + 4)
                if keep[group].sum() == 2:
                    continue
                trial = keep.copy()
                trial[q] = False
                costs[q] = ls_error(h, w[:, c], trial)[0]
            keep[min(costs, key=costs.get)] = False
        np.testing.assert_array_equal(mask[:, c], keep)
        np.testing.assert_allclose(
            np.asarray(new[:, c]), ls_error(h, w[:, c], keep)[1], atol=1e-9
        )


@pytest.mark.parametrize("rows, cols", [(2, 1), (2, 3), (4, 2), (1, 2)])
def test_obc_blocks_choose_as_brute_force_step_by_step(rows, cols):
    w, h = problem(d_in=12, d_out=6, seed=4)
    k = 2  # of 12 / rows input blocks per run of cols outputs
    sparsity = k * rows / 12
    new, mask = lw.obc_prune(
        jnp.asarray(w), jnp.asarray(h), sparsity, pattern=js.Block((rows, cols))
    )
    mask = np.asarray(mask)
    for g in range(6 // cols):
        group = slice(g * cols, (g + 1) * cols)
        keep = np.ones(12, bool)
        for _ in range(k):
            # The cost of a support is the sum over the block's columns.
            costs = {}
            for b in range(12 // rows):
                if not keep[b * rows]:
                    continue
                trial = keep.copy()
                trial[b * rows : (b + 1) * rows] = False
                costs[b] = sum(ls_error(h, w[:, c], trial)[0] for c in range(6)[group])
            b = min(costs, key=costs.get)
            keep[b * rows : (b + 1) * rows] = False
        for c in range(6)[group]:
            np.testing.assert_array_equal(mask[:, c], keep, err_msg=f"column {c}")
            np.testing.assert_allclose(
                np.asarray(new[:, c]), ls_error(h, w[:, c], keep)[1], atol=1e-9
            )
    assert np.all(np.asarray(new)[~mask] == 0.0)


def test_blocks_of_one_weight_are_the_unstructured_methods():
    w, h = problem(d_in=12, d_out=5, seed=5)
    w, h = jnp.asarray(w), jnp.asarray(h)
    for prune, extra in ((lw.obc_prune, {}), (lw.sparsegpt_prune, {"block_size": 4})):
        plain = prune(w, h, 0.5, **extra)
        blocks = prune(w, h, 0.5, pattern=js.Block((1, 1)), **extra)
        np.testing.assert_array_equal(plain[1], blocks[1])
        np.testing.assert_allclose(plain[0], blocks[0], atol=1e-12)


def sparsegpt_reference(w, h, sparsity, block, dims=(1, 1)):
    """SparseGPT's rule written with explicit inverses of the remaining
    inputs' H, no Cholesky, one input at a time; ``dims`` are the
    (inputs, outputs) of a pruned block."""
    w = w.T.copy()  # (d_out, d_in)
    d_in = w.shape[1]
    pruned = np.zeros_like(w, bool)
    for start in range(0, d_in, block):
        stop = min(start + block, d_in)
        hinv = np.linalg.inv(h[start:, start:])
        # Block mask by w^2 / [H_F^-1]_ii with F the inputs from i on.
        score = np.empty((w.shape[0], stop - start))
        for i in range(start, stop):
            hf = np.linalg.inv(h[i:, i:])
            score[:, i - start] = w[:, i] ** 2 / hf[0, 0]
        rows, cols = dims
        go, gi = score.shape[0] // cols, score.shape[1] // rows
        grouped = score.reshape(go, cols, gi, rows).sum(axis=(1, 3))
        count = round(sparsity * grouped.size)
        order = np.argsort(grouped.ravel(), kind="stable")[:count]
        block_mask = np.zeros(grouped.size, bool)
        block_mask[order] = True
        block_mask = block_mask.reshape(go, 1, gi, 1)
        pruned[:, start:stop] = np.broadcast_to(
            block_mask, (go, cols, gi, rows)
        ).reshape(score.shape)
        del hinv
        for i in range(start, stop):
            hf = np.linalg.inv(h[i:, i:])
            err = np.where(pruned[:, i], w[:, i], 0.0)
            w[:, i:] -= np.outer(err / hf[0, 0], hf[0])
            w[:, i] = np.where(pruned[:, i], 0.0, w[:, i])
    return w.T, ~pruned.T


@pytest.mark.parametrize("block", [3, 4, 16])
def test_sparsegpt_matches_its_rule_written_with_explicit_inverses(block):
    w, h = problem(d_in=10, d_out=6, seed=3)
    new, mask = lw.sparsegpt_prune(
        jnp.asarray(w), jnp.asarray(h), 0.5, block_size=block
    )
    want, want_mask = sparsegpt_reference(w, h, 0.5, block)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_allclose(np.asarray(new), want, atol=1e-9)


@pytest.mark.parametrize("dims, block", [((2, 1), 8), ((2, 3), 6), ((1, 2), 4)])
def test_sparsegpt_blocks_match_the_rule_written_with_explicit_inverses(dims, block):
    w, h = problem(d_in=12, d_out=6, seed=6)
    new, mask = lw.sparsegpt_prune(
        jnp.asarray(w), jnp.asarray(h), 0.5, pattern=js.Block(dims), block_size=block
    )
    want, want_mask = sparsegpt_reference(w, h, 0.5, block, dims)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_allclose(np.asarray(new), want, atol=1e-9)
    kept = np.asarray(mask).reshape(12 // dims[0], dims[0], 6 // dims[1], dims[1])
    assert np.all(kept == kept[:, :1, :, :1])  # whole blocks
    assert float(1 - kept.mean()) == 0.5


def features(kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "relu":  # a hidden layer's input: ReLU of a random projection
        return np.maximum(rng.normal(size=(400, 16)) @ rng.normal(size=(16, 32)), 0)
    pixels = js.data.digits(0).x_train.astype(np.float64)
    return pixels[:, rng.permutation(64)[:32]]


@pytest.mark.parametrize("kind", ["relu", "digits"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_error_against_obc_and_magnitude(kind, seed):
    """SparseGPT's documented cost of visiting inputs in order: on layer
    inputs like a network's (ReLU features, digit pixels) its error is
    within 2.5x of OBC's (measured 1.2-2.0x over three seeds, unstructured
    50 %, 2:4 and 50 % of 4x1, 2x2 and 1x4 blocks, lazy blocks of 8) and
    below magnitude pruning's (1.4-3.6x OBC's). On independent inputs (H
    near a multiple of I) all three coincide; on strongly correlated
    synthetic inputs SparseGPT can fall to magnitude's level (measured up to
    3.8x OBC)."""
    x = features(kind, seed)
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(32, 16)))
    acc = lw.hessian_update(lw.hessian_init(32, jnp.float64), jnp.asarray(x))
    h = lw.damped(acc, 0.01)
    for pattern, sparsity in (
        (js.Element(), 0.5),
        (js.NM(2, 4, axis=0), None),
        (js.Block((4, 1)), 0.5),
        (js.Block((2, 2)), 0.5),
    ):
        gpt, gpt_mask = lw.sparsegpt_prune(
            w, h, sparsity, pattern=pattern, block_size=8
        )
        obc, _ = lw.obc_prune(w, h, sparsity, pattern=pattern)
        if isinstance(pattern, js.NM):
            assert np.all(np.asarray(gpt_mask).reshape(8, 4, 16).sum(1) == 2)
            magnitude = pattern.keep(jnp.abs(w))
        else:
            magnitude = js.layerwise_mask(
                {"w": jnp.abs(w)}, 0.5, granularity=pattern, reduce="l2"
            )["w"]
        assert float(1 - np.mean(gpt_mask)) == 0.5
        errors = [
            float(lw.reconstruction_error(w, p, h))
            for p in (obc, gpt, jnp.where(magnitude, w, 0.0))
        ]
        assert errors[0] <= errors[1] <= 2.5 * errors[0], errors
        assert errors[2] > errors[1], errors


def test_nothing_pruned_changes_nothing():
    w, h = problem()
    for prune in (lw.obc_prune, lw.sparsegpt_prune):
        new, mask = prune(jnp.asarray(w), jnp.asarray(h), 0.0)
        np.testing.assert_allclose(np.asarray(new), w, atol=1e-12)
        assert bool(jnp.all(mask))


@pytest.mark.parametrize("prune", [lw.obc_prune, lw.sparsegpt_prune])
def test_bad_input_names_the_layer(prune):
    w, h = problem()
    w, h = jnp.asarray(w), jnp.asarray(h)
    with pytest.raises(ValueError, match="dense_1/kernel: H of shape"):
        prune(w, h[:4, :4], 0.5, path="dense_1/kernel")
    with pytest.raises(ValueError, match="dense_1/kernel: a kernel"):
        prune(w[:, 0], h, 0.5, path="dense_1/kernel")
    with pytest.raises(ValueError, match="use NM\\(2, 4, axis=0\\)"):
        prune(w, h, pattern=js.NM(2, 4), path="dense_1/kernel")
    with pytest.raises(ValueError, match="not divisible by m=3"):
        prune(w, h, pattern=js.NM(1, 3, axis=0), path="dense_1/kernel")
    with pytest.raises(ValueError, match="N:M fixes the sparsity"):
        prune(w, h, 0.5, pattern=js.NM(2, 4, axis=0), path="dense_1/kernel")
    with pytest.raises(
        ValueError, match=r"dense_1/kernel: sparsity must be in \[0, 1\)"
    ):
        prune(w, h, 1.0, path="dense_1/kernel")
    with pytest.raises(ValueError, match="dense_1/kernel: unstructured pruning needs"):
        prune(w, h, path="dense_1/kernel")
    with pytest.raises(TypeError, match="Element\\(\\), NM"):
        prune(w, h, 0.5, pattern=js.Channel(-1), path="dense_1/kernel")
    with pytest.raises(ValueError, match="dense_1/kernel: shape \\(8, 5\\) is not"):
        prune(w, h, 0.5, pattern=js.Block((3, 1)), path="dense_1/kernel")
    with pytest.raises(ValueError, match="dense_1/kernel: a layer's block is"):
        prune(w, h, 0.5, pattern=js.Block((1, 2, 1)), path="dense_1/kernel")
    with pytest.raises(ValueError, match="dense_1/kernel: unstructured pruning"):
        prune(w, h, pattern=js.Block((2, 1)), path="dense_1/kernel")
    # An input that never varies: H is singular without damping.
    x = np.random.default_rng(0).normal(size=(30, 8))
    x[:, 3] = 0.0
    acc = lw.hessian_update(lw.hessian_init(8), jnp.asarray(x))
    with pytest.raises(ValueError, match="dense_1/kernel: H is singular"):
        prune(w, lw.damped(acc, 0.0), 0.5, path="dense_1/kernel")
    new, _ = prune(w, lw.damped(acc, 0.01), 0.5, path="dense_1/kernel")
    assert np.all(np.isfinite(np.asarray(new)))


def test_calibration_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="do not end in the layer's input width 8"):
        lw.hessian_update(lw.hessian_init(8), jnp.ones((4, 7)))


def mlp_and_batches():
    from jaxsparse.experiments.models import init_mlp, mlp

    params = init_mlp(jax.random.key(0), (64, 32, 16, 8))
    x = js.data.digits(0).x_train.astype(np.float64)
    return mlp, params, [jnp.asarray(x[i : i + 200]) for i in range(0, 600, 200)]


def hand_hessian(inputs):
    x = np.concatenate([np.asarray(a) for a in inputs])
    acc = lw.hessian_update(lw.hessian_init(x.shape[1], jnp.float64), jnp.asarray(x))
    return lw.damped(acc, 0.01)


@pytest.mark.parametrize("order", ["sequential", "independent"])
def test_prune_layers_calibrates_each_layer_on_the_inputs_it_reads(order):
    mlp, params, batches = mlp_and_batches()
    new, mask = lw.prune_layers(mlp, params, batches, 0.5, order=order, block_size=16)
    # By hand: each layer's inputs from the model as the order says (the
    # layers before it pruned, or the dense model), then SparseGPT on them.
    want = {k: dict(v) for k, v in params.items()}
    reference = want if order == "sequential" else params
    inputs = list(batches)
    for i in range(3):
        layer = f"dense_{i}"
        kernel, kept = lw.sparsegpt_prune(
            params[layer]["kernel"], hand_hessian(inputs), 0.5, block_size=16
        )
        np.testing.assert_allclose(new[layer]["kernel"], kernel, atol=1e-9)
        np.testing.assert_array_equal(mask[layer]["kernel"], kept)
        assert bool(jnp.all(mask[layer]["bias"]))
        want[layer]["kernel"] = kernel
        inputs = [
            jax.nn.relu(x @ reference[layer]["kernel"] + reference[layer]["bias"][None])
            for x in inputs
        ]
    np.testing.assert_array_equal(params["dense_0"]["kernel"] != 0, True)


@pytest.mark.parametrize("method", ["obc", "sparsegpt"])
def test_prune_layers_removes_whole_blocks(method):
    mlp, params, batches = mlp_and_batches()
    new, mask = lw.prune_layers(
        mlp,
        params,
        batches,
        0.5,
        pattern=js.Block((4, 2)),
        method=method,
        block_size=16,
    )
    for layer in ("dense_0", "dense_1", "dense_2"):
        kept = np.asarray(mask[layer]["kernel"])
        d_in, d_out = kept.shape
        blocks = kept.reshape(d_in // 4, 4, d_out // 2, 2)
        assert np.all(blocks == blocks[:, :1, :, :1]), layer
        assert kept.mean() == 0.5
        assert np.all(np.asarray(new[layer]["kernel"])[~kept] == 0)


def test_prune_layers_n_m_obc_and_a_flax_model():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(64, 32, rngs=rngs)
            self.b = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    _, _, batches = mlp_and_batches()
    batches = [b.astype(jnp.float32) for b in batches]
    new, mask = lw.prune_layers(
        fn, state, batches, pattern=js.NM(2, 4, axis=0), method="obc"
    )
    for layer in ("a", "b"):
        kept = np.asarray(mask[layer]["kernel"][...])
        d_in = kept.shape[0]
        assert np.all(kept.reshape(d_in // 4, 4, -1).sum(1) == 2)
        assert np.all(np.asarray(new[layer]["kernel"][...])[~kept] == 0)
    pruned = nnx.merge(graphdef, new)
    out = jax.jit(lambda m, x: m(x))(pruned, batches[0])
    assert out.shape == (200, 8) and bool(jnp.all(jnp.isfinite(out)))


def test_prune_layers_refuses_bad_input_naming_the_layer():
    mlp, params, batches = mlp_and_batches()
    with pytest.raises(ValueError, match="calibration batch 0 does not fit"):
        lw.prune_layers(mlp, params, [jnp.ones((5, 63))], 0.5)
    with pytest.raises(ValueError, match="calibration batch 1 does not fit"):
        lw.prune_layers(mlp, params, [batches[0], jnp.ones((5, 63))], 0.5)
    with pytest.raises(ValueError, match="dense_0/bias: no layer reads this leaf"):
        lw.prune_layers(mlp, params, batches, 0.5, include="bias")
    # Pixels that are 0 in every digit make layer 0's H singular undamped.
    with pytest.raises(ValueError, match="dense_0/kernel: H is singular"):
        lw.prune_layers(mlp, params, batches, 0.5, damp=0.0)
    with pytest.raises(ValueError, match="method must be"):
        lw.prune_layers(mlp, params, batches, 0.5, method="obs")
    with pytest.raises(ValueError, match="order must be"):
        lw.prune_layers(mlp, params, batches, 0.5, order="random")
    with pytest.raises(ValueError, match="at least one calibration batch"):
        lw.prune_layers(mlp, params, [], 0.5)


def test_conv_rows_are_numpy_im2col_in_the_kernel_view_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3))  # NHWC
    kernel = rng.normal(size=(2, 3, 3, 4))  # HWIO

    def model(p, x):
        return jax.lax.conv_general_dilated(
            x, p["k"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    closed = jax.make_jaxpr(model)({"k": kernel}, x)
    eqn = next(e for e in closed.jaxpr.eqns if e.primitive.name.startswith("conv"))
    rows = np.asarray(lw.conv_rows(jnp.asarray(x), kernel.shape, eqn.params))
    want = [
        x[n, i : i + 2, j : j + 3, :].ravel()  # (H, W, I) order
        for n in range(2)
        for i in range(4)
        for j in range(4)
    ]
    np.testing.assert_allclose(rows, np.stack(want), atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(lw.kernel_view(jnp.asarray(kernel))), kernel.reshape(18, 4)
    )


@pytest.mark.parametrize(
    "dims,strides,padding,dilation",
    [
        (("NHWC", "HWIO", "NHWC"), (2, 1), "SAME", (1, 1)),
        (("NCHW", "OIHW", "NCHW"), (1, 2), "VALID", (2, 1)),
    ],
)
def test_conv_rows_times_the_view_is_the_convolution(dims, strides, padding, dilation):
    rng = np.random.default_rng(1)
    lhs_shape = (2, 7, 6, 3) if dims[0] == "NHWC" else (2, 3, 7, 6)
    k_shape = (3, 2, 3, 5) if dims[1] == "HWIO" else (5, 3, 3, 2)
    x, kernel = jnp.asarray(rng.normal(size=lhs_shape)), rng.normal(size=k_shape)

    def model(p, x):
        return jax.lax.conv_general_dilated(
            x, p["k"], strides, padding, rhs_dilation=dilation, dimension_numbers=dims
        )

    out = model({"k": jnp.asarray(kernel)}, x)
    closed = jax.make_jaxpr(model)({"k": kernel}, x)
    eqn = next(e for e in closed.jaxpr.eqns if e.primitive.name.startswith("conv"))
    rows = lw.conv_rows(x, kernel.shape, eqn.params)
    axis = eqn.params["dimension_numbers"][1][0]
    flat_out = jnp.moveaxis(out, dims[2].index("C"), -1).reshape(-1, 5)
    np.testing.assert_allclose(
        rows @ lw.kernel_view(jnp.asarray(kernel), axis), flat_out, atol=1e-10
    )


def test_prune_layers_prunes_convolutions_in_their_im2col_view():
    from jaxsparse.experiments.models import init_lenet5, lenet5

    params = init_lenet5(jax.random.key(0), 8, 10)
    x = jnp.asarray(js.data.digits(0).x_train[:300], jnp.float64)
    new, mask = lw.prune_layers(
        lenet5,
        params,
        [x],
        include="(conv_1|dense_.)/kernel",
        pattern=js.NM(2, 4, axis=0),
    )
    assert bool(jnp.all(mask["conv_0"]["kernel"]))  # left out by include
    kept = np.asarray(mask["conv_1"]["kernel"])  # (5, 5, 20, 50): 2 of 4 channels
    assert np.all(kept.reshape(5, 5, 5, 4, 50).sum(3) == 2)
    # By hand: SparseGPT on conv_1's view with H from its im2col rows
    # (conv_0 is left alone, so conv_1 reads the dense model's activations).
    closed = jax.make_jaxpr(lenet5)(params, x)
    convs = [e for e in closed.jaxpr.eqns if e.primitive.name.startswith("conv")]
    first = (
        jax.lax.conv_general_dilated(
            x.reshape(-1, 8, 8, 1),
            params["conv_0"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + params["conv_0"]["bias"][None, None, None]
    )
    pooled = jax.lax.reduce_window(
        first, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )
    rows = lw.conv_rows(pooled, (5, 5, 20, 50), convs[1].params)
    acc = lw.hessian_update(lw.hessian_init(500, jnp.float64), rows)
    want, _ = lw.sparsegpt_prune(
        lw.kernel_view(params["conv_1"]["kernel"]),
        lw.damped(acc),
        pattern=js.NM(2, 4, axis=0),
    )
    np.testing.assert_allclose(
        np.asarray(lw.kernel_view(new["conv_1"]["kernel"])), want, atol=1e-5
    )
    with pytest.raises(ValueError, match="conv_0/kernel: 25 inputs are not divisible"):
        lw.prune_layers(lenet5, params, [x], pattern=js.NM(2, 4, axis=0))
