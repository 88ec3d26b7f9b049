"""Ephemeral sparsity: activations and backpropagated errors that are
sparse for one step only.

- :func:`topk_activations` keeps the ``k`` largest entries of each example
  (k-winners-take-all), :func:`threshold_activations` those above a
  threshold; both optionally pass the whole gradient through
  (straight-through). :class:`KWinners` is the flax nnx layer.
- :func:`activation_sparsity` measures how many outputs of every ReLU in
  any function are exactly zero, found in its jaxpr.
- :func:`topk_backward` (meProp) is the identity going forward and keeps
  only the ``k`` largest-magnitude entries of each example's error going
  backward.
- :func:`topk_gradients`, :func:`threshold_gradients` and
  :func:`deep_gradient_compression` are optax transforms that send only a
  few entries of each update and keep the rest in their state until it
  has grown large enough (error feedback); :func:`on_support` keeps an
  optimizer's state only on a fixed mask's support.
- :func:`sparse_allreduce` sums data-parallel updates inside ``shard_map``
  by exchanging only each device's top-k values and indices;
  :func:`exchange_bits` counts what that sends against a dense all-reduce.

References:
  Hoefler et al. 2021, §2.3 (ephemeral sparsity); Ahmad & Scheinkman 2019,
  "How can we be so dense?" (k-winners-take-all); Makhzani & Frey 2014
  (k-sparse autoencoders); Sun et al. 2017, "meProp", §2; Stich, Cordonnier
  & Jaggi 2018, "Sparsified SGD with memory"; Lin et al. 2018, "Deep
  Gradient Compression", §3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax, tree_util

from jaxsparse import _jaxpr, _tree
from jaxsparse._types import LeafSelector, Mask
from jaxsparse.distribution import Distribution, Uniform, topk_mask


def _check_k(k: Any, size: int, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise ValueError(f"{where}: k must be an integer in [1, {size}], got {k!r}")


def _topk_mask(x: jax.Array, k: int, axis: int, by_magnitude: bool) -> jax.Array:
    """Exactly ``k`` entries along ``axis`` per index of the other axes (the
    largest; ties go to the lower index)."""
    moved = jnp.moveaxis(x, axis, -1)
    _, idx = lax.top_k(jnp.abs(moved) if by_magnitude else moved, k)
    mask = jnp.put_along_axis(
        jnp.zeros(moved.shape, bool), idx, True, axis=-1, inplace=False
    )
    return jnp.moveaxis(mask, -1, axis)


def _straight_through(x: jax.Array, sparse: jax.Array) -> jax.Array:
    """``sparse`` going forward, the identity's gradient going backward."""
    return x + lax.stop_gradient(sparse - x)


def topk_activations(
    x: jax.Array, k: int, *, axis: int = -1, straight_through: bool = False
) -> jax.Array:
    """k-winners-take-all: keeps the ``k`` largest entries along ``axis``
    of every example, zeroes the rest.

    Args:
      x: activations, e.g. ``(batch, features)``.
      k: entries kept per example, in ``[1, x.shape[axis]]``.
      axis: the axis competed over (the others index examples).
      straight_through: pass the whole gradient back (the identity's);
        by default only the winners receive gradient.

    Returns:
      ``x`` with all but ``k`` entries per example set to 0.

    Raises:
      ValueError: ``k`` out of range or ``axis`` out of bounds.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> ephemeral.topk_activations(jnp.array([[0.5, -2.0, 3.0, 1.0]]), 2)
      Array([[0., 0., 3., 1.]], dtype=float32)

    References:
      Ahmad & Scheinkman 2019, §2; Hoefler et al. 2021, §2.3.
    """
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"topk_activations: axis {axis} is out of range for {x.shape}")
    _check_k(k, x.shape[axis], "topk_activations")
    sparse = jnp.where(_topk_mask(x, k, axis, by_magnitude=False), x, 0.0)
    return _straight_through(x, sparse) if straight_through else sparse


