"""Dependency groups traced from models, selection by units, and shrink."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from optax_helpers import standard
from unit_models import (
    BLOCK_UNITS,
    CNN,
    CNN_UNITS,
    FLAT_CNN_UNITS,
    LINEN_UNITS,
    MHA_UNITS,
    MLP_UNITS,
    Block,
    flat_cnn,
    flat_cnn_params,
    linen_cnn,
    mha,
    mha_params,
    mlp,
    mlp_params,
    randomize_batch_stats,
)

import jaxsparse as js


def _spec(groups):
    return {
        s.name: sorted((m.path, m.axis, m.stride) for m in s.members if not m.state)
        for s in groups.sets
    }


def _quiet_trace_module(model, *args):
    with warnings.catch_warnings():
        # nnx attention refuses a value width other than the query's.
        warnings.simplefilter("ignore", UserWarning)
        return js.trace_module(model, *args)


class _Case:
    """A model as (apply, params, state, x) with its traced groups."""

    def __init__(self, name):
        key = jax.random.key(1)
        self.name = name
        self.state = None
        self.module = None
        if name == "mlp":
            self.params, self.x = mlp_params(), jax.random.normal(key, (4, 5))
            self.apply = mlp
            self.groups = js.trace(mlp, self.params, self.x)
        elif name == "mha":
            self.params, self.x = mha_params(), jax.random.normal(key, (2, 3, 8))
            self.apply = mha
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.groups = js.trace(mha, self.params, self.x)
        elif name == "flat_cnn":
            self.params = flat_cnn_params()
            self.x = jax.random.normal(key, (2, 6, 6, 1))
            self.apply = flat_cnn
            self.groups = js.trace(flat_cnn, self.params, self.x)
        elif name == "linen":
            self.apply, self.params, self.state, self.x = linen_cnn()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.groups = js.trace(
                    self.apply, self.params, self.x, state=self.state
                )
        else:
            if name == "cnn":
                model = randomize_batch_stats(CNN(nnx.Rngs(0)))
                self.x = jax.random.normal(key, (2, 6, 6, 1))
            else:
                model = Block(8, 2, nnx.Rngs(0))
                self.x = jax.random.normal(key, (2, 5, 8))
            self.module = model
            graphdef, self.params, self.state = nnx.split(model, nnx.Param, ...)

            def apply(p, s, x):
                return nnx.merge(graphdef, p, s)(x)

            self.apply = apply
            self.groups = _quiet_trace_module(model, self.x)

    def run(self, params):
        if self.state is None:
            return self.apply(params, self.x)
        return self.apply(params, self.state, self.x)


EXPECTED = {
    "mlp": MLP_UNITS,
    "mha": MHA_UNITS,
    "cnn": CNN_UNITS,
    "block": BLOCK_UNITS,
    "linen": LINEN_UNITS,
    "flat_cnn": FLAT_CNN_UNITS,
}
CASES = {name: _Case(name) for name in EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_traced_units_are_the_hand_listed_ones(name):
    assert _spec(CASES[name].groups) == {
        k: sorted(v) for k, v in EXPECTED[name].items()
    }


def test_batch_statistics_join_their_channels():
    case = CASES["cnn"]
    state = {
        s.name: sorted(m.path for m in s.members if m.state) for s in case.groups.sets
    }
    assert state["c1/kernel/value:3"] == ["bn1/mean/value", "bn1/var/value"]
    assert state["c2/kernel/value:3"] == [
        "bn0/mean/value",
        "bn0/var/value",
        "bn2/mean/value",
        "bn2/var/value",
    ]


def test_dense_axes_say_why():
    reasons = {(p, a): r for p, a, r in CASES["block"].groups.dense}
    assert "contracted between activations" in reasons["attn/query/kernel/value", 2]
    assert "model input" in reasons["fc1/kernel/value", 0]
    refused = reasons["attn/value/kernel/value", 2]
    assert any("value shape should be" in r for r in refused)
    reasons = {(p, a): r for p, a, r in CASES["cnn"].groups.dense}
    assert reasons["stem/kernel/value", 0] == ("convolution window",)
    assert reasons["head/kernel/value", 1] == ("model output",)


def _zero_by_hand(params, spec, unit, size):
    """Zeroes the unit's slices from the hand-written spec: index ``i`` of
    the axis is unit ``(i // stride) % size``."""
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): x
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    for path, axis, stride in spec:
        x = np.array(flat[path])
        hit = (np.arange(x.shape[axis]) // stride) % size == unit
        index = [slice(None)] * x.ndim
        index[axis] = hit
        x[tuple(index)] = 0
        flat[path] = jnp.asarray(x)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: flat[
            "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
        ],
        params,
    )


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(list(EXPECTED)),
    which=st.integers(0, 1),
    unit=st.integers(0, 31),
)
def test_masking_one_unit_equals_zeroing_it_by_hand(name, which, unit):
    case = CASES[name]
    sets = case.groups.sets
    s = sets[which % len(sets)]
    unit %= s.size
    units = {t.name: jnp.ones(t.size, bool) for t in sets}
    units[s.name] = units[s.name].at[unit].set(False)
    masked = js.apply_mask(case.params, case.groups.element_mask(units, case.params))
    by_hand = _zero_by_hand(case.params, EXPECTED[name][s.name], unit, s.size)
    np.testing.assert_array_equal(case.run(masked), case.run(by_hand))


