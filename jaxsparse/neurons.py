"""Data-driven criteria for units: what the next layer reads from each one.

A :class:`UnitView` runs a model with its units exposed: it records the
activation each unit set hands to the layer that reads it (the first
contraction with a parameter along the unit axis) and can scale or shift
that activation, which is how gates, sensitivities and Taylor scores are
taken without editing the model. Every criterion returns unit scores
``{set name: (size,) array}``, higher meaning keep, that
:func:`select_units` turns into a unit mask for
:meth:`~jaxsparse.groups.Groups.element_mask` and
:func:`~jaxsparse.groups.shrink`.

The activation's axis 0 is taken as the batch axis (per-example criteria).

References:
  Hoefler et al. 2021, §3.2 (similarity merging), §3.3 (data-driven
  criteria: activation statistics, variance, correlation, sensitivity) and
  §3.4 (gates, Taylor, Jacobian QR).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import tree_util

from jaxsparse import _jaxpr, _tree
from jaxsparse._types import Params, Sparsity
from jaxsparse.distribution import Distribution, Uniform
from jaxsparse.groups import (
    Groups,
    along_units,
    model_call,
    split_shape,
    trace,
    units_include,
    walk_model,
)

UnitScores = dict[str, jax.Array]
"""One score per unit, ``{set name: (size,) array}``; higher means keep."""


class _Tap(NamedTuple):
    var: Any
    axis: int
    stride: int
    readers: int
    kernel: int
    kernel_axes: tuple[int, ...]
    bias: int | None


def _taps(walked, names: Iterable[str]) -> dict[str, _Tap]:
    """Where the first reader of each unit set takes its activation."""
    walk, atoms = walked.walk, walked.walk.atoms
    by_name = {s.name: r for s, r in zip(walked.groups.sets, walked.roots)}
    out = {}
    for name in names:
        root = by_name[name]
        found = []
        for c in walk.consumers:
            dims = walk.dims(c.activation)
            for axis in c.axes:
                resolved = atoms.resolve(dims[axis])
                if root in resolved:
                    j = resolved.index(root)
                    stride = math.prod(atoms.size[a] for a in resolved[j + 1 :])
                    found.append((c, axis, stride))
        if not found:
            raise ValueError(f"{name}: no layer reads these units")
        c, axis, stride = found[0]
        out[name] = _Tap(
            c.activation,
            axis,
            stride,
            len({f[0].output for f in found}),
            c.kernel,
            c.axes,
            walk.bias.get(c.output),
        )
    return out


def _per_example(x: jax.Array, axis: int, size: int, stride: int) -> jax.Array:
    """An activation as ``(batch, positions, size)``."""
    split = x.reshape(split_shape(x.shape, axis, size, stride))
    return jnp.moveaxis(split, axis + 1, -1).reshape(x.shape[0], -1, size)


def _evaluate(closed, flat, hooks: dict, record) -> tuple[list, dict]:
    """Evaluates a closed jaxpr, keeping the values of the variables in
    ``record`` and passing those in ``hooks`` through their hook (after
    recording them)."""
    recorded = {}

    def step(_, eqn, ins):
        outs = _jaxpr.bind(eqn, ins)
        for j, (v, value) in enumerate(zip(eqn.outvars, outs)):
            if v in record:
                recorded[v] = value
            if v in hooks:
                outs[j] = hooks[v](value)
        return outs

    return _jaxpr.evaluate(closed, flat, step), recorded


class UnitView:
    """A model run with its units exposed (see the module docstring).

    Build it with :func:`view` (a function of params) or
    :func:`view_module` (a flax nnx module).

    Attributes:
      groups: the model's units.
    """

    def __init__(
        self, call: Callable, params: Params, state: Any, args: tuple, groups: Groups
    ):
        self.groups = groups
        self._call = call
        self._has_state = state is not None
        walked = walk_model(call, params, state, args)
        taps = _taps(walked, [s.name for s in groups.sets])
        paths = [p for p, _ in walked.leaves]
        n_params = len(tree_util.tree_leaves(params))
        self.readers = {}
        """``{set name: (kernel path, bias path or None, number of readers)}``
        of the first layer that reads each set."""
        for name, tap in taps.items():
            if tap.kernel >= n_params:
                raise ValueError(f"{name}: read by a state leaf, not a parameter")
            bias = None if tap.bias is None or tap.bias >= n_params else paths[tap.bias]
            self.readers[name] = (paths[tap.kernel], bias, tap.readers)

    def run(
        self,
        params: Params,
        *args: Any,
        state: Any = None,
        scale: dict[str, jax.Array] | None = None,
        shift: dict[str, jax.Array] | None = None,
    ) -> tuple[Any, dict[str, jax.Array]]:
        """Runs the model, optionally scaling or shifting what the first
        reader of a set sees (``(size,)`` for all examples, ``(batch,
        size)`` per example).

        Returns:
          ``(outputs, activations)``: the activations as
          ``{set name: (batch, positions, size)}`` (before any scale or
          shift). Jittable; differentiable in ``scale`` and ``shift``.
        """
        if self._has_state and state is None:
            raise ValueError("this model reads state: pass run(..., state=...)")
        walked = walk_model(self._call, params, state, args)
        taps = _taps(walked, [s.name for s in self.groups.sets])
        sizes = {s.name: s.size for s in self.groups.sets}
        hooks: dict[Any, Callable] = {}
        for kind, values in (("scale", scale), ("shift", shift)):
            for name, v in (values or {}).items():
                tap = taps[name]
                v = jnp.asarray(v)

                def hook(
                    x,
                    v=v,
                    tap=tap,
                    kind=kind,
                    size=sizes[name],
                    before=hooks.get(tap.var),
                ):
                    if before is not None:
                        x = before(x)
                    wide = along_units(
                        v.astype(x.dtype), x.shape, tap.axis, size, tap.stride
                    )
                    return x * wide if kind == "scale" else x + wide

                hooks[tap.var] = hook
        flat = tree_util.tree_leaves((params, state, args))
        out_tree = tree_util.tree_structure(
            jax.eval_shape(self._call, params, state, args)
        )
        outs, recorded = _evaluate(
            walked.closed, flat, hooks, {t.var for t in taps.values()}
        )
        acts = {
            name: _per_example(recorded[t.var], t.axis, sizes[name], t.stride)
            for name, t in taps.items()
        }
        return tree_util.tree_unflatten(out_tree, outs), acts


def view(
    fn: Callable[..., Any], params: Params, *args: Any, state: Any = None, **kwargs: Any
) -> UnitView:
    """A :class:`UnitView` of ``fn(params, *args, **kwargs)`` (with
    ``state``: ``fn(params, state, *args, **kwargs)``), units as
    :func:`~jaxsparse.groups.trace` finds them.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsparse as js
      >>> p = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
      >>> v = js.neurons.view(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], p,
      ...                     jnp.ones((5, 3)))
      >>> out, acts = v.run(p, jnp.ones((5, 3)))
      >>> acts["w1:1"].shape
      (5, 1, 4)
    """
    groups = trace(fn, params, *args, state=state, **kwargs)
    call = model_call(fn, state is not None, kwargs)
    return UnitView(call, params, state, args, groups)


def view_module(
    model: nnx.Module, *args: Any, **kwargs: Any
) -> tuple[UnitView, Params, Any]:
    """A :class:`UnitView` of a flax nnx module, with its params and state
    (``run(params, *args, state=state)``)."""
    graphdef, params, state = nnx.split(model, nnx.Param, ...)

    def apply(p, s, *a, **k):
        return nnx.merge(graphdef, p, s)(*a, **k)

    return view(apply, params, *args, state=state, **kwargs), params, state


# -- activation statistics ---------------------------------------------------


class ActivationStats(NamedTuple):
    """Streaming statistics of one unit set's activations (Chan et al.'s
    pairwise merge, so batches of any size combine exactly).

    Attributes:
      count: samples seen (examples times positions).
      mean: ``(size,)`` mean activation.
      comoment: ``(size, size)`` sum of centred outer products (its
        diagonal only, ``(size,)``, without correlation).
      zeros: ``(size,)`` count of activations exactly zero.
    """

    count: jax.Array
    mean: jax.Array
    comoment: jax.Array
    zeros: jax.Array

    @property
    def variance(self) -> jax.Array:
        """Population variance per unit."""
        diag = self.comoment if self.comoment.ndim == 1 else jnp.diagonal(self.comoment)
        return diag / jnp.maximum(self.count, 1.0)

    @property
    def apoz(self) -> jax.Array:
        """Average percentage of zeros per unit (Hu et al. 2016), in [0, 1]."""
        return self.zeros / jnp.maximum(self.count, 1.0)

    @property
    def correlation(self) -> jax.Array:
        """``(size, size)`` Pearson correlation (0 where a unit is constant)."""
        if self.comoment.ndim == 1:
            raise ValueError("these statistics were gathered without correlation")
        sd = jnp.sqrt(jnp.diagonal(self.comoment))
        den = sd[:, None] * sd[None, :]
        return jnp.where(den > 0, self.comoment / jnp.where(den > 0, den, 1.0), 0.0)


def stats_init(
    groups: Groups, *, correlation: bool = True, dtype: Any = jnp.float32
) -> dict[str, ActivationStats]:
    """Empty statistics for every unit set."""
    return {
        s.name: ActivationStats(
            jnp.zeros((), dtype),
            jnp.zeros((s.size,), dtype),
            jnp.zeros((s.size, s.size) if correlation else (s.size,), dtype),
            jnp.zeros((s.size,), dtype),
        )
        for s in groups.sets
    }


def stats_update(
    stats: dict[str, ActivationStats], activations: dict[str, jax.Array]
) -> dict[str, ActivationStats]:
    """Merges one batch of activations (``{name: (..., size)}``) into the
    statistics; jittable, O(size²) memory whatever the data size.

    References:
      Chan, Golub & LeVeque 1979 (pairwise merge of means and comoments).
    """
    out = {}
    for name, s in stats.items():
        x = activations[name]
        x = x.reshape(-1, x.shape[-1]).astype(s.mean.dtype)
        n_b = jnp.asarray(x.shape[0], s.mean.dtype)
        mean_b = jnp.mean(x, axis=0)
        centred = x - mean_b[None]
        n = s.count + n_b
        delta = mean_b - s.mean
        if s.comoment.ndim == 2:
            c_b = centred.T @ centred
            extra = jnp.outer(delta, delta) * (s.count * n_b / n)
        else:
            c_b = jnp.sum(centred * centred, axis=0)
            extra = delta * delta * (s.count * n_b / n)
        out[name] = ActivationStats(
            n,
            s.mean + delta * (n_b / n),
            s.comoment + c_b + extra,
            s.zeros + jnp.sum(x == 0, axis=0).astype(s.mean.dtype),
        )
    return out


def activation_stats(
    unit_view: UnitView,
    params: Params,
    batches: Iterable[Any],
    *,
    state: Any = None,
    correlation: bool = True,
    dtype: Any = None,
) -> dict[str, ActivationStats]:
    """Streams a dataset through the model under one ``jit`` and gathers
    each unit set's mean, variance, zeros and (with ``correlation``) the
    pairwise comoments, holding one batch of activations at a time.

    Args:
      unit_view: the model.
      params: its params.
      batches: model inputs, one batch at a time (a tuple of positional
        arguments, or a single array).
      state: the model's state, if it has one.
      correlation: gather the ``(size, size)`` comoments.
      dtype: of the statistics; by default the params' floating dtype, at
        least float32.

    Returns:
      ``{set name: ActivationStats}``.
    """
    if dtype is None:
        floats = [
            x.dtype
            for x in tree_util.tree_leaves(params)
            if jnp.issubdtype(x.dtype, jnp.floating)
        ]
        dtype = max([jnp.dtype(jnp.float32), *floats], key=lambda d: d.itemsize)
    stats = stats_init(unit_view.groups, correlation=correlation, dtype=dtype)

    @jax.jit
    def step(stats, batch):
        _, acts = unit_view.run(params, *batch, state=state)
        return stats_update(stats, acts)

    for batch in batches:
        stats = step(stats, batch if isinstance(batch, tuple) else (batch,))
    return stats


def select_units(
    scores: UnitScores, sparsity: Sparsity, *, distribution: Distribution = Uniform()
) -> dict[str, jax.Array]:
    """The unit mask keeping the highest scores of each set (or over all
    sets, with :class:`~jaxsparse.Global`), as the selection of masks does
    for element scores."""
    return distribution.mask(scores, sparsity, include=units_include(None))


# -- rewiring the reader: folding and merging --------------------------------


def _leaf_map(tree: Any) -> dict[str, Any]:
    return {_tree.path_str(p): x for p, x in _tree.leaves_with_path(tree)}


def _replace(tree: Any, new: dict[str, Any]) -> Any:
    return tree_util.tree_map_with_path(
        lambda p, x: new.get(_tree.path_str(p), x), tree, is_leaf=_tree.is_none
    )


def _reader(unit_view: UnitView, name: str, need_bias: bool):
    """The kernel (path, unit axis) and bias path of a set's only reader."""
    kernel, bias, readers = unit_view.readers[name]
    if readers != 1:
        raise ValueError(
            f"{name}: read by {readers} layers (a residual stream); folding and "
            "merging need the units to have one reader"
        )
    if need_bias and bias is None:
        raise ValueError(
            f"{name}: the layer that reads these units ({kernel}) has no bias "
            "to fold into"
        )
    unit_set = unit_view.groups.unit_set(name)
    member = next(m for m in unit_set.members if m.path == kernel and not m.state)
    if member.stride != 1:
        raise ValueError(f"{name}: units spread over several positions of {kernel}")
    return kernel, member.axis, bias