def threshold_activations(
    x: jax.Array, threshold: float | jax.Array, *, straight_through: bool = False
) -> jax.Array:
    """Keeps the entries of ``x`` above ``threshold``, zeroes the rest.

    Args:
      x: activations.
      threshold: a scalar (may be traced).
      straight_through: pass the whole gradient back.

    Returns:
      ``where(x > threshold, x, 0)``.

    References:
      Hoefler et al. 2021, §2.3 (ReLU is the threshold 0).
    """
    sparse = jnp.where(x > threshold, x, 0.0)
    return _straight_through(x, sparse) if straight_through else sparse


class KWinners(nnx.Module):
    """A k-winners-take-all layer: :func:`topk_activations` along the last
    axis, ``k`` given as a count or as the fraction kept.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> layer = ephemeral.KWinners(fraction=0.25)
      >>> layer(jnp.arange(8.0)[None]).tolist()
      [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0]]
    """

    def __init__(
        self,
        k: int | None = None,
        *,
        fraction: float | None = None,
        straight_through: bool = False,
    ):
        if (k is None) == (fraction is None):
            raise ValueError("KWinners: give exactly one of k and fraction")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"KWinners: fraction must be in (0, 1], got {fraction!r}")
        self.k = k
        self.fraction = fraction
        self.straight_through = straight_through

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.k
        if k is None:
            k = max(1, round(self.fraction * x.shape[-1]))
        return topk_activations(x, k, straight_through=self.straight_through)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def topk_backward(x: jax.Array, k: int, axis: int = -1) -> jax.Array:
    """meProp: the identity going forward; going backward, each example's
    error keeps only its ``k`` entries of largest magnitude along ``axis``.

    Put it on a layer's pre-activation (``topk_backward(x @ w, k)``): the
    weight gradient then has at most ``k`` nonzero columns per example.

    Args:
      x: a layer's output.
      k: error entries kept per example, in ``[1, x.shape[axis]]``.
      axis: the axis selected over.

    Returns:
      ``x`` itself.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> g = jax.grad(lambda x: (ephemeral.topk_backward(x, 1) * jnp.array(
      ...     [[1.0, -3.0, 2.0]])).sum())(jnp.ones((1, 3)))
      >>> g.tolist()
      [[0.0, -3.0, 0.0]]

    References:
      Sun et al. 2017, "meProp", §2 (top-k of the output gradient).
    """
    _check_k(k, x.shape[axis], "topk_backward")
    return x


def _topk_backward_fwd(x, k, axis):
    _check_k(k, x.shape[axis], "topk_backward")
    return x, None


def _topk_backward_bwd(k, axis, _, g):
    return (jnp.where(_topk_mask(g, k, axis, by_magnitude=True), g, 0.0),)


topk_backward.defvjp(_topk_backward_fwd, _topk_backward_bwd)


def _is_relu(eqn) -> bool:
    """``max(x, 0)`` with a literal zero (what ``jax.nn.relu`` lowers to)."""
    if eqn.primitive.name != "max":
        return False
    return any(
        isinstance(v, jex.Literal) and jnp.ndim(v.val) == 0 and v.val == 0
        for v in eqn.invars
    )


def _eval_recording(closed, args: list, found: list) -> list:
    """Evaluates a closed jaxpr, appending every ReLU output to ``found``;
    enters ``jit`` and ``custom_jvp_call`` (``jax.nn.relu``'s wrapper)."""

    def step(_, eqn, ins):
        name = eqn.primitive.name
        if name == "jit":
            return _eval_recording(eqn.params["jaxpr"], ins, found)
        if name == "custom_jvp_call":
            return _eval_recording(eqn.params["call_jaxpr"], ins, found)
        outs = _jaxpr.bind(eqn, ins)
        if _is_relu(eqn):
            found.append(outs[0])
        return outs

    return _jaxpr.evaluate(closed, args, step)


