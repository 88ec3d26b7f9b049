"""Mask pytrees: building, applying and checking them.

A mask mirrors the params: a ``bool`` array per pruned leaf (``True`` keeps
the entry) and ``None`` per leaf left dense. Which leaves are pruned is set
by ``include`` (see :data:`jaxsparse.LeafSelector`): by default every
floating array with ``ndim >= 2``. Masks are chosen from scores by
:mod:`jaxsparse.selection` and :mod:`jaxsparse.distribution`, and counted by
:mod:`jaxsparse.reports`.

References:
  Hoefler et al. 2021, §2.3 (what is sparsified).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util

from jaxsparse import _tree
from jaxsparse._types import LeafSelector, Mask, Params


def dense_mask(params: Params, *, include: LeafSelector = None) -> Mask:
    """An all-``True`` mask over the leaves that ``include`` selects.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> js.dense_mask({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
      {'b': None, 'w': Array([[ True,  True],
             [ True,  True]], dtype=bool)}
    """
    return _tree.map_selected(
        lambda _, x: jnp.ones(jnp.shape(x), jnp.bool_), params, include
    )


def apply_mask(params: Params, mask: Mask) -> Params:
    """Zeroes the pruned entries of ``params``; ``None`` mask leaves pass.

    Args:
      params: a pytree of arrays.
      mask: a mask pytree with the same structure (``None`` for dense leaves).

    Returns:
      The params with every entry where the mask is ``False`` set to 0, in
      each leaf's own dtype.

    Raises:
      ValueError: if the trees or a leaf's shapes differ.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> params = {"w": jnp.array([[1.0, 2.0]]), "b": jnp.ones(1)}
      >>> js.apply_mask(params, {"w": jnp.array([[False, True]]), "b": None})["w"]
      Array([[0., 2.]], dtype=float32)
    """
    _tree.check_same_tree(params, mask, name="mask", ref_name="params")
    return tree_util.tree_map(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
        mask,
        params,
        is_leaf=_tree.is_none,
    )


def check_finite(tree: Any) -> None:
    """Raises ``ValueError`` naming the first leaf holding NaN or infinity.

    Eager (it reads the values on the host); use it before selection when
    non-finite scores should stop a run rather than rank lowest.
    """
    for path, leaf in _tree.leaves_with_path(tree):
        if leaf is None:
            continue
        values = np.asarray(leaf)
        if not np.issubdtype(values.dtype, np.inexact):
            continue
        bad = ~np.isfinite(values)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{_tree.path_str(path)}: {int(bad.sum())} non-finite value(s) "
                f"(NaN or inf), the first at index {where}"
            )


def effective_mask(opt_state: Any) -> Mask:
    """The mask an optimizer state enforces: every ``mask`` field in it (one
    per jaxsparse transform in a chain), merged by logical AND.

    ``optax.tree.get(state, "mask")`` finds the mask of a chain with one
    jaxsparse transform; with several it raises, and this merges them: an
    entry is kept only if every transform keeps it (``None`` leaves count
    as keeping everything).

    Args:
      opt_state: an optax state (any nesting of chains, wrappers,
        ``MultiSteps``, ``inject_hyperparams``).

    Returns:
      A mask pytree mirroring the params.

    Raises:
      ValueError: the state holds no mask, or masks of different trees.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsparse as js
      >>> params = {"w": jnp.ones((1, 3))}
      >>> tx = optax.chain(
      ...     js.keep_masked({"w": jnp.array([[True, True, False]])}),
      ...     js.keep_masked({"w": jnp.array([[False, True, True]])}),
      ... )
      >>> js.effective_mask(tx.init(params))["w"].tolist()
      [[False, True, False]]
    """
    found = [
        m
        for _, m in optax.tree_utils.tree_get_all_with_path(opt_state, "mask")
        if m is not None
    ]
    if not found:
        raise ValueError("the optimizer state holds no mask (no jaxsparse transform)")
    merged = found[0]
    for other in found[1:]:
        _tree.check_same_tree(merged, other, name="a mask", ref_name="first mask")
        merged = tree_util.tree_map(
            lambda a, b: b if a is None else (a if b is None else a & b),
            merged,
            other,
            is_leaf=_tree.is_none,
        )
    return merged
