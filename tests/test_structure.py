"""Tests for jaxsparse.structure, each pattern checked element by element
against a brute-force numpy loop."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse.structure import num_groups


def scores_of(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def reduce_np(values, how):
    values = np.asarray(values, np.float64)
    if how == "l1":
        return np.abs(values).sum()
    if how == "l2":
        return np.sqrt((values**2).sum())
    return values.sum()


def check_groups(granularity, shape, group_of, sparsity, how="l1", dtype=jnp.float32):
    """Masks must be constant on each group and prune exactly the
    lowest-scoring groups (ties: later group first)."""
    s = scores_of(shape, dtype=dtype)
    mask = np.asarray(
        js.layerwise_mask({"w": s}, sparsity, granularity=granularity, reduce=how)["w"]
    )
    values = np.asarray(s, np.float64)
    groups = {}
    for idx in itertools.product(*map(range, shape)):
        groups.setdefault(group_of(idx), []).append(idx)
    keys = sorted(groups)
    assert len(keys) == num_groups(granularity, shape)
    group_scores = np.array(
        [reduce_np([values[i] for i in groups[k]], how) for k in keys]
    )
    gs = np.asarray(granularity.group_scores(s, how), np.float64).ravel()
    np.testing.assert_allclose(
        gs, group_scores, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5
    )
    k = round(sparsity * len(keys))
    order = np.lexsort((-np.arange(len(keys)), gs))
    pruned_groups = set(order[:k].tolist())
    for g, key in enumerate(keys):
        for idx in groups[key]:
            assert mask[idx] == (g not in pruned_groups), (key, idx)


@pytest.mark.parametrize("how", ["l1", "l2", "sum"])
@pytest.mark.parametrize(
    "shape,block",
    [((8, 6), (2, 3)), ((4, 6), (3,)), ((2, 2, 4, 6), (2, 2)), ((4, 4), (4, 4))],
)
def test_block(shape, block, how):
    full = (1,) * (len(shape) - len(block)) + block
    check_groups(
        js.Block(block),
        shape,
        lambda idx: tuple(i // b for i, b in zip(idx, full)),
        0.5,
        how,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,axis", [((5, 4), -1), ((5, 4), 0), ((3, 3, 2, 8), -1)])
def test_channel(shape, axis, dtype):
    a = axis % len(shape)
    check_groups(js.Channel(axis), shape, lambda idx: (idx[a],), 0.5, dtype=dtype)


@pytest.mark.parametrize(
    "shape,stride,axis", [((6, 4), 3, 0), ((4, 8), 2, -1), ((2, 3, 6), 3, -1)]
)
def test_strided(shape, stride, axis):
    a = axis % len(shape)

    def group_of(idx):
        return (*idx[:a], idx[a] % stride, *idx[a + 1 :])

    check_groups(js.Strided(stride, axis), shape, group_of, 0.4)
    mask = np.asarray(
        js.layerwise_mask(
            {"w": scores_of(shape)}, 0.4, granularity=js.Strided(stride, axis)
        )["w"]
    )
    # A kept pattern is offsets plus the stride: every fibre along the axis
    # is periodic with period `stride`.
    moved = np.moveaxis(mask, a, -1)
    np.testing.assert_array_equal(moved, np.roll(moved, stride, axis=-1))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (3, 8), (4, 4)])
@pytest.mark.parametrize("shape,axis", [((4, 8), -1), ((8, 3), 0), ((3, 3, 8, 2), 2)])
def test_nm_keeps_top_n_of_every_m(n, m, shape, axis):
    s = np.array(scores_of(shape))
    s[tuple(0 for _ in shape)] = np.nan
    mask = np.asarray(
        js.layerwise_mask({"w": jnp.asarray(s)}, None, granularity=js.NM(n, m, axis))[
            "w"
        ]
    )
    a = axis % len(shape)
    ms, ss = np.moveaxis(mask, a, -1), np.moveaxis(s, a, -1)
    for idx in itertools.product(*map(range, ms.shape[:-1])):
        for start in range(0, ms.shape[-1], m):
            vals = ss[idx][start : start + m]
            nan = np.isnan(vals)
            order = np.lexsort((np.arange(m), -np.where(nan, 0, vals), nan))
            expected = np.zeros(m, bool)
            expected[order[:n]] = True
            np.testing.assert_array_equal(ms[idx][start : start + m], expected)


def test_nm_ties_keep_earlier():
    mask = js.layerwise_mask({"w": jnp.ones((2, 4))}, None, granularity=js.NM(2, 4))[
        "w"
    ]
    np.testing.assert_array_equal(np.asarray(mask), [[True, True, False, False]] * 2)


def test_nm_rejects_other_sparsity():
    with pytest.raises(ValueError, match=r"fixes the sparsity at 0.5"):
        js.layerwise_mask({"w": jnp.ones((2, 4))}, 0.3, granularity=js.NM(2, 4))
    mask = js.layerwise_mask({"w": jnp.ones((2, 4))}, 0.5, granularity=js.NM(2, 4))["w"]
    assert int(np.asarray(mask).sum()) == 4


@pytest.mark.parametrize(
    "granularity,shape,message",
    [
        (
            js.Block((2, 3)),
            (4, 4),
            "layer/w: shape (4, 4) is not divisible by Block(shape=(2, 3))",
        ),
        (
            js.Block((2, 2, 2)),
            (4, 4),
            "layer/w: shape (4, 4) is not divisible by Block(shape=(2, 2, 2))",
        ),
        (
            js.NM(2, 4),
            (4, 6),
            "layer/w: shape (4, 6) is not divisible by NM(n=2, m=4, axis=-1)",
        ),
        (
            js.Strided(4, 0),
            (6, 4),
            "layer/w: shape (6, 4) is not divisible by Strided(stride=4, axis=0)",
        ),
        (js.Channel(2), (4, 4), "layer/w: axis 2 is out of range for shape (4, 4)"),
    ],
)
def test_shape_not_divisible_names_leaf(granularity, shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        js.layerwise_mask(
            {"layer": {"w": jnp.ones(shape)}}, 0.5, granularity=granularity
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: js.Block((0, 2)),
        lambda: js.Block(()),
        lambda: js.NM(3, 2),
        lambda: js.NM(0, 4),
        lambda: js.Strided(0),
        lambda: js.Block((2.0,)),
    ],
)
def test_bad_patterns_raise(make):
    with pytest.raises(ValueError):
        make()


def test_unknown_granularity_and_reduce():
    with pytest.raises(TypeError, match="granularity must be"):
        js.layerwise_mask({"w": jnp.ones((2, 2))}, 0.5, granularity="block")
    with pytest.raises(ValueError, match="reduce must be one of"):
        js.layerwise_mask(
            {"w": jnp.ones((2, 2))}, 0.5, granularity=js.Channel(), reduce="max"
        )


def test_granularities_are_hashable_static_args():
    select = jax.jit(js.layerwise_mask, static_argnames="granularity")
    for g in [
        js.Element(),
        js.Block((2, 2)),
        js.Channel(-1),
        js.Strided(2),
        js.NM(2, 4, 0),
    ]:
        assert hash(g) == hash(type(g)(**g.__dict__))
        sp = None if isinstance(g, js.NM) else jnp.float32(0.5)
        mask = select({"w": scores_of((4, 4))}, sp, granularity=g)
        assert float(js.sparsity(mask)) == 0.5


def test_global_over_channels_counts_groups():
    scores = {"a": jnp.ones((3, 4)), "b": 2 * jnp.ones((5, 6))}
    mask = js.global_mask(scores, 0.5, granularity=js.Channel())
    # 10 channels, 5 pruned: a's 4 (score 3 each) before b's (score 10 each).
    assert not np.asarray(mask["a"]).any()
    np.testing.assert_array_equal(np.asarray(mask["b"])[0], [True] * 5 + [False])