def activation_sparsity(fn: Any, *args: Any) -> dict[str, jax.Array]:
    """The fraction of exactly-zero outputs of every ReLU in ``fn(*args)``.

    The ReLUs are found in ``fn``'s jaxpr (``jax.nn.relu``, or any
    ``max(x, 0)``, inside ``jit`` calls too), so any model can be measured
    without changing it. Jittable; the keys are static.

    Args:
      fn: any function of arrays, e.g. ``lambda x: model(x)``.
      *args: its arguments.

    Returns:
      ``{"relu_0 (shape)": fraction, ...}`` in the order the ReLUs run.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> x = jnp.array([[-1.0, 2.0, -3.0, 4.0]])
      >>> found = ephemeral.activation_sparsity(jax.nn.relu, x)
      >>> {k: float(v) for k, v in found.items()}
      {'relu_0 (1, 4)': 0.5}

    References:
      Hoefler et al. 2021, §2.3 (ReLU activations are sparse for free).
    """
    closed = jax.make_jaxpr(fn)(*args)
    found: list = []
    _eval_recording(closed, jax.tree.leaves(args), found)
    return {
        f"relu_{i} {tuple(out.shape)}": jnp.mean((out == 0).astype(jnp.float32))
        for i, out in enumerate(found)
    }


class ErrorFeedbackState(NamedTuple):
    """State of :func:`topk_gradients` and :func:`threshold_gradients`."""

    count: jax.Array
    residual: optax.Updates
    """What was not sent yet (0 on leaves always sent whole)."""


class DGCState(NamedTuple):
    """State of :func:`deep_gradient_compression`."""

    count: jax.Array
    momentum: optax.Updates
    residual: optax.Updates


def _at(value: Any, count: jax.Array) -> Any:
    return value(count) if callable(value) else value


def _check_updates(updates: Any, residual: Any, name: str) -> None:
    _tree.check_same_tree(updates, residual, name="updates", ref_name=f"{name} state")


def _send(acc: optax.Updates, mask: Mask) -> tuple[optax.Updates, optax.Updates]:
    """``(sent, kept back)``: ``acc`` split by ``mask``; one of the two is 0
    at every entry, so they add up to ``acc`` exactly (``None`` mask leaves
    are sent whole)."""

    def part(sending: bool):
        def leaf(m, a):
            if m is None:
                return a if sending else jnp.zeros_like(a)
            zero = jnp.zeros((), a.dtype)
            return jnp.where(m, a, zero) if sending else jnp.where(m, zero, a)

        return tree_util.tree_map(leaf, mask, acc, is_leaf=_tree.is_none)

    return part(True), part(False)


def _error_feedback(
    select: Callable[[optax.Updates, jax.Array], Mask], error_feedback: bool, name: str
) -> optax.GradientTransformation:
    def init(params):
        return ErrorFeedbackState(
            jnp.zeros((), jnp.int32), tree_util.tree_map(jnp.zeros_like, params)
        )

    def update(updates, state, params=None):
        del params
        _check_updates(updates, state.residual, name)
        acc = updates
        if error_feedback:
            acc = tree_util.tree_map(jnp.add, state.residual, updates)
        sent, kept = _send(acc, select(acc, state.count))
        residual = kept if error_feedback else state.residual
        return sent, ErrorFeedbackState(state.count + 1, residual)

    return optax.GradientTransformation(init, update)


def _magnitudes(tree: optax.Updates) -> optax.Updates:
    return tree_util.tree_map(jnp.abs, tree)


