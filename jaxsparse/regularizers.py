"""Sparsity-inducing penalties, their relaxations, and proximal steps.

Penalties are pure functions of a params pytree over the leaves ``include``
selects (default: floating arrays with ``ndim >= 2``, as for masks),
returning a scalar to add to the loss. :func:`add_penalty` adds a penalty's
gradient inside an optax chain; :func:`proximal_l1` and
:func:`proximal_group_lasso` are proximal steps that produce exact zeros.

References:
  Hoefler et al. 2021, §3.6; Louizos et al. 2018 (L0, hard concrete);
  Luo & Wu 2019 (sigmoid relaxation); Manessi et al. 2018 (learned
  thresholds); Zhuang et al. 2020 (polarization); Yang et al. 2020
  (DeepHoyer); Yuan & Lin 2006, Wen et al. 2016 (group lasso).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import tree_util

from jaxsparse import _tree
from jaxsparse._types import LeafSelector, Params
from jaxsparse.structure import Granularity, check_granularity, num_groups


def _positive(value: Any, name: str) -> None:
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(value: Any, name: str) -> None:
    """A concrete number must be >= 0; a schedule or a traced value (from
    ``optax.inject_hyperparams``) passes."""
    if callable(value):
        return
    number = _tree.concrete_float(value)
    if number is not None and not number >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _sum_selected(
    fn: Callable[[jax.Array], jax.Array], params: Params, include
) -> jax.Array:
    terms = [fn(x) for _, x in _tree.selected(params, include)]
    return sum(terms) if terms else jnp.zeros(())


def _abs(w: jax.Array) -> jax.Array:
    """``|w|`` whose derivative is ``sign(w)``: 0 at 0, the subgradient a
    penalty should use (``jnp.abs`` differentiates to 1 there)."""
    return w * jnp.sign(w)


def l1(params: Params, *, include: LeafSelector = None) -> jax.Array:
    """``sum |w|`` over the selected leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> float(l1({"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([5.0])}))  # b skipped
      3.0

    References:
      Tibshirani 1996; Hoefler et al. 2021, §3.6.
    """
    return _sum_selected(lambda w: jnp.sum(_abs(w)), params, include)


Surrogate = Literal["identity", "softplus", "leaky_relu"]


def _step_surrogate_grad(u: jax.Array, variant: Surrogate, slope: float) -> jax.Array:
    if variant == "identity":
        return jnp.ones_like(u)
    if variant == "softplus":
        return jax.nn.sigmoid(u)
    return jnp.where(u > 0, 1.0, slope).astype(u.dtype)


def l0_ste(
    params: Params,
    threshold: float,
    *,
    variant: Surrogate = "identity",
    slope: float = 0.1,
    include: LeafSelector = None,
) -> jax.Array:
    """L0 through a straight-through estimator.

    Forward: the number of weights with ``|w| > threshold``. Backward: the
    step ``H(u)``, ``u = |w| - threshold``, is replaced by a surrogate whose
    derivative is 1 (``"identity"``), ``sigmoid(u)`` (``"softplus"``) or
    1 / ``slope`` (``"leaky_relu"``, for ``u > 0`` / ``u <= 0``), so
    ``d/dw = surrogate'(u) * sign(w)``.

    References:
      Bengio et al. 2013 (straight-through); Hoefler et al. 2021, §3.6.
    """
    if variant not in ("identity", "softplus", "leaky_relu"):
        raise ValueError(
            f"variant must be identity, softplus or leaky_relu, got {variant!r}"
        )
    _non_negative(threshold, "threshold")
    _positive(slope, "slope")

    @jax.custom_vjp
    def step(u):
        return (u > 0).astype(u.dtype)

    def forward(u):
        return step(u), u

    def backward(u, g):
        return (g * _step_surrogate_grad(u, variant, slope),)

    step.defvjp(forward, backward)
    return _sum_selected(lambda w: jnp.sum(step(_abs(w) - threshold)), params, include)


def sigmoid_l0(
    params: Params, beta: float, *, include: LeafSelector = None
) -> jax.Array:
    """Smooth L0: ``sum (2 sigmoid(beta |w|) - 1)``, which tends to the count
    of non-zero weights as the sharpness ``beta`` grows.

    References:
      Luo & Wu 2019 (sigmoid approximation of the step); Hoefler et al. 2021,
      §3.6.
    """
    _positive(beta, "beta")
    return _sum_selected(
        lambda w: jnp.sum(2 * jax.nn.sigmoid(beta * _abs(w)) - 1), params, include
    )


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 with a 0 gradient where ``den`` is 0 (the double
    ``where`` keeps NaN out of the backward pass)."""
    nonzero = den > 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def _norm(w: jax.Array, axis=None) -> jax.Array:
    """``||w||_2`` whose gradient is 0 (not NaN) at ``w = 0``."""
    squares = jnp.sum(jnp.square(w), axis=axis)
    nonzero = squares > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1)), 0)


