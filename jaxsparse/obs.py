"""Second-order pruning: Optimal Brain Damage, Optimal Brain Surgeon and
WoodFisher.

The loss change of a weight perturbation ``dw`` is modelled as
``g^T dw + 1/2 dw^T H dw``. OBD keeps the exact diagonal of ``H``; OBS uses
a (block-diagonal) inverse ``H^-1`` and moves the remaining weights to
compensate; WoodFisher takes ``H^-1`` from empirical-Fisher blocks
(:func:`jaxsparse.curvature.fisher_inverse`).

References:
  LeCun, Denker & Solla 1990 (OBD); Hassibi & Stork 1992 (OBS);
  Singh & Alistarh 2020 (WoodFisher); Hoefler et al. 2021, §3.5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import tree_util

from jaxsparse import _tree
from jaxsparse._types import Mask, Params, Scores, Sparsity
from jaxsparse.curvature import BlockInverse, _blocked, block_diagonal, hvp
from jaxsparse.distribution import Distribution, Global
from jaxsparse.masks import topk_mask


def _check_covered(params: Params, tree: Any, name: str, shapes: bool = True) -> None:
    _tree.check_same_tree(params, tree, name=name, ref_name="params", shapes=shapes)


def obd_saliency(params: Params, hessian_diag: Params) -> Scores:
    """OBD saliency ``rho_q = H_qq w_q^2 / 2`` (``None`` where the diagonal is).

    References:
      LeCun et al. 1990, eq. 5; Hoefler et al. 2021, §3.5.
    """
    _check_covered(params, hessian_diag, "hessian_diag")
    return tree_util.tree_map(
        lambda h, w: None if h is None else h * jnp.square(w) / 2,
        hessian_diag,
        params,
        is_leaf=_tree.is_none,
    )


def obs_saliency(params: Params, inverse_diag: Params) -> Scores:
    """OBS saliency ``rho_q = w_q^2 / (2 [H^-1]_qq)``; with ``H = I`` it ranks
    like magnitude.

    Args:
      params: the weights.
      inverse_diag: ``[H^-1]_qq`` mirroring the params (``None`` for leaves
        not scored), e.g. :func:`jaxsparse.curvature.block_diagonal`.

    References:
      Hassibi & Stork 1992, eq. 5; Hoefler et al. 2021, §3.5.
    """
    _check_covered(params, inverse_diag, "inverse_diag")
    return tree_util.tree_map(
        lambda d, w: None if d is None else jnp.square(w) / (2 * d),
        inverse_diag,
        params,
        is_leaf=_tree.is_none,
    )


def block_apply(inverse: BlockInverse, v: Params) -> Params:
    """``H^-1 v`` with the block-diagonal inverse (``None`` for leaves it
    does not cover)."""
    _check_covered(v, inverse.blocks, "inverse", shapes=False)

    def apply(b, x):
        flat = _blocked(x[None], inverse.block_size)[:, 0, :]
        out = jnp.einsum("kij,kj->ki", b, flat.astype(b.dtype))
        return out.reshape(-1)[: x.size].reshape(x.shape).astype(x.dtype)

    return tree_util.tree_map(
        lambda b, x: None if b is None else apply(b, x),
        inverse.blocks,
        v,
        is_leaf=_tree.is_none,
    )


class OBSResult(NamedTuple):
    """What :func:`obs_prune` returns."""

    params: Params
    mask: Mask
    predicted_increase: jax.Array


def _leaf_step(inv, w, keep, g, method):
    """The OBS update of one leaf's blocks; returns ``(new w, model change)``."""
    size = inv.shape[-1]

    def blocks(x):
        return _blocked(x[None], size)[:, 0, :].astype(inv.dtype)

    wb, qb = blocks(w), blocks((~keep).astype(inv.dtype))
    gb = jnp.zeros_like(wb) if g is None else blocks(g)

    def block(a, w, q, g):
        u = a @ g
        r = q * (w - u)
        if method == "joint":
            # Solve [H^-1]_QQ y_Q = r_Q with fixed shapes: identity off Q.
            system = q[:, None] * a * q[None, :] + jnp.diag(1 - q)
            y = jnp.linalg.solve(system, r)
        else:
            y = r / jnp.diagonal(a)
        # Pruned weights land exactly on zero.
        dw = jnp.where(q > 0, -w, -u - a @ y)
        hdw = jnp.linalg.solve(a, dw)
        return w + dw, jnp.dot(g, dw) + 0.5 * jnp.dot(dw, hdw)

    new, change = jax.vmap(block)(inv, wb, qb, gb)
    new = new.reshape(-1)[: w.size].reshape(w.shape).astype(w.dtype)
    return jnp.where(keep, new, jnp.zeros((), w.dtype)), jnp.sum(change)