def _fold_into_bias(
    shift: jax.Array, kernel: jax.Array, axis: int, bias: jax.Array
) -> jax.Array:
    """``bias`` plus what a constant input ``shift`` (one value per unit)
    adds to the reader's output."""
    moved = jnp.tensordot(shift.astype(kernel.dtype), kernel, axes=([0], [axis]))
    lead = moved.ndim - bias.ndim
    if moved.shape[lead:] != bias.shape:
        raise ValueError(
            f"the reader's output {moved.shape} does not end with its bias "
            f"shape {bias.shape}"
        )
    return bias + moved.reshape((-1, *bias.shape)).sum(0).astype(bias.dtype)


def _rewire(unit_view, params, name, mix, shift):
    """The reader sees ``h_kept @ mix + shift`` in place of ``h``:
    ``kernel <- mix @ kernel`` on the kept units, ``bias += fold(shift)``,
    removed units masked."""
    kernel_path, axis, bias_path = _reader(unit_view, name, True)
    leaves = _leaf_map(params)
    kernel = leaves[kernel_path]
    moved = jnp.moveaxis(kernel, axis, 0)
    rewired = jnp.tensordot(mix.astype(kernel.dtype), moved, axes=([1], [0]))
    new = {kernel_path: jnp.moveaxis(rewired, 0, axis).astype(kernel.dtype)}
    new[bias_path] = _fold_into_bias(shift, kernel, axis, leaves[bias_path])
    return new


