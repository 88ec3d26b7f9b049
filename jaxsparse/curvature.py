"""Exact curvature of a loss over parameter pytrees.

Hessian-vector products are forward-over-reverse (``jax.jvp`` of
``jax.grad``). Exact Hessian diagonals and dense blocks come from vmapped
HVPs in memory-bounded chunks, restricted to one leaf at a time; the
generalized Gauss-Newton diagonal for softmax cross-entropy takes ``C``
vector-Jacobian products per example. The empirical Fisher lives in
:mod:`jaxsparse.fisher`, block inverses in :mod:`jaxsparse.blocks`.

Loss functions take the params first: ``loss_fn(params, *args) -> scalar``.

References:
  Hoefler et al. 2021, §3.5; Pearlmutter 1994 (fast exact HVPs);
  Martens 2020 (GGN); Hutchinson 1990.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax, tree_util

from jaxsparse import _jaxpr, _tree
from jaxsparse._types import KeyPath, LeafSelector, LossFn, Mask, Params
from jaxsparse.blocks import BlockInverse, stack, stacked_blocks


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

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: jnp.sum(p["w"] ** 3)  # H = diag(6 w)
      >>> hvp(loss, {"w": jnp.array([1.0, 2.0])}, {"w": jnp.ones(2)})["w"]
      Array([ 6., 12.], dtype=float32)

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
    by_structure: bool = True,
) -> Params:
    """Exact Hessian diagonal of the selected leaves.

    In general one HVP per basis vector, restricted to the leaf (so each
    product costs one forward-over-reverse pass and returns only that leaf),
    vmapped over ``chunk_size`` vectors at a time: memory is ``chunk_size``
    times one gradient, time is ``size / chunk_size`` batched passes.

    A dense kernel ``W`` that enters the loss only through ``z = x @ W``
    (one use, contracting ``x``'s last axis with ``W``'s first) takes one
    HVP per output unit instead: ``d²L/dW_jk² = Σ_n x_nj² d²L/dz_nk²`` when
    the loss couples no two positions ``n`` of ``z`` (examples, tokens). A
    probe HVP checks that: where a position's curvature reaches another
    (batch norm in training mode, attention across tokens), the generic
    path runs instead, under ``lax.cond``, so the result is exact either way.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point.
      *args: the batch.
      include: which leaves (default: floating arrays with ``ndim >= 2``).
      chunk_size: basis vectors (or output units) per vmapped batch.
      by_structure: use the dense-layer identity where it applies; ``False``
        forces the generic path (the reference it is tested against).

    Returns:
      A pytree mirroring ``params``: ``diag(H)`` per selected leaf, ``None``
      elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: jnp.sum(p["w"] ** 4) / 12  # H = diag(w^2)
      >>> hessian_diag(loss, {"w": jnp.array([[1.0, 2.0], [3.0, 0.5]])})["w"]
      Array([[1.  , 4.  ],
             [9.  , 0.25]], dtype=float32)

    References:
      LeCun et al. 1990 (OBD needs the diagonal); Hoefler et al. 2021, §3.5.
    """
    _tree.check_positive_int(chunk_size, "chunk_size")
    leaves, _ = tree_util.tree_flatten_with_path(params)
    paths = [p for p, _ in leaves]
    closed = None
    if by_structure:
        closed = jax.make_jaxpr(lambda *flat: loss_fn(_unflat(params, flat), *args))(
            *(x for _, x in leaves)
        )

    def generic(path, leaf):
        rows = jnp.arange(leaf.size)
        entries = _leaf_hvp_rows(
            loss_fn, params, path, leaf, args, rows, chunk_size, lambda r, i: r[i]
        )
        return entries.reshape(leaf.shape)

    def diag(path, leaf):
        at = None if closed is None else _dense_use(closed, paths.index(path))
        if at is None:
            return generic(path, leaf)
        flat = [x for _, x in leaves]
        return _dense_kernel_diag(
            closed, flat, at, chunk_size, lambda: generic(path, leaf)
        )

    return _tree.map_selected(diag, params, include)


def _unflat(params: Params, flat) -> Params:
    return tree_util.tree_unflatten(tree_util.tree_structure(params), list(flat))


def _dense_use(closed, index: int) -> int | None:
    """The index of the one equation using input ``index``, if that use is a
    dense layer's ``x @ W`` (``x``'s last axis against ``W``'s first, ``W``
    two-dimensional); otherwise ``None``."""
    var = closed.jaxpr.invars[index]
    if var.aval.ndim != 2 or any(v is var for v in closed.jaxpr.outvars):
        return None
    uses = [
        i
        for i, eqn in enumerate(closed.jaxpr.eqns)
        for v in eqn.invars
        if not isinstance(v, jex.core.Literal) and v is var
    ]
    if len(uses) != 1:
        return None
    eqn = closed.jaxpr.eqns[uses[0]]
    if eqn.primitive.name != "dot_general" or eqn.invars[1] is not var:
        return None
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    x_ndim = eqn.invars[0].aval.ndim
    if tuple(rhs_c) != (0,) or tuple(lhs_c) != (x_ndim - 1,) or lhs_b or rhs_b:
        return None
    return uses[0]


def _eval_offset(closed, flat, at: int, offset):
    """Evaluates the jaxpr with ``offset`` added to equation ``at``'s output;
    returns the loss and that equation's first input."""
    seen = []

    def step(i, eqn, ins):
        outs = _jaxpr.bind(eqn, ins)
        if i != at:
            return outs
        seen.append(ins[0])
        return [outs[0] + offset.astype(outs[0].dtype)]

    return _jaxpr.evaluate(closed, flat, step)[0], seen[0]


