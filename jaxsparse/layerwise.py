"""Layer-wise OBS reconstruction: prune each layer so that its outputs on
calibration inputs change least (OBC and SparseGPT).

For a dense kernel ``W`` of shape ``(d_in, d_out)`` read as ``y = x W``, the
layer-wise loss ``||X W - X W_hat||^2`` over calibration inputs ``X`` has the
Hessian ``H = 2 X^T X`` with respect to every output column of ``W``; the
columns are independent problems sharing one ``H``. Removing input ``q``
of a column ``w`` costs ``w_q^2 / [H^-1]_qq`` and the Optimal Brain
Surgeon's update of the remaining entries is exact.

- :func:`obc_prune` removes weights one at a time per column, each time
  the one whose removal costs least, updating the column and ``H^-1``
  exactly (Optimal Brain Compression): the result is the greedy exact
  solution, and the final weights are the least-squares optimum for the
  chosen support.
- :func:`sparsegpt_prune` visits the inputs in order, in blocks; inside a
  block it picks the mask by the same cost, then removes each input's
  weights and spreads the error over the inputs not yet visited, using
  rows of one Cholesky factor of ``H^-1`` (SparseGPT). Cheaper by a factor
  of about ``d_in``; its error is within a small factor of OBC's.

``H`` is accumulated from calibration batches with :func:`hessian_init` and
:func:`hessian_update` (jittable, one pass) and damped by a fraction of its
mean diagonal in :func:`damped`.

References:
  Frantar & Alistarh 2022, "Optimal Brain Compression", §3-4 (ExactOBS);
  Frantar & Alistarh 2023, "SparseGPT", §3 and Algorithm 1;
  Hassibi & Stork 1993 (OBS); Hoefler et al. 2021, §3.5.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax, tree_util

from jaxsparse import _jaxpr, _tree
from jaxsparse._types import LeafSelector, Mask, Params
from jaxsparse.structure import NM, Block, Element

Pattern = Element | NM | Block


class LayerHessian(NamedTuple):
    """The running ``sum x x^T`` of a layer's inputs and how many rows."""

    xtx: jax.Array
    count: jax.Array


def hessian_init(d_in: int, dtype: jnp.dtype = jnp.float32) -> LayerHessian:
    """An empty accumulator for inputs of width ``d_in``, summed in ``dtype``."""
    _tree.check_positive_int(d_in, "d_in")
    return LayerHessian(jnp.zeros((d_in, d_in), dtype), jnp.zeros((), jnp.int32))


def hessian_update(acc: LayerHessian, x: jax.Array) -> LayerHessian:
    """Adds a batch of inputs ``x`` of shape ``(..., d_in)`` (every leading
    index is one row: examples, positions). Jittable.

    Raises:
      ValueError: ``x``'s last axis is not ``d_in``.
    """
    d_in = acc.xtx.shape[0]
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"calibration inputs of shape {tuple(x.shape)} do not end in the "
            f"layer's input width {d_in}"
        )
    rows = x.reshape(-1, d_in).astype(acc.xtx.dtype)
    return LayerHessian(
        acc.xtx + rows.T @ rows,
        acc.count + jnp.asarray(rows.shape[0], jnp.int32),
    )


def damped(acc: LayerHessian, damp: float = 0.01) -> jax.Array:
    """``H = 2 X^T X / n + damp * mean(diag) * I`` (SparseGPT's damping;
    ``damp`` is the fraction of the mean diagonal, 0.01 in the paper)."""
    if not damp >= 0.0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    h = 2.0 * acc.xtx / jnp.maximum(acc.count, 1).astype(acc.xtx.dtype)
    return h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)