def _random_units(groups, seed, fraction=0.5):
    rng = np.random.default_rng(seed)
    units = {}
    for s in groups.sets:
        keep = rng.random(s.size) >= fraction
        keep[rng.integers(s.size)] = True
        units[s.name] = jnp.asarray(keep)
    return units


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("seed", [0, 1])
def test_shrunk_model_equals_masked_model(name, seed):
    case = CASES[name]
    units = _random_units(case.groups, seed)
    masked = js.apply_mask(case.params, case.groups.element_mask(units, case.params))
    want = case.run(masked)
    if case.module is not None:
        small = js.shrink(case.module, case.groups, units)
        outputs = [small(case.x), nnx.jit(lambda m, x: m(x))(small, case.x)]
        small_params = nnx.state(small, nnx.Param)
    elif name == "linen":
        small_params, small_state = js.shrink(
            case.params, case.groups, units, state=case.state
        )
        width = int(np.sum(units["Conv_0/kernel:3"]))
        inner = int(np.sum(units["Conv_1/kernel:3"]))
        apply, *_ = linen_cnn(width=width, inner=inner)
        outputs = [
            apply(small_params, small_state, case.x),
            jax.jit(apply)(small_params, small_state, case.x),
        ]
    else:
        small_params = js.shrink(case.params, case.groups, units)
        outputs = [
            case.apply(small_params, case.x),
            jax.jit(case.apply)(small_params, case.x),
        ]
    for got in outputs:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    removed = sum(int(np.sum(~np.asarray(u))) for u in units.values())
    before = sum(x.size for x in jax.tree.leaves(case.params))
    after = sum(x.size for x in jax.tree.leaves(small_params))
    assert removed == 0 or after < before


def test_shrunk_nnx_modules_report_their_new_widths():
    case = CASES["block"]
    units = {s.name: jnp.arange(s.size) % 2 == 0 for s in case.groups.sets}
    small = js.shrink(case.module, case.groups, units)
    assert small.fc1.out_features == 16 and small.fc2.in_features == 16
    assert small.attn.query.out_features == (1, 4)
    assert small.attn.out.in_features == (1, 4)
    cnn = CASES["cnn"]
    units = {s.name: jnp.arange(s.size) < 3 for s in cnn.groups.sets}
    small = js.shrink(cnn.module, cnn.groups, units)
    assert small.bn0.num_features == 3 and small.bn1.num_features == 3
    assert small.stem.out_features == 3 and small.c1.in_features == 3
    assert small.head.in_features == 3 and small.head.out_features == 10


@pytest.mark.parametrize("reduce", ["l1", "l2", "sum"])
def test_unit_scores_reduce_over_the_whole_unit(reduce):
    case = CASES["mlp"]
    p = case.params
    got = case.groups.unit_scores(p, reduce)["l1/w:1"]
    parts = [p["l1"]["w"], p["l1"]["b"][None], p["l2"]["w"].T]
    if reduce == "l1":
        want = sum(np.abs(np.asarray(x)).sum(0) for x in parts)
    elif reduce == "l2":
        want = np.sqrt(sum(np.square(np.asarray(x)).sum(0) for x in parts))
    else:
        want = sum(np.asarray(x).sum(0) for x in parts)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_unit_scores_of_obd_saliency_skip_the_leaves_it_leaves_out():
    case = CASES["mlp"]
    p, x = case.params, case.x
    y = jnp.ones((x.shape[0], 3))

    def loss(p, x, y):
        return jnp.mean(jnp.square(mlp(p, x) - y))

    diag = js.curvature.hessian_diag(loss, p, x, y)  # kernels only
    saliency = js.obs.obd_saliency(p, diag)
    assert saliency["l1"]["b"] is None
    got = case.groups.unit_scores(saliency)["l1/w:1"]
    want = np.abs(saliency["l1"]["w"]).sum(0) + np.abs(saliency["l2"]["w"]).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    mask = js.layerwise_mask(saliency, 0.5, granularity=case.groups)
    assert int(np.sum(~np.asarray(case.groups.unit_mask(mask)["l1/w:1"]))) == 4
    # The biases the criterion skipped still lose their removed units.
    np.testing.assert_array_equal(mask["l1"]["b"], np.asarray(mask["l1"]["w"]).any(0))


