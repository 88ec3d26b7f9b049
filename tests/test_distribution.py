"""Tests for jaxsparse.distribution."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import KINDS, make_tree

import jaxsparse as js
from jaxsparse import _tree

SHAPES = {
    "conv1": (3, 3, 3, 16),
    "conv2": (3, 3, 16, 32),
    "fc1": (512, 128),
    "fc2": (128, 10),
}


def params_of(shapes=SHAPES):
    return {k: jnp.zeros(s) for k, s in shapes.items()}


def allocation(dist, params, sparsity):
    tree = dist.allocate(params, sparsity)
    return {
        _tree.path_str(p): float(s)
        for p, s in _tree.leaves_with_path(tree)
        if s is not None
    }


def pruned_counts(alloc, shapes):
    return {k: round(s * np.prod(shapes[k])) for k, s in alloc.items()}


def erk_reference(shapes, density, power=1.0):
    """RigL's procedure: mark leaves dense while the scaled density exceeds 1."""
    n = {k: np.prod(s) for k, s in shapes.items()}
    w = {k: (sum(s) / np.prod(s)) ** power for k, s in shapes.items()}
    dense = set()
    while True:
        budget = density * sum(n.values()) - sum(n[k] for k in dense)
        eps = budget / sum(w[k] * n[k] for k in n if k not in dense)
        over = {k for k in n if k not in dense and eps * w[k] > 1}
        if not over:
            return {k: 1.0 if k in dense else eps * w[k] for k in n}
        dense |= over


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.98])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_erk_matches_reference_and_total(sparsity, power):
    alloc = allocation(js.ERK(power_scale=power), params_of(), sparsity)
    ref = erk_reference(SHAPES, 1 - sparsity, power)
    for k, s in alloc.items():
        n = np.prod(SHAPES[k])
        assert abs((1 - s) - ref[k]) <= 1.0 / n + 1e-12, k
    total = sum(np.prod(s) for s in SHAPES.values())
    assert sum(pruned_counts(alloc, SHAPES).values()) == round(sparsity * total)


def test_erk_caps_small_layers_dense():
    alloc = allocation(js.ERK(), params_of(), 0.5)
    assert alloc["conv1"] == 0.0
    assert 0.5 < alloc["fc1"] < 1.0


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.95, 0.3333])
def test_uniform_total_exact_and_each_leaf_within_one(sparsity):
    alloc = allocation(js.Uniform(), params_of(), sparsity)
    counts = pruned_counts(alloc, SHAPES)
    total = sum(np.prod(s) for s in SHAPES.values())
    assert sum(counts.values()) == round(sparsity * total)
    for k, c in counts.items():
        assert abs(c - sparsity * np.prod(SHAPES[k])) < 1.0


def test_min_density_floor():
    alloc = allocation(js.ERK(min_density=0.09), params_of(), 0.9)
    for k, s in alloc.items():
        n = np.prod(SHAPES[k])
        assert n - round(s * n) >= np.ceil(0.09 * n)
    plain = allocation(js.ERK(), params_of(), 0.9)
    assert plain["fc1"] > 0.91
    assert alloc["fc1"] == pytest.approx(0.91, abs=1.0 / np.prod(SHAPES["fc1"]))
    total = sum(np.prod(s) for s in SHAPES.values())
    assert sum(pruned_counts(alloc, SHAPES).values()) == round(0.9 * total)
    with pytest.raises(ValueError, match="min_density"):
        js.ERK(min_density=0.5).allocate(params_of(), 0.9)
    # Uniform caps each leaf by its own floor instead.
    capped = js.Uniform(min_density=0.5).allocate(params_of(), 0.9)
    for k, s in capped.items():
        n = np.prod(SHAPES[k])
        assert n - round(s * n) == np.ceil(0.5 * n)


