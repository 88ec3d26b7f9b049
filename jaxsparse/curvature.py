"""Exact curvature of a loss over parameter pytrees.

Hessian-vector products are forward-over-reverse (``jax.jvp`` of
``jax.grad``). Exact Hessian diagonals and dense blocks come from vmapped
HVPs in memory-bounded chunks, restricted to one leaf at a time; the
generalized Gauss-Newton diagonal for softmax cross-entropy takes ``C``
vector-Jacobian products per example. Empirical-Fisher blocks are inverted
by Sherman-Morrison rank-one updates (WoodFisher) or by Cholesky.

Loss functions take the params first: ``loss_fn(params, *args) -> scalar``.

References:
  Hoefler et al. 2021, §3.5; Pearlmutter 1994 (fast exact HVPs);
  Martens 2020 (GGN); Hutchinson 1990; Singh & Alistarh 2020 (WoodFisher).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax, tree_util

from jaxsparse import _tree
from jaxsparse._types import KeyPath, LeafSelector, Params

LossFn = Callable[..., jax.Array]


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_damping(damping: float) -> None:
    if not float(damping) > 0.0:
        raise ValueError(f"damping must be > 0, got {damping!r}")


def hvp(loss_fn: LossFn, params: Params, v: Params, *args: Any) -> Params:
    """Exact Hessian-vector product ``H v``, forward over reverse.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point at which the Hessian is taken.
      v: a tangent with the params' tree structure and shapes.
      *args: further arguments of ``loss_fn`` (the batch).

    Returns:
      ``H v`` with the params' tree structure.

    Raises:
      ValueError: if ``v`` does not mirror ``params``.

    References:
      Pearlmutter 1994; Hoefler et al. 2021, §3.5.
    """
    _tree.check_same_tree(params, v, name="v", ref_name="params")
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


def _leaf_function(params: Params, path: KeyPath) -> Callable[[jax.Array], Params]:
    """``params`` as a function of the one leaf at ``path``."""
    leaves, treedef = tree_util.tree_flatten_with_path(params)
    index = [p for p, _ in leaves].index(path)
    flat = [x for _, x in leaves]

    def with_leaf(leaf):
        new = list(flat)
        new[index] = leaf
        return treedef.unflatten(new)

    return with_leaf


def _leaf_hvp_rows(
    loss_fn: LossFn,
    params: Params,
    path: KeyPath,
    leaf: jax.Array,
    args,
    rows,
    chunk_size,
    pick=lambda row, i: row,
):
    """``pick(H[i, :], i)`` for each ``i`` in ``rows``, over the leaf's own
    Hessian block (flattened), ``chunk_size`` basis vectors at a time; only
    what ``pick`` keeps is stored."""
    with_leaf = _leaf_function(params, path)

    def leaf_grad(x):
        return jax.grad(lambda y: loss_fn(with_leaf(y), *args))(x).ravel()

    size = leaf.size

    def column(i):
        basis = jnp.zeros(size, leaf.dtype).at[i].set(1).reshape(leaf.shape)
        return pick(jax.jvp(leaf_grad, (leaf,), (basis,))[1], i)

    rows = jnp.asarray(rows, jnp.int32)
    count = rows.shape[0]
    chunks = -(-count // chunk_size)
    padded = jnp.pad(rows, (0, chunks * chunk_size - count))
    out = lax.map(jax.vmap(column), padded.reshape(chunks, chunk_size))
    return out.reshape(chunks * chunk_size, *out.shape[2:])[:count]


def hessian_diag(
    loss_fn: LossFn,
    params: Params,
    *args: Any,
    include: LeafSelector = None,
    chunk_size: int = 256,
) -> Params:
    """Exact Hessian diagonal of the selected leaves.

    One HVP per basis vector, restricted to the leaf (so each product costs
    one forward-over-reverse pass and returns only that leaf), vmapped over
    ``chunk_size`` vectors at a time: memory is ``chunk_size`` times one
    gradient, time is ``size / chunk_size`` batched passes.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point.
      *args: the batch.
      include: which leaves (default: ``ndim >= 2``).
      chunk_size: basis vectors per vmapped batch.

    Returns:
      A pytree mirroring ``params``: ``diag(H)`` per selected leaf, ``None``
      elsewhere.

    References:
      LeCun et al. 1990 (OBD needs the diagonal); Hoefler et al. 2021, §3.5.
    """
    _check_positive_int(chunk_size, "chunk_size")

    def diag(path, leaf):
        rows = jnp.arange(leaf.size)
        entries = _leaf_hvp_rows(
            loss_fn, params, path, leaf, args, rows, chunk_size, lambda r, i: r[i]
        )
        return entries.reshape(leaf.shape)

    return _tree.map_selected(diag, params, include)


def hessian_block(
    loss_fn: LossFn,
    params: Params,
    *args: Any,
    leaf: str,
    indices: Any = None,
    chunk_size: int = 256,
) -> jax.Array:
    """The exact dense Hessian block of one leaf (or of an index set in it).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point.
      *args: the batch.
      leaf: the ``/``-joined path of the leaf (``"dense_0/kernel"``).
      indices: flat (row-major) indices into the leaf; all when ``None``.
      chunk_size: basis vectors per vmapped batch.

    Returns:
      ``H[indices][:, indices]``, a ``(m, m)`` array.

    Raises:
      ValueError: an unknown leaf path or a chunk size that is not positive.
    """
    _check_positive_int(chunk_size, "chunk_size")
    found = [
        (p, x)
        for p, x in tree_util.tree_flatten_with_path(params)[0]
        if _tree.path_str(p) == leaf
    ]
    if not found:
        names = [
            _tree.path_str(p) for p, _ in tree_util.tree_flatten_with_path(params)[0]
        ]
        raise ValueError(f"no leaf at path {leaf!r}; leaves are {names}")
    ((path, x),) = found
    idx = jnp.arange(x.size) if indices is None else jnp.asarray(indices, jnp.int32)
    return _leaf_hvp_rows(
        loss_fn, params, path, x, args, idx, chunk_size, lambda r, i: r[idx]
    )


def hutchinson_diag(
    loss_fn: LossFn,
    params: Params,
    *args: Any,
    key: jax.Array,
    samples: int,
    include: LeafSelector = None,
) -> Params:
    """Hutchinson's unbiased estimate ``E[z * (H z)]`` of the Hessian
    diagonal with Rademacher probes ``z``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point.
      *args: the batch.
      key: PRNG key for the probes.
      samples: number of probes.
      include: which leaves to return.

    Returns:
      A pytree mirroring ``params`` (``None`` for leaves not selected).

    References:
      Hutchinson 1990; Bekas et al. 2007; Hoefler et al. 2021, §3.5.
    """
    _check_positive_int(samples, "samples")
    leaves, treedef = tree_util.tree_flatten(params)

    def probe(k):
        z = treedef.unflatten(
            [
                jax.random.rademacher(jax.random.fold_in(k, i), x.shape, x.dtype)
                for i, x in enumerate(leaves)
            ]
        )
        return tree_util.tree_map(jnp.multiply, z, hvp(loss_fn, params, z, *args))

    estimates = lax.map(probe, jax.random.split(key, samples))
    mean = dict(
        tree_util.tree_flatten_with_path(
            tree_util.tree_map(lambda e: jnp.mean(e, axis=0), estimates)
        )[0]
    )
    return _tree.map_selected(lambda p, _: mean[p], params, include)


def ggn_diag_softmax_ce(
    logits_fn: Callable[..., jax.Array],
    params: Params,
    x: jax.Array,
    *,
    include: LeafSelector = None,
    chunk_size: int = 64,
) -> Params:
    """Exact diagonal of the generalized Gauss-Newton matrix of the mean
    softmax cross-entropy.

    With ``p = softmax(z)`` the output Hessian ``diag(p) - p p^T`` factors as
    ``L L^T`` with ``L = diag(sqrt p) (I - sqrt p sqrt p^T)``, so
    ``diag(G) = mean_n sum_c (J_n^T l_{n,c})^2``: ``C`` vector-Jacobian
    products per example, vmapped over classes and over ``chunk_size``
    examples at a time. It does not depend on the labels.

    Args:
      logits_fn: ``logits_fn(params, x) -> (batch, classes)`` logits.
      params: the point.
      x: the inputs, batch first.
      include: which leaves to return.
      chunk_size: examples per vmapped batch.

    Returns:
      A pytree mirroring ``params`` (``None`` for leaves not selected).

    References:
      Martens 2020, "New insights and perspectives on the natural gradient
      method", §8; Schraudolph 2002; Hoefler et al. 2021, §3.5.
    """
    _check_positive_int(chunk_size, "chunk_size")
    n = x.shape[0]

    def one(xi):
        logits, vjp = jax.vjp(lambda p: logits_fn(p, xi[None])[0], params)
        a = jnp.sqrt(jax.nn.softmax(logits))
        factor = jnp.diag(a) @ (jnp.eye(a.shape[0], dtype=a.dtype) - jnp.outer(a, a))
        columns = jax.vmap(lambda c: vjp(c)[0])(factor.T)
        return tree_util.tree_map(lambda j: jnp.sum(j * j, axis=0), columns)

    chunks = -(-n // chunk_size)
    padded = jnp.pad(x, [(0, chunks * chunk_size - n)] + [(0, 0)] * (x.ndim - 1))
    weights = (jnp.arange(chunks * chunk_size) < n).astype(x.dtype)

    def chunk(args):
        xs, ws = args
        per = jax.vmap(one)(xs)
        return tree_util.tree_map(
            lambda t: jnp.tensordot(ws.astype(t.dtype), t, axes=1), per
        )

    sums = lax.map(
        chunk,
        (
            padded.reshape((chunks, chunk_size, *x.shape[1:])),
            weights.reshape(chunks, chunk_size),
        ),
    )
    total = tree_util.tree_map(lambda s: jnp.sum(s, axis=0) / n, sums)
    flat = dict(tree_util.tree_flatten_with_path(total)[0])
    return _tree.map_selected(lambda p, _: flat[p], params, include)


def per_example_grads(loss_fn: LossFn, params: Params, *batch: jax.Array) -> Params:
    """Gradients of each example's loss, stacked along a new leading axis.

    ``loss_fn(params, *batch)`` is the usual batched (mean) loss; each
    example is fed as a batch of one, so any batched model works.

    Returns:
      A pytree mirroring ``params`` whose leaves have a leading axis of the
      batch size.
    """
    if not batch:
        raise ValueError("per_example_grads needs a batch")

    def one(*example):
        return jax.grad(loss_fn)(params, *(e[None] for e in example))

    return jax.vmap(one)(*batch)


def _map_per_example(fn, grads: Params, include: LeafSelector) -> Params:
    """``fn(path, g)`` on the per-example gradient leaves whose parameter
    (the leaf without its leading axis) ``include`` selects."""
    one = tree_util.tree_map(lambda g: g[0], grads)
    chosen = {p for p, _ in _tree.selected(one, include)}
    return tree_util.tree_map_with_path(
        lambda p, g: fn(p, g) if p in chosen else None, grads
    )


def fisher_diag(grads: Params, *, include: LeafSelector = None) -> Params:
    """Empirical Fisher diagonal ``mean_n g_n^2`` from per-example gradients
    (leading axis ``N``, as :func:`per_example_grads` returns); ``include``
    selects by the parameter's own shape."""
    return _map_per_example(
        lambda _, g: jnp.mean(jnp.square(g), axis=0), grads, include
    )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["blocks"],
    meta_fields=["block_size", "damping"],
)
@dataclasses.dataclass(frozen=True)
class BlockInverse:
    """Inverses of diagonal blocks of ``damping * I + F`` (a pytree whose
    only array data are the blocks; ``block_size`` and ``damping`` are
    static).

    Attributes:
      blocks: a pytree mirroring the params: for each selected leaf an array
        ``(n_blocks, B, B)`` covering its flattened entries in consecutive
        runs of ``B`` (the last run zero-padded), ``None`` elsewhere.
      block_size: ``B``.
      damping: ``lambda``.
    """

    blocks: Any
    block_size: int
    damping: float


