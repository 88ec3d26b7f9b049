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

import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import tree_util

from jaxsparse import _tree, blocks
from jaxsparse._types import LossFn, Mask, Params, Scores, Sparsity
from jaxsparse.blocks import BlockInverse
from jaxsparse.curvature import hvp
from jaxsparse.distribution import Distribution, Global, topk_mask
from jaxsparse.fisher import MatrixFreeInverse, mfac_apply, mfac_diag, mfac_restrict


def _check_covered(params: Params, tree: Any, name: str, shapes: bool = True) -> None:
    _tree.check_same_tree(params, tree, name=name, ref_name="params", shapes=shapes)


def obd_saliency(params: Params, hessian_diag: Params) -> Scores:
    """OBD saliency ``rho_q = H_qq w_q^2 / 2`` (``None`` where the diagonal is).

    Example:
      >>> import jax.numpy as jnp
      >>> w, h = {"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([1.0, 8.0])}
      >>> obd_saliency(w, h)["w"]
      Array([2., 4.], dtype=float32)

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

    Example:
      >>> import jax.numpy as jnp
      >>> w, d = {"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([1.0, 0.125])}
      >>> obs_saliency(w, d)["w"]
      Array([2., 4.], dtype=float32)

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


class OBSResult(NamedTuple):
    """What :func:`obs_prune` returns."""

    params: Params
    mask: Mask
    predicted_increase: jax.Array


def _masked_solve(a: jax.Array, q: jax.Array, rhs: jax.Array) -> jax.Array:
    """``([A]_QQ)^-1 rhs_Q`` on ``Q = {q = 1}`` and 0 elsewhere, batched over
    blocks with fixed shapes (the system is the identity off ``Q``)."""
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    system = q[..., :, None] * a * q[..., None, :] + eye * (1 - q)[..., None, :]
    return jnp.linalg.solve(system, q[..., :, None] * rhs)


def _condition(a: jax.Array, pruned: jax.Array) -> jax.Array:
    """``A - A[:, P] ([A]_PP)^-1 A[P, :]``: the block inverse restricted to the
    survivors. With ``A = H^-1`` its survivor block is ``(H_SS)^-1`` (a Schur
    complement) and its rows and columns on ``P`` are 0, so scores and
    updates built from it never touch the pruned set."""
    return a - (a * pruned[:, None, :]) @ _masked_solve(a, pruned, a)


def _obs_step(params, inverse, g, previous, sparsity, method, distribution):
    """One pruning step of :func:`obs_prune`, every block of every leaf in
    one batch."""
    full, split = blocks.stack(inverse.blocks)
    dtype = full.dtype
    w = blocks.stacked_blocks(inverse, params, dtype)
    real = blocks.stacked_blocks(inverse, jax.tree.map(jnp.ones_like, params), dtype)
    pruned = None
    a = full
    if previous is not None:
        pruned = real * (1 - blocks.stacked_blocks(inverse, previous, dtype))
        a = _condition(full, pruned)
    gb = None if g is None else blocks.stacked_blocks(inverse, g, dtype)
    u = jnp.zeros_like(w) if gb is None else jnp.einsum("kij,kj->ki", a, gb)
    diag = jnp.diagonal(a, axis1=1, axis2=2)
    rho = jnp.square(w - u) / (2 * diag)
    if pruned is not None:
        # Weights pruned by an earlier step rank lowest, so they stay pruned.
        rho = jnp.where(pruned > 0, -jnp.inf, rho)
    covered = {p for p, b in _tree.leaves_with_path(inverse.blocks) if b is not None}
    mask = topk_mask(
        blocks.from_blocks(inverse, split(rho), params),
        sparsity,
        distribution=distribution,
        include=lambda p, _: p in covered,
    )
    # Q: the real entries pruned now and not before.
    q = real * (1 - blocks.stacked_blocks(inverse, mask, dtype))
    if pruned is not None:
        q = q * (1 - pruned)
    r = q * (w - u)
    if method == "joint":
        y = _masked_solve(a, q, r[..., None])[..., 0]
    else:
        y = r / jnp.where(q > 0, diag, 1)
    dw = jnp.where(q > 0, -w, -u - jnp.einsum("kij,kj->ki", a, y))
    # The model's change uses the full damped curvature H = A^-1.
    hdw = jnp.linalg.solve(full, dw[..., None])[..., 0]
    change = 0.5 * jnp.sum(dw * hdw)
    if gb is not None:
        change = change + jnp.sum(gb * dw)
    moved = blocks.from_blocks(inverse, split(w + dw), params)
    new_params = tree_util.tree_map(
        lambda x, m, n: x if m is None else jnp.where(m, n, jnp.zeros((), x.dtype)),
        params,
        mask,
        moved,
        is_leaf=_tree.is_none,
    )
    return new_params, mask, change


def _mfac_step(params, inverse, g, previous, sparsity, distribution):
    """One independent-OBS step over the whole model with an M-FAC inverse
    (restricted to the survivors of earlier steps)."""
    full = inverse
    if previous is not None:
        inverse = mfac_restrict(inverse, previous)
    covered = inverse.selected

    def on_covered(fn, *trees):
        return tree_util.tree_map(
            lambda c, *xs: None if c is None else fn(*xs),
            covered,
            *trees,
            is_leaf=_tree.is_none,
        )

    diag = mfac_diag(inverse, params)
    u = on_covered(jnp.zeros_like, params) if g is None else mfac_apply(inverse, g)
    rho = on_covered(lambda w, u, d: jnp.square(w - u) / (2 * d), params, u, diag)
    if previous is not None:
        # Weights pruned by an earlier step rank lowest, so they stay pruned.
        rho = on_covered(lambda r, m: jnp.where(m, r, -jnp.inf), rho, previous)
    paths = {p for p, c in _tree.leaves_with_path(covered) if c is not None}
    mask = topk_mask(
        rho, sparsity, distribution=distribution, include=lambda p, _: p in paths
    )
    # Q: the covered entries pruned now and not before.
    if previous is None:
        now = on_covered(jnp.logical_not, mask)
    else:
        now = on_covered(lambda m, p: ~m & p, mask, previous)
    z = on_covered(
        lambda q, w, u, d: jnp.where(q, (w - u) / d, 0.0), now, params, u, diag
    )
    fz = mfac_apply(inverse, z)
    dw = on_covered(lambda q, w, u, f: jnp.where(q, -w, -u - f), now, params, u, fz)
    if previous is not None:
        # The restricted inverse is I / lambda on the pruned coordinates:
        # they stay at 0 and take no part in the change.
        dw = on_covered(lambda d, p: jnp.where(p, d, 0.0), dw, previous)
    # The model's change under the full damped Fisher lambda I + G^T G / m.
    flat = jnp.concatenate([jnp.ravel(x) for x in tree_util.tree_leaves(dw)])
    gdw = full.grads @ flat
    m = full.grads.shape[0]
    change = 0.5 * (full.damping * jnp.vdot(flat, flat) + jnp.vdot(gdw, gdw) / m)
    if g is not None:
        change = change + sum(
            jnp.vdot(a, b)
            for a, b in zip(
                tree_util.tree_leaves(on_covered(lambda x: x, g)),
                tree_util.tree_leaves(dw),
            )
        )
    new_params = tree_util.tree_map(
        lambda x, m, d: x if m is None else jnp.where(m, x + d, jnp.zeros((), x.dtype)),
        params,
        mask,
        on_covered(lambda d: d, dw),
        is_leaf=_tree.is_none,
    )
    return new_params, mask, change


def obs_prune(
    params: Params,
    inverse: BlockInverse
    | MatrixFreeInverse
    | Callable[[Params], BlockInverse | MatrixFreeInverse],
    sparsity: Sparsity,
    *,
    method: Literal["joint", "independent"] = "joint",
    steps: int = 1,
    grads: Params | Callable[[Params], Params] | None = None,
    distribution: Distribution = Global(),
) -> OBSResult:
    """Prunes with OBS compensation to ``sparsity`` of the covered leaves.

    Each step scores the surviving weights by OBS saliency
    ``w_q^2 / (2 [(H_SS)^-1]_qq)`` over the curvature restricted to the set
    ``S`` of survivors (with ``grads``: ``(w_q - u_q)^2 / (2 [(H_SS)^-1]_qq)``,
    ``u = (H_SS)^-1 g_S``), selects the lowest and moves every surviving
    weight of a block to the minimum of the quadratic model under the
    constraint that the pruned ones are zero. ``(H_SS)^-1`` comes from the
    given full block inverse ``A = H^-1`` by conditioning on the pruned set
    ``P``: ``A_SS - A_SP (A_PP)^-1 A_PS``, so from the second step on each
    choice is the least increase given the earlier ones, as in Hassibi &
    Stork's procedure:

    - ``"joint"``: ``dw = -H^-1 E_Q ([H^-1]_QQ)^-1 w_Q`` for the set ``Q``
      removed together in each block (Hassibi & Stork; with a gradient,
      ``dw = -H^-1 g - H^-1 E_Q ([H^-1]_QQ)^-1 (w_Q - u_Q)``; ``H^-1`` here
      the survivors' inverse);
    - ``"independent"``: the sum of the single-weight updates
      ``-(w_q / [H^-1]_qq) H^-1 e_q``, as WoodFisher's code does.

    Pruned weights are then set exactly to 0.

    Args:
      params: the weights.
      inverse: the block inverse of the (damped) curvature, an M-FAC
        :class:`~jaxsparse.fisher.MatrixFreeInverse` of the whole model
        (``method="independent"``; between steps it is restricted to the
        survivors by dropping the pruned coordinates of its gradients), or
        a function returning either at given params (required when ``steps > 1``: it is
        recomputed at the new weights between steps and conditioned on the
        weights pruned so far). A function that takes a ``mask`` keyword
        gets the current mask (``None`` at the first step) and may return
        the inverse restricted to the survivors directly, e.g.
        ``lambda p, mask: fisher_inverse(grads_at(p), ..., mask=mask)``;
        that avoids the cancellation the conditioning suffers in float32
        when the damping is tiny.
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

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse.blocks import BlockInverse
      >>> # H = [[2, 1], [1, 2]] at a minimum: w_1 costs least (0.61 against
      >>> # 0.75) and w_0 moves by -(w_1 / [H^-1]_11) [H^-1]_01 = 0.45.
      >>> h_inv = jnp.linalg.inv(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
      >>> inverse = BlockInverse({"w": h_inv[None]}, 2, 0.0)
      >>> result = obs_prune({"w": jnp.array([1.0, 0.9])}, inverse, 0.5)
      >>> result.params["w"].round(3), result.mask["w"]
      (Array([1.45, 0.  ], dtype=float32), Array([ True, False], dtype=bool))

    References:
      Hassibi & Stork 1992, eqs. 4-5; Singh & Alistarh 2020, §3-4 (WoodFisher,
      multi-weight and non-minimum OBS); Hoefler et al. 2021, §3.5.
    """
    if method not in ("joint", "independent"):
        raise ValueError(f"method must be 'joint' or 'independent', got {method!r}")
    _tree.check_positive_int(steps, "steps")
    if steps > 1 and not callable(inverse):
        raise ValueError(
            "steps > 1 recomputes the inverse: pass a function of the params"
        )
    _tree.check_sparsity(sparsity)
    takes_mask = callable(inverse) and "mask" in inspect.signature(inverse).parameters
    mask = None
    total = 0.0
    for step in range(1, steps + 1):
        if not callable(inverse):
            inv = inverse
        elif takes_mask:
            inv = inverse(params, mask=mask)
        else:
            inv = inverse(params)
        g = grads(params) if callable(grads) else grads
        if g is not None:
            _check_covered(params, g, "grads")
        target = sparsity * step / steps
        if isinstance(inv, MatrixFreeInverse):
            if method != "independent":
                raise ValueError(
                    "an M-FAC inverse takes method='independent' (the joint "
                    "update needs [H^-1]_QQ for the whole pruned set)"
                )
            params, mask, change = _mfac_step(
                params, inv, g, mask, target, distribution
            )
        else:
            blocks.check_covers(inv, params)
            params, mask, change = _obs_step(
                params, inv, g, mask, target, method, distribution
            )
        total = total + change
    return OBSResult(params, mask, jnp.asarray(total))


def predicted_loss_change(
    loss_fn: LossFn, params: Params, delta: Params, *args: Any
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
