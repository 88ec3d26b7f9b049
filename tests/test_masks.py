"""Tests for jaxsparse.masks (and the selection kernel in _select.py)."""

import functools
import math
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trees import KINDS, make_tree

import jaxsparse as js
from jaxsparse import _tree
from jaxsparse._select import (
    fullest_columns,
    num_pruned,
    order_key,
    prune_lowest,
    prune_lowest_by_bisection,
)


def reference_pruned(leaves, k):
    """Brute force: sort (NaN lowest, then value, then later position first)
    and prune the first ``k``; returns flat bool arrays per leaf."""
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    pos = np.arange(flat.size)
    nan = np.isnan(flat)
    order = np.lexsort((-pos, np.where(nan, 0.0, flat), ~nan))
    pruned = np.zeros(flat.size, bool)
    pruned[order[:k]] = True
    out, start = [], 0
    for x in leaves:
        out.append(pruned[start : start + np.size(x)].reshape(np.shape(x)))
        start += np.size(x)
    return out


def selected_leaves(tree, include=None):
    return [(_tree.path_str(p), x) for p, x in _tree.selected(tree, include)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_layerwise_matches_reference(kind, dtype, sparsity):
    scores = js.saliency.magnitude(make_tree(kind, dtype))
    mask = jax.jit(js.layerwise_mask)(scores, sparsity)
    for (path, s), (_, m) in zip(selected_leaves(scores), selected_leaves(mask)):
        k = round(sparsity * s.size)
        (expected,) = reference_pruned([np.asarray(s, np.float32)], k)
        np.testing.assert_array_equal(~np.asarray(m), expected, err_msg=path)
        assert int((~np.asarray(m)).sum()) == k


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.9, 0.97])
def test_global_matches_reference(kind, dtype, sparsity):
    scores = js.saliency.magnitude(make_tree(kind, dtype))
    mask = jax.jit(js.global_mask)(scores, sparsity)
    leaves = [s for _, s in selected_leaves(scores)]
    total = sum(s.size for s in leaves)
    expected = reference_pruned(
        [np.asarray(s, np.float32) for s in leaves], round(sparsity * total)
    )
    got = [~np.asarray(m) for _, m in selected_leaves(mask)]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_dense_leaves_stay_none_and_mask_mirrors_tree():
    params = make_tree("namedtuple")
    mask = js.layerwise_mask(js.saliency.magnitude(params), 0.5)
    assert mask[0].bias is None and mask[1].bias is None
    assert mask[0].kernel.dtype == jnp.bool_
    assert mask[0].kernel.shape == params[0].kernel.shape
    assert type(mask[0]) is type(params[0])


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77])
def test_all_equal_scores_prune_exact_count_latest_first(n, sparsity):
    scores = {"w": jnp.ones((n, 1))}
    pruned = ~np.asarray(js.layerwise_mask(scores, sparsity)["w"]).ravel()
    k = round(sparsity * n)
    assert pruned.sum() == k
    np.testing.assert_array_equal(pruned, np.arange(n) >= n - k)


def test_ties_across_leaves_break_by_tree_order():
    scores = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 2))}
    mask = js.global_mask(scores, 0.5)
    np.testing.assert_array_equal(
        np.asarray(mask["a"]), [[True] * 3, [True, True, False]]
    )
    np.testing.assert_array_equal(np.asarray(mask["b"]), [[False] * 2] * 2)


def test_nan_ranks_lowest_and_inf_orders():
    scores = {"w": jnp.array([[1.0, jnp.nan, -jnp.inf, jnp.inf, 0.0, -0.0]])}
    mask = js.layerwise_mask(scores, 0.5)["w"]
    # NaN, then -inf, then the later of the two zeros.
    np.testing.assert_array_equal(
        np.asarray(mask), [[True, False, False, True, True, False]]
    )


def test_order_key_is_monotone():
    x = jnp.array([jnp.nan, -jnp.inf, -3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, jnp.inf])
    keys = np.asarray(order_key(x)).astype(np.int64)
    assert keys[0] == 0
    assert np.all(np.diff(keys[1:]) >= 0)
    assert keys[4] == keys[5]
    assert np.all(np.diff(np.delete(keys[1:], 3)) > 0)


