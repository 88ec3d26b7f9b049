"""The empirical Fisher: per-example gradients, its diagonal, and its
block-diagonal inverse by Cholesky or by the Woodbury recursion.

``F = (1/N) sum_n g_n g_n^T`` over per-example gradients ``g_n`` stands in
for the Hessian where exact blocks are too expensive. Its damped inverse
``(lambda I + F)^-1`` is built per block of ``B`` consecutive entries,
starting from ``lambda^-1 I`` and folding one rank-one Sherman-Morrison
update per gradient (WoodFisher), or by forming and factoring each block.

References:
  Singh & Alistarh 2020 (WoodFisher); Sherman & Morrison 1950;
  Hoefler et al. 2021, §3.5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax, tree_util

from jaxsparse import _tree
from jaxsparse._types import LeafSelector, Mask, Params
from jaxsparse.blocks import BlockInverse, blocked, stack


def per_example_grads(
    loss_fn: Callable[..., jax.Array], params: Params, *batch: jax.Array
) -> Params:
    """Gradients of each example's loss, stacked along a new leading axis.

    ``loss_fn(params, *batch)`` is the usual batched (mean) loss; each
    example is fed as a batch of one, so any batched model works.

    Returns:
      A pytree mirroring ``params`` whose leaves have a leading axis of the
      batch size.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, x: jnp.mean(x @ p["w"])
      >>> per_example_grads(loss, {"w": jnp.ones(2)}, jnp.eye(2))["w"]
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
    """
    if not batch:
        raise ValueError("per_example_grads needs a batch")

    def one(*example):
        return jax.grad(loss_fn)(params, *(e[None] for e in example))

    return jax.vmap(one)(*batch)


def _map_per_example(fn, grads: Params, include: LeafSelector) -> Params:
    """``fn(g)`` on the per-example gradient leaves whose parameter (the leaf
    without its leading axis) ``include`` selects, ``None`` elsewhere."""
    one = tree_util.tree_map(lambda g: g[0], grads)
    chosen = {p for p, _ in _tree.selected(one, include)}
    return tree_util.tree_map_with_path(
        lambda p, g: fn(g) if p in chosen else None, grads
    )


def fisher_diag(grads: Params, *, include: LeafSelector = None) -> Params:
    """Empirical Fisher diagonal ``mean_n g_n^2`` from per-example gradients.

    Args:
      grads: leading axis ``N``, as :func:`per_example_grads` returns.
      include: which leaves, judged by the parameter's own shape (default:
        floating arrays with ``ndim >= 2``).

    Example:
      >>> import jax.numpy as jnp
      >>> fisher_diag({"w": jnp.array([[[1.0, 2.0]], [[3.0, 0.0]]])})["w"]
      Array([[5., 2.]], dtype=float32)
    """
    return _map_per_example(lambda g: jnp.mean(jnp.square(g), axis=0), grads, include)


def woodbury_init(
    params: Params, *, block_size: int, damping: float, include: LeafSelector = None
) -> BlockInverse:
    """The starting point ``lambda^-1 I`` of the Sherman-Morrison recursion.

    Example:
      >>> import jax.numpy as jnp
      >>> inv = woodbury_init({"w": jnp.zeros((3, 2))}, block_size=4, damping=0.5)
      >>> inv.blocks["w"].shape, float(inv.blocks["w"][0, 0, 0])
      ((2, 4, 4), 2.0)
    """
    _tree.check_positive_int(block_size, "block_size")
    _tree.check_positive(damping, "damping")

    def eye(_, x):
        count = -(-x.size // block_size)
        return jnp.broadcast_to(
            jnp.eye(block_size, dtype=x.dtype) / damping,
            (count, block_size, block_size),
        )

    return BlockInverse(_tree.map_selected(eye, params, include), block_size, damping)


def woodbury_update(
    inverse: BlockInverse, grads: Params, *, num_samples: int, rank: int = 32
) -> BlockInverse:
    """Folds a mini-batch of per-example gradients into the block inverses.

    Each gradient ``g`` adds ``g g^T / num_samples`` to ``F``; the inverse
    follows by Sherman-Morrison,
    ``A^-1 - (A^-1 g)(A^-1 g)^T / (num_samples + g^T A^-1 g)``. ``rank``
    successive rank-one steps are taken at once with the Woodbury identity
    ``A^-1 - U (N I + G^T U)^-1 U^T``, ``U = A^-1 G`` (the same recursion,
    in matrix products rather than matrix-vector ones), one ``lax.scan``
    step per ``rank`` gradients over the blocks of every leaf at once.
    Feeding all ``num_samples`` gradients in any number of pieces gives
    ``(damping * I + (1/N) sum g g^T)^-1`` per block.

    Args:
      inverse: the running inverse (from :func:`woodbury_init`).
      grads: per-example gradients with a leading batch axis, mirroring the
        params (leaves the inverse does not cover are ignored).
      num_samples: ``N``, the total number of gradients that will be folded.
      rank: gradients folded per scan step (1 is plain Sherman-Morrison).

    Returns:
      The updated :class:`BlockInverse`.

    References:
      Singh & Alistarh 2020, "WoodFisher", §3 (eq. 11); Sherman & Morrison
      1950; Hoefler et al. 2021, §3.5.
    """
    _tree.check_positive_int(num_samples, "num_samples")
    _tree.check_positive_int(rank, "rank")
    _tree.check_same_tree(
        inverse.blocks, grads, name="grads", ref_name="params", shapes=False
    )
    a, split = stack(inverse.blocks)
    if a is None:
        return inverse
    g, _ = stack(
        tree_util.tree_map(
            lambda b, g: None if b is None else blocked(g, inverse.block_size),
            inverse.blocks,
            grads,
            is_leaf=_tree.is_none,
        )
    )
    g = g.astype(a.dtype)
    n = g.shape[1]
    k = min(rank, n)
    steps = -(-n // k)
    # Zero gradients leave the inverse unchanged, so padding is exact.
    g = jnp.pad(g, ((0, 0), (0, steps * k - n), (0, 0)))
    chunks = g.reshape(g.shape[0], steps, k, g.shape[2]).transpose(1, 0, 2, 3)
    eye = jnp.eye(k, dtype=a.dtype)[None]

    def step(a, gs):
        u = a @ jnp.swapaxes(gs, 1, 2)
        inner = num_samples * eye + gs @ u
        factor = jax.scipy.linalg.cho_factor(inner, lower=True)
        return a - u @ jax.scipy.linalg.cho_solve(factor, jnp.swapaxes(u, 1, 2)), None

    return dataclasses.replace(inverse, blocks=split(lax.scan(step, a, chunks)[0]))


def fisher_inverse(
    grads: Params,
    *,
    block_size: int,
    damping: float,
    include: LeafSelector = None,
    method: Literal["auto", "woodbury", "cholesky"] = "auto",
    mask: Mask = None,
) -> BlockInverse:
    """Block-diagonal ``(damping * I + F)^-1`` of the empirical Fisher
    ``F = (1/N) sum g g^T`` from per-example gradients in one batch.

    Args:
      grads: per-example gradients (leading axis ``N``) mirroring the params.
      block_size: ``B``, consecutive flattened entries per block (per leaf).
      damping: ``lambda > 0``.
      include: which leaves, judged by the parameter's shape (default:
        floating arrays with ``ndim >= 2``).
      method: ``"woodbury"`` (N rank-one updates), ``"cholesky"`` (form each
        block and factor it) or ``"auto"`` (Cholesky when ``N >= B``).
      mask: optional, mirroring the params: the Fisher of the kept entries
        only (pruned coordinates' gradients are dropped), so each block is
        ``(H_SS)^-1`` on the survivors ``S`` and ``lambda^-1 I`` on the rest.
        :func:`jaxsparse.obs.obs_prune` passes its mask to an inverse
        function that takes ``mask``.

    Returns:
      A :class:`~jaxsparse.blocks.BlockInverse`.

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"w": jnp.array([[[2.0, 0.0]], [[0.0, 0.0]]])}  # N = 2
      >>> inv = fisher_inverse(g, block_size=2, damping=1.0)
      >>> inv.blocks["w"][0].round(4)  # (I + diag(2, 0))^-1
      Array([[0.3333, 0.    ],
             [0.    , 1.    ]], dtype=float32)

    References:
      Singh & Alistarh 2020 (WoodFisher); Hoefler et al. 2021, §3.5.
    """
    _tree.check_positive_int(block_size, "block_size")
    _tree.check_positive(damping, "damping")
    if method not in ("auto", "woodbury", "cholesky"):
        raise ValueError(f"method must be auto, woodbury or cholesky, got {method!r}")
    n = tree_util.tree_leaves(grads)[0].shape[0]
    if mask is not None:
        one = tree_util.tree_map(lambda g: g[0], grads)
        _tree.check_same_tree(one, mask, name="mask", ref_name="params")
        grads = tree_util.tree_map(
            lambda m, g: (
                g if m is None else jnp.where(m[None], g, jnp.zeros((), g.dtype))
            ),
            mask,
            grads,
            is_leaf=_tree.is_none,
        )
    if method == "auto":
        method = "cholesky" if n >= block_size else "woodbury"
    if method == "woodbury":
        start = woodbury_init(
            tree_util.tree_map(lambda g: g[0], grads),
            block_size=block_size,
            damping=damping,
            include=include,
        )
        return woodbury_update(start, grads, num_samples=n)

    g, split = stack(_map_per_example(lambda g: blocked(g, block_size), grads, include))
    if g is None:
        return BlockInverse(split(None), block_size, damping)
    eye = jnp.eye(block_size, dtype=g.dtype)
    f = damping * eye[None] + jnp.swapaxes(g, 1, 2) @ g / n
    inverse = jax.scipy.linalg.cho_solve(
        jax.scipy.linalg.cho_factor(f, lower=True), jnp.broadcast_to(eye, f.shape)
    )
    return BlockInverse(split(inverse), block_size, damping)