def topk_gradients(
    sparsity: float | optax.Schedule,
    *,
    error_feedback: bool = True,
    distribution: Distribution = Uniform(),
    include: LeafSelector = None,
) -> optax.GradientTransformation:
    """Sends only the largest entries of each update; with error feedback,
    what is not sent is added to the next update instead of being lost.

    Each step ``acc = residual + update``; the ``1 - sparsity`` fraction of
    ``acc`` of largest magnitude is sent (the transform's output), the rest
    becomes the new residual, so ``residual' + sent == residual + update``
    exactly. Leaves ``include`` leaves out are sent whole.

    Args:
      sparsity: fraction of each selected update held back (0.99 sends 1 %),
        in ``[0, 1)``; a float or a schedule of the step (e.g. a warm-up).
      error_feedback: keep what is not sent (Stich et al.'s memory); off,
        it is dropped.
      distribution: how the entries sent are spread: ``Uniform()`` sends
        the same fraction of every leaf (per layer, as DGC), ``Global()``
        the largest entries of the whole model.
      include: the leaves compressed (default: those of two or more
        dimensions; biases and scales go whole).

    Returns:
      An ``optax.GradientTransformation``; put it before the optimizer:
      ``optax.chain(topk_gradients(0.99), optax.sgd(lr))``.

    Raises:
      ValueError: a concrete sparsity outside ``[0, 1)``, or updates whose
        tree differs from the state's (naming the leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> tx = ephemeral.topk_gradients(0.5)
      >>> g = {"w": jnp.array([[1.0, -4.0], [0.5, 2.0]])}
      >>> sent, state = tx.update(g, tx.init(g))
      >>> sent["w"].tolist(), state.residual["w"].tolist()
      ([[0.0, -4.0], [0.0, 2.0]], [[1.0, 0.0], [0.5, 0.0]])

    References:
      Stich, Cordonnier & Jaggi 2018, Algorithm 1 (top-k with memory);
      Hoefler et al. 2021, §2.3.
    """
    if not callable(sparsity):
        _tree.check_sparsity(sparsity, where="topk_gradients: sparsity")

    def select(acc, count):
        return topk_mask(
            _magnitudes(acc),
            _at(sparsity, count),
            distribution=distribution,
            include=include,
        )

    return _error_feedback(select, error_feedback, "topk_gradients")


def threshold_gradients(
    threshold: float | optax.Schedule,
    *,
    error_feedback: bool = True,
    include: LeafSelector = None,
) -> optax.GradientTransformation:
    """Sends the entries of each update whose magnitude (with the residual
    added) reaches ``threshold``; with error feedback the rest waits.

    Args:
      threshold: a non-negative float or a schedule of the step.
      error_feedback: keep what is not sent.
      include: the leaves compressed (default: two or more dimensions).

    Returns:
      An ``optax.GradientTransformation`` (state :class:`ErrorFeedbackState`).

    Raises:
      ValueError: a negative concrete threshold, or updates whose tree
        differs from the state's.

    References:
      Strom 2015, "Scalable distributed DNN training using commodity GPU
      cloud computing" (threshold with residual); Hoefler et al. 2021, §2.3.
    """
    if not callable(threshold) and not threshold >= 0:
        raise ValueError(
            f"threshold_gradients: threshold must be >= 0, got {threshold!r}"
        )

    def select(acc, count):
        t = _at(threshold, count)
        return _tree.map_selected(lambda _, a: jnp.abs(a) >= t, acc, include)

    return _error_feedback(select, error_feedback, "threshold_gradients")