def _work_dtype(x: jax.Array) -> jnp.dtype:
    """float64 stays float64 (tests against numpy); the rest works in float32."""
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _check_layer(kernel, h, sparsity, pattern, path):
    if kernel.ndim != 2:
        raise ValueError(f"{path}: a kernel (d_in, d_out) is 2-D, got {kernel.shape}")
    if h.shape != (kernel.shape[0],) * 2:
        raise ValueError(
            f"{path}: H of shape {tuple(h.shape)} does not fit a kernel of "
            f"{kernel.shape[0]} inputs"
        )
    if isinstance(pattern, NM):
        if pattern.axis % 2 != 0:
            raise ValueError(
                f"{path}: N:M runs along the inputs of a (d_in, d_out) kernel: "
                f"use NM({pattern.n}, {pattern.m}, axis=0), got axis={pattern.axis}"
            )
        if kernel.shape[0] % pattern.m:
            raise ValueError(
                f"{path}: {kernel.shape[0]} inputs are not divisible by m={pattern.m}"
            )
        if sparsity is not None:
            raise ValueError(f"{path}: N:M fixes the sparsity; leave sparsity out")
    elif isinstance(pattern, Element):
        _need_sparsity(sparsity, path)
    elif isinstance(pattern, Block):
        if len(pattern.shape) > 2:
            raise ValueError(
                f"{path}: a layer's block is (inputs, outputs) of its "
                f"(d_in, d_out) view, got {pattern}"
            )
        pattern.check(kernel.shape, path)
        _need_sparsity(sparsity, path)
    else:
        raise TypeError(
            f"{path}: layer-wise pruning takes Element(), NM(n, m, axis=0) or "
            f"Block((inputs, outputs)), got {pattern!r}"
        )


def _block_dims(pattern: Block) -> tuple[int, int]:
    """A block's ``(inputs, outputs)`` in a ``(d_in, d_out)`` view."""
    return (1, *pattern.shape)[-2:]


def _need_sparsity(sparsity: float | None, path: str) -> None:
    if sparsity is None:
        raise ValueError(f"{path}: unstructured pruning needs a sparsity")
    _tree.check_sparsity(sparsity, where=f"{path}: sparsity")


def _inputs_together(pattern: Pattern) -> int:
    """How many consecutive inputs the pattern decides on together."""
    if isinstance(pattern, NM):
        return pattern.m
    if isinstance(pattern, Block):
        return _block_dims(pattern)[0]
    return 1