@pytest.mark.parametrize("dist", [js.Uniform(), js.ERK(), js.ERK(min_density=0.05)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_traced_allocation_agrees_with_concrete(dist, sparsity):
    params = params_of()
    traced = jax.jit(lambda s: dist.allocate(params, s))(jnp.float32(sparsity))
    concrete = allocation(dist, params, sparsity)
    t_counts = {k: round(float(s) * np.prod(SHAPES[k])) for k, s in traced.items()}
    c_counts = pruned_counts(concrete, SHAPES)
    assert sum(t_counts.values()) == sum(c_counts.values())
    for k in SHAPES:
        assert abs(t_counts[k] - c_counts[k]) <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_allocation_mirrors_tree(kind):
    params = make_tree(kind)
    tree = js.ERK().allocate(params, 0.5)
    leaves = _tree.leaves_with_path(tree)
    assert [p for p, _ in leaves] == [p for p, _ in _tree.leaves_with_path(params)]
    assert [p for p, s in leaves if s is not None] == [
        p for p, _ in _tree.selected(params, None)
    ]
    mask = js.layerwise_mask(js.saliency.magnitude(params), tree)
    report = js.sparsity_report(mask)
    assert report.size - report.nonzeros == round(0.5 * report.size)


def test_custom():
    params = params_of()
    alloc = js.Custom({"conv": 0.5, "fc1": 0.9}).allocate(params, None)
    assert alloc == {"conv1": 0.5, "conv2": 0.5, "fc1": 0.9, "fc2": None}
    assert js.Custom([("fc", 0.1)]) == js.Custom({"fc": 0.1})
    hash(js.Custom({"fc": 0.1}))
    with pytest.raises(
        ValueError, match=r"Custom: sparsity for 'fc' must be in \[0, 1\]"
    ):
        js.Custom({"fc": 1.2})
    with pytest.raises(ValueError, match="prunes nothing"):
        js.Custom({"nothing": 0.5}).allocate(params, 0.5)


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda: js.Uniform(min_density=-0.1), ValueError),
        (lambda: js.ERK(min_density=2.0), ValueError),
        (lambda: js.ERK(power_scale=-1.0), ValueError),
        (lambda: js.Global(min_density=1.1), ValueError),
        (lambda: js.Uniform().allocate(params_of(), 1.0), ValueError),
        (lambda: js.ERK().allocate(params_of(), -0.2), ValueError),
        (lambda: js.topk_mask(params_of(), 0.5, distribution="global"), TypeError),
    ],
)
def test_bad_configuration_raises(make, error):
    with pytest.raises(error):
        make()


def test_nothing_selected():
    assert js.Uniform().allocate({"b": jnp.ones(3)}, 0.5) == {"b": None}


def test_topk_mask_accepts_its_own_allocation_of_a_whole_leaf():
    """Regression: ERK at 0.9 allocates 1.0 to a (1, 1) head, which
    layerwise_mask used to refuse."""
    params = {"a": jnp.ones((20, 30)), "head": jnp.ones((1, 1))}
    scores = js.saliency.magnitude(params)
    for dist in (js.Uniform(), js.ERK(), js.Global()):
        mask = js.topk_mask(scores, 0.9, distribution=dist)
        pruned = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(mask))
        assert pruned in (round(0.9 * 600) + 1, round(0.9 * 601)), dist


@pytest.mark.parametrize("traced", [False, True])
def test_uniform_is_layerwise_leaf_by_leaf(traced):
    """Regression: at 0.8859375 over leaves of 640, 512 and 80 entries the
    largest-remainder rule pruned (567, 453, 71); each leaf alone gives
    (567, 454, 71)."""
    params = {
        "a": jnp.arange(640.0).reshape(64, 10),
        "b": jnp.arange(512.0).reshape(32, 16),
        "c": jnp.arange(80.0).reshape(8, 10),
    }
    s = 0.8859375

    def masks(s):
        return (
            js.topk_mask(params, s, distribution=js.Uniform()),
            js.layerwise_mask(params, s),
        )

    uniform, layerwise = jax.jit(masks)(jnp.float32(s)) if traced else masks(s)
    counts = {k: int((~np.asarray(m)).sum()) for k, m in uniform.items()}
    assert counts == {"a": 567, "b": 454, "c": 71}
    for k in params:
        np.testing.assert_array_equal(uniform[k], layerwise[k])