def _hoyer_leaf(w: jax.Array, square: bool) -> jax.Array:
    a = jnp.sum(_abs(w))
    if square:
        return _safe_ratio(jnp.square(a), jnp.sum(jnp.square(w)))
    return _safe_ratio(a, _norm(w))


def hoyer(params: Params, *, include: LeafSelector = None) -> jax.Array:
    """Hoyer regularizer ``||w||_1 / ||w||_2`` per leaf, summed; scale-invariant.

    An all-zero leaf contributes 0 with a 0 gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.array([[3.0, -4.0]]), "z": jnp.zeros((2, 2))}
      >>> round(float(hoyer(params)), 4)
      1.4

    References:
      Hoyer 2004; Yang et al. 2020 (DeepHoyer), eq. 3.
    """
    return _sum_selected(lambda w: _hoyer_leaf(w, False), params, include)


def hoyer_square(params: Params, *, include: LeafSelector = None) -> jax.Array:
    """Hoyer-Square ``||w||_1^2 / ||w||_2^2`` per leaf, summed; scale-invariant.

    An all-zero leaf contributes 0 with a 0 gradient.

    References:
      Yang et al. 2020 (DeepHoyer), eq. 4; Hoefler et al. 2021, §3.6.
    """
    return _sum_selected(lambda w: _hoyer_leaf(w, True), params, include)


def _checked(params: Params, granularity: Granularity, include) -> None:
    check_granularity(granularity)
    for path, x in _tree.selected(params, include):
        granularity.check(tuple(x.shape), _tree.path_str(path))


def group_lasso(
    params: Params, granularity: Granularity, *, include: LeafSelector = None
) -> jax.Array:
    """Group lasso ``sum_g sqrt(n_g) ||w_g||_2`` over the groups of a
    granularity (``Channel(-1)`` for neurons or filters, ``Block``, ...).

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> w = {"w": jnp.array([[3.0, 0.0], [4.0, 0.0]])}
      >>> float(group_lasso(w, js.Channel(-1)))  # sqrt(2) * (5 + 0)
      7.071067810058594

    References:
      Yuan & Lin 2006; Wen et al. 2016; Hoefler et al. 2021, §3.6.
    """
    _checked(params, granularity, include)

    def leaf(w):
        size = w.size / num_groups(granularity, tuple(w.shape))
        squares = granularity.group_scores(jnp.square(w), "sum")
        nonzero = squares > 0
        norms = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1)), 0)
        return math.sqrt(size) * jnp.sum(norms)

    return _sum_selected(leaf, params, include)


def polarization(
    params: Params, t: float, *, include: LeafSelector = None, per_leaf: bool = False
) -> jax.Array:
    """Polarization ``t ||a||_1 - ||a - mean(a) 1||_1`` over the scaling
    factors ``a`` (usually batch-norm gammas: pass ``include``). It pushes
    some factors to 0 and the others away from it.

    As in the paper, ``a`` is every selected factor of the network and
    ``mean(a)`` their mean over all ``n`` of them (Zhuang et al. 2020, §3.2:
    "the average of all the scaling factors"); ``per_leaf=True`` takes the
    mean of each leaf separately and sums the per-leaf terms instead.

    Example:
      >>> import jax.numpy as jnp
      >>> gammas = {"bn1": jnp.array([0.0, 1.0]), "bn2": jnp.array([3.0, 1.0])}
      >>> float(polarization(gammas, 1.0, include=lambda p, x: True))  # 5 - 3.5
      1.5
      >>> float(polarization(gammas, 1.0, include=lambda p, x: True, per_leaf=True))
      2.0

    References:
      Zhuang et al. 2020, "Neuron-level structured pruning using polarization
      regularizer", eq. 2 and §3.2; Hoefler et al. 2021, §3.6.
    """
    _non_negative(t, "t")

    def term(a):
        return t * jnp.sum(_abs(a)) - jnp.sum(_abs(a - jnp.mean(a)))

    if per_leaf:
        return _sum_selected(term, params, include)
    leaves = [x.ravel() for _, x in _tree.selected(params, include)]
    if not leaves:
        return jnp.zeros(())
    return term(jnp.concatenate(leaves))