def test_unit_mask_of_an_expanded_mask_round_trips():
    case = CASES["cnn"]
    units = _random_units(case.groups, 3)
    mask = case.groups.element_mask(units, case.params)
    back = case.groups.unit_mask(mask)
    for name in units:
        np.testing.assert_array_equal(back[name], units[name])


@pytest.mark.parametrize("distribution", [js.Uniform(), js.ERK(), js.Global(0.25)])
def test_selection_removes_exact_unit_counts(distribution):
    case = CASES["cnn"]
    scores = js.saliency.magnitude(case.params)
    mask = js.topk_mask(scores, 0.5, distribution=distribution, granularity=case.groups)
    units = case.groups.unit_mask(mask)
    removed = {k: int(np.sum(~np.asarray(v))) for k, v in units.items()}
    assert sum(removed.values()) == 7  # round(0.5 * 14)
    if isinstance(distribution, js.Uniform):
        assert removed == {"c2/kernel/value:3": 4, "c1/kernel/value:3": 3}
    reference = js.layerwise_mask(
        case.groups.unit_scores(scores),
        0.5,
        include=lambda p, x: True,
    )
    if isinstance(distribution, js.Uniform):
        for name in units:
            np.testing.assert_array_equal(units[name], reference[name])


def test_include_selects_unit_sets_by_name():
    case = CASES["block"]
    scores = js.saliency.magnitude(case.params)
    mask = js.layerwise_mask(scores, 0.5, granularity=case.groups, include="fc1")
    units = case.groups.unit_mask(mask)
    assert bool(np.all(units["attn/key/kernel/value:1"]))
    assert int(np.sum(~np.asarray(units["fc1/kernel/value:1"]))) == 16