def test_custom_scales_with_an_overall_target_and_takes_a_floor():
    params = params_of()
    custom = js.Custom({"conv": 0.5, "fc1": 0.9})
    reach = custom.overall(params)
    total = sum(np.prod(s) for s in SHAPES.values())
    want = (0.5 * (27 * 16 + 144 * 32) + 0.9 * 512 * 128) / total
    assert reach == pytest.approx(want)
    assert allocation(custom, params, reach) == pytest.approx(
        {"conv1": 0.5, "conv2": 0.5, "fc1": 0.9}
    )
    half = allocation(custom, params, reach / 2)
    assert half == pytest.approx({"conv1": 0.25, "conv2": 0.25, "fc1": 0.45})
    traced = jax.jit(lambda s: custom.allocate(params, s))(jnp.float32(reach / 2))
    assert float(traced["fc1"]) == pytest.approx(0.45, rel=1e-6)
    assert traced["fc2"] is None
    floored = js.Custom({"conv": 0.5, "fc1": 0.9}, min_density=0.2).allocate(
        params, None
    )
    assert floored["fc1"] == (65536 - math.ceil(0.2 * 65536)) / 65536
    assert floored["conv1"] == 0.5
    whole = js.Custom({"fc2": 1.0}).allocate(params, None)
    mask = js.layerwise_mask(params, whole)
    assert not np.asarray(mask["fc2"]).any()


LEAF_SHAPES = [(1, 1), (1, 4), (4, 1), (2, 4), (4, 4), (8, 2), (1, 8), (3, 5)]
DISTRIBUTIONS = [
    js.Uniform(),
    js.ERK(),
    js.Global(),
    js.Uniform(min_density=0.1),
    js.ERK(min_density=0.1),
    js.Global(min_density=0.1),
]
GRANULARITIES = [js.Element(), js.Block((1, 2)), js.Channel(-1), js.NM(2, 4)]


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(
    shapes=st.lists(st.sampled_from(LEAF_SHAPES), min_size=1, max_size=4),
    dist=st.sampled_from(DISTRIBUTIONS),
    granularity=st.sampled_from(GRANULARITIES),
    sparsity=st.floats(0.0, 0.999),
)
def test_every_distribution_and_granularity_masks_or_blames_the_input(
    shapes, dist, granularity, sparsity
):
    """Either a mask with the documented count, or an error about the
    user's own input (a pattern that does not divide a leaf, a floor the
    target cannot meet); never a refusal of the toolkit's own intermediate."""
    key = jax.random.key(len(shapes))
    scores = {
        f"l{i}": jax.random.normal(jax.random.fold_in(key, i), s)
        for i, s in enumerate(shapes)
    }
    target = None if granularity.fixed_sparsity is not None else sparsity
    try:
        mask = js.topk_mask(scores, target, distribution=dist, granularity=granularity)
    except ValueError as e:
        message = str(e)
        assert "not divisible" in message or "min_density" in message, message
        return
    groups = {k: js.structure.num_groups(granularity, scores[k].shape) for k in scores}
    pruned_groups = {}
    for k, m in mask.items():
        m = np.asarray(m)
        per_group = m.size // groups[k]
        pruned_groups[k] = int((~m).sum()) // per_group
    if granularity.fixed_sparsity is not None:
        for k in scores:
            assert (~np.asarray(mask[k])).sum() == round(
                granularity.fixed_sparsity * scores[k].size
            )
    elif isinstance(dist, js.Uniform):
        for k in scores:
            n = groups[k]
            floor = math.ceil(dist.min_density * scores[k].size)
            most = (scores[k].size - floor) / scores[k].size
            assert pruned_groups[k] == round(min(sparsity, most) * n), k
    elif isinstance(dist, js.Global):
        assert sum(pruned_groups.values()) == round(sparsity * sum(groups.values()))
    else:
        sizes = {k: scores[k].size for k in scores}
        # ERK allocates over entries and each leaf then rounds its groups.
        alloc = dist.allocate(scores, sparsity)
        for k in scores:
            assert pruned_groups[k] == round(float(alloc[k]) * groups[k]), k
        if isinstance(granularity, js.Element):
            assert sum(pruned_groups.values()) == round(sparsity * sum(sizes.values()))