def _dense_kernel_diag(closed, flat, at: int, chunk_size: int, generic):
    """``Σ_n x_nj² d²L/dz_nk²`` for the kernel of equation ``at``, or
    ``generic()`` where the loss couples positions of ``z``."""
    z_aval = closed.jaxpr.eqns[at].outvars[0].aval
    zero = jnp.zeros(z_aval.shape, z_aval.dtype)
    _, x = _eval_offset(closed, flat, at, zero)
    x = x.reshape(-1, x.shape[-1])
    units = z_aval.shape[-1]
    positions = x.shape[0]

    def z_hvp(v):
        grad = jax.grad(lambda d: _eval_offset(closed, flat, at, d)[0])
        return jax.jvp(grad, (zero,), (v.reshape(z_aval.shape),))[1].reshape(
            positions, units
        )

    def unit(k):
        # The same unit at every position: with no coupling each position
        # returns its own d²L/dz_nk², which is all the diagonal needs.
        basis = jnp.zeros((positions, units), z_aval.dtype).at[:, k].set(1)
        return z_hvp(basis)[:, k]

    chunks = -(-units // chunk_size)
    ks = jnp.pad(jnp.arange(units), (0, chunks * chunk_size - units))
    h = lax.map(jax.vmap(unit), ks.reshape(chunks, chunk_size))
    h = h.reshape(chunks * chunk_size, positions)[:units].T
    kernel = closed.jaxpr.eqns[at].invars[1].aval
    structured = (jnp.square(x).T @ h.astype(x.dtype)).astype(kernel.dtype)
    if positions == 1:
        return structured
    # A probe on the even positions: any curvature it moves to an odd one
    # means positions are coupled and the identity does not hold.
    even = (jnp.arange(positions) % 2 == 0)[:, None]
    probe = jnp.where(even, jnp.ones((positions, units), z_aval.dtype), 0)
    coupled = jnp.any(jnp.where(even, 0, z_hvp(probe)) != 0)
    return lax.cond(coupled, generic, lambda: structured)


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
    _tree.check_positive_int(chunk_size, "chunk_size")
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
    _tree.check_positive_int(samples, "samples")
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
    _tree.check_positive_int(chunk_size, "chunk_size")
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

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)  # H = 2 I
      >>> v = {"w": jnp.array([3.0, 6.0])}
      >>> inverse_hvp_cg(loss, {"w": jnp.ones(2)}, v, damping=1.0)["w"]
      Array([1., 2.], dtype=float32)

    References:
      Martens 2010 (Hessian-free); Hoefler et al. 2021, §3.5.
    """
    _tree.check_positive(damping, "damping")
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
    mask: Mask = None,
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
      mask: optional, mirroring the params: the Hessian of the kept entries
        only (pruned rows and columns dropped), so each block is
        ``(H_SS + damping I)^-1`` on the survivors ``S`` and
        ``damping^-1 I`` on the rest. :func:`jaxsparse.obs.obs_prune`
        passes its mask to an inverse function that takes ``mask``.

    Returns:
      A :class:`BlockInverse` (with ``block_size`` the largest leaf's size
      when ``None`` was given, smaller leaves zero-padded).

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)  # H = 2 I
      >>> inv = hessian_inverse(loss, {"w": jnp.ones((1, 2))}, damping=2.0)
      >>> inv.blocks["w"][0]
      Array([[0.25, 0.  ],
             [0.  , 0.25]], dtype=float32)

    References:
      Hassibi & Stork 1992 (OBS); Hoefler et al. 2021, §3.5.
    """
    _tree.check_positive(damping, "damping")
    _tree.check_positive_int(chunk_size, "chunk_size")
    chosen = list(_tree.selected(params, include))
    if not chosen:
        raise ValueError("no leaf selected")
    size = block_size or max(x.size for _, x in chosen)
    _tree.check_positive_int(size, "block_size")

    def block(path, leaf):
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
        return jnp.pad(rows, ((0, pad), (0, 0))).reshape(n_blocks, size, size)

    blocks, split = stack(_tree.map_selected(block, params, include))
    if mask is not None:
        _tree.check_same_tree(params, mask, name="mask", ref_name="params")
        # A dense (None) mask leaf keeps everything.
        full = tree_util.tree_map(
            lambda m, x: jnp.ones(x.shape, bool) if m is None else m,
            mask,
            params,
            is_leaf=_tree.is_none,
        )
        covered = BlockInverse(split(blocks), size, damping)
        keep = stacked_blocks(covered, full, blocks.dtype)
        blocks = blocks * keep[:, :, None] * keep[:, None, :]
    eye = jnp.eye(size, dtype=blocks.dtype)
    # One batched inverse for every leaf (see jaxsparse.blocks).
    inverse = jnp.linalg.inv(blocks + damping * eye[None])
    return BlockInverse(split(inverse), size, damping)