def deep_gradient_compression(
    sparsity: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    distribution: Distribution = Uniform(),
    include: LeafSelector = None,
) -> optax.GradientTransformation:
    """Deep Gradient Compression: top-k with momentum correction and
    momentum factor masking.

    Each step ``u = momentum * u + g``, ``v = v + u``; the largest
    ``1 - sparsity`` of ``v`` is sent and removed from ``v``, and the
    momentum ``u`` of the entries sent is reset to 0. The momentum lives
    here, so follow it with plain SGD:
    ``optax.chain(deep_gradient_compression(0.999), optax.sgd(lr))``.

    Args:
      sparsity: fraction held back, in ``[0, 1)``, or a schedule (DGC warms
        it up: 75 %, 93.75 %, ... 99.9 % over the first epochs).
      momentum: the momentum coefficient.
      distribution: ``Uniform()`` (per layer, as the paper) or ``Global()``.
      include: the leaves compressed (default: two or more dimensions).

    Returns:
      An ``optax.GradientTransformation`` (state :class:`DGCState`).

    Raises:
      ValueError: a concrete sparsity outside ``[0, 1)``, a momentum
        outside ``[0, 1)``, or updates whose tree differs from the state's.

    References:
      Lin et al. 2018, "Deep Gradient Compression", §3.1-3.2 and
      Algorithm 1; Hoefler et al. 2021, §2.3.
    """
    if not callable(sparsity):
        _tree.check_sparsity(sparsity, where="deep_gradient_compression: sparsity")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(
            f"deep_gradient_compression: momentum must be in [0, 1), got {momentum!r}"
        )

    def init(params):
        zeros = tree_util.tree_map(jnp.zeros_like, params)
        return DGCState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None):
        del params
        _check_updates(updates, state.residual, "deep_gradient_compression")
        u = tree_util.tree_map(lambda m, g: momentum * m + g, state.momentum, updates)
        v = tree_util.tree_map(jnp.add, state.residual, u)
        mask = topk_mask(
            _magnitudes(v),
            _at(sparsity, state.count),
            distribution=distribution,
            include=include,
        )
        sent, residual = _send(v, mask)
        _, u = _send(u, mask)
        return sent, DGCState(state.count + 1, u, residual)

    return optax.GradientTransformation(init, update)


class OnSupportState(NamedTuple):
    """State of :func:`on_support`: the inner optimizer's state over the
    kept entries only (one flat vector per leaf)."""

    inner: optax.OptState


def on_support(
    inner: optax.GradientTransformation, mask: Mask
) -> optax.GradientTransformation:
    """Runs ``inner`` on the kept entries of a fixed ``mask`` only, so its
    state (Adam's moments, ...) holds one value per kept weight instead of
    one per weight; pruned entries get a 0 update.

    Args:
      inner: any optimizer or transform that works entry by entry.
      mask: a concrete mask pytree (``None`` leaves are kept whole); fixed
        for the life of the transform.

    Returns:
      An ``optax.GradientTransformation`` (state :class:`OnSupportState`).

    Raises:
      ValueError: params or updates whose tree or shapes differ from the
        mask's (naming the leaf).
      TypeError: a traced mask.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxsparse import ephemeral
      >>> params = {"w": jnp.ones((2, 3))}
      >>> tx = ephemeral.on_support(optax.adam(0.1), {"w": jnp.eye(2, 3, dtype=bool)})
      >>> tx.init(params).inner[0].mu["w"].shape
      (2,)

    References:
      Hoefler et al. 2021, §2.3 (sparse optimizer state) and §8.
    """
    try:
        support = tree_util.tree_map(
            lambda m: None if m is None else np.flatnonzero(np.asarray(m)),
            mask,
            is_leaf=_tree.is_none,
        )
    except jax.errors.TracerArrayConversionError:
        raise TypeError(
            "on_support: the mask must be concrete (fixed before training)"
        ) from None

    def gather(tree):
        _tree.check_same_tree(tree, mask, name="mask", ref_name="params")
        return tree_util.tree_map(
            lambda idx, x: x if idx is None else x.reshape(-1)[idx],
            support,
            tree,
            is_leaf=_tree.is_none,
        )

    def scatter(flat, like):
        return tree_util.tree_map(
            lambda idx, f, x: (
                f
                if idx is None
                else jnp.zeros(x.size, f.dtype).at[idx].set(f).reshape(x.shape)
            ),
            support,
            flat,
            like,
            is_leaf=_tree.is_none,
        )

    def init(params):
        return OnSupportState(inner.init(gather(params)))

    def update(updates, state, params=None):
        compressed, new = inner.update(
            gather(updates), state.inner, None if params is None else gather(params)
        )
        return scatter(compressed, updates), OnSupportState(new)

    return optax.GradientTransformation(init, update)


def _kept_count(n: int, sparsity: float) -> int:
    """Entries a device sends of a leaf of ``n`` (at least one)."""
    return max(1, n - round(sparsity * n))