def _obs_step(params, inv, g, previous, sparsity, method, distribution):
    """One pruning step of :func:`obs_prune`."""
    diag = dict(_tree.leaves_with_path(block_diagonal(inv, params)))
    u = dict(_tree.leaves_with_path(block_apply(inv, g))) if g is not None else {}
    kept = dict(_tree.leaves_with_path(previous)) if previous is not None else {}

    def score(path, w):
        d = diag.get(path)
        if d is None:
            return None
        rho = jnp.square(w - u[path] if u else w) / (2 * d)
        # Weights pruned by an earlier step rank lowest, so they stay pruned.
        return jnp.where(kept[path], rho, -jnp.inf) if kept else rho

    scores = tree_util.tree_map_with_path(score, params)
    mask = topk_mask(
        scores,
        sparsity,
        distribution=distribution,
        include=lambda p, _: diag.get(p) is not None,
    )
    blocks = dict(_tree.leaves_with_path(inv.blocks))
    masks = dict(_tree.leaves_with_path(mask))
    grads = dict(_tree.leaves_with_path(g)) if g is not None else {}
    changes = []

    def update(path, w):
        if masks.get(path) is None:
            return w
        new, change = _leaf_step(blocks[path], w, masks[path], grads.get(path), method)
        changes.append(change)
        return new

    new_params = tree_util.tree_map_with_path(update, params)
    return new_params, mask, sum(changes)


def obs_prune(
    params: Params,
    inverse: BlockInverse | Callable[[Params], BlockInverse],
    sparsity: Sparsity,
    *,
    method: Literal["joint", "independent"] = "joint",
    steps: int = 1,
    grads: Params | Callable[[Params], Params] | None = None,
    distribution: Distribution = Global(),
) -> OBSResult:
    """Prunes with OBS compensation to ``sparsity`` of the covered leaves.

    Each step scores the unpruned weights by OBS saliency (with ``grads``:
    ``(w_q - u_q)^2 / (2 [H^-1]_qq)``, ``u = H^-1 g``), selects the lowest
    (weights pruned before stay pruned) and moves every weight of a block to
    the minimum of the quadratic model under the constraint that the pruned
    ones are zero:

    - ``"joint"``: ``dw = -H^-1 E_Q ([H^-1]_QQ)^-1 w_Q`` for the set ``Q``
      removed together in each block (Hassibi & Stork; with a gradient,
      ``dw = -H^-1 g - H^-1 E_Q ([H^-1]_QQ)^-1 (w_Q - u_Q)``);
    - ``"independent"``: the sum of the single-weight updates
      ``-(w_q / [H^-1]_qq) H^-1 e_q``, as WoodFisher's code does.

    Pruned weights are then set exactly to 0.

    Args:
      params: the weights.
      inverse: the block inverse, or a function of the params returning it
        (required when ``steps > 1``: it is recomputed between steps).
      sparsity: the final fraction of covered weights to prune.
      method: ``"joint"`` or ``"independent"``.
      steps: prune in this many equal increments of sparsity.
      grads: the loss gradient (or a function of the params returning it)
        for models that are not at a minimum; ``None`` assumes ``g = 0``.
      distribution: how the saliency threshold applies across leaves
        (default: one global threshold).

    Returns:
      :class:`OBSResult` with the new params, the mask and the model's
      predicted loss increase summed over steps.

    References:
      Hassibi & Stork 1992, eqs. 4-5; Singh & Alistarh 2020, §3-4 (WoodFisher,
      multi-weight and non-minimum OBS); Hoefler et al. 2021, §3.5.
    """
    if method not in ("joint", "independent"):
        raise ValueError(f"method must be 'joint' or 'independent', got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if steps > 1 and not callable(inverse):
        raise ValueError(
            "steps > 1 recomputes the inverse: pass a function of the params"
        )
    _tree.check_sparsity(sparsity)
    mask = None
    total = 0.0
    for step in range(1, steps + 1):
        inv = inverse(params) if callable(inverse) else inverse
        _check_covered(params, inv.blocks, "inverse", shapes=False)
        g = grads(params) if callable(grads) else grads
        if g is not None:
            _check_covered(params, g, "grads")
        params, mask, change = _obs_step(
            params, inv, g, mask, sparsity * step / steps, method, distribution
        )
        total = total + change
    return OBSResult(params, mask, jnp.asarray(total))


def predicted_loss_change(
    loss_fn: Callable[..., jax.Array], params: Params, delta: Params, *args: Any
) -> jax.Array:
    """The quadratic model's loss change ``g^T d + 1/2 d^T H d`` for a weight
    change ``d`` (exact gradient and HVP at ``params``), to hold against the
    measured ``loss(params + d) - loss(params)``.

    References:
      Hoefler et al. 2021, §3.5 (eq. 7).
    """
    _check_covered(params, delta, "delta")
    g = jax.grad(loss_fn)(params, *args)
    hd = hvp(loss_fn, params, delta, *args)
    dots = [
        jnp.vdot(a, b) + 0.5 * jnp.vdot(b, c)
        for a, b, c in zip(
            tree_util.tree_leaves(g),
            tree_util.tree_leaves(delta),
            tree_util.tree_leaves(hd),
        )
    ]
    return sum(dots)