def _pruned_count(d_in: int, sparsity: float | None, pattern: Pattern) -> int:
    """Removals per column (per block of inputs for :class:`Block`)."""
    if isinstance(pattern, NM):
        return d_in // pattern.m * (pattern.m - pattern.n)
    if isinstance(pattern, Block):
        return round(sparsity * (d_in // _block_dims(pattern)[0]))
    return round(sparsity * d_in)


def _inverse(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``H^-1`` through a Cholesky factor, and whether ``H`` was positive
    definite (a singular ``H`` gives NaN factors)."""
    chol = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    return jax.scipy.linalg.cho_solve((chol, True), eye), jnp.all(jnp.isfinite(chol))


def _check_definite(ok: jax.Array, path: str) -> None:
    if not bool(ok):
        raise ValueError(
            f"{path}: H is singular (some inputs never vary on the calibration "
            "data); use damp > 0"
        )


def _obc_column(w, hinv, k: int, group: int, keep_per_group: int):
    """Greedy exact OBS on one column: ``k`` removals."""
    d = w.shape[0]
    groups = jnp.arange(d) // group

    def step(_, carry):
        w, hinv, removed, cost = carry
        diag = jnp.diag(hinv)
        score = jnp.square(w) / diag
        pruned_in_group = jax.ops.segment_sum(
            removed.astype(jnp.int32), groups, num_segments=d // group
        )
        full = pruned_in_group[groups] >= group - keep_per_group
        score = jnp.where(removed | full, jnp.inf, score)
        q = jnp.argmin(score)
        col = hinv[:, q]
        removed = removed.at[q].set(True)
        # Rounding leaves ~1e-7 where exact arithmetic gives 0: removed
        # entries and H^-1's row and column of q are set to 0 outright.
        w = jnp.where(removed, 0.0, w - (w[q] / diag[q]) * col)
        hinv = hinv - jnp.outer(col, col) / diag[q]
        hinv = jnp.where(removed[:, None] | removed[None, :], 0.0, hinv)
        hinv = hinv + jnp.diag(removed.astype(hinv.dtype))
        return w, hinv, removed, cost + score[q]

    init = (w, hinv, jnp.zeros(d, bool), jnp.zeros((), w.dtype))
    w, _, removed, cost = lax.fori_loop(0, k, step, init)
    return w, ~removed, cost


def _obc_blocks(w, hinv, k, rows: int):
    """Greedy exact OBS on the columns ``w`` ``(cols, d)`` of one block
    column: ``k`` removals of ``rows`` consecutive inputs from every column
    at once, the block ``Q`` of least ``sum_c w_cQ^T [H^-1_QQ]^-1 w_cQ``."""
    d = w.shape[1]
    nb = d // rows
    eye = jnp.eye(rows, dtype=w.dtype)

    def step(_, carry):
        w, hinv, removed, cost = carry
        diag = hinv.reshape(nb, rows, nb, rows)[jnp.arange(nb), :, jnp.arange(nb)]
        inv = jnp.linalg.inv(diag)  # (nb, rows, rows)
        wb = w.reshape(w.shape[0], nb, rows)
        score = jnp.einsum("cbi,bij,cbj->b", wb, inv, wb)
        score = jnp.where(removed, jnp.inf, score)
        b = jnp.argmin(score)
        cols = lax.dynamic_slice_in_dim(hinv, b * rows, rows, axis=1)  # (d, rows)
        wq = lax.dynamic_slice_in_dim(w, b * rows, rows, axis=1)
        removed = removed.at[b].set(True)
        gone = jnp.repeat(removed, rows)
        w = jnp.where(gone, 0.0, w - (wq @ inv[b]) @ cols.T)
        hinv = hinv - cols @ inv[b] @ cols.T
        # As in _obc_column: exact zeros, and an identity block for removed
        # inputs so that their diagonal blocks stay invertible.
        hinv = jnp.where(gone[:, None] | gone[None, :], 0.0, hinv)
        hinv = hinv + jnp.kron(jnp.diag(removed.astype(hinv.dtype)), eye)
        return w, hinv, removed, cost + score[b]

    init = (w, hinv, jnp.zeros(nb, bool), jnp.zeros((), w.dtype))
    w, _, removed, _ = lax.fori_loop(0, k, step, init)
    return w, jnp.broadcast_to(~jnp.repeat(removed, rows), w.shape)


def obc_prune(
    kernel: jax.Array,
    hessian: jax.Array,
    sparsity: float | None = None,
    *,
    pattern: Pattern = Element(),
    columns_at_once: int = 64,
    path: str = "kernel",
) -> tuple[jax.Array, jax.Array]:
    """Optimal Brain Compression: exact greedy OBS on every output column.

    Each column removes ``round(sparsity * d_in)`` weights (or ``m - n`` of
    every ``m`` inputs for ``NM(n, m, axis=0)``), one at a time, always the
    one of least ``w_q^2 / [H^-1]_qq`` among those still allowed, and moves
    the rest by the OBS update; ``H^-1`` loses that input exactly. With
    ``Block((r, c))`` each run of ``c`` columns removes ``round(sparsity *
    d_in / r)`` blocks of ``r`` inputs together, each the block ``Q`` of
    least ``sum_c w_cQ^T [H^-1_QQ]^-1 w_cQ`` (OBS for a group of weights).

    Args:
      kernel: ``(d_in, d_out)``.
      hessian: the layer's ``H`` (``(d_in, d_in)``, e.g. :func:`damped`).
      sparsity: fraction of each column removed, in ``[0, 1)`` (not with N:M).
      pattern: ``Element()``, ``NM(n, m, axis=0)`` or ``Block((r, c))``
        (``r`` inputs by ``c`` outputs of the kernel).
      columns_at_once: columns (block columns) solved side by side
        (memory: this many ``d_in x d_in`` inverses).
      path: the layer's name in error messages.

    Returns:
      ``(new_kernel, mask)``; pruned entries are exactly 0.

    Raises:
      ValueError: bad shapes, pattern or sparsity, or a singular ``H``.

    Example:
      Two inputs that always move together: removing the smaller weight
      moves its contribution onto the other, so the outputs do not change.

      >>> import jax.numpy as jnp
      >>> from jaxsparse import layerwise
      >>> x = jnp.array([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]])
      >>> acc = layerwise.hessian_update(layerwise.hessian_init(2), x)
      >>> kernel = jnp.array([[3.0], [1.0]])
      >>> new, mask = layerwise.obc_prune(kernel, layerwise.damped(acc, 1e-6), 0.5)
      >>> new.round(3).tolist(), mask.tolist()
      ([[4.0], [0.0]], [[True], [False]])

    References:
      Frantar & Alistarh 2022, Algorithm 1 (ExactOBS) and §4; Kurtic et
      al. 2022 (oBERT), §3.1 (OBS removing a block at once).
    """
    _check_layer(kernel, hessian, sparsity, pattern, path)
    k = jnp.asarray(_pruned_count(kernel.shape[0], sparsity, pattern), jnp.int32)
    if isinstance(pattern, Block):
        new, mask, ok = _obc_block_solve(
            kernel, hessian, k, _block_dims(pattern), columns_at_once
        )
        _check_definite(ok, path)
        return new, mask
    if isinstance(pattern, NM):
        group, keep = pattern.m, pattern.n
    else:
        group, keep = kernel.shape[0], 0
    new, mask, ok = _obc_solve(kernel, hessian, k, group, keep, columns_at_once)
    _check_definite(ok, path)
    return new, mask


# The count k is traced: one compilation serves every sparsity.
@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _obc_solve(kernel, hessian, k, group, keep, columns_at_once):
    dtype = _work_dtype(kernel)
    hinv, ok = _inverse(hessian.astype(dtype))

    def solve(w):
        return _obc_column(w, hinv, k, group, keep)[:2]

    columns = kernel.T.astype(dtype)
    new, mask = lax.map(solve, columns, batch_size=columns_at_once)
    return new.T.astype(kernel.dtype), mask.T, ok


@functools.partial(jax.jit, static_argnums=(3, 4))
def _obc_block_solve(kernel, hessian, k, dims, columns_at_once):
    rows, cols = dims
    dtype = _work_dtype(kernel)
    hinv, ok = _inverse(hessian.astype(dtype))
    d_in, d_out = kernel.shape
    groups = kernel.T.astype(dtype).reshape(d_out // cols, cols, d_in)
    new, mask = lax.map(
        lambda w: _obc_blocks(w, hinv, k, rows), groups, batch_size=columns_at_once
    )
    return (
        new.reshape(d_out, d_in).T.astype(kernel.dtype),
        mask.reshape(d_out, d_in).T,
        ok,
    )


def _block_mask(w1, diag1, sparsity: jax.Array, dims: tuple[int, int] = (1, 1)):
    """Entries of the lazy block (d_out, B) to prune: ``round(sparsity *
    groups)`` groups (single entries, or ``dims = (inputs, outputs)``
    blocks) of least summed ``w^2 / d^2`` over the whole lazy block
    (SparseGPT's adaptive mask; ties go to the earlier group)."""
    score = jnp.square(w1) / jnp.square(diag1)[None, :]
    by_group = Block(dims[::-1]).group_scores(score, "sum")
    rank = jnp.argsort(jnp.argsort(by_group.ravel(), stable=True), stable=True)
    pruned = jnp.round(sparsity * by_group.size).astype(rank.dtype)
    return Block(dims[::-1]).expand((rank < pruned).reshape(by_group.shape), w1.shape)


def _nm_mask(w_group, diag_group, n: int):
    """Per row, the ``m - n`` of least ``w^2 / d^2`` in a group of ``m``."""
    score = jnp.square(w_group) / jnp.square(diag_group)[None, :]
    order = jnp.argsort(score, axis=1, stable=True)
    m = w_group.shape[1]
    rank = jnp.argsort(order, axis=1)
    return rank < m - n


def sparsegpt_prune(
    kernel: jax.Array,
    hessian: jax.Array,
    sparsity: float | None = None,
    *,
    pattern: Pattern = Element(),
    block_size: int = 128,
    path: str = "kernel",
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT: prune the inputs in order, in lazy blocks, over one
    Cholesky factor of ``H^-1``.

    The inputs are visited in blocks of ``block_size``; a block's mask
    prunes ``round(sparsity * size)`` of its entries, those of least
    ``w^2 / U_ii^2`` over the whole block (``U`` the upper Cholesky factor
    of ``H^-1``), or, for N:M, the ``m - n`` of least score in each group
    of ``m`` inputs of each output, chosen when the group is reached, or,
    for ``Block((r, c))``, the same fraction of its ``r x c`` blocks, by
    their summed score. Each
    input's error then moves the inputs after it in the block at once and
    the later blocks in one matrix product per block.

    Args:
      kernel: ``(d_in, d_out)``.
      hessian: the layer's ``H`` (``(d_in, d_in)``, e.g. :func:`damped`).
      sparsity: fraction removed, in ``[0, 1)`` (not with N:M).
      pattern: ``Element()``, ``NM(n, m, axis=0)`` or ``Block((r, c))``
        (``r`` inputs by ``c`` outputs of the kernel).
      block_size: inputs per lazy block (a multiple of ``m`` for N:M, of
        ``r`` for blocks).
      path: the layer's name in error messages.

    Returns:
      ``(new_kernel, mask)``; pruned entries are exactly 0.

    Raises:
      ValueError: bad shapes, pattern or sparsity, or a singular ``H``.

    References:
      Frantar & Alistarh 2023, "SparseGPT", Algorithm 1, §3.3-3.5.
    """
    _check_layer(kernel, hessian, sparsity, pattern, path)
    _tree.check_positive_int(block_size, "block_size")
    step = _inputs_together(pattern)
    if block_size % step:
        raise ValueError(
            f"{path}: block_size {block_size} is not a multiple of the "
            f"pattern's {step} inputs ({pattern})"
        )
    fraction = jnp.asarray(0.0 if sparsity is None else sparsity, jnp.float32)
    new, mask, ok = _sparsegpt_solve(kernel, hessian, fraction, pattern, block_size)
    _check_definite(ok, path)
    return new, mask


# The sparsity is traced: one compilation serves every sparsity.
@functools.partial(jax.jit, static_argnums=(3, 4))
def _sparsegpt_solve(kernel, hessian, sparsity, pattern, block_size):
    d_in = kernel.shape[0]
    dtype = _work_dtype(kernel)
    hinv, ok = _inverse(hessian.astype(dtype))
    upper = jnp.linalg.cholesky(hinv).T
    w = kernel.T.astype(dtype)  # (d_out, d_in): one row per output
    masks = []
    for start in range(0, d_in, block_size):
        stop = min(start + block_size, d_in)
        u1 = upper[start:stop, start:stop]
        w1 = w[:, start:stop]
        diag1 = jnp.diag(u1)
        if isinstance(pattern, NM):
            mask1 = jnp.zeros(w1.shape, bool)
        elif isinstance(pattern, Block):
            mask1 = _block_mask(w1, diag1, sparsity, _block_dims(pattern))
        else:
            mask1 = _block_mask(w1, diag1, sparsity)

        def visit(i, carry, u1=u1, diag1=diag1):
            w1, mask1, err1 = carry
            if isinstance(pattern, NM):
                m = pattern.m
                at = (i // m) * m
                group = lax.dynamic_slice_in_dim(w1, at, m, axis=1)
                gdiag = lax.dynamic_slice_in_dim(diag1, at, m)
                fresh = _nm_mask(group, gdiag, pattern.n)
                now = lax.dynamic_slice_in_dim(mask1, at, m, axis=1)
                chosen = jnp.where(i % m == 0, fresh, now)
                mask1 = lax.dynamic_update_slice_in_dim(mask1, chosen, at, axis=1)
            col = w1[:, i]
            q = jnp.where(mask1[:, i], 0.0, col)
            err = (col - q) / diag1[i]
            # U is upper triangular: row i is 0 before i, so this moves
            # column i to q and only the columns after it otherwise.
            w1 = w1 - jnp.outer(err, u1[i])
            w1 = w1.at[:, i].set(q)
            return w1, mask1, err1.at[:, i].set(err)

        w1, mask1, err1 = lax.fori_loop(
            0, stop - start, visit, (w1, mask1, jnp.zeros_like(w1))
        )
        w = w.at[:, start:stop].set(w1)
        w = w.at[:, stop:].add(-err1 @ upper[start:stop, stop:])
        masks.append(~mask1)
    mask = jnp.concatenate(masks, axis=1)
    return w.T.astype(kernel.dtype), mask.T, ok


def reconstruction_error(
    kernel: jax.Array, pruned: jax.Array, hessian: jax.Array
) -> jax.Array:
    """``sum_c (w_c - w_hat_c)^T H (w_c - w_hat_c)``: the layer-wise loss of
    a pruned kernel (with ``H = 2 X^T X / n``, twice the mean squared error
    of the outputs)."""
    dtype = _work_dtype(hessian)
    delta = (kernel - pruned).astype(dtype)
    return jnp.sum(delta * (hessian.astype(dtype) @ delta))


_FOLLOW = ("convert_element_type", "copy", "copy_p")


def _inputs_of_kernels(
    closed, flat, sources: dict, wanted: set[int], out_axes: dict | None = None
) -> tuple[list, dict]:
    """Evaluates a jaxpr, recording for each wanted parameter leaf the
    activations it multiplies as ``x @ kernel`` (``{leaf: [inputs, ...]}``).

    ``sources`` maps the jaxpr's variables that are parameter leaves (or a
    dtype cast of one) to their leaf index; calls (``jit``) are entered.
    Convolutions record their im2col rows. ``out_axes`` (if given) gets
    each recorded kernel's output axis.
    """
    out_axes = {} if out_axes is None else out_axes
    found: dict[int, list] = {}

    def step(_, eqn, ins):
        name = eqn.primitive.name
        src = [
            None if isinstance(v, jex.Literal) else sources.get(v) for v in eqn.invars
        ]
        if name == "jit" and any(s is not None for s in src):
            inner = eqn.params["jaxpr"]
            inner_sources = {
                iv: s for iv, s in zip(inner.jaxpr.invars, src) if s is not None
            }
            outs, got = _inputs_of_kernels(inner, ins, inner_sources, wanted, out_axes)
            for leaf, xs in got.items():
                found.setdefault(leaf, []).extend(xs)
        else:
            outs = _jaxpr.bind(eqn, ins)
        if name in _FOLLOW and src[0] is not None:
            sources[eqn.outvars[0]] = src[0]
        if name == "conv_general_dilated" and src[1] in wanted:
            patches = conv_rows(ins[0], ins[1].shape, eqn.params)
            if patches is not None:
                found.setdefault(src[1], []).append(patches)
                out_axes[src[1]] = eqn.params["dimension_numbers"][1][0]
        if name == "dot_general" and src[1] in wanted:
            (lhs_c, rhs_c), (lhs_b, _) = eqn.params["dimension_numbers"]
            x = ins[0]
            if (
                tuple(rhs_c) == (0,)
                and tuple(lhs_c) == (x.ndim - 1,)
                and not lhs_b
                and ins[1].ndim == 2
            ):
                found.setdefault(src[1], []).append(x.reshape(-1, x.shape[-1]))
                out_axes[src[1]] = 1
        return outs

    return _jaxpr.evaluate(closed, flat, step), found


def conv_rows(
    x: jax.Array, kernel_shape: tuple[int, ...], params: dict[str, Any]
) -> jax.Array | None:
    """The im2col rows of a convolution's input: one row per output position,
    its features in the order of :func:`kernel_view`'s rows, so that the
    convolution equals ``conv_rows(x, ...) @ kernel_view(kernel, out_axis)``.

    Args:
      x: the convolution's input (``lhs``).
      kernel_shape: the kernel's shape.
      params: the ``conv_general_dilated`` equation's parameters (window
        strides, padding, dilations, dimension numbers), as in a jaxpr.

    Returns:
      ``(positions, d_in)``, or ``None`` for a grouped convolution.
    """
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    nchw = jnp.transpose(x, lhs_spec)
    window = tuple(kernel_shape[a] for a in rhs_spec[2:])
    patches = lax.conv_general_dilated_patches(
        nchw,
        window,
        params["window_strides"],
        params["padding"],
        lhs_dilation=params["lhs_dilation"],
        rhs_dilation=params["rhs_dilation"],
    )
    # (N, C * prod(window), *out) with features ordered (C, *window): put
    # them last and in the kernel's own axis order.
    rows = jnp.moveaxis(patches, 1, -1).reshape(-1, x.shape[lhs_spec[1]], *window)
    labels = [rhs_spec[1], *rhs_spec[2:]]
    order = sorted(range(len(labels)), key=lambda j: labels[j])
    rows = jnp.transpose(rows, (0, *[1 + j for j in order]))
    return rows.reshape(rows.shape[0], -1)


def kernel_view(kernel: jax.Array, out_axis: int = -1) -> jax.Array:
    """A kernel as ``(d_in, d_out)``: the output axis last, the others
    flattened in their order (a dense kernel as it is; a conv ``HWIO``
    kernel as ``(H * W * I, O)``, its rows matching the convolution's
    im2col patches)."""
    moved = jnp.moveaxis(kernel, out_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _from_view(view: jax.Array, kernel: jax.Array, out_axis: int) -> jax.Array:
    moved = jnp.moveaxis(kernel, out_axis, -1)
    return jnp.moveaxis(view.reshape(moved.shape), -1, out_axis)


class _Layers(NamedTuple):
    closed: Any
    paths: list[str]
    kernels: list[int]
    """Leaf indices of the kernels, in the order the model first reads them."""
    out_axes: dict[int, int]
    """Each kernel's output axis (1 for dense kernels)."""


def _find_layers(fn, params, example, include) -> _Layers:
    closed = jax.make_jaxpr(lambda p, x: fn(p, *x))(params, example)
    leaves = tree_util.tree_leaves_with_path(params)
    paths = [_tree.path_str(p) for p, _ in leaves]
    sources = {v: i for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])}
    flat = [
        jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
        for a in [a for _, a in leaves] + tree_util.tree_leaves(example)
    ]
    selected = _tree.leaf_selector(include)
    candidates = {i for i, (p, a) in enumerate(leaves) if selected(p, a)}
    order: list[int] = []
    out_axes: dict[int, int] = {}

    def trace(*flat_in):
        _, found = _inputs_of_kernels(
            closed, list(flat_in), dict(sources), candidates, out_axes
        )
        order.extend(found)
        return 0

    jax.eval_shape(trace, *flat)
    if include is not None:
        missing = sorted(candidates - set(order))
        if missing:
            raise ValueError(
                f"{paths[missing[0]]}: no layer reads this leaf as x @ kernel; "
                "layer-wise pruning finds dense and (ungrouped) conv kernels"
            )
    return _Layers(closed, paths, order, out_axes)