def test_float64_scores_are_not_merged_by_float32(x64):
    base = 1.0
    scores = {
        "w": jnp.array([[base, base + 1e-12, base + 2e-12, base + 3e-12]], jnp.float64)
    }
    np.testing.assert_array_equal(
        np.asarray(js.layerwise_mask(scores, 0.5)["w"]), [[False, False, True, True]]
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.123, 0.5, 0.9, 0.999])
def test_traced_sparsity_compiles_once_and_counts_exactly(sparsity):
    scores = js.saliency.magnitude(make_tree("dict"))
    traces = []

    @jax.jit
    def select(s, sp):
        traces.append(1)
        return js.layerwise_mask(s, sp)

    for sp in (0.2, sparsity):
        mask = select(scores, jnp.asarray(sp, jnp.float32))
        for (_, s), (_, m) in zip(selected_leaves(scores), selected_leaves(mask)):
            assert int((~np.asarray(m)).sum()) == round(np.float32(sp) * s.size)
    assert len(traces) == 1


def test_eager_selection_compiles_once_per_shape(monkeypatch):
    """Called outside ``jit``, the selection is still one compiled function
    whose counts are arguments: a new sparsity does not trace it again."""
    from jaxsparse import _select

    traces = []
    order_key = _select.order_key

    def counting(*args):
        traces.append(1)
        return order_key(*args)

    monkeypatch.setattr(_select, "order_key", counting)
    scores = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 37)))}
    counts = []
    for sparsity in (0.2, 0.5, 0.9):
        mask = js.layerwise_mask(scores, sparsity)["w"]
        assert int((~np.asarray(mask)).sum()) == round(sparsity * 111)
        counts.append(len(traces))
    assert counts[0] > 0
    assert counts[1] == counts[2] == counts[0]


def test_num_pruned_rounds_half_to_even():
    assert num_pruned(0.5, 5) == 2
    assert num_pruned(0.5, 7) == 4
    assert int(num_pruned(jnp.float32(0.5), 5)) == 2
    assert int(jax.jit(num_pruned, static_argnums=1)(jnp.float32(0.5), 7)) == 4
    assert num_pruned(0.9, 10**8) == 90_000_000


@settings(max_examples=25, deadline=None)
@given(
    scores=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=3, max_side=9),
        elements=st.sampled_from([0.0, -1.0, 1.0, 2.5, np.nan, np.inf, -np.inf, 3e-8]),
    ),
    sparsity=st.floats(0.0, 0.999),
)
def test_selection_property_with_heavy_ties(scores, sparsity):
    mask = js.layerwise_mask({"w": jnp.asarray(scores)}, sparsity)["w"]
    (expected,) = reference_pruned([scores], round(sparsity * scores.size))
    np.testing.assert_array_equal(~np.asarray(mask), expected)


