"""How one overall sparsity target is spread over the pruned leaves.

A distribution is a small frozen (hashable) object. :class:`Uniform`,
:class:`ERK` and :class:`Custom` allocate a sparsity per leaf (a pytree
mirroring the params, ``None`` for dense leaves) that layer-wise selection
then meets exactly; :class:`Global` means one threshold over all leaves
(:func:`jaxsparse.global_mask`).

Allocations are exact in the count: the per-leaf pruned counts add up to
``round(sparsity * total)`` (largest-remainder rounding), so the overall
sparsity matches the target to the element. A concrete sparsity is allocated
on the host in float64; a traced one (from a schedule inside ``jit``) in
float32 with the same algorithm.

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
from jaxsparse._types import LeafSelector, Params, Sparsity, SparsityTree

_BISECTION_STEPS = 64


class Distribution(abc.ABC):
    """Base of the per-leaf allocations."""

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
          A pytree mirroring ``params``: a scalar sparsity per pruned leaf and
          ``None`` per dense leaf.
        """


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


@dataclasses.dataclass(frozen=True)
class Uniform(Distribution):
    """Every leaf gets the overall sparsity (up to one entry of rounding).

    Args:
      min_density: a floor on each leaf's density, in ``[0, 1]``.
    """

    min_density: float = 0.0

    def __post_init__(self):
        _check_density(self.min_density, "Uniform")

    def allocate(self, params, sparsity, *, include=None):
        return _allocate(params, sparsity, include, lambda x: 1.0, self.min_density)


@dataclasses.dataclass(frozen=True)
class ERK(Distribution):
    """Erdős–Rényi-Kernel: density proportional to ``sum(shape) / prod(shape)``.

    The factor is scaled so the overall sparsity matches; a leaf whose
    density would exceed 1 stays dense and the others absorb the difference.

    Args:
      power_scale: exponent on the ERK ratio (1 is the paper's ERK, 0 is
        uniform), as in the RigL code.
      min_density: a floor on each leaf's density, in ``[0, 1]``.

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

    def allocate(self, params, sparsity, *, include=None):
        raise TypeError(
            "Global allocates by score, not by shape; select with "
            "jaxsparse.global_mask or jaxsparse.topk_mask"
        )


@dataclasses.dataclass(frozen=True)
class Custom(Distribution):
    """Explicit per-leaf sparsities keyed by regular expressions.

    Each selected leaf takes the value of the first pattern found in its
    ``/``-joined path; a selected leaf that no pattern matches stays dense.
    There is no overall target: pass ``sparsity=None``.

    Args:
      sparsities: a mapping (or pairs) from pattern to sparsity in ``[0, 1)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse.distribution import Custom
      >>> params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 2))}
      >>> Custom({"a": 0.5}).allocate(params, None)
      {'a': 0.5, 'b': None}
    """

    sparsities: tuple[tuple[str, float], ...]

    def __post_init__(self):
        pairs = (
            tuple(self.sparsities.items())
            if isinstance(self.sparsities, Mapping)
            else tuple(tuple(p) for p in self.sparsities)
        )
        for pattern, value in pairs:
            re.compile(pattern)
            _tree.check_sparsity(value, where=f"Custom: sparsity for {pattern!r}")
        object.__setattr__(self, "sparsities", pairs)

    def allocate(self, params, sparsity, *, include=None):
        if sparsity is not None:
            raise ValueError(
                f"Custom sets every leaf's sparsity itself; pass sparsity=None, "
                f"got {sparsity!r}"
            )

        def lookup(path, _):
            name = _tree.path_str(path)
            for pattern, value in self.sparsities:
                if re.search(pattern, name):
                    return value
            return None

        return _tree.map_selected(lookup, params, include)