def sparse_allreduce(
    updates: optax.Updates,
    sparsity: float,
    axis_name: str,
    *,
    mean: bool = False,
) -> optax.Updates:
    """Sums ``updates`` over the devices of ``axis_name`` (inside
    ``shard_map``), each device sending only its ``1 - sparsity`` entries
    of largest magnitude per leaf as values and indices.

    Every device gathers all devices' values and indices and adds them in
    device order into zeros, so every device ends with the same sum, and
    with ``sparsity=0`` it is the dense all-reduce. Combine it with
    :func:`topk_gradients` (``sparsity=0`` after it, or the same sparsity
    to let this function select) to keep what was not sent.

    Args:
      updates: this device's updates (each leaf whole on every device of
        ``axis_name``: data parallelism).
      sparsity: fraction of each leaf not sent, a concrete float in ``[0, 1)``.
      axis_name: the mesh axis the devices of one reduction lie along.
      mean: divide by the number of devices.

    Returns:
      The sum (or mean) over the devices of what each sent.

    Raises:
      ValueError: a sparsity outside ``[0, 1)``, or ``axis_name`` not an
        axis of the enclosing ``shard_map``.

    References:
      Renggli et al. 2019, "SparCML" (sparse all-gather of values and
      indices); Lin et al. 2018, §2; Hoefler et al. 2021, §2.3 and §8.
    """
    if _tree.concrete_float(sparsity) is None:
        raise TypeError("sparse_allreduce: sparsity must be a concrete float")
    _tree.check_sparsity(sparsity, where="sparse_allreduce: sparsity")
    try:
        devices = lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"sparse_allreduce: {axis_name!r} is not a mesh axis of the enclosing "
            f"shard_map ({err})"
        ) from None

    def leaf(x):
        flat = x.reshape(-1)
        k = _kept_count(flat.size, sparsity)
        _, idx = lax.top_k(jnp.abs(flat), k)
        values = lax.all_gather(flat[idx], axis_name)
        indices = lax.all_gather(idx, axis_name)

        # In device order, each device's indices distinct: deterministic.
        def add(i, acc):
            return acc.at[indices[i]].add(values[i], unique_indices=True)

        total = lax.fori_loop(0, devices, add, jnp.zeros_like(flat))
        if mean:
            total = total / jnp.asarray(devices, total.dtype)
        return total.reshape(x.shape)

    return tree_util.tree_map(leaf, updates)


class ExchangeBits(NamedTuple):
    """Bits one device sends per step, for each way of reducing."""

    dense: int
    """A dense ring all-reduce: ``2 (p - 1) / p`` of every value."""
    sparse: int
    """:func:`sparse_allreduce` as it runs: its values and int32 indices to
    each of the ``p - 1`` other devices."""
    coo: int
    """The same entries in COO with ``ceil(log2 n)``-bit indices
    (:func:`jaxsparse.storage.model_bits`): what an encoder would need."""


def exchange_bits(
    updates: optax.Updates, sparsity: float, devices: int
) -> ExchangeBits:
    """Counts the bits one device sends in one reduction of ``updates``
    over ``devices`` devices, dense and by :func:`sparse_allreduce`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse import ephemeral
      >>> ephemeral.exchange_bits({"w": jnp.zeros((1000, 1000))}, 0.99, 8)
      ExchangeBits(dense=56000000, sparse=4480000, coo=3640000)
    """
    from jaxsparse import storage

    _tree.check_positive_int(devices, "devices")
    _tree.check_sparsity(sparsity, where="exchange_bits: sparsity")
    dense = sparse = coo = 0
    for x in tree_util.tree_leaves(updates):
        n = int(np.prod(x.shape))
        k = 8 * jnp.dtype(x.dtype).itemsize
        sent = _kept_count(n, sparsity)
        dense += 2 * (devices - 1) * n * k // devices
        sparse += (devices - 1) * sent * (k + 32)
        coo += (devices - 1) * int(storage.model_bits("coo", n, sent, k))
    return ExchangeBits(dense, sparse, coo)