def _finish(unit_view, params, new, units):
    from jaxsparse.masks import apply_mask

    full = {
        s.name: units.get(s.name, jnp.ones(s.size, bool)) for s in unit_view.groups.sets
    }
    params = _replace(params, new)
    return apply_mask(params, unit_view.groups.element_mask(full, params)), full


def fold_constant_units(
    unit_view: UnitView,
    params: Params,
    stats: dict[str, ActivationStats],
    keep: dict[str, jax.Array],
) -> tuple[Params, dict[str, jax.Array]]:
    """Removes units and folds their mean output into the reader's bias.

    A unit whose output barely varies contributes ``mean_u * K[u]`` to the
    next layer's pre-activation; ``b' = b + sum_u mean_u K[u]`` keeps that
    contribution, exactly when the unit is constant (and the reader is a
    dense layer or an unpadded convolution).

    Args:
      unit_view: the model.
      params: its params.
      stats: the activation statistics (their ``mean``).
      keep: ``{set name: (size,) bool}`` for the sets to prune (others are
        kept whole); select it from ``-stats[name].variance`` to remove the
        most nearly constant units.

    Returns:
      ``(params, unit mask)``: the params with biases updated and the
      removed units masked, and the full unit mask for
      :func:`~jaxsparse.groups.shrink`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsparse as js
      >>> p = {"w1": jnp.array([[1.0, 0.0]]), "b1": jnp.array([0.0, 2.0]),
      ...      "w2": jnp.array([[1.0], [3.0]]), "b2": jnp.zeros(1)}
      >>> def f(p, x):
      ...     h = jax.nn.relu(x @ p["w1"] + p["b1"][None])
      ...     return h @ p["w2"] + p["b2"][None]
      >>> x = jnp.array([[1.0], [2.0]])
      >>> v = js.neurons.view(f, p, x)
      >>> stats = js.neurons.activation_stats(v, p, [x])
      >>> keep = {"w1:1": jnp.array([True, False])}
      >>> new, units = js.neurons.fold_constant_units(v, p, stats, keep)
      >>> new["b2"], f(new, x).ravel()
      (Array([6.], dtype=float32), Array([7., 8.], dtype=float32))

    References:
      Hoefler et al. 2021, §3.3 (neurons whose output barely varies, their
      mean folded into the next layer's bias).
    """
    new = {}
    for name, kept in keep.items():
        kept = jnp.asarray(kept)
        mix = jnp.diag(kept.astype(stats[name].mean.dtype))
        shift = jnp.where(kept, 0.0, stats[name].mean)
        new.update(_rewire(unit_view, params, name, mix, shift))
    return _finish(unit_view, params, new, {k: jnp.asarray(v) for k, v in keep.items()})