def learned_threshold(x: jax.Array, t: jax.Array, beta: float) -> jax.Array:
    """Manessi et al.'s differentiable soft threshold
    ``v(x, t) = ReLU(x - t) + t sigmoid(beta (x - t)) - ReLU(-x - t)
    - t sigmoid(beta (-x - t))``; weights with ``|x|`` well below ``t``
    become (nearly) 0, and ``t`` receives gradients.

    References:
      Manessi et al. 2018, "Automated pruning for deep neural network
      compression", eq. 3; Hoefler et al. 2021, §3.6.
    """
    _positive(beta, "beta")
    return (
        jax.nn.relu(x - t)
        + t * jax.nn.sigmoid(beta * (x - t))
        - jax.nn.relu(-x - t)
        - t * jax.nn.sigmoid(beta * (-x - t))
    )


def init_thresholds(
    params: Params, value: float = 0.0, *, include: LeafSelector = None
) -> Params:
    """One trainable threshold per selected leaf (a float32 scalar), ``None``
    elsewhere; train them with the params and apply them with
    :func:`apply_thresholds` inside the loss."""
    _non_negative(value, "value")
    return _tree.map_selected(lambda _, x: jnp.asarray(value, x.dtype), params, include)


def apply_thresholds(params: Params, thresholds: Params, beta: float) -> Params:
    """The params seen by the forward pass: :func:`learned_threshold` on each
    leaf that has a threshold (a scalar per leaf, or an array that
    broadcasts, e.g. one per output neuron)."""
    _tree.check_same_tree(
        params, thresholds, name="thresholds", ref_name="params", shapes=False
    )
    return tree_util.tree_map(
        lambda t, w: w if t is None else learned_threshold(w, t, beta),
        thresholds,
        params,
        is_leaf=_tree.is_none,
    )


class HardConcrete(NamedTuple):
    """Hard-concrete gate settings (Louizos et al. 2018): temperature
    ``beta`` and stretch interval ``(gamma, zeta)``."""

    temperature: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1

    def check(self) -> None:
        _positive(self.temperature, "temperature")
        if not self.gamma < 0.0 < 1.0 < self.zeta:
            raise ValueError(
                f"need gamma < 0 and zeta > 1, got gamma={self.gamma}, zeta={self.zeta}"
            )


def hard_concrete_sample(
    log_alpha: jax.Array, key: jax.Array, gate: HardConcrete = HardConcrete()
) -> jax.Array:
    """Samples gates in ``[0, 1]``: ``s = sigmoid((log u - log(1-u) +
    log_alpha) / beta)``, stretched to ``(gamma, zeta)`` and clipped.

    References:
      Louizos et al. 2018, "Learning sparse neural networks through L0
      regularization", eqs. 9-10.
    """
    gate.check()
    u = jax.random.uniform(
        key, jnp.shape(log_alpha), jnp.result_type(log_alpha), 1e-6, 1 - 1e-6
    )
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / gate.temperature)
    return jnp.clip(s * (gate.zeta - gate.gamma) + gate.gamma, 0.0, 1.0)


def hard_concrete_l0(
    log_alpha: jax.Array, gate: HardConcrete = HardConcrete()
) -> jax.Array:
    """Expected number of non-zero gates, ``sum sigmoid(log_alpha - beta
    log(-gamma / zeta))`` (Louizos et al. 2018, eq. 12)."""
    gate.check()
    shift = gate.temperature * math.log(-gate.gamma / gate.zeta)
    return jnp.sum(jax.nn.sigmoid(log_alpha - shift))


def hard_concrete_gates(
    log_alpha: jax.Array, gate: HardConcrete = HardConcrete()
) -> jax.Array:
    """Deterministic test-time gates ``clip(sigmoid(log_alpha) (zeta - gamma)
    + gamma, 0, 1)``; exactly 0 where ``log_alpha`` is low enough."""
    gate.check()
    return jnp.clip(
        jax.nn.sigmoid(log_alpha) * (gate.zeta - gate.gamma) + gate.gamma, 0.0, 1.0
    )


class PenaltyState(NamedTuple):
    """State of :func:`add_penalty` and the proximal transforms."""

    count: jax.Array


def _init_count(params: Params) -> PenaltyState:
    del params
    return PenaltyState(jnp.zeros((), jnp.int32))


def _value_at(value: optax.ScalarOrSchedule, count: jax.Array):
    return value(count) if callable(value) else value