def _blocked(g: jax.Array, block_size: int) -> jax.Array:
    """``(N, *shape)`` -> ``(n_blocks, N, B)``, zero-padded."""
    n = g.shape[0]
    flat = g.reshape(n, -1)
    size = flat.shape[1]
    blocks = -(-size // block_size)
    flat = jnp.pad(flat, ((0, 0), (0, blocks * block_size - size)))
    return flat.reshape(n, blocks, block_size).transpose(1, 0, 2)


def woodbury_init(
    params: Params, *, block_size: int, damping: float, include: LeafSelector = None
) -> BlockInverse:
    """The starting point ``lambda^-1 I`` of the Sherman-Morrison recursion."""
    _check_positive_int(block_size, "block_size")
    _check_damping(damping)

    def eye(_, x):
        blocks = -(-x.size // block_size)
        return jnp.broadcast_to(
            jnp.eye(block_size, dtype=x.dtype) / damping,
            (blocks, block_size, block_size),
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
    step per ``rank`` gradients, vmapped over blocks. Feeding all
    ``num_samples`` gradients in any number of pieces gives
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
    _check_positive_int(num_samples, "num_samples")
    _check_positive_int(rank, "rank")
    _tree.check_same_tree(
        inverse.blocks, grads, name="grads", ref_name="params", shapes=False
    )

    def fold(inv, g):
        blocked = _blocked(g, inverse.block_size).astype(inv.dtype)
        n = blocked.shape[1]
        k = min(rank, n)
        steps = -(-n // k)
        # Zero gradients leave the inverse unchanged, so padding is exact.
        blocked = jnp.pad(blocked, ((0, 0), (0, steps * k - n), (0, 0)))
        chunks = blocked.reshape(blocked.shape[0], steps, k, blocked.shape[2])
        eye = jnp.eye(k, dtype=inv.dtype)

        def per_block(a, gs):
            def step(a, g):
                u = a @ g.T
                inner = num_samples * eye + g @ u
                factor = jax.scipy.linalg.cho_factor(inner, lower=True)
                return a - u @ jax.scipy.linalg.cho_solve(factor, u.T), None

            return lax.scan(step, a, gs)[0]

        return jax.vmap(per_block)(inv, chunks)

    blocks = tree_util.tree_map(
        lambda inv, g: None if inv is None else fold(inv, g),
        inverse.blocks,
        grads,
        is_leaf=_tree.is_none,
    )
    return dataclasses.replace(inverse, blocks=blocks)


def fisher_inverse(
    grads: Params,
    *,
    block_size: int,
    damping: float,
    include: LeafSelector = None,
    method: str = "auto",
) -> BlockInverse:
    """Block-diagonal ``(damping * I + F)^-1`` of the empirical Fisher
    ``F = (1/N) sum g g^T`` from per-example gradients in one batch.

    Args:
      grads: per-example gradients (leading axis ``N``) mirroring the params.
      block_size: ``B``, consecutive flattened entries per block (per leaf).
      damping: ``lambda > 0``.
      include: which leaves, judged by the parameter's shape (default:
        ``ndim >= 2``).
      method: ``"woodbury"`` (N rank-one updates), ``"cholesky"`` (form each
        block and factor it) or ``"auto"`` (Cholesky when ``N >= B``).

    Returns:
      A :class:`BlockInverse`.

    References:
      Singh & Alistarh 2020 (WoodFisher); Hoefler et al. 2021, §3.5.
    """
    _check_positive_int(block_size, "block_size")
    _check_damping(damping)
    if method not in ("auto", "woodbury", "cholesky"):
        raise ValueError(f"method must be auto, woodbury or cholesky, got {method!r}")
    n = tree_util.tree_leaves(grads)[0].shape[0]
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

    def cholesky(_, g):
        eye = jnp.eye(block_size, dtype=g.dtype)

        def invert(gs):
            f = damping * eye + gs.T @ gs / n
            return jax.scipy.linalg.cho_solve(
                jax.scipy.linalg.cho_factor(f, lower=True), eye
            )

        return jax.vmap(invert)(_blocked(g, block_size))

    return BlockInverse(_map_per_example(cholesky, grads, include), block_size, damping)


def block_diagonal(inverse: BlockInverse, params: Params) -> Params:
    """The diagonal of the block inverse, shaped like each leaf
    (``[H^-1]_qq`` for OBS saliencies)."""
    return tree_util.tree_map(
        lambda b, x: (
            None
            if b is None
            else jnp.diagonal(b, axis1=1, axis2=2)
            .reshape(-1)[: x.size]
            .reshape(x.shape)
        ),
        inverse.blocks,
        params,
        is_leaf=_tree.is_none,
    )


def inverse_hvp_cg(
    loss_fn: LossFn,
    params: Params,
    v: Params,
    *args: Any,
    damping: float,
    tol: float = 1e-6,
    maxiter: int | None = None,
) -> Params:
    """``(H + damping * I)^-1 v`` by conjugate gradients on exact HVPs.

    Conjugate gradients needs a positive definite operator: pick ``damping``
    above the magnitude of the most negative eigenvalue.

    References:
      Martens 2010 (Hessian-free); Hoefler et al. 2021, §3.5.
    """
    _check_damping(damping)
    _tree.check_same_tree(params, v, name="v", ref_name="params")

    def matvec(u):
        hu = hvp(loss_fn, params, u, *args)
        return tree_util.tree_map(lambda a, b: a + damping * b, hu, u)

    return jax.scipy.sparse.linalg.cg(matvec, v, tol=tol, maxiter=maxiter)[0]


def hessian_inverse(
    loss_fn: LossFn,
    params: Params,
    *args: Any,
    damping: float,
    block_size: int | None = None,
    include: LeafSelector = None,
    chunk_size: int = 256,
) -> BlockInverse:
    """Block-diagonal ``(H + damping * I)^-1`` from exact Hessian blocks.

    Each selected leaf is cut into blocks of ``block_size`` consecutive
    flattened entries (the whole leaf when ``None``: exact per-layer OBS);
    each block is built from exact HVPs and inverted densely.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point.
      *args: the batch.
      damping: ``lambda > 0``, added to the diagonal before inverting.
      block_size: entries per block; ``None`` for one block per leaf.
      include: which leaves.
      chunk_size: basis vectors per vmapped HVP batch.

    Returns:
      A :class:`BlockInverse` (with ``block_size`` the largest leaf's size
      when ``None`` was given, smaller leaves zero-padded).

    References:
      Hassibi & Stork 1992 (OBS); Hoefler et al. 2021, §3.5.
    """
    _check_damping(damping)
    _check_positive_int(chunk_size, "chunk_size")
    chosen = list(_tree.selected(params, include))
    if not chosen:
        raise ValueError("no leaf selected")
    size = block_size or max(x.size for _, x in chosen)
    _check_positive_int(size, "block_size")

    def invert(path, leaf):
        n_blocks = -(-leaf.size // size)
        pad = n_blocks * size - leaf.size

        def own_block(row, i):
            return lax.dynamic_slice(
                jnp.pad(row, (0, pad)), ((i // size) * size,), (size,)
            )

        rows = _leaf_hvp_rows(
            loss_fn,
            params,
            path,
            leaf,
            args,
            jnp.arange(leaf.size),
            chunk_size,
            own_block,
        )
        blocks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(n_blocks, size, size)
        eye = jnp.eye(size, dtype=leaf.dtype)
        return jnp.linalg.inv(blocks + damping * eye[None])

    return BlockInverse(_tree.map_selected(invert, params, include), size, damping)