def _incoming(
    unit_view: UnitView, params: Params, name: str, state: Any = None
) -> np.ndarray:
    """``(size, d)``: each unit's incoming parameters (and state), all of its
    slices except the reader's kernel rows, side by side."""
    kernel_path, _, _ = _reader(unit_view, name, False)
    unit_set = unit_view.groups.unit_set(name)
    leaves = _leaf_map(params)
    state_leaves = _leaf_map(state) if state is not None else {}
    parts = []
    for m in unit_set.members:
        if m.path == kernel_path and not m.state:
            continue
        source = state_leaves if m.state else leaves
        if m.path not in source:
            continue
        x = np.asarray(source[m.path], np.float64)
        split = x.reshape(split_shape(x.shape, m.axis, unit_set.size, m.stride))
        parts.append(np.moveaxis(split, m.axis + 1, 0).reshape(unit_set.size, -1))
    return np.concatenate(parts, axis=1)


def similarity_saliency(
    unit_view: UnitView, params: Params, name: str, *, state: Any = None
) -> np.ndarray:
    """Srinivas & Babu's cost of merging unit ``j`` into unit ``i``:
    ``s[i, j] = ||a_j||^2 ||W_i - W_j||^2`` with ``W`` the incoming weights
    (every slice of the unit but the reader's) and ``a_j`` the outgoing
    weights; ``inf`` on the diagonal.

    References:
      Srinivas & Babu 2015, "Data-free parameter pruning for deep neural
      networks", §3 (Eq. 4); Hoefler et al. 2021, §3.2.
    """
    kernel_path, axis, _ = _reader(unit_view, name, False)
    w = _incoming(unit_view, params, name, state)
    kernel = np.moveaxis(
        np.asarray(_leaf_map(params)[kernel_path], np.float64), axis, 0
    )
    a2 = np.sum(kernel.reshape(kernel.shape[0], -1) ** 2, axis=1)
    d2 = np.sum((w[:, None, :] - w[None, :, :]) ** 2, axis=-1)
    s = a2[None, :] * d2
    np.fill_diagonal(s, np.inf)
    return s


