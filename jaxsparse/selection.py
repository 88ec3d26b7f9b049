"""Exact top-k selection of masks from scores: layer-wise and global.

**Counting.** Pruning a fraction ``s`` of ``n`` entries (or groups) removes
exactly ``round(s * n)`` of them, rounding half to even as Python's
``round`` does, even when scores tie. ``s`` may be a traced scalar. A
per-leaf target may be 1 (the whole leaf); an overall target stays in
``[0, 1)``.

**Ties and NaN.** Scores are ranked by value, NaN lowest (so NaN entries
are pruned first and the result stays deterministic under ``jit``); among
equal scores the entry that comes later (leaf order of the tree, then
row-major position in the leaf) is pruned first. Use
:func:`jaxsparse.check_finite` to reject NaN eagerly instead.

References:
  Hoefler et al. 2021, §3.2 (layer-wise versus global thresholds).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from jaxsparse import _tree
from jaxsparse._select import num_pruned, prune_lowest
from jaxsparse._types import LeafSelector, Mask, Scores, Sparsity, SparsityTree
from jaxsparse.groups import Groups, units_include
from jaxsparse.structure import Element, Granularity, Reduce, check_granularity


def _leaf_sparsities(
    scores: Scores, sparsity: Sparsity | SparsityTree, include: LeafSelector
) -> list[tuple[int, str, jax.Array, Any]]:
    """``(leaf index, path, leaf, sparsity)`` for every leaf to be pruned."""
    leaves = _tree.leaves_with_path(scores)
    select = _tree.leaf_selector(include)
    if sparsity is None or not _is_tree(sparsity):
        if sparsity is not None:
            _tree.check_sparsity(sparsity)
        return [
            (i, _tree.path_str(p), x, sparsity)
            for i, (p, x) in enumerate(leaves)
            if x is not None and select(p, x)
        ]
    _tree.check_same_tree(
        scores, sparsity, name="sparsity", ref_name="scores", shapes=False
    )
    out = []
    for i, ((p, x), (_, s)) in enumerate(zip(leaves, _tree.leaves_with_path(sparsity))):
        if s is None or x is None:
            continue
        name = _tree.path_str(p)
        # A per-leaf target may remove the whole leaf (an allocation at a
        # high overall target, a Custom map).
        _tree.check_sparsity(s, where=f"{name}: sparsity", whole=True)
        out.append((i, name, x, s))
    return out


def _expand_like(
    granularity: Granularity, keep: jax.Array, leaf: jax.Array
) -> jax.Array:
    """Expands a group mask to ``leaf``'s shape and, under an Explicit mesh,
    its sharding (elementwise masks inherit it anyway; expanded group masks
    would otherwise take the group axis's sharding only). Under Auto mesh
    axes the layout is XLA's choice: pass ``out_shardings`` to pin it."""
    mask = granularity.expand(keep, tuple(leaf.shape))
    sharding = jax.typeof(leaf).sharding
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    explicit = jax.sharding.AxisType.Explicit
    if (
        spec is not None
        and mesh is not None
        and any(a is not None for a in spec)
        and explicit in getattr(mesh, "axis_types", ())
        and jax.typeof(mask).sharding.spec != spec
    ):
        mask = jax.sharding.reshard(mask, spec)
    return mask


def _is_tree(x: Any) -> bool:
    return not isinstance(x, (int, float, np.ndarray, np.generic, jax.Array))


def _unflatten_like(scores: Scores, masks: dict[int, jax.Array]) -> Mask:
    leaves, treedef = tree_util.tree_flatten(scores, is_leaf=_tree.is_none)
    return treedef.unflatten([masks.get(i) for i in range(len(leaves))])


def _check_leaves(entries, granularity: Granularity) -> None:
    check_granularity(granularity)
    for _, name, leaf, _ in entries:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{name}: scores must be floating point, got dtype {leaf.dtype}"
            )
        granularity.check(tuple(leaf.shape), name)


def _fixed_mask(scores, entries, granularity: Granularity) -> Mask:
    """The mask of a granularity that fixes the sparsity and selects alone."""
    fixed = granularity.fixed_sparsity
    for _, name, _, s in entries:
        value = None if s is None else _tree.concrete_float(s)
        if s is not None and (value is None or not math.isclose(value, fixed)):
            raise ValueError(
                f"{name}: {granularity} fixes the sparsity at "
                f"{fixed}; pass sparsity=None, got {s!r}"
            )
    return _unflatten_like(scores, {i: granularity.keep(x) for i, _, x, _ in entries})


