"""The empirical Fisher: per-example gradients, its diagonal, and its
block-diagonal inverse by Cholesky or by the Woodbury recursion, and the
whole model's inverse matrix-free (M-FAC).

``F = (1/N) sum_n g_n g_n^T`` over per-example gradients ``g_n`` stands in
for the Hessian where exact blocks are too expensive. Its damped inverse
``(lambda I + F)^-1`` is built per block of ``B`` consecutive entries,
starting from ``lambda^-1 I`` and folding one rank-one Sherman-Morrison
update per gradient (WoodFisher), or by forming and factoring each block.

References:
  Singh & Alistarh 2020 (WoodFisher); Sherman & Morrison 1950;
  Frantar, Kurtic & Alistarh 2021 (M-FAC); Hoefler et al. 2021, §3.5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

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
    inverse: BlockInverse, grads: Params, *, num_samples: int, rank: int = 64
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
        # With L L^T = N I + G U, the update U (L L^T)^-1 U^T is W^T W for
        # W = L^-1 U^T: one small triangular solve and one matrix product,
        # symmetric by construction (cho_solve's two solves over the wide
        # U^T cost more than the products on XLA's CPU backend).
        lower = jnp.linalg.cholesky(num_samples * eye + gs @ u)
        w = jax.scipy.linalg.solve_triangular(lower, jnp.swapaxes(u, 1, 2), lower=True)
        return a - jnp.swapaxes(w, 1, 2) @ w, None

    return dataclasses.replace(inverse, blocks=split(lax.scan(step, a, chunks)[0]))


def _kept_grads(grads: Params, mask: Mask) -> Params:
    """Per-example gradients with the masked-out coordinates set to 0 (the
    Fisher of the kept entries only)."""
    one = tree_util.tree_map(lambda g: g[0], grads)
    _tree.check_same_tree(one, mask, name="mask", ref_name="params")
    return tree_util.tree_map(
        lambda m, g: g if m is None else jnp.where(m[None], g, jnp.zeros((), g.dtype)),
        mask,
        grads,
        is_leaf=_tree.is_none,
    )


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
        grads = _kept_grads(grads, mask)
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


class MatrixFreeInverse(NamedTuple):
    """``(lambda I + F)^-1`` of the empirical Fisher of ``m`` gradients over
    the whole model, held as the gradients and one ``m x m`` factor: O(m d)
    memory, no block of ``F`` ever formed (see :func:`mfac_inverse`)."""

    grads: jax.Array
    """``(m, d)``: the covered entries of each gradient, flattened."""
    factor: jax.Array
    """Lower Cholesky factor of ``m I + G G^T / lambda`` (``m x m``)."""
    damping: jax.Array
    selected: Any
    """The params' tree with ``True`` on covered leaves and ``None`` elsewhere."""


def _covered(tree: Any, selected: Any) -> list[jax.Array]:
    return [
        x
        for s, x in zip(
            tree_util.tree_leaves(selected, is_leaf=_tree.is_none),
            tree_util.tree_structure(selected, is_leaf=_tree.is_none).flatten_up_to(
                tree
            ),
        )
        if s is not None
    ]


def _ravel(tree: Any, selected: Any, dtype) -> jax.Array:
    parts = [jnp.ravel(x).astype(dtype) for x in _covered(tree, selected)]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)


def _unravel(flat: jax.Array, selected: Any, like: Any) -> Any:
    out, start = [], 0
    treedef = tree_util.tree_structure(selected, is_leaf=_tree.is_none)
    for s, x in zip(
        tree_util.tree_leaves(selected, is_leaf=_tree.is_none),
        treedef.flatten_up_to(like),
    ):
        if s is None:
            out.append(None)
            continue
        out.append(flat[start : start + x.size].reshape(x.shape).astype(x.dtype))
        start += x.size
    return treedef.unflatten(out)