def similarity_merge(
    unit_view: UnitView,
    params: Params,
    remove: dict[str, int],
    *,
    state: Any = None,
) -> tuple[Params, dict[str, jax.Array]]:
    """Merges units with near-identical incoming weights (Srinivas & Babu):
    repeatedly the pair ``(i, j)`` of least :func:`similarity_saliency`
    goes, ``j`` removed and its outgoing weights added to ``i``'s. Exact
    when the two units' incoming weights are equal.

    Args:
      unit_view: the model.
      params: its params.
      remove: ``{set name: how many units to merge away}``.
      state: the model's state (its batch statistics count as incoming).

    Returns:
      ``(params, unit mask)`` as :func:`fold_constant_units`.

    References:
      Srinivas & Babu 2015, §3; Hoefler et al. 2021, §3.2.
    """
    new, units = {}, {}
    for name, count in remove.items():
        kernel_path, axis, _ = _reader(unit_view, name, False)
        size = unit_view.groups.unit_set(name).size
        if not 0 <= count < size:
            raise ValueError(
                f"{name}: can merge away 0 to {size - 1} units, got {count}"
            )
        w = _incoming(unit_view, params, name, state)
        kernel = np.moveaxis(
            np.asarray(_leaf_map(params)[kernel_path], np.float64), axis, 0
        ).copy()
        alive = np.ones(size, bool)
        for _ in range(count):
            a2 = np.sum(kernel.reshape(size, -1) ** 2, axis=1)
            s = a2[None, :] * np.sum((w[:, None] - w[None, :]) ** 2, axis=-1)
            s[~alive, :] = np.inf
            s[:, ~alive] = np.inf
            np.fill_diagonal(s, np.inf)
            i, j = np.unravel_index(np.argmin(s), s.shape)
            kernel[i] += kernel[j]
            kernel[j] = 0.0
            alive[j] = False
        dtype = _leaf_map(params)[kernel_path].dtype
        new[kernel_path] = jnp.asarray(np.moveaxis(kernel, 0, axis), dtype)
        units[name] = jnp.asarray(alive)
    return _finish(unit_view, params, new, units)


