"""Data-driven unit criteria against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from unit_models import CNN, mlp, mlp_params, randomize_batch_stats

import jaxsparse as js
from jaxsparse import neurons

H1, H2 = "l1/w:1", "l2/w:1"


def _data(n=24, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 5))


def _hidden(p, x):
    h1 = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"][None])
    h2 = jax.nn.sigmoid(h1 @ p["l2"]["w"] + p["l2"]["b"][None])
    return h1, h2


def _view(p, x):
    return neurons.view(mlp, p, x)


def _ce(out, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1)[:, 0]


def test_view_records_what_the_next_layer_reads():
    p, x = mlp_params(), _data()
    v = _view(p, x)
    assert v.readers == {H1: ("l2/w", "l2/b", 1), H2: ("l3/w", "l3/b", 1)}
    out, acts = jax.jit(lambda p, x: v.run(p, x))(p, x)
    h1, h2 = _hidden(p, x)
    np.testing.assert_allclose(out, mlp(p, x), rtol=1e-6)
    np.testing.assert_allclose(acts[H1][:, 0], h1, rtol=1e-6)
    np.testing.assert_allclose(acts[H2][:, 0], h2, rtol=1e-6)


def test_conv_channels_are_read_per_position():
    model = randomize_batch_stats(CNN(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 1))
    v, p, s = neurons.view_module(model, x)
    _, acts = v.run(p, x, state=s)
    inner = nnx.relu(model.bn1(model.c1(nnx.relu(model.bn0(model.stem(x))))))
    np.testing.assert_allclose(
        acts["c1/kernel/value:3"], inner.reshape(2, 36, 6), rtol=1e-5, atol=1e-6
    )


def test_streamed_statistics_equal_numpy_on_all_the_data():
    p, x = mlp_params(), _data(30)
    v = _view(p, x)
    batches = [x[:7], x[7:20], x[20:]]
    stats = neurons.activation_stats(v, p, batches)
    h1 = np.asarray(_hidden(p, x)[0], np.float64)
    s = stats[H1]
    assert float(s.count) == 30
    np.testing.assert_allclose(s.mean, h1.mean(0), atol=1e-6)
    np.testing.assert_allclose(s.variance, h1.var(0), atol=1e-5)
    np.testing.assert_allclose(s.apoz, (h1 == 0).mean(0), atol=1e-7)
    corr = np.corrcoef(h1.T)
    live = h1.var(0) > 0
    np.testing.assert_allclose(
        np.asarray(s.correlation)[np.ix_(live, live)],
        corr[np.ix_(live, live)],
        atol=1e-5,
    )
    diag_only = neurons.activation_stats(v, p, batches, correlation=False)[H1]
    np.testing.assert_allclose(diag_only.variance, s.variance, rtol=1e-6)
    with pytest.raises(ValueError, match="without correlation"):
        _ = diag_only.correlation


def test_folding_a_constant_unit_leaves_the_outputs_unchanged():
    p, x = mlp_params(), _data()
    p["l1"]["w"] = p["l1"]["w"].at[:, 3].set(0.0)
    p["l1"]["b"] = p["l1"]["b"].at[3].set(0.7)
    v = _view(p, x)
    stats = neurons.activation_stats(v, p, [x[:10], x[10:]])
    assert float(stats[H1].variance[3]) < 1e-12
    keep = neurons.select_units({H1: stats[H1].variance}, 1 / 7)
    assert not bool(keep[H1][3]) and int(np.sum(keep[H1])) == 6
    folded, units = neurons.fold_constant_units(v, p, stats, {H1: keep[H1]})
    np.testing.assert_allclose(
        folded["l2"]["b"], p["l2"]["b"] + 0.7 * p["l2"]["w"][3], rtol=1e-6
    )
    np.testing.assert_allclose(mlp(folded, x), mlp(p, x), atol=1e-6)
    small = js.shrink(folded, v.groups, units)
    assert small["l2"]["w"].shape == (6, 6)
    np.testing.assert_allclose(mlp(small, x), mlp(p, x), atol=1e-6)


def test_similarity_saliency_is_srinivas_and_babus_formula():
    p, x = mlp_params(), _data()
    v = _view(p, x)
    s = neurons.similarity_saliency(v, p, H1)
    w = np.concatenate(
        [np.asarray(p["l1"]["w"]).T, np.asarray(p["l1"]["b"])[:, None]], 1
    )
    a2 = np.sum(np.asarray(p["l2"]["w"], np.float64) ** 2, axis=1)
    for i in range(7):
        for j in range(7):
            want = np.inf if i == j else a2[j] * np.sum((w[i] - w[j]) ** 2)
            np.testing.assert_allclose(s[i, j], want, rtol=1e-5)


def test_merging_a_duplicate_unit_is_exact_and_chooses_the_duplicate():
    p, x = mlp_params(), _data()
    p["l1"]["w"] = p["l1"]["w"].at[:, 5].set(p["l1"]["w"][:, 1])
    p["l1"]["b"] = p["l1"]["b"].at[5].set(p["l1"]["b"][1])
    v = _view(p, x)
    merged, units = neurons.similarity_merge(v, p, {H1: 1})
    removed = np.flatnonzero(~np.asarray(units[H1]))
    assert removed.tolist() in ([1], [5])
    kept = 5 if removed[0] == 1 else 1
    np.testing.assert_allclose(
        merged["l2"]["w"][kept], p["l2"]["w"][1] + p["l2"]["w"][5], rtol=1e-6
    )
    np.testing.assert_allclose(mlp(merged, x), mlp(p, x), atol=1e-6)
    small = js.shrink(merged, v.groups, units)
    np.testing.assert_allclose(mlp(small, x), mlp(p, x), atol=1e-6)


def test_correlation_merge_refits_by_least_squares(x64):
    p = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_params())
    x = _data(40).astype(jnp.float64)
    # Unit 4 is twice unit 2 (ReLU is positively homogeneous): perfectly
    # correlated, so the refit absorbs it exactly.
    p["l1"]["w"] = p["l1"]["w"].at[:, 4].set(2.0 * p["l1"]["w"][:, 2])
    p["l1"]["b"] = p["l1"]["b"].at[4].set(2.0 * p["l1"]["b"][2])
    v = _view(p, x)
    stats = neurons.activation_stats(v, p, [x[:15], x[15:]])
    stats = jax.tree.map(lambda a: a.astype(jnp.float64), stats)
    merged, units = neurons.correlation_merge(v, p, stats, {H1: 1})
    assert np.flatnonzero(~np.asarray(units[H1])).tolist() == [2]
    np.testing.assert_allclose(mlp(merged, x), mlp(p, x), atol=1e-8)
    # The refit against numpy's least squares on the activations.
    h1 = np.asarray(_hidden(p, x)[0])
    keep = np.asarray(units[H1])
    design = np.concatenate([h1[:, keep], np.ones((40, 1))], 1)
    target = h1 @ np.asarray(p["l2"]["w"]) + np.asarray(p["l2"]["b"])[None]
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(merged["l2"]["w"][keep], solution[:-1], atol=1e-8)
    np.testing.assert_allclose(merged["l2"]["b"], solution[-1], atol=1e-8)


def test_output_sensitivity_matches_the_jacobian_by_hand():
    p, x = mlp_params(), _data(12)
    v = _view(p, x)
    got = neurons.output_sensitivity(v, p, [x[:5], x[5:]])

    def from_h1(h1):
        h2 = jax.nn.sigmoid(h1 @ p["l2"]["w"] + p["l2"]["b"])
        return h2 @ p["l3"]["w"] + p["l3"]["b"]

    h1, _ = _hidden(p, x)
    jac = jax.vmap(jax.jacobian(from_h1))(h1)  # (n, out, units)
    want = np.sqrt(np.mean(np.sum(np.square(jac), axis=1), axis=0))
    np.testing.assert_allclose(got[H1], want, rtol=1e-5)


def _gated_loss(p, x, y, g1):
    h1 = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"][None])
    h1 = h1 * (g1 if g1.ndim == 2 else g1[None])
    h2 = jax.nn.sigmoid(h1 @ p["l2"]["w"] + p["l2"]["b"][None])
    return jnp.sum(_ce(h2 @ p["l3"]["w"] + p["l3"]["b"][None], y))


def test_taylor_is_molchanovs_mean_absolute_first_order_change():
    p, x = mlp_params(), _data(12)
    y = jnp.arange(12) % 3
    v = _view(p, x)
    got = neurons.taylor_units(v, p, [(x[:4], y[:4]), (x[4:], y[4:])], _ce)
    grads = jax.grad(_gated_loss, argnums=3)(p, x, y, jnp.ones((12, 7)))
    # d L / d gate_nu = a_nu dL/da_nu: the Taylor term of example n.
    np.testing.assert_allclose(got[H1], np.mean(np.abs(grads), axis=0), rtol=1e-5)
    normalized = neurons.taylor_units(v, p, [(x, y)], _ce, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized[H1]), 1.0, rtol=1e-6)


def test_gate_saliency_is_minus_the_gate_derivative():
    p, x = mlp_params(), _data(12)
    y = jnp.arange(12) % 3
    v = _view(p, x)
    got = neurons.gate_saliency(v, p, [(x[:6], y[:6]), (x[6:], y[6:])], _ce)
    want = -jax.grad(_gated_loss, argnums=3)(p, x, y, jnp.ones(7))
    np.testing.assert_allclose(got[H1], want, rtol=1e-5, atol=1e-6)
    # The derivative by central differences, gate by gate.
    eps = 1e-2
    for u in range(7):
        up = _gated_loss(p, x, y, jnp.ones(7).at[u].add(eps))
        down = _gated_loss(p, x, y, jnp.ones(7).at[u].add(-eps))
        np.testing.assert_allclose(-(up - down) / (2 * eps), got[H1][u], atol=2e-3)


def test_jacobian_qr_finds_a_dependent_unit():
    p, x = mlp_params(), _data(10)
    # Unit 6 copies unit 0: its column of the Jacobian of the next layer's
    # pre-activations (with respect to its weights) repeats unit 0's.
    p["l1"]["w"] = p["l1"]["w"].at[:, 6].set(p["l1"]["w"][:, 0])
    p["l1"]["b"] = p["l1"]["b"].at[6].set(p["l1"]["b"][0])
    v = _view(p, x)
    result = neurons.jacobian_qr(v, p, x)[H1]
    assert int(result.rank) == 6
    dependent = np.flatnonzero(~np.asarray(result.independent)).tolist()
    assert dependent in ([0], [6])

    def pre_activation(w2, b2):
        h1 = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"][None])
        return (h1 @ w2 + b2[None])[:, 0]

    jac_w, jac_b = jax.jacobian(pre_activation, argnums=(0, 1))(
        p["l2"]["w"], p["l2"]["b"]
    )
    columns = jac_w[:, :, 0]  # (examples, units): the weights into output 0
    bias = jac_b[:, 0]
    centred = columns - np.outer(bias, bias @ columns) / (bias @ bias)
    _, r, order = jax.scipy.linalg.qr(centred, mode="economic", pivoting=True)
    np.testing.assert_array_equal(result.order, order)
    np.testing.assert_allclose(
        result.diagonal, np.abs(np.diagonal(r)), rtol=1e-4, atol=1e-5
    )
    assert float(result.scores[dependent[0]]) < 1e-5 * float(result.diagonal[0])


def test_folding_needs_one_reader_and_a_bias():
    model = CNN(nnx.Rngs(0))
    x = jnp.ones((2, 6, 6, 1))
    v, p, s = neurons.view_module(model, x)
    stats = neurons.activation_stats(v, p, [x], state=s)
    keep = {"c2/kernel/value:3": jnp.arange(8) > 0}
    with pytest.raises(ValueError, match="read by 2 layers"):
        neurons.fold_constant_units(v, p, stats, keep)
    q = mlp_params()

    def no_bias(p, x):
        return jax.nn.relu(x @ p["l1"]["w"]) @ p["l2"]["w"]

    vb = neurons.view(no_bias, q, _data())
    stats = neurons.activation_stats(vb, q, [_data()])
    with pytest.raises(ValueError, match="no bias"):
        neurons.fold_constant_units(vb, q, stats, {H1: jnp.arange(7) > 0})


def test_merge_counts_are_checked():
    p, x = mlp_params(), _data()
    v = _view(p, x)
    with pytest.raises(ValueError, match="0 to 6"):
        neurons.similarity_merge(v, p, {H1: 7})
    stats = neurons.activation_stats(v, p, [x])
    with pytest.raises(ValueError, match="0 to 6"):
        neurons.correlation_merge(v, p, stats, {H1: -1})