def mfac_inverse(
    grads: Params,
    *,
    damping: float,
    include: LeafSelector = None,
    mask: Mask = None,
) -> MatrixFreeInverse:
    """M-FAC: the damped inverse empirical Fisher of ``m`` gradients over
    every covered entry at once, matrix-free.

    With ``G`` the ``(m, d)`` gradients and ``F = G^T G / m``, Woodbury's
    identity gives ``(lambda I + F)^-1 = I / lambda - G^T B G / lambda^2``
    with ``B = (m I + G G^T / lambda)^-1``: products cost O(m d) after an
    O(m^2 d) setup, the exact result of M-FAC's recursion over the ``m``
    rank-one updates, and the whole model is one block (not a
    block-diagonal approximation as :func:`fisher_inverse`).

    Args:
      grads: per-example (or per-batch) gradients, leading axis ``m``,
        mirroring the params.
      damping: ``lambda > 0``.
      include: which leaves (default: floating arrays with ``ndim >= 2``).
      mask: optional, mirroring the params: the Fisher of the kept entries
        only, so the inverse restricted to the survivors is ``(F_SS)^-1``
        (what :func:`jaxsparse.obs.obs_prune` asks for between steps).

    Returns:
      A :class:`MatrixFreeInverse`; use :func:`mfac_apply` and
      :func:`mfac_diag`, or pass it to :func:`jaxsparse.obs.obs_prune`.

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"w": jnp.array([[[2.0, 0.0]], [[0.0, 0.0]]])}  # m = 2
      >>> inv = mfac_inverse(g, damping=1.0)
      >>> mfac_diag(inv, {"w": jnp.zeros((1, 2))})["w"].round(4)  # 1/(1+2), 1
      Array([[0.3333, 1.    ]], dtype=float32)

    References:
      Frantar, Kurtic & Alistarh 2021, "M-FAC: Efficient matrix-free
      approximations of second-order information", §3-4.
    """
    _tree.check_positive(damping, "damping")
    one = tree_util.tree_map(lambda g: g[0], grads)
    if mask is not None:
        grads = _kept_grads(grads, mask)
    selected = _tree.map_selected(lambda _, x: True, one, include)
    leaves = _covered(grads, selected)
    if not leaves:
        raise ValueError("mfac_inverse: include selects no leaf")
    m = leaves[0].shape[0]
    dtype = jnp.result_type(*leaves)
    g = jnp.concatenate([x.reshape(m, -1).astype(dtype) for x in leaves], axis=1)
    lam = jnp.asarray(damping, dtype)
    gram = m * jnp.eye(m, dtype=dtype) + g @ g.T / lam
    return MatrixFreeInverse(g, jnp.linalg.cholesky(gram), lam, selected)


def mfac_apply(inverse: MatrixFreeInverse, v: Params) -> Params:
    """``(lambda I + F)^-1 v`` on the covered leaves (``None`` elsewhere)."""
    flat = _ravel(v, inverse.selected, inverse.grads.dtype)
    coef = jax.scipy.linalg.cho_solve((inverse.factor, True), inverse.grads @ flat)
    lam = inverse.damping
    out = flat / lam - inverse.grads.T @ coef / (lam * lam)
    return _unravel(out, inverse.selected, v)


def mfac_diag(inverse: MatrixFreeInverse, like: Params) -> Params:
    """The diagonal of ``(lambda I + F)^-1`` on the covered leaves, shaped
    like ``like`` (``None`` elsewhere): ``1/lambda - sum_ab G_aq B_ab G_bq /
    lambda^2`` in O(m^2 d)."""
    bg = jax.scipy.linalg.cho_solve((inverse.factor, True), inverse.grads)
    lam = inverse.damping
    diag = 1.0 / lam - jnp.sum(inverse.grads * bg, axis=0) / (lam * lam)
    return _unravel(diag, inverse.selected, like)


def mfac_restrict(inverse: MatrixFreeInverse, mask: Mask) -> MatrixFreeInverse:
    """The inverse Fisher of the kept entries only: the pruned coordinates of
    the gradients are dropped and the ``m x m`` factor rebuilt, so on the
    survivors ``S`` it is ``(lambda I + F_SS)^-1`` (and ``I / lambda`` on
    the rest)."""
    keep = _ravel(
        tree_util.tree_map(
            lambda s, m: None if s is None else (jnp.ones((), bool) & m),
            inverse.selected,
            mask,
            is_leaf=_tree.is_none,
        ),
        inverse.selected,
        inverse.grads.dtype,
    )
    g = inverse.grads * keep[None, :]
    m = g.shape[0]
    gram = m * jnp.eye(m, dtype=g.dtype) + g @ g.T / inverse.damping
    return inverse._replace(grads=g, factor=jnp.linalg.cholesky(gram))