def correlation_merge(
    unit_view: UnitView,
    params: Params,
    stats: dict[str, ActivationStats],
    remove: dict[str, int],
    *,
    ridge: float = 0.0,
) -> tuple[Params, dict[str, jax.Array]]:
    """Removes units that fire together and refits the reader by least
    squares on the activations.

    Repeatedly the pair of live units with the largest ``|correlation|``
    loses its lower-variance unit. The reader then gets
    ``K' = R K`` and ``b' = b + (mu - mu_kept R) K``, where
    ``R = C_kk^+ C_k:`` regresses every unit on the kept ones (``C`` the
    activation comoments): the least-squares fit of the layer's input, with
    an intercept folded into the bias. Exact when the removed units are
    affine functions of the kept ones.

    Args:
      unit_view: the model.
      params: its params.
      stats: activation statistics gathered with correlation.
      remove: ``{set name: how many units to remove}``.
      ridge: added to ``C_kk``'s diagonal, relative to its mean.

    Returns:
      ``(params, unit mask)`` as :func:`fold_constant_units`.

    References:
      Hoefler et al. 2021, §3.3 (neurons that always activate together are
      merged); Srinivas & Babu 2015 (merging with the outgoing weights).
    """
    new, units = {}, {}
    for name, count in remove.items():
        s = stats[name]
        size = s.mean.shape[0]
        if not 0 <= count < size:
            raise ValueError(f"{name}: can remove 0 to {size - 1} units, got {count}")
        corr = np.abs(np.asarray(s.correlation, np.float64))
        var = np.asarray(s.variance, np.float64)
        alive = np.ones(size, bool)
        for _ in range(count):
            c = corr.copy()
            c[~alive, :] = -1.0
            c[:, ~alive] = -1.0
            np.fill_diagonal(c, -1.0)
            i, j = np.unravel_index(np.argmax(c), c.shape)
            alive[j if var[j] <= var[i] else i] = False
        comoment = np.asarray(s.comoment, np.float64)
        mean = np.asarray(s.mean, np.float64)
        ckk = comoment[np.ix_(alive, alive)]
        ckk = ckk + ridge * np.trace(ckk) / max(1, ckk.shape[0]) * np.eye(ckk.shape[0])
        regress = np.linalg.lstsq(ckk, comoment[alive], rcond=None)[0]
        mix = np.zeros((size, size))
        mix[alive] = regress
        shift = mean - mean[alive] @ regress
        new.update(
            _rewire(unit_view, params, name, jnp.asarray(mix), jnp.asarray(shift))
        )
        units[name] = jnp.asarray(alive)
    return _finish(unit_view, params, new, units)


# -- sensitivity, Taylor, gates, Jacobian QR ---------------------------------


def _split_batch(batch: Any) -> tuple[tuple, tuple]:
    """``(inputs, targets)`` from a batch given as ``(x, y)`` or
    ``((x1, x2), (y1,))``."""
    inputs, targets = batch
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    targets = targets if isinstance(targets, tuple) else (targets,)
    return inputs, targets


def _sizes(unit_view: UnitView) -> dict[str, int]:
    return {s.name: s.size for s in unit_view.groups.sets}