def test_structured_prune_trains_under_jit_and_shrinks():
    case = CASES["cnn"]
    graphdef, state = nnx.split(case.module, nnx.Param, ...)[0], case.state
    labels = jnp.arange(2) % 10

    def loss(p):
        logits = nnx.merge(graphdef, p, state)(case.x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.chain(
        standard(optax.adam(1e-2)),
        js.prune(
            js.saliency.magnitude,
            js.schedules.iterative([(2, 0.25), (4, 0.5)]),
            granularity=case.groups,
        ),
    )

    @jax.jit
    def step(p, opt):
        updates, opt = tx.update(jax.grad(loss)(p), opt, p)
        return optax.apply_updates(p, updates), opt

    p, opt = case.params, tx.init(case.params)
    for _ in range(6):
        p, opt = step(p, opt)
    assert step._cache_size() == 1
    mask = js.effective_mask(opt)
    units = case.groups.unit_mask(mask)
    assert sum(int(np.sum(~np.asarray(u))) for u in units.values()) == 7
    masked_out = nnx.merge(graphdef, p, state)(case.x)
    model = nnx.merge(graphdef, p, state)
    small = js.shrink(model, case.groups, mask)
    np.testing.assert_allclose(small(case.x), masked_out, atol=1e-5, rtol=1e-5)


def test_shrink_applies_an_element_mask_inside_kept_units():
    case = CASES["mlp"]
    units = _random_units(case.groups, 0)
    mask = case.groups.element_mask(units, case.params)
    mask = {**mask, "l3": {"w": jnp.arange(18).reshape(6, 3) % 2 == 0, "b": None}}
    mask["l1"] = dict(mask["l1"])
    want = case.run(js.apply_mask(case.params, mask))
    small = js.shrink(case.params, case.groups, mask)
    np.testing.assert_allclose(case.apply(small, case.x), want, atol=1e-5)


def test_shrink_refuses_a_mask_of_another_model():
    case = CASES["mlp"]
    other = {"l1": {"w": jnp.ones((5, 7), bool), "b": None}}
    with pytest.raises(ValueError, match="no leaf at 'l2/w'"):
        js.shrink(case.params, case.groups, other)
    wrong = {"l1/w:1": jnp.ones(7, bool), "x:0": jnp.ones(3, bool)}
    with pytest.raises(ValueError, match="traced from another model"):
        js.shrink(case.params, case.groups, wrong)


def test_shrink_refuses_params_of_another_model():
    case = CASES["mlp"]
    params = {**case.params, "l2": {"w": jnp.ones((9, 6)), "b": jnp.ones(6)}}
    units = {s.name: jnp.ones(s.size, bool) for s in case.groups.sets}
    with pytest.raises(ValueError, match="l2/w: params shape"):
        js.shrink(params, case.groups, units)


def test_shrink_refuses_to_empty_a_layer():
    case = CASES["mlp"]
    units = {s.name: jnp.ones(s.size, bool) for s in case.groups.sets}
    units["l2/w:1"] = jnp.zeros(6, bool)
    with pytest.raises(ValueError, match=r"l2/w:1: the mask removes all 6 units"):
        js.shrink(case.params, case.groups, units)


def test_shrink_refuses_to_run_under_jit():
    case = CASES["mlp"]
    units = {s.name: jnp.ones(s.size, bool) for s in case.groups.sets}
    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        jax.jit(lambda u: js.shrink(case.params, case.groups, u))(units)


def test_shrink_needs_the_state_its_groups_run_through():
    case = CASES["linen"]
    units = {s.name: jnp.ones(s.size, bool) for s in case.groups.sets}
    with pytest.raises(ValueError, match="state"):
        js.shrink(case.params, case.groups, units)


def test_an_operation_the_trace_does_not_follow_is_named():
    params = mlp_params()

    def model(p, x):
        h = jnp.cumsum(jax.nn.relu(x @ p["l1"]["w"]), axis=-1)
        h = jax.lax.fori_loop(0, 2, lambda i, h: h * h, h @ p["l2"]["w"])
        return h @ p["l3"]["w"]

    with pytest.warns(UserWarning, match=r"l2/w axis 1 \(unsupported: scan"):
        groups = js.trace(model, params, jnp.ones((2, 5)))
    assert groups.sets == ()
    reasons = {(p, a): r for p, a, r in groups.dense}
    assert reasons["l1/w", 1] == ("cumsum along the axis",)
    assert reasons["l1/b", 0] == ("unused by the model",)


def test_a_reshape_to_fixed_sizes_is_caught_by_the_probe():
    params = mha_params()

    def fixed_heads(p, x):
        b, n, _ = x.shape
        v = (x @ p["v"]).reshape(b, n, 2, -1)
        return v.reshape(b, n, -1) @ p["o"]

    # Two heads are fixed; their width follows the kernel.
    with pytest.warns(UserWarning, match="computes reshape with shape"):
        groups = js.trace(fixed_heads, params, jnp.ones((2, 3, 8)))
    assert [(s.size, s.members[0].stride) for s in groups.sets] == [(4, 1)]
    unprobed = js.trace(fixed_heads, params, jnp.ones((2, 3, 8)), probe=False)
    assert [s.size for s in unprobed.sets] == [2, 4]


def test_a_reshape_that_cuts_a_unit_leaves_it_dense():
    params = mlp_params()

    def model(p, x):
        h = (x @ p["l1"]["w"]).reshape(-1, 2)
        return h.reshape(x.shape[0], 7) @ p["l2"]["w"]

    groups = js.trace(model, params, jnp.ones((2, 5)))
    reasons = {(p, a): r for p, a, r in groups.dense}
    assert "a reshape that cuts through a dimension" in reasons["l1/w", 1]
    assert groups.sets == ()


def test_unit_masks_are_checked():
    case = CASES["mlp"]
    with pytest.raises(ValueError, match="unit mask does not match"):
        case.groups.element_mask({"l1/w:1": jnp.ones(7, bool)}, case.params)
    bad = {s.name: jnp.ones(s.size + 1, bool) for s in case.groups.sets}
    with pytest.raises(ValueError, match="l1/w:1: unit mask shape"):
        case.groups.element_mask(bad, case.params)
    with pytest.raises(TypeError, match="unit mask is a dict"):
        case.groups.element_mask([1, 2], case.params)