def add_penalty(
    penalty_fn: Callable[[Params], jax.Array], strength: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """Adds ``strength * grad(penalty_fn)(params)`` to the updates.

    Put it before the optimizer, as ``optax.add_decayed_weights``:
    ``optax.chain(add_penalty(js.regularizers.l1, 1e-4), optax.adam(1e-3))``.

    Raises:
      ValueError: a negative strength, or ``update`` without params.
    """
    _non_negative(strength, "strength")

    def update(updates, state, params=None, **extra):
        del extra
        _tree.need_params(params, "add_penalty", updates)
        scale = _value_at(strength, state.count)
        grads = jax.grad(penalty_fn)(params)
        updates = tree_util.tree_map(
            lambda u, g: u + (scale * g).astype(u.dtype), updates, grads
        )
        return updates, PenaltyState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(_init_count, update)


def _proximal(name, shrink, learning_rate, strength):
    _non_negative(strength, "strength")
    _non_negative(learning_rate, "learning_rate")

    def update(updates, state, params=None, **extra):
        del extra
        _tree.need_params(params, name, updates)
        lr = _value_at(learning_rate, state.count)
        lam = _value_at(strength, state.count)
        new = shrink(optax.apply_updates(params, updates), lr * lam)
        updates = tree_util.tree_map(
            lambda n, p, u: u if n is None else (n - p).astype(u.dtype),
            new,
            params,
            updates,
            is_leaf=_tree.is_none,
        )
        return updates, PenaltyState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(_init_count, update)


def soft_threshold(w: jax.Array, tau: jax.Array) -> jax.Array:
    """The proximal operator of ``tau |w|``: ``sign(w) max(|w| - tau, 0)``.

    Example:
      >>> import jax.numpy as jnp
      >>> soft_threshold(jnp.array([-2.0, 0.3, 1.0]), 0.5)
      Array([-1.5,  0. ,  0.5], dtype=float32)
    """
    return jnp.sign(w) * jnp.maximum(jnp.abs(w) - tau, 0.0)


def proximal_l1(
    strength: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule,
    *,
    include: LeafSelector = None,
) -> optax.GradientTransformation:
    """Proximal step for ``strength * ||w||_1`` after the optimizer: the
    weights after the step are soft-thresholded by ``learning_rate *
    strength``, so small ones become exactly 0.

    Chain it after a plain gradient step with the same learning rate, so
    that the pair is one proximal-gradient step:
    ``optax.chain(optax.sgd(lr), proximal_l1(lam, lr))``. After an adaptive
    optimizer it is a heuristic (the threshold ignores the per-weight scale).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.array([[0.05, -1.0]])}
      >>> tx = optax.chain(optax.sgd(0.1), proximal_l1(1.0, 0.1))
      >>> updates, _ = tx.update({"w": jnp.zeros((1, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [[0.0, -0.8999999761581421]]

    References:
      Parikh & Boyd 2014, §6.5.2; Hoefler et al. 2021, §3.6.
    """

    def shrink(after, tau):
        return _tree.map_selected(lambda _, w: soft_threshold(w, tau), after, include)

    return _proximal("proximal_l1", shrink, learning_rate, strength)


def block_soft_threshold(
    w: jax.Array, tau: jax.Array, granularity: Granularity
) -> jax.Array:
    """The proximal operator of ``tau sum_g sqrt(n_g) ||w_g||_2``: each group
    shrinks by ``max(0, 1 - tau sqrt(n_g) / ||w_g||_2)``, so groups below
    the threshold become exactly 0."""
    norms = granularity.group_scores(w, "l2")
    size = w.size / num_groups(granularity, tuple(w.shape))
    scale = jnp.maximum(1.0 - tau * math.sqrt(size) / jnp.maximum(norms, 1e-30), 0.0)
    return w * granularity.expand(scale, tuple(w.shape)).astype(w.dtype)


def proximal_group_lasso(
    strength: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule,
    granularity: Granularity,
    *,
    include: LeafSelector = None,
) -> optax.GradientTransformation:
    """Proximal step for the group lasso (block soft-thresholding) after the
    optimizer; whole groups become exactly 0. Chain it as :func:`proximal_l1`.

    References:
      Yuan & Lin 2006; Parikh & Boyd 2014, §6.5.4; Hoefler et al. 2021, §3.6.
    """
    check_granularity(granularity)

    def shrink(after, tau):
        _checked(after, granularity, include)
        return _tree.map_selected(
            lambda _, w: block_soft_threshold(w, tau, granularity), after, include
        )

    return _proximal("proximal_group_lasso", shrink, learning_rate, strength)