def output_sensitivity(
    unit_view: UnitView, params: Params, batches: Iterable[Any], *, state: Any = None
) -> UnitScores:
    """How strongly the outputs move with each unit:
    ``S_u = sqrt(mean_n sum_k (dy_nk / da_nu)^2)``, the derivative taken
    for a shift of the unit's activation in example ``n`` (all its
    positions).

    Args:
      unit_view: the model.
      params: its params.
      batches: model inputs, one batch at a time (a tuple or one array).
      state: the model's state, if any.

    Returns:
      Unit scores (higher: the output depends more on the unit).

    References:
      Hoefler et al. 2021, §3.3 (input-output sensitivity); Zurada, Malinowski
      & Cloete 1994; Engelbrecht 2001.
    """
    sizes = _sizes(unit_view)

    @jax.jit
    def batch_sums(batch):
        n = tree_util.tree_leaves(batch)[0].shape[0]
        zeros = {k: jnp.zeros((n, v)) for k, v in sizes.items()}

        def outputs(shift):
            out, _ = unit_view.run(params, *batch, state=state, shift=shift)
            return jax.tree.map(lambda y: jnp.sum(y, axis=0), out)

        jac = jax.jacrev(outputs)(zeros)
        return {
            k: sum(
                jnp.sum(jnp.square(j[k]), axis=tuple(range(j[k].ndim - 2)))
                for j in tree_util.tree_leaves(
                    jac, is_leaf=lambda x: isinstance(x, dict)
                )
            ).sum(0)
            for k in sizes
        }, n

    total, count = _summed(
        (batch_sums(b if isinstance(b, tuple) else (b,)) for b in batches), sizes
    )
    return {k: jnp.sqrt(v / count) for k, v in total.items()}


def _summed(parts: Iterable[tuple[dict, int]], sizes: dict[str, int]):
    """Sums per-batch ``(unit scores, count)`` pairs over a dataset."""
    total, count = {k: jnp.zeros(v) for k, v in sizes.items()}, 0
    for scores, n in parts:
        total = {k: total[k] + scores[k] for k in sizes}
        count += n
    return total, count


def _loss_of(unit_view, params, state, loss, inputs, targets, **hooks):
    out, acts = unit_view.run(params, *inputs, state=state, **hooks)
    return jnp.sum(loss(out, *targets)), acts


def taylor_units(
    unit_view: UnitView,
    params: Params,
    batches: Iterable[Any],
    loss: Callable[..., jax.Array],
    *,
    state: Any = None,
    normalize: bool = False,
) -> UnitScores:
    """Molchanov et al.'s first-order Taylor criterion accumulated over a
    dataset: ``Theta_u = mean_n |(1/M) sum_m a_nmu dL/da_nmu|``, the change
    of the loss if unit ``u`` of example ``n`` were zeroed, averaged over
    its ``M`` positions (feature-map pixels), then over examples.

    Args:
      unit_view: the model.
      params: its params.
      batches: ``(inputs, targets)`` pairs.
      loss: ``loss(outputs, *targets)``: per-example losses (summed) or
        their sum.
      state: the model's state, if any.
      normalize: divide each set's scores by their Euclidean norm (the
        paper's layer-wise normalization, for a global ranking).

    Returns:
      Unit scores.

    References:
      Molchanov et al. 2017, "Pruning convolutional neural networks for
      resource efficient inference", §2.2 (Eq. 8); Hoefler et al. 2021,
      §3.4.
    """
    sizes = _sizes(unit_view)

    @jax.jit
    def batch_sums(inputs, targets):
        n = tree_util.tree_leaves(inputs)[0].shape[0]
        gates = {k: jnp.ones((n, v)) for k, v in sizes.items()}

        def objective(g):
            return _loss_of(unit_view, params, state, loss, inputs, targets, scale=g)

        grads, acts = jax.grad(objective, has_aux=True)(gates)
        return {
            k: jnp.sum(jnp.abs(grads[k]) / acts[k].shape[1], axis=0) for k in sizes
        }, n

    total, count = _summed((batch_sums(*_split_batch(b)) for b in batches), sizes)
    scores = {k: v / count for k, v in total.items()}
    if normalize:
        scores = {
            k: v / jnp.maximum(jnp.linalg.norm(v), 1e-30) for k, v in scores.items()
        }
    return scores