def _scores(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=n)
    if kind == "integers":  # ties of about n/5 straddle most thresholds
        return rng.integers(0, 5, size=n).astype(float)
    if kind == "few ties":  # ten-entry ties
        return np.repeat(rng.normal(size=-(-n // 10)), 10)[:n]
    if kind == "zero pile":  # pruned weights: 80 % exact zeros
        return np.where(rng.random(n) < 0.8, 0.0, rng.normal(size=n))
    if kind == "nan":
        x = np.full(n, 1.5)
        x[rng.random(n) < 0.05] = np.nan
        return x
    if kind == "cauchy":
        return np.abs(rng.standard_cauchy(n))
    return rng.normal(size=n) * 1e-40  # subnormal float32


SCORE_KINDS = ["normal", "integers", "few ties", "zero pile", "nan", "cauchy", "tiny"]


# One jitted function per search, shared by the cases: the score kinds of one
# shape reuse its compilation.
_SEARCHES = {
    p: jax.jit(functools.partial(prune_lowest, paired=p)) for p in (False, True)
}


def _selects_as_bisection_reference(kind, shape, paired):
    n = int(np.prod(shape))
    x = jnp.asarray(_scores(kind, n, 0).reshape(shape), jnp.float32)
    y = jnp.asarray(_scores(kind, 300, 1), jnp.float32)
    v = jnp.asarray(np.random.default_rng(2).random(300) < 0.6)
    search = _SEARCHES[paired]

    def both(counts):
        args = ([[x], [y]], counts, [[None], [v]])
        new = search(*args)
        ref = jax.jit(prune_lowest_by_bisection)(*args)
        together = search([[x, y]], [counts[0] + counts[1]])
        alone = jax.jit(prune_lowest_by_bisection)([[x, y]], [counts[0] + counts[1]])
        return new + together, ref + alone

    for k in sorted({0, 1, n // 3, n // 2, (9 * n) // 10, n - 1, n}):
        new, ref = both([jnp.int32(max(k, 0)), jnp.int32(min(k, 180))])
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(a, b, err_msg=f"{kind} k={k}")
    (flat,) = reference_pruned([np.asarray(x)], (9 * n) // 10)
    np.testing.assert_array_equal(both([jnp.int32((9 * n) // 10), 0])[0][0][0], flat)


@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (128,), (1031,), (50, 41), (3000, 7)])
def test_search_selects_as_bisection_reference(kind, shape):
    """Both ends of the search (a count hit, a tie straddling the threshold
    broken by position) against one key bit per pass, for counts from none
    to all, with and without ``valid``, one and two groups."""
    _selects_as_bisection_reference(kind, shape, paired=False)


@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("shape", [(7,), (1031,), (50, 41), (3000, 7)])
def test_paired_search_selects_as_bisection_reference(kind, shape):
    """The large selections' search on small ones, so that every end is
    reached: a hit, a bracket of at most 16 entries gathered from columns
    and tails (ties inside it broken by position), and a tie pile larger
    than that bisected on the position."""
    _selects_as_bisection_reference(kind, shape, paired=True)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("piled", ["small", "large", "all"])
def test_tie_piles_in_some_groups_are_cut_by_their_own_positions(paired, piled):
    """Leaves of 10, 300 and 21,000 entries selected layer-wise, some of them
    mostly zeros whose tie straddles the threshold (zero biases beside
    normal kernels, as at initialization): each pile is cut by the bits of
    its own leaf's positions, a group without one is left as it is,
    against brute force."""
    rng = np.random.default_rng(0)
    sizes = (10, 300, 21_000)
    leaves = []
    for n in sizes:
        x = rng.normal(size=n)
        if piled == "all" or (piled == "small") == (n < 1000):
            x = np.where(rng.random(n) < 0.95, 0.0, x)
        leaves.append(jnp.asarray(x, jnp.float32))
    for sparsity in (0.1, 0.5, 0.9):  # cuts late, midway and early in a pile
        counts = [round(sparsity * n) for n in sizes]
        out = _SEARCHES[paired]([[x] for x in leaves], [jnp.int32(k) for k in counts])
        for x, k, (got,) in zip(leaves, counts, out):
            (want,) = reference_pruned([x], k)
            np.testing.assert_array_equal(got, want, err_msg=f"{sparsity} {x.size}")


@pytest.mark.parametrize("kind", ["normal", "zero pile", "integers", "few ties"])
def test_paired_search_at_scale_selects_as_bisection_reference(kind):
    """At 5 million scores the finish gathers a bracket of up to 4096
    entries from columns ranked by blocks, and a prime-sized leaf leaves
    columns and entries over."""
    x = jnp.asarray(_scores(kind, 3_000_017, 0), jnp.float32)
    y = jnp.asarray(_scores(kind, 2_100_000, 1).reshape(1500, 1400), jnp.float32)
    v = jnp.asarray(np.random.default_rng(2).random(y.shape) < 0.9)
    search = _SEARCHES[True]
    reference = jax.jit(prune_lowest_by_bisection)
    for k in (1, 2_000_000, 4_500_000):
        for valid in (None, [[None, v]]):
            new = search([[x, y]], [jnp.int32(k)], valid)
            ref = reference([[x, y]], [jnp.int32(k)], valid)
            for a, b in zip(new[0], ref[0]):
                np.testing.assert_array_equal(a, b, err_msg=f"{kind} k={k}")


def test_search_in_float64(x64):
    x = jnp.asarray(_scores("normal", 5000, 3), jnp.float64)
    x = x.at[::7].set(x[0])  # a 715-way tie among distinct doubles
    for k in (0, 100, 2500, 4999):
        (b,) = prune_lowest_by_bisection([[x]], [k])
        for paired in (False, True):
            (a,) = prune_lowest([[x]], [k], paired=paired)
            np.testing.assert_array_equal(a[0], b[0])


def test_search_memory_is_linear_without_a_sort():
    x = jnp.zeros((1000, 1000), jnp.float32)
    for paired in (False, True):
        lowered = jax.jit(
            lambda s, p=paired: prune_lowest([[s]], [num_pruned(0.9, s.size)], paired=p)
        ).lower(x)
        # Only a sample (256, or 4 sqrt(n) for the paired search) and a
        # gathered bracket are ever sorted.
        sorts = r'"stablehlo.sort".*?\}\) : \(tensor<(\d+)x'
        sizes = [int(n) for n in re.findall(sorts, lowered.as_text(), re.DOTALL)]
        assert sizes and max(sizes) <= x.size // 16, sizes
        assert paired or sizes == [256], sizes
        temp = lowered.compile().memory_analysis().temp_size_in_bytes
        assert temp <= 16 * x.size, temp  # the key and a few O(n) buffers


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
def test_search_writes_only_keys_and_mask_outside_its_loops(paired, with_valid):
    """Outside the search's loops and conds, the compiled selection writes the
    mask per leaf and, for the small selections' search, one key array,
    nothing else the leaf's size: the positions that break ties and the tie
    masks of a rare pile are built where they are used (each was one more
    pass over every score), and the large selections' search computes the
    keys in each pass, where reading memory hides the work."""
    x = jnp.zeros((1000, 1000), jnp.float32)
    v = jnp.ones(x.shape, bool)

    def select(s, v):
        valid = [[v]] if with_valid else None
        return prune_lowest([[s]], [num_pruned(0.9, s.size)], valid, paired=paired)

    text = jax.jit(select).lower(x, v).compile().as_text()
    entry = text[text.index("ENTRY") :]
    written = [
        line
        for line in entry.splitlines()
        if re.search(r"= \w+\[1000,1000\]", line)
        and "parameter(" not in line
        and "get-tuple-element(" not in line
    ]
    assert len(written) == (1 if paired else 2), written


@pytest.mark.parametrize("paired", [False, True])
def test_search_passes_write_nothing_the_size_of_the_scores(paired):
    """Each pass of a search reads the keys once and writes only its counts:
    the compare is fused into the column sums (over more than 32 rows XLA
    splits the sum and writes the compare's result out between the two)."""
    x = jnp.zeros((1000, 1000), jnp.float32)
    v = jnp.ones(x.shape, bool)

    def select(s, v):
        return prune_lowest([[s]], [num_pruned(0.9, s.size)], [[v]], paired=paired)

    text = jax.jit(select).lower(x, v).compile().as_text()
    computations = {
        m.group(1): block
        for block in re.split(r"\n(?=\S)", text)
        if (m := re.match(r"(?:ENTRY )?%?([\w.-]+) ", block))
    }
    bodies = re.findall(r"while\(.*?body=%?([\w.-]+)", text)
    assert bodies
    for body in bodies:
        for line in computations[body].splitlines()[1:]:
            result = re.match(r"\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]", line)
            if not result or re.search(r"(parameter|get-tuple-element)\(", line):
                continue
            size = int(np.prod([int(d) for d in result.group(2).split(",") if d]))
            assert size < x.size // 8, line


@pytest.mark.parametrize("sizes", [(100, 50), (5000,), (1021, 3000, 7)])
def test_fullest_columns_hold_every_column_of_the_bracket(sizes):
    """The finish gathers the columns that the search's counts say hold the
    bracket's entries (at most ``width``), ranking many columns by blocks of
    16 first: every positive column is chosen, the ones the blocks leave
    over included."""
    width, total = 16, sum(sizes)
    rng = np.random.default_rng(0)
    for _ in range(20):
        positive = rng.choice(total, rng.integers(1, width), replace=False)
        positive = np.unique(np.append(positive, total - 1))
        counts = np.zeros(total, np.uint8)
        counts[positive] = rng.integers(1, 16, positive.size)
        columns = np.split(counts, np.cumsum(sizes)[:-1])
        chosen = fullest_columns([jnp.asarray(c) for c in columns], width)
        assert chosen.shape == (width,)
        assert set(positive) <= set(np.asarray(chosen).tolist())


def _whiles(jaxpr):
    """The ``while`` equations of ``jaxpr`` and of every jaxpr inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _whiles(inner)


@pytest.mark.parametrize("paired", [False, True])
def test_search_counts_only_the_groups_still_searching(paired):
    """Several groups search in one loop until the last threshold is found;
    each group's count is under a cond on whether that group still searches,
    so groups found early are not counted again. One group needs no cond."""
    leaves = [jnp.ones((50, 41)), jnp.ones((30, 7)), jnp.ones((9, 9))]

    def loop_conds(groups):
        counts = [num_pruned(0.5, sum(x.size for x in g)) for g in groups]
        jaxpr = jax.make_jaxpr(lambda gs: prune_lowest(gs, counts, paired=paired))(
            groups
        ).jaxpr
        (search, *_) = _whiles(jaxpr)
        return [e.primitive.name for e in search.params["body_jaxpr"].jaxpr.eqns].count(
            "cond"
        )

    assert loop_conds([[x] for x in leaves]) == len(leaves)
    assert loop_conds([leaves]) == 0


def test_include_predicate_and_regex():
    params = make_tree("linen")
    scores = js.saliency.magnitude(params)
    by_regex = js.layerwise_mask(scores, 0.5, include="Dense_0/kernel")
    assert by_regex["params"]["Conv_0"]["kernel"] is None
    assert by_regex["params"]["Dense_0"]["kernel"] is not None
    by_fn = js.layerwise_mask(scores, 0.5, include=lambda path, x: x.ndim == 1)
    assert by_fn["params"]["Dense_0"]["kernel"] is None
    assert by_fn["params"]["Dense_0"]["bias"].shape == (5,)
    with pytest.raises(TypeError, match="include must be"):
        js.layerwise_mask(scores, 0.5, include=3)


def test_per_leaf_sparsity_tree():
    scores = {"a": jnp.arange(10.0).reshape(2, 5), "b": jnp.arange(6.0).reshape(2, 3)}
    mask = js.layerwise_mask(scores, {"a": 0.2, "b": None})
    assert mask["b"] is None
    np.testing.assert_array_equal(np.asarray(mask["a"]).ravel(), np.arange(10) >= 2)
    with pytest.raises(ValueError, match="sparsity tree does not match"):
        js.layerwise_mask(scores, {"a": 0.2})
    # A per-leaf target may remove the whole leaf; above 1 it is refused.
    whole = js.layerwise_mask(scores, {"a": 0.2, "b": 1.0})
    assert not np.asarray(whole["b"]).any()
    with pytest.raises(ValueError, match=re.escape("b: sparsity must be in [0, 1]")):
        js.layerwise_mask(scores, {"a": 0.2, "b": 1.5})


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_raises(bad):
    scores = {"w": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match="sparsity must be in"):
        js.layerwise_mask(scores, bad)
    with pytest.raises(ValueError, match="sparsity must be in"):
        js.global_mask(scores, bad)


def test_non_float_scores_raise_with_path():
    scores = {"layer": {"w": jnp.ones((2, 2), jnp.int32)}}
    # Integer leaves are not selected by default; chosen explicitly they raise.
    assert js.layerwise_mask(scores, 0.5)["layer"]["w"] is None
    with pytest.raises(TypeError, match="layer/w: scores must be floating"):
        js.layerwise_mask(scores, 0.5, include=lambda p, x: True)


def test_global_min_density_guards_layers():
    scores = {
        "small": jnp.full((4, 4), 0.01),
        "big": jnp.arange(1.0, 65.0).reshape(8, 8),
    }
    plain = js.global_mask(scores, 0.5)
    assert not np.asarray(plain["small"]).any()
    guarded = js.global_mask(scores, 0.5, min_density=0.25)
    assert np.asarray(guarded["small"]).sum() == 4
    total_kept = sum(int(np.asarray(m).sum()) for m in guarded.values())
    assert total_kept == 80 - round(0.5 * 80)
    # The 4 guarded entries come out of the big leaf's share.
    assert np.asarray(guarded["big"]).sum() == 36
    np.testing.assert_array_equal(
        np.asarray(guarded["big"]).ravel(), np.arange(64) >= 28
    )
    with pytest.raises(ValueError, match="min_density"):
        js.global_mask(scores, 0.9, min_density=0.5)
    with pytest.raises(ValueError, match="min_density must be in"):
        js.global_mask(scores, 0.5, min_density=1.5)


def test_global_min_density_traced():
    scores = {
        "small": jnp.full((4, 4), 0.01),
        "big": jnp.arange(1.0, 65.0).reshape(8, 8),
    }
    f = jax.jit(lambda s, sp: js.global_mask(s, sp, min_density=0.25))
    mask = f(scores, jnp.float32(0.5))
    assert np.asarray(mask["small"]).sum() == 4
    assert np.asarray(mask["big"]).sum() == 36


def test_apply_mask_zeroes_and_keeps_dtype():
    params = make_tree("dict", jnp.bfloat16)
    mask = js.layerwise_mask(js.saliency.magnitude(params), 0.5)
    out = js.apply_mask(params, mask)
    k = out["dense"]["kernel"]
    assert k.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(k == 0), ~np.asarray(mask["dense"]["kernel"])
    )
    np.testing.assert_array_equal(
        np.asarray(out["dense"]["bias"]), np.asarray(params["dense"]["bias"])
    )


def test_apply_mask_mismatch_raises_with_path():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match=re.escape("b: mask shape (2, 2)")):
        js.apply_mask(params, {"a": None, "b": jnp.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="missing"):
        js.apply_mask(params, {"a": None})
    with pytest.raises(ValueError, match="does not match"):
        js.apply_mask(params, [None, None])


@pytest.mark.parametrize("kind", KINDS)
def test_apply_mask_on_every_tree_kind(kind):
    params = make_tree(kind)
    mask = js.layerwise_mask(js.saliency.magnitude(params), 0.6)
    out = jax.jit(js.apply_mask)(params, mask)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    assert abs(float(js.sparsity(out)) - float(js.sparsity(mask))) < 1e-6


def test_dense_mask():
    mask = js.dense_mask(make_tree("dict"))
    assert mask["dense"]["bias"] is None
    assert np.asarray(mask["conv"]["kernel"]).all()


def test_check_finite_names_leaf():
    js.check_finite({"a": jnp.ones(3), "b": None, "c": jnp.arange(3)})
    with pytest.raises(ValueError, match=r"layer/1: 2 non-finite value\(s\)"):
        js.check_finite({"layer": [jnp.ones(2), jnp.array([1.0, jnp.nan, jnp.inf])]})


def test_sparsity_report_and_scalar():
    tree = {
        "w": jnp.array([[0.0, 1.0], [0.0, 2.0]]),
        "m": jnp.array([[True, False, False]]),
    }
    report = js.sparsity_report(tree)
    assert [leaf.path for leaf in report.leaves] == ["m", "w"]
    assert report.nonzeros == 3 and report.size == 7
    assert math.isclose(report.sparsity, 4 / 7)
    assert math.isclose(float(jax.jit(js.sparsity)(tree)), 4 / 7, rel_tol=1e-6)
    text = str(report)
    assert "total" in text and "57.14%" in text
    assert float(js.sparsity({"b": jnp.ones(3)})) == 0.0


@pytest.mark.parametrize("distribution", [js.Uniform(), js.ERK(), js.Global()])
def test_topk_mask_hits_target(distribution):
    scores = js.saliency.magnitude(make_tree("dict"))
    mask = js.topk_mask(scores, 0.7, distribution=distribution)
    report = js.sparsity_report(mask)
    assert report.size - report.nonzeros == round(0.7 * report.size)


def test_topk_mask_nm_and_custom():
    scores = js.saliency.magnitude(make_tree("dict"))
    nm = js.topk_mask(scores, None, granularity=js.NM(1, 2, axis=-2))
    assert float(js.sparsity(nm)) == 0.5
    custom = js.topk_mask(scores, None, distribution=js.Custom({"conv": 0.25}))
    assert custom["dense"]["kernel"] is None
    assert float(js.sparsity(custom)) == round(0.25 * 72) / 72
    with pytest.raises(TypeError, match="distribution must be"):
        js.topk_mask(scores, 0.5, distribution="erk")


def test_default_selection_takes_floating_arrays_only():
    """Regression: magnitude on a tree holding an int32 (3, 3) array raised."""
    params = {"w": jnp.ones((3, 3)), "table": jnp.ones((3, 3), jnp.int32)}
    scores = js.saliency.magnitude(params)
    assert scores["table"] is None
    mask = js.layerwise_mask(scores, 0.5)
    assert mask["table"] is None and mask["w"].shape == (3, 3)
    bf16 = js.dense_mask({"w": jnp.ones((2, 2), jnp.bfloat16)})
    assert bf16["w"] is not None


def test_effective_mask_merges_every_mask_of_a_chain():
    """Regression: with two prune transforms optax.tree.get(state, "mask")
    raised a KeyError followed by the whole state."""
    params = {"a": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.ones(3)}
    tx = optax.chain(
        optax.sgd(0.1),
        js.prune(js.saliency.magnitude, js.schedules.constant(0.5)),
        js.keep_masked({"a": jnp.array([[True] * 4, [False] * 4]), "b": None}),
    )
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    merged = js.effective_mask(state)
    np.testing.assert_array_equal(
        merged["a"], [[False, False, False, False], [False, False, False, False]]
    )
    assert merged["b"] is None
    with pytest.raises(ValueError, match="holds no mask"):
        js.effective_mask(optax.sgd(0.1).init(params))
