"""Tests for jaxsparse.distribution."""

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
        js.Uniform(min_density=0.5).allocate(params_of(), 0.9)


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
    with pytest.raises(ValueError, match="pass sparsity=None"):
        js.Custom({"fc": 0.1}).allocate(params, 0.5)
    with pytest.raises(
        ValueError, match=r"Custom: sparsity for 'fc' must be in \[0, 1\)"
    ):
        js.Custom({"fc": 1.2})


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda: js.Uniform(min_density=-0.1), ValueError),
        (lambda: js.ERK(min_density=2.0), ValueError),
        (lambda: js.ERK(power_scale=-1.0), ValueError),
        (lambda: js.Global(min_density=1.1), ValueError),
        (lambda: js.Uniform().allocate(params_of(), 1.0), ValueError),
        (lambda: js.ERK().allocate(params_of(), -0.2), ValueError),
        (lambda: js.Global().allocate(params_of(), 0.5), TypeError),
    ],
)
def test_bad_configuration_raises(make, error):
    with pytest.raises(error):
        make()


def test_nothing_selected():
    assert js.Uniform().allocate({"b": jnp.ones(3)}, 0.5) == {"b": None}