def gate_saliency(
    unit_view: UnitView,
    params: Params,
    batches: Iterable[Any],
    loss: Callable[..., jax.Array],
    *,
    state: Any = None,
) -> UnitScores:
    """Mozer & Smolensky's skeletonization: a gate ``alpha_u`` multiplies
    each unit's output, and the relevance ``rho_u = E(alpha_u = 0) -
    E(alpha_u = 1)`` is estimated by ``-dE/dalpha_u`` at ``alpha = 1``,
    summed over the dataset.

    Args:
      unit_view: the model.
      params: its params.
      batches: ``(inputs, targets)`` pairs.
      loss: ``loss(outputs, *targets)``, summed over the batch.
      state: the model's state, if any.

    Returns:
      Unit scores (higher: removing the unit raises the loss more).

    References:
      Mozer & Smolensky 1989, "Skeletonization: a technique for trimming the
      fat from a network via relevance assessment", §2; Hoefler et al. 2021,
      §3.4.
    """
    sizes = _sizes(unit_view)

    @jax.jit
    def batch_grad(inputs, targets):
        gates = {k: jnp.ones((v,)) for k, v in sizes.items()}

        def objective(g):
            return _loss_of(unit_view, params, state, loss, inputs, targets, scale=g)

        return jax.grad(objective, has_aux=True)(gates)[0]

    grads, _ = _summed(((batch_grad(*_split_batch(b)), 0) for b in batches), sizes)
    total = {k: -v for k, v in grads.items()}
    return total


class DependentUnits(NamedTuple):
    """Xu & Ho's QR with column pivoting of one unit set's Jacobian columns.

    Attributes:
      order: the pivot order (most independent first).
      diagonal: ``|R_ii|`` in pivot order.
      rank: the numerical rank (``|R_ii| > tol * |R_00|``).
      scores: ``|R_ii|`` given back to the unit it pivoted (higher keeps;
        the dependent units score lowest).
    """

    order: jax.Array
    diagonal: jax.Array
    rank: jax.Array
    scores: jax.Array

    @property
    def independent(self) -> jax.Array:
        """``(size,) bool``: the units among the first ``rank`` pivots."""
        size = self.order.shape[0]
        position = jnp.zeros(size, jnp.int32).at[self.order].set(jnp.arange(size))
        return position < self.rank


def jacobian_qr(
    unit_view: UnitView,
    params: Params,
    *inputs: Any,
    state: Any = None,
    tol: float = 1e-6,
) -> dict[str, DependentUnits]:
    """Finds units whose outputs are linear combinations of other units'.

    The per-example Jacobian of the next layer's pre-activations with
    respect to its weights has, for each of its outputs, one column per
    unit: the unit's activation over the examples (and positions). QR with
    column pivoting of those columns orders the units from most to least
    independent; past the numerical rank, a unit's column is a combination
    of the ones before it, so the unit can go and the next layer's weights
    absorb it. Where the next layer has a bias, its constant column is
    taken out first (the columns are centred), so a constant unit counts
    as dependent too.

    Args:
      unit_view: the model.
      params: its params.
      *inputs: one batch of model inputs (more examples than units).
      state: the model's state, if any.
      tol: relative threshold on ``|R_ii|`` for the rank.

    Returns:
      ``{set name: DependentUnits}``; remove the units not ``independent``.

    References:
      Xu & Ho 2006, "A new training and pruning algorithm based on node
      dependence and Jacobian rank deficiency", §3; Hoefler et al. 2021,
      §3.4.
    """
    sizes = _sizes(unit_view)
    centred = {k: unit_view.readers[k][1] is not None for k in sizes}

    @jax.jit
    def qr(inputs):
        _, acts = unit_view.run(params, *inputs, state=state)
        result = {}
        for k, size in sizes.items():
            jac = acts[k].reshape(-1, size)
            if centred[k]:
                jac = jac - jnp.mean(jac, axis=0)[None]
            _, r, order = jax.scipy.linalg.qr(jac, mode="economic", pivoting=True)
            diag = jnp.abs(jnp.diagonal(r))
            diag = jnp.concatenate([diag, jnp.zeros(size - diag.shape[0], diag.dtype)])
            rank = jnp.sum(diag > tol * diag[0])
            scores = jnp.zeros(size, diag.dtype).at[order].set(diag)
            result[k] = DependentUnits(order, diag, rank, scores)
        return result

    return qr(inputs)
