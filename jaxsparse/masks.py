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

import hashlib
from typing import Any

import jax
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
    # ones_like keeps each leaf's sharding: under an Explicit mesh the mask
    # then has the type every later mask of the leaf has.
    return _tree.map_selected(
        lambda _, x: jnp.ones_like(x, dtype=jnp.bool_), params, include
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


def _digest(x: Any) -> np.uint32:
    data = np.ascontiguousarray(np.asarray(x))
    raw = hashlib.blake2b(data.tobytes(), digest_size=4).digest()
    # 0 marks "not held here"; a real digest of 0 becomes 1.
    return np.uint32(max(1, int.from_bytes(raw, "little")))


def _part_digests(leaf: Any) -> np.ndarray:
    """One digest per distinct part of ``leaf`` (its shards, in the global
    sharding's order; the whole leaf for a host array), 0 for the parts
    this process does not hold."""
    if not isinstance(leaf, jax.Array):
        return np.array([_digest(leaf)], np.uint32)
    parts = sorted(
        {str(i) for i in leaf.sharding.devices_indices_map(leaf.shape).values()}
    )
    held = {str(s.index): _digest(s.data) for s in leaf.addressable_shards}
    return np.array([held.get(p, 0) for p in parts], np.uint32)


def check_same_across_processes(tree: Any, *, name: str = "mask") -> None:
    """Raises if the processes of a multi-process run hold different values
    of ``tree`` (a mask built from another key or other data on one host),
    naming the first leaf that differs; call it before the first step.
    A no-op in a single process.

    Every process hashes the parts of each leaf it holds; the hashes are
    gathered and each part must hash alike wherever it is held.

    Raises:
      ValueError: naming the leaf and two processes that disagree.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> js.masks.check_same_across_processes({"w": jnp.ones((2, 2), bool)})

    References:
      Hoefler et al. 2021, §8 (data-parallel sparse training needs one mask).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    leaves = [(p, x) for p, x in _tree.leaves_with_path(tree) if x is not None]
    local = [_part_digests(x) for _, x in leaves]
    if not local:
        return
    sizes = [len(d) for d in local]
    gathered = np.asarray(
        multihost_utils.process_allgather(np.concatenate(local)), np.uint32
    ).reshape(jax.process_count(), -1)
    start = 0
    for (path, _), size in zip(leaves, sizes):
        block = gathered[:, start : start + size]
        start += size
        for part in block.T:
            held = np.flatnonzero(part)
            if len(held) and np.any(part[held] != part[held[0]]):
                other = held[np.argmax(part[held] != part[held[0]])]
                raise ValueError(
                    f"{_tree.path_str(path)}: processes {held[0]} and {other} hold "
                    f"different values of this {name}; build it from the same key "
                    "and data on every process"
                )
