"""One-shot pruning of a trained model, without fine-tuning, by any of six
pruners side by side: magnitude, OBD, block WoodFisher, M-FAC (whole-model
inverse Fisher), OBC and SparseGPT (layer-wise reconstruction).

:func:`one_shot_pruner` computes what a pruner needs once (a Hessian
diagonal, Fisher inverse, or nothing) and returns a function from sparsity
to pruned params, so a sweep over sparsities pays for the curvature once.
The runner's ``post-training`` method and ``benchmarks/bench_layerwise.py``
both prune through it.

References:
  LeCun et al. 1990 (OBD); Singh & Alistarh 2020 (WoodFisher); Frantar,
  Kurtic & Alistarh 2021 (M-FAC); Frantar & Alistarh 2022 (OBC) and 2023
  (SparseGPT); Hoefler et al. 2021, §3.5.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import _tree, curvature, fisher, layerwise, obs
from jaxsparse._types import LeafSelector, Params
from jaxsparse.distribution import Distribution
from jaxsparse.experiments.config import PRUNERS
from jaxsparse.structure import NM, Element

Pruner = Literal["magnitude", "obd", "woodfisher", "mfac", "obc", "sparsegpt"]
Apply = Callable[[Params, jax.Array], jax.Array]


class OneShot(NamedTuple):
    """A pruner made ready for one trained model."""

    prune: Callable[[float | None], Params]
    """Sparsity (``None`` for N:M) to pruned params."""
    seconds: float
    """The one-off time of its curvature (0 for those that need none)."""


def _mean_leaf(tree) -> float:
    leaves = [np.ravel(x) for x in jax.tree.leaves(tree)]
    return float(np.mean(np.concatenate(leaves)))


def _magnitude_nm(params: Params, pattern: NM, include: LeafSelector) -> Params:
    """Keeps the ``n`` largest of every ``m`` inputs of each selected
    kernel, in its ``(d_in, d_out)`` view as the layer-wise pruners do."""
    selected = _tree.leaf_selector(include)

    def keep(path, leaf):
        if not selected(path, leaf):
            return jnp.ones(leaf.shape, bool)
        view = layerwise.kernel_view(jnp.abs(leaf))
        return pattern.keep(view).reshape(leaf.shape)

    return js.apply_mask(params, jax.tree_util.tree_map_with_path(keep, params))


def one_shot_pruner(
    pruner: Pruner,
    apply: Apply,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    pattern: Element | NM = Element(),
    distribution: Distribution = js.Uniform(),
    include: LeafSelector = None,
    obd_diagonal: Literal["gauss-newton", "exact"] = "gauss-newton",
    woodfisher_block: int = 64,
    damp: float = 0.01,
    block_size: int = 128,
) -> OneShot:
    """Prepares ``pruner`` for the trained ``params`` of ``apply``.

    Args:
      pruner: one of :data:`PRUNERS`.
      apply: ``apply(params, x) -> logits``; the loss is the mean softmax
        cross-entropy.
      params: the trained params (never modified).
      x: calibration inputs (OBC and SparseGPT read the layers' inputs on
        them; the others take their curvature from them).
      y: their labels (unused by magnitude, OBC and SparseGPT).
      pattern: ``Element()`` or ``NM(n, m, axis=0)`` (N:M along each
        kernel's inputs; magnitude, OBC and SparseGPT only).
      distribution: how magnitude, OBD, WoodFisher and M-FAC spread the
        sparsity over layers (OBC and SparseGPT prune each kernel to it).
      include: the kernels pruned (default: every leaf of two or more
        dimensions).
      obd_diagonal: OBD's diagonal: ``"gauss-newton"`` (exact GGN, as
        LeCun et al. approximate it; one product per class and example) or
        ``"exact"`` (the Hessian's, one HVP per weight: small models only).
      woodfisher_block: WoodFisher's block size.
      damp: OBC and SparseGPT's damping (fraction of the mean diagonal);
        WoodFisher and M-FAC are damped by the Fisher's mean diagonal.
      block_size: SparseGPT's lazy block.

    Returns:
      A :class:`OneShot`.

    Raises:
      ValueError: an unknown pruner or diagonal, or N:M with a pruner that
        selects by a global or per-layer top-k.
    """
    if pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if obd_diagonal not in ("gauss-newton", "exact"):
        raise ValueError(
            f"obd_diagonal must be 'gauss-newton' or 'exact', got {obd_diagonal!r}"
        )
    nm = isinstance(pattern, NM)
    if nm and pruner not in ("magnitude", "obc", "sparsegpt"):
        raise ValueError(
            f"pruner {pruner!r} has no N:M pattern; use magnitude, obc or sparsegpt"
        )

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()

    # The sparsity is traced: one compilation serves a whole sweep.
    def by_scores(scores):
        return jax.jit(
            lambda s: js.apply_mask(
                params,
                js.topk_mask(scores, s, distribution=distribution, include=include),
            )
        )

    start = time.perf_counter()
    if pruner == "magnitude":
        if nm:
            return OneShot(lambda s: _magnitude_nm(params, pattern, include), 0.0)
        return OneShot(by_scores(js.saliency.magnitude(params)), 0.0)
    if pruner in ("obc", "sparsegpt"):

        def reconstruct(s):
            return layerwise.prune_layers(
                apply,
                params,
                [x],
                None if nm else s,
                pattern=pattern,
                method=pruner,
                damp=damp,
                block_size=block_size,
                include=include,
            )[0]

        return OneShot(reconstruct, 0.0)
    if pruner == "obd":
        if obd_diagonal == "exact":
            diag = curvature.hessian_diag(loss, params, x, y, include=include)
        else:
            diag = curvature.ggn_diag_softmax_ce(apply, params, x, include=include)
        jax.block_until_ready(diag)
        return OneShot(
            by_scores(obs.obd_saliency(params, diag)), time.perf_counter() - start
        )
    per_example = fisher.per_example_grads(loss, params, x, y)
    damping = _mean_leaf(fisher.fisher_diag(per_example, include=include))
    if pruner == "woodfisher":
        inverse = fisher.fisher_inverse(
            per_example, block_size=woodfisher_block, damping=damping, include=include
        )
        method = "joint"
    else:
        inverse = fisher.mfac_inverse(per_example, damping=damping, include=include)
        method = "independent"
    jax.block_until_ready(inverse)
    seconds = time.perf_counter() - start

    @jax.jit
    def surgeon(s):
        return obs.obs_prune(
            params, inverse, s, method=method, distribution=distribution
        ).params

    return OneShot(surgeon, seconds)
