"""How one overall sparsity target is spread over the pruned leaves, and
the mask it selects (:func:`topk_mask`).

A distribution is a small frozen (hashable) object that answers one
question: which mask do these scores give at this target
(:meth:`Distribution.mask`). :class:`Global` selects with one threshold over
all leaves; :class:`Uniform`, :class:`ERK` and :class:`Custom` allocate a
sparsity per leaf (:meth:`Allocation.allocate`, a pytree mirroring the
params, ``None`` for dense leaves) that layer-wise selection then meets
exactly.

**Two counting rules.**

- :class:`Uniform` prunes every selected leaf to exactly
  ``round(s * n_leaf)``, the same as :func:`jaxsparse.layerwise_mask`, so a
  leaf's count never depends on the other leaves.
- :class:`ERK` and :class:`Global` are exact in the total: the per-leaf
  pruned counts add up to ``round(s * total)`` (ERK rounds per leaf by
  largest remainder). A concrete sparsity is allocated on the host in
  float64; a traced one (from a schedule inside ``jit``) in float32 with the
  same algorithm.
- :class:`Custom` gives each leaf its own target, scaled by an overall
  target when one is given (see its docstring).

Every distribution takes a ``min_density`` floor (the layer-collapse guard
of Wang et al. 2020): each leaf keeps at least ``ceil(min_density * n)``.
A per-leaf target may be 1 (a whole leaf removed); the overall target stays
in ``[0, 1)``.

References:
  Hoefler et al. 2021, §3.2 and §2.4.5; Evci et al. 2020 (ERK); Wang et al.
  2020 (a density floor per layer against layer collapse).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse import _tree
from jaxsparse._types import LeafSelector, Mask, Params, Scores, Sparsity, SparsityTree
from jaxsparse.groups import Groups, units_include
from jaxsparse.selection import global_mask, layerwise_mask
from jaxsparse.structure import Element, Granularity, Reduce

_BISECTION_STEPS = 64


class Distribution(abc.ABC):
    """Base of the distributions: each selects its own mask."""

    min_density: float

    @abc.abstractmethod
    def mask(
        self,
        scores: Scores,
        sparsity: Sparsity | None,
        *,
        granularity: Granularity = Element(),
        include: LeafSelector = None,
        reduce: Reduce = "l1",
    ) -> Mask:
        """The mask these scores give at ``sparsity`` (see :func:`topk_mask`)."""


class Allocation(Distribution):
    """A distribution that allocates a target per leaf, then selects each
    leaf by its own threshold."""

    @abc.abstractmethod
    def allocate(
        self, params: Params, sparsity: Sparsity | None, *, include: LeafSelector = None
    ) -> SparsityTree:
        """Per-leaf sparsity for the leaves ``include`` selects.

        Args:
          params: the params (or scores) whose leaf shapes are allocated over.
          sparsity: the overall fraction of selected entries to prune.
          include: which leaves are pruned.

        Returns:
          A pytree mirroring ``params``: a scalar sparsity (in ``[0, 1]``) per
          pruned leaf and ``None`` per dense leaf.
        """

    def mask(
        self,
        scores: Scores,
        sparsity: Sparsity | None,
        *,
        granularity: Granularity = Element(),
        include: LeafSelector = None,
        reduce: Reduce = "l1",
    ) -> Mask:
        if isinstance(granularity, Groups):
            units = granularity.unit_scores(scores, reduce)
            keep = self.mask(units, sparsity, include=units_include(include))
            return granularity.element_mask(keep, scores)
        if granularity.fixed_sparsity is not None:
            return layerwise_mask(
                scores, None, granularity=granularity, include=include
            )
        targets = self.allocate(scores, sparsity, include=include)
        return layerwise_mask(scores, targets, granularity=granularity, reduce=reduce)


def _check_density(min_density: float, owner: str) -> None:
    if not 0.0 <= float(min_density) <= 1.0:
        raise ValueError(f"{owner}: min_density must be in [0, 1], got {min_density!r}")


def _allocate(
    params: Params,
    sparsity: Sparsity,
    include: LeafSelector,
    weight: Any,
    min_density: float,
) -> SparsityTree:
    """Densities ``clip(c * weight_l, floor_l, 1)`` with ``c`` chosen so the
    kept count is ``total - round(sparsity * total)``, rounded per leaf by
    largest remainder so the counts add up exactly."""
    _tree.check_sparsity(sparsity)
    leaves = list(_tree.selected(params, include))
    if not leaves:
        return _tree.map_selected(lambda p, x: None, params, include)
    sizes_int = [int(np.size(x)) for _, x in leaves]
    total = sum(sizes_int)
    floors_int = [math.ceil(min_density * n) for n in sizes_int]
    value = _tree.concrete_float(sparsity)
    if value is not None:
        xp, dtype = np, np.float64
        keep_total = total - round(value * total)
        if keep_total < sum(floors_int):
            raise ValueError(
                f"sparsity {value!r} keeps {keep_total} of {total} entries, fewer "
                f"than min_density={min_density!r} requires ({sum(floors_int)})"
            )
    else:
        xp, dtype = jnp, jnp.float32
        keep_total = total - jnp.round(jnp.asarray(sparsity, dtype) * total)
        keep_total = jnp.maximum(keep_total, sum(floors_int))
    sizes = xp.asarray(sizes_int, dtype)
    floors = xp.asarray(floors_int, dtype) / sizes
    weights = xp.asarray([weight(x) for _, x in leaves], dtype)

    def kept(c):
        return xp.sum(sizes * xp.clip(c * weights, floors, 1.0))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        low = kept(mid) < keep_total
        return xp.where(low, mid, lo), xp.where(low, hi, mid)

    bounds = (xp.asarray(0.0, dtype), xp.asarray(1.0, dtype) / xp.min(weights))
    if xp is np:
        for i in range(_BISECTION_STEPS):
            bounds = bisect(i, bounds)
    else:
        bounds = lax.fori_loop(0, _BISECTION_STEPS, bisect, bounds)
    exact = sizes * xp.clip(bounds[1] * weights, floors, 1.0)
    counts = xp.floor(exact)
    deficit = keep_total - xp.sum(counts)
    order = xp.argsort(-(exact - counts), stable=True)
    rank = xp.argsort(order, stable=True)
    counts = xp.minimum(
        counts + xp.where(rank.astype(dtype) < deficit, 1.0, 0.0), sizes
    )
    per_leaf = (sizes - counts) / sizes
    by_path = {
        _tree.path_str(p): float(per_leaf[i]) if xp is np else per_leaf[i]
        for i, (p, _) in enumerate(leaves)
    }
    return _tree.map_selected(lambda p, x: by_path[_tree.path_str(p)], params, include)


def _capped(sparsity: Any, size: int, min_density: float) -> Any:
    """``sparsity`` lowered, if needed, so ``ceil(min_density * size)``
    entries stay."""
    if min_density == 0.0:
        return sparsity
    most = (size - math.ceil(min_density * size)) / size
    value = _tree.concrete_float(sparsity)
    if value is not None:
        return min(value, most)
    return jnp.minimum(jnp.asarray(sparsity, jnp.float32), most)


@dataclasses.dataclass(frozen=True)
class Uniform(Allocation):
    """Every leaf pruned to exactly ``round(sparsity * n_leaf)``, as
    :func:`jaxsparse.layerwise_mask` does.

    Args:
      min_density: a floor on each leaf's density, in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"a": jnp.ones((4, 4)), "b": jnp.ones((2, 2))}
      >>> Uniform().allocate(params, 0.5)
      {'a': 0.5, 'b': 0.5}
      >>> Uniform(min_density=0.75).allocate(params, 0.5)
      {'a': 0.25, 'b': 0.25}
    """

    min_density: float = 0.0

    def __post_init__(self):
        _check_density(self.min_density, "Uniform")

    def allocate(self, params, sparsity, *, include=None):
        _tree.check_sparsity(sparsity)
        return _tree.map_selected(
            lambda _, x: _capped(sparsity, int(np.size(x)), self.min_density),
            params,
            include,
        )


@dataclasses.dataclass(frozen=True)
class ERK(Allocation):
    """Erdős–Rényi-Kernel: density proportional to ``sum(shape) / prod(shape)``.

    The factor is scaled so the overall sparsity matches; a leaf whose
    density would exceed 1 stays dense and the others absorb the difference.
    The per-leaf counts add up to ``round(sparsity * total)``.

    Args:
      power_scale: exponent on the ERK ratio (1 is the paper's ERK, 0 is
        uniform in density but still exact in the total), as in the RigL
        code.
      min_density: a floor on each leaf's density, in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"a": jnp.ones((10, 10)), "b": jnp.ones((10, 2))}
      >>> ERK().allocate(params, 0.5)  # 60 + 0 = round(0.5 * 120) pruned
      {'a': 0.6, 'b': 0.0}

    References:
      Evci et al. 2020, "Rigging the Lottery", §3 and appendix; Mocanu et al.
      2018 (Erdős–Rényi); Hoefler et al. 2021, §3.2.
    """

    power_scale: float = 1.0
    min_density: float = 0.0

    def __post_init__(self):
        _check_density(self.min_density, "ERK")
        if not float(self.power_scale) >= 0.0:
            raise ValueError(f"ERK: power_scale must be >= 0, got {self.power_scale!r}")

    def allocate(self, params, sparsity, *, include=None):
        def weight(x):
            return (sum(np.shape(x)) / math.prod(np.shape(x))) ** self.power_scale

        return _allocate(params, sparsity, include, weight, self.min_density)


@dataclasses.dataclass(frozen=True)
class Global(Distribution):
    """One threshold over all selected leaves (see :func:`jaxsparse.global_mask`).

    Args:
      min_density: each leaf keeps at least this fraction of its groups
        (the layer-collapse guard of Wang et al. 2020).
    """

    min_density: float = 0.0

    def __post_init__(self):
        _check_density(self.min_density, "Global")

    def mask(
        self,
        scores,
        sparsity,
        *,
        granularity=Element(),
        include=None,
        reduce="l1",
    ):
        return global_mask(
            scores,
            sparsity,
            granularity=granularity,
            include=include,
            reduce=reduce,
            min_density=self.min_density,
        )


@dataclasses.dataclass(frozen=True)
class Custom(Allocation):
    """Explicit per-leaf sparsities keyed by regular expressions.

    Each selected leaf takes the value ``c`` of the first pattern found in
    its ``/``-joined path (1 removes the whole leaf); a selected leaf that no
    pattern matches stays dense.

    - With ``sparsity=None`` every leaf gets its own ``c``.
    - With an overall target ``s`` (a schedule's value), every leaf gets
      ``min(1, c * s / c_bar)``, where ``c_bar`` is the overall sparsity the
      map itself reaches over the selected leaves (:meth:`overall`): the
      map's shape is kept and scaled, so a schedule that ends at ``c_bar``
      reaches every leaf's own target, as in Han et al.'s per-layer ratios
      reached by iterative pruning.

    Args:
      sparsities: a mapping (or pairs) from pattern to sparsity in ``[0, 1]``.
      min_density: a floor on each leaf's density, in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse.distribution import Custom
      >>> params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
      >>> custom = Custom({"a": 0.5})
      >>> custom.allocate(params, None)
      {'a': 0.5, 'b': None}
      >>> custom.overall(params)
      0.25
      >>> custom.allocate(params, 0.125)  # half way there
      {'a': 0.25, 'b': None}

    References:
      Han et al. 2015, "Learning both weights and connections", §4 (per-layer
      pruning ratios); Hoefler et al. 2021, §3.2.
    """

    sparsities: tuple[tuple[str, float], ...]
    min_density: float = 0.0

    def __post_init__(self):
        _check_density(self.min_density, "Custom")
        pairs = (
            tuple(self.sparsities.items())
            if isinstance(self.sparsities, Mapping)
            else tuple(tuple(p) for p in self.sparsities)
        )
        for pattern, value in pairs:
            re.compile(pattern)
            _tree.check_sparsity(
                value, where=f"Custom: sparsity for {pattern!r}", whole=True
            )
        object.__setattr__(self, "sparsities", pairs)

    def _lookup(self, path) -> float | None:
        name = _tree.path_str(path)
        for pattern, value in self.sparsities:
            if re.search(pattern, name):
                return float(value)
        return None

    def overall(self, params: Params, *, include: LeafSelector = None) -> float:
        """The fraction of the selected entries the map itself prunes."""
        chosen = list(_tree.selected(params, include))
        total = sum(int(np.size(x)) for _, x in chosen)
        pruned = sum((self._lookup(p) or 0.0) * int(np.size(x)) for p, x in chosen)
        return pruned / total if total else 0.0

    def allocate(self, params, sparsity, *, include=None):
        scale = None
        if sparsity is not None:
            _tree.check_sparsity(sparsity)
            reach = self.overall(params, include=include)
            if reach == 0.0:
                raise ValueError(
                    "Custom: the map prunes nothing of the selected leaves, so an "
                    "overall target cannot scale it"
                )
            scale = sparsity / reach

        def leaf(path, x):
            value = self._lookup(path)
            if value is None:
                return None
            if scale is not None:
                value = (
                    min(1.0, value * scale)
                    if _tree.concrete_float(scale) is not None
                    else jnp.minimum(1.0, value * jnp.asarray(scale, jnp.float32))
                )
            return _capped(value, int(np.size(x)), self.min_density)

        return _tree.map_selected(leaf, params, include)


def topk_mask(
    scores: Scores,
    sparsity: Sparsity | None,
    *,
    distribution: Distribution = Uniform(),
    granularity: Granularity = Element(),
    include: LeafSelector = None,
    reduce: Reduce = "l1",
) -> Mask:
    """Selects a mask from scores for one overall target, as ``distribution``
    spreads it across leaves (``distribution.mask(...)``).

    :class:`Global` selects with one threshold (:func:`jaxsparse.global_mask`);
    every other distribution allocates per-leaf targets and selects
    layer-wise (:func:`jaxsparse.layerwise_mask`).

    Args:
      scores: a pytree of float scores (higher means keep).
      sparsity: the overall fraction to prune, in ``[0, 1)`` (may be traced;
        ``None`` for :class:`~jaxsparse.NM` or a :class:`Custom` map).
      distribution: how the target is spread over leaves.
      granularity: which entries are removed together.
      include: which leaves are pruned.
      reduce: group reduction, as in :func:`jaxsparse.layerwise_mask`.

    Returns:
      A mask pytree.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> scores = {"a": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.ones((1, 1))}
      >>> js.topk_mask(scores, 0.9, distribution=js.ERK())["b"]
      Array([[False]], dtype=bool)

    References:
      Hoefler et al. 2021, §3.1–3.2; Evci et al. 2020 (ERK).
    """
    if not isinstance(distribution, Distribution):
        raise TypeError(
            "distribution must be Uniform(), ERK(), Global() or Custom(...), "
            f"got {distribution!r}"
        )
    return distribution.mask(
        scores, sparsity, granularity=granularity, include=include, reduce=reduce
    )
