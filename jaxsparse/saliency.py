"""Data-free and first-order saliency criteria: which entries to keep.

Every criterion returns scores with the tree structure of the params (higher
means keep); :func:`jaxsparse.topk_mask` and friends turn scores into masks.

References:
  Hoefler et al. 2021, §3.2 (magnitude), §3.4 (first order: Taylor, SNIP);
  Lee et al. 2019 (SNIP); Liu et al. 2019 (random pruning as a baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

from jaxsparse import _tree
from jaxsparse._types import LeafSelector, Params, Scores


def _is_floating(leaf) -> bool:
    """Only floating leaves are scored: integer leaves (tables, counters)
    are never pruned and score ``None``."""
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _floating(params: Params, name: str) -> None:
    for path, leaf in _tree.leaves_with_path(params):
        if leaf is not None and not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{_tree.path_str(path)}: {name} needs floating point params, "
                f"got dtype {jnp.result_type(leaf)}"
            )


def magnitude(params: Params) -> Scores:
    """Magnitude ``|w|``: small weights are pruned first.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> js.saliency.magnitude({"w": jnp.array([-2.0, 1.0])})
      {'w': Array([2., 1.], dtype=float32)}

    References:
      Hoefler et al. 2021, §3.2; Han et al. 2015.
    """
    return tree_util.tree_map(lambda w: jnp.abs(w) if _is_floating(w) else None, params)


def random(params: Params, key: jax.Array) -> Scores:
    """Uniform random scores in ``[0, 1)``, one independent draw per leaf.

    Args:
      params: the params whose shapes are scored.
      key: a PRNG key; each leaf uses ``fold_in(key, leaf_index)``.

    Returns:
      float32 scores with the params' tree structure.

    References:
      Hoefler et al. 2021, §2.4.5; Liu et al. 2019 (random sparse training).
    """
    leaves, treedef = tree_util.tree_flatten(params)
    return treedef.unflatten(
        [
            jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x), jnp.float32)
            for i, x in enumerate(leaves)
        ]
    )


def taylor(params: Params, grads: Params) -> Scores:
    """First-order Taylor saliency ``|g * w|``, the estimated change of the
    loss when a weight is set to zero.

    Args:
      params: the params.
      grads: gradients of the loss with the params' tree structure.

    Raises:
      ValueError: if ``grads`` does not mirror ``params``.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> w, g = {"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([0.5, 3.0])}
      >>> js.saliency.taylor(w, g)
      {'w': Array([1., 3.], dtype=float32)}

    References:
      Hoefler et al. 2021, §3.4; Molchanov et al. 2019.
    """
    _tree.check_same_tree(params, grads, name="grads", ref_name="params")
    return tree_util.tree_map(
        lambda w, g: jnp.abs(g * w) if _is_floating(w) else None, params, grads
    )


def snip(
    loss_fn: Callable[..., jax.Array],
    params: Params,
    *args: Any,
    include: LeafSelector = None,
) -> Scores:
    """SNIP connection sensitivity ``|dL/dc|`` at ``c = 1``, normalized.

    For a connection gate ``c`` multiplying each weight, ``dL/dc = g * w``;
    SNIP divides ``|g * w|`` by its sum over the prunable leaves so scores
    of all leaves are on one scale (Lee et al. 2019, eq. 3).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the params, typically at initialization.
      *args: the batch (and anything else ``loss_fn`` takes).
      include: the leaves whose sum normalizes the scores (default: the
        prunable leaves, ``ndim >= 2``).

    Returns:
      Scores with the params' tree structure; the selected leaves sum to 1.

    References:
      Lee et al. 2019, "SNIP: single-shot network pruning based on connection
      sensitivity", §4.1; Hoefler et al. 2021, §3.4 and §2.4.5.
    """
    _floating(params, "snip")
    grads = jax.grad(loss_fn)(params, *args)
    scores = taylor(params, grads)
    total = sum(
        jnp.sum(x, dtype=jnp.float32) for _, x in _tree.selected(scores, include)
    )
    return tree_util.tree_map(
        lambda s: (s.astype(jnp.float32) / total).astype(s.dtype),
        scores,
    )