def layerwise_mask(
    scores: Scores,
    sparsity: Sparsity | SparsityTree | None,
    *,
    granularity: Granularity = Element(),
    include: LeafSelector = None,
    reduce: Reduce = "l1",
) -> Mask:
    """Prunes each selected leaf to its own target by its own threshold.

    Args:
      scores: a pytree of float scores (higher means keep) mirroring params.
      sparsity: one fraction for every selected leaf, or a pytree mirroring
        ``scores`` with a fraction per leaf to prune and ``None`` per leaf to
        leave dense (as :mod:`jaxsparse.distribution` returns; ``include`` is
        then not consulted). ``None`` only with :class:`~jaxsparse.NM`, which
        fixes the sparsity itself. May be traced.
      granularity: which entries are removed together; the fraction counts
        groups (``round(s * groups)`` groups are pruned in each leaf). With
        :class:`~jaxsparse.groups.Groups`, each unit set is pruned to its
        own fraction of units; ``sparsity`` is then one fraction or a dict
        keyed by set name, and ``include`` selects sets by name.
      include: which leaves to prune when ``sparsity`` is a scalar.
      reduce: how element scores become group scores: ``"l1"`` (sum of
        absolute values), ``"l2"`` (Euclidean norm) or ``"sum"``.

    Returns:
      A mask pytree: ``bool`` arrays for pruned leaves, ``None`` elsewhere.

    Raises:
      ValueError: a concrete sparsity outside ``[0, 1)``, a sparsity tree
        that does not match, or a shape the granularity does not divide
        (naming the leaf path).
      TypeError: non-float scores or an unknown granularity.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> scores = {"w": jnp.array([[4.0, 1.0], [3.0, 2.0]])}
      >>> js.layerwise_mask(scores, 0.5)["w"]
      Array([[ True, False],
             [ True, False]], dtype=bool)

    References:
      Hoefler et al. 2021, §3.2 (layer-wise magnitude thresholds).
    """
    if isinstance(granularity, Groups):
        units = granularity.unit_scores(scores, reduce)
        keep = layerwise_mask(units, sparsity, include=units_include(include))
        return granularity.element_mask(keep, scores)
    entries = _leaf_sparsities(scores, sparsity, include)
    _check_leaves(entries, granularity)
    if granularity.fixed_sparsity is not None:
        return _fixed_mask(scores, entries, granularity)
    if any(s is None for *_, s in entries):
        raise ValueError(
            "sparsity=None is only allowed with a granularity that fixes it (NM)"
        )
    grouped = [granularity.group_scores(x, reduce) for _, _, x, _ in entries]
    counts = [num_pruned(s, g.size) for (*_, s), g in zip(entries, grouped)]
    pruned = prune_lowest([[g] for g in grouped], counts)
    return _unflatten_like(
        scores,
        {
            i: _expand_like(granularity, ~p[0], x)
            for (i, _, x, _), p in zip(entries, pruned)
        },
    )


def global_mask(
    scores: Scores,
    sparsity: Sparsity,
    *,
    granularity: Granularity = Element(),
    include: LeafSelector = None,
    reduce: Reduce = "l1",
    min_density: float = 0.0,
) -> Mask:
    """Prunes the selected leaves together by one threshold over all scores.

    Scores of different leaves are compared directly, so they should be on
    one scale (magnitude, Taylor, OBS saliency). ``min_density`` guards
    against removing a whole layer: every leaf first keeps its own best
    ``ceil(min_density * groups)`` groups, and the global threshold decides
    the rest, so the total pruned count is still exact.

    Args:
      scores: a pytree of float scores (higher means keep).
      sparsity: the fraction of all selected groups to prune (may be traced).
      granularity: which entries are removed together (groups are counted;
        with :class:`~jaxsparse.groups.Groups`, units of every set compete).
      include: which leaves take part.
      reduce: group reduction, as in :func:`layerwise_mask`.
      min_density: the fraction of each leaf's groups that is always kept,
        in ``[0, 1]``; must not exceed ``1 - sparsity``.

    Returns:
      A mask pytree.

    Raises:
      ValueError: bad sparsity or ``min_density``, or a shape the
        granularity does not divide.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> scores = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[3.0, 4.0]])}
      >>> m = js.global_mask(scores, 0.5)
      >>> m["a"].tolist(), m["b"].tolist()
      ([[False, False]], [[True, True]])

    References:
      Hoefler et al. 2021, §3.2 (global thresholds), §2.4.5 (layer collapse);
      Wang et al. 2020 (a density floor per layer).
    """
    if granularity.fixed_sparsity is None and (
        sparsity is None or _is_tree(sparsity) or np.ndim(sparsity) != 0
    ):
        raise ValueError("global_mask takes one scalar sparsity for all leaves")
    if not 0.0 <= float(min_density) <= 1.0:
        raise ValueError(f"min_density must be in [0, 1], got {min_density!r}")
    if isinstance(granularity, Groups):
        units = granularity.unit_scores(scores, reduce)
        keep = global_mask(
            units, sparsity, include=units_include(include), min_density=min_density
        )
        return granularity.element_mask(keep, scores)
    entries = _leaf_sparsities(scores, sparsity, include)
    _check_leaves(entries, granularity)
    if granularity.fixed_sparsity is not None:
        return _fixed_mask(scores, entries, granularity)
    grouped = [granularity.group_scores(x, reduce) for _, _, x, _ in entries]
    total = sum(g.size for g in grouped)
    count = num_pruned(sparsity, total)
    valid = None
    if min_density > 0.0:
        floors = [math.ceil(min_density * g.size) for g in grouped]
        value = _tree.concrete_float(sparsity)
        if value is not None and count > total - sum(floors):
            raise ValueError(
                f"sparsity {value!r} prunes {count} of {total} groups but "
                f"min_density={min_density!r} keeps at least {sum(floors)}"
            )
        floor_pruned = prune_lowest(
            [[g] for g in grouped], [g.size - f for g, f in zip(grouped, floors)]
        )
        valid = [[p[0] for p in floor_pruned]]
    pruned = prune_lowest([grouped], [count], valid)[0]
    return _unflatten_like(
        scores,
        {
            i: _expand_like(granularity, ~p, x)
            for (i, _, x, _), p in zip(entries, pruned)
        },
    )