def _as_args(batch: Any) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def prune_layers(
    fn: Callable[..., Any],
    params: Params,
    batches: Iterable[Any],
    sparsity: float | None = None,
    *,
    pattern: Pattern = Element(),
    method: Literal["sparsegpt", "obc"] = "sparsegpt",
    order: Literal["sequential", "independent"] = "sequential",
    damp: float = 0.01,
    block_size: int = 128,
    include: LeafSelector = None,
) -> tuple[Params, Mask]:
    """Prunes every dense layer of ``fn(params, *batch)`` by layer-wise OBS
    reconstruction on calibration batches.

    The layers are the parameter leaves the model reads as ``x @ kernel``
    or as a convolution's kernel (found in its jaxpr, inside ``jit`` calls
    too); a convolution is pruned in its im2col view (:func:`kernel_view`:
    rows ``H * W * I`` of an ``HWIO`` kernel, so N:M runs along the input
    channels and a ``Block((r, c))`` covers ``r`` rows of that view by
    ``c`` filters). For each, ``H = 2 X^T X / n`` is accumulated over the
    batches (one jitted pass), damped
    by ``damp`` times its mean diagonal, and the kernel pruned by
    :func:`sparsegpt_prune` or :func:`obc_prune`. ``order="sequential"``
    calibrates each layer on the inputs the model gives once the layers
    before it are pruned (a pass per layer, as SparseGPT does);
    ``"independent"`` takes every layer's inputs from the dense model in
    one pass.

    Args:
      fn: the model, ``fn(params, *batch)``.
      params: its parameters (not modified).
      batches: calibration inputs, each the model's arguments after params
        (an array or a tuple); iterated once per pass.
      sparsity: fraction of each kernel removed (not with N:M).
      pattern: ``Element()``, ``NM(n, m, axis=0)`` or ``Block((r, c))``.
      method: ``"sparsegpt"`` or ``"obc"``.
      order: ``"sequential"`` or ``"independent"``.
      damp: fraction of the mean diagonal added to ``H``.
      block_size: SparseGPT's lazy block.
      include: which kernels (default: every 2-D float leaf read as a
        kernel).

    Returns:
      ``(new_params, mask)``; the mask is ``True`` on leaves left alone.

    Raises:
      ValueError: a batch that does not fit the model, a selected leaf no
        layer reads as a kernel, or a singular ``H`` (naming the layer).

    References:
      Frantar & Alistarh 2023, "SparseGPT", §3-4 (sequential calibration);
      Frantar & Alistarh 2022, "Optimal Brain Compression".
    """
    if method not in ("sparsegpt", "obc"):
        raise ValueError(f"method must be 'sparsegpt' or 'obc', got {method!r}")
    if order not in ("sequential", "independent"):
        raise ValueError(f"order must be 'sequential' or 'independent', got {order!r}")
    batches = [_as_args(b) for b in batches]
    if not batches:
        raise ValueError("prune_layers needs at least one calibration batch")
    try:
        layers = _find_layers(fn, params, batches[0], include)
    except (TypeError, ValueError) as err:
        if "no layer reads" in str(err):
            raise
        raise ValueError(f"calibration batch 0 does not fit the model: {err}") from err
    leaves, treedef = tree_util.tree_flatten(params)
    leaves = list(leaves)
    mask_leaves: list[Any] = [jnp.ones(a.shape, bool) for a in leaves]
    n_params = len(leaves)

    def hessians(current, wanted):
        @jax.jit
        def accumulate(accs, flat_params, flat_args):
            _, found = _inputs_of_kernels(
                layers.closed,
                [*flat_params, *flat_args],
                {v: i for i, v in enumerate(layers.closed.jaxpr.invars[:n_params])},
                set(wanted),
            )
            return {
                i: functools.reduce(hessian_update, found[i], accs[i]) for i in wanted
            }

        accs = {
            i: hessian_init(
                kernel_view(current[i], layers.out_axes[i]).shape[0],
                _work_dtype(current[i]),
            )
            for i in wanted
        }
        for j, batch in enumerate(batches):
            flat_args = tree_util.tree_leaves(batch)
            try:
                accs = accumulate(accs, current, flat_args)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"calibration batch {j} does not fit the model: {err}"
                ) from err
        return accs

    prune = sparsegpt_prune if method == "sparsegpt" else obc_prune
    extra = {"block_size": block_size} if method == "sparsegpt" else {}
    groups = (
        [[i] for i in layers.kernels] if order == "sequential" else [layers.kernels]
    )
    for group in groups:
        accs = hessians(leaves, group)
        for i in group:
            axis = layers.out_axes[i]
            new, mask = prune(
                kernel_view(leaves[i], axis),
                damped(accs[i], damp),
                sparsity,
                pattern=pattern,
                path=layers.paths[i],
                **extra,
            )
            leaves[i] = _from_view(new, leaves[i], axis)
            mask_leaves[i] = _from_view(mask, mask_leaves[i], axis)
    return treedef.unflatten(leaves), treedef.unflatten(mask_leaves)
