"""When to sparsify: schedules as pure functions of the step count.

A schedule maps the step count (a traced int32 under ``jit``) to a
:class:`Target`: the sparsity to hold, whether this step recomputes the mask,
and whether this is a dense phase in which every weight is free. Schedules
hold no state; the adaptive schedule of Prechelt carries a small state of its
own (:class:`AdaptiveSchedule`). All are evaluated with ``jnp``/``lax`` only.

The survey's general schedule (choose a structure, initialize, train,
prune or regrow, train with the structure fixed, repeat) is a composition:
a granularity and distribution (the structure), a criterion at step 0
(:func:`constant`), milestones (:func:`iterative`) or phases
(:func:`phases`, :func:`iht`, :func:`dsd`) and, for regrowth, the dynamic
transforms with :func:`cosine_drop_fraction`.

References:
  Hoefler et al. 2021, §2.4 (when to sparsify); Zhu & Gupta 2017 (gradual);
  Jin et al. 2016 (IHT); Han et al. 2017 (DSD); Evci et al. 2020 (RigL);
  Prechelt 1997 (adaptive pruning strength); You et al. 2020 (early-bird).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxsparse import _tree
from jaxsparse._types import Mask, Schedule


class Target(NamedTuple):
    """What a schedule asks for at one step.

    Attributes:
      sparsity: float32 scalar, the fraction to prune when the mask is
        recomputed.
      update: bool scalar, whether this step recomputes the mask.
      dense: bool scalar, whether this is a dense phase (no weight masked).
    """

    sparsity: jax.Array
    update: jax.Array
    dense: jax.Array


def _target(sparsity, update, dense=False) -> Target:
    return Target(
        jnp.asarray(sparsity, jnp.float32),
        jnp.asarray(update, jnp.bool_),
        jnp.asarray(dense, jnp.bool_),
    )


def _check_step(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def constant(sparsity: float, *, at: int = 0) -> Schedule:
    """Hold ``sparsity`` from step ``at`` on; the mask is computed once, at
    ``at``. Dense before ``at``.

    With ``at=0`` this is static sparse training: the mask comes from the
    criterion at initialization (random, SNIP) and stays fixed. With a later
    ``at`` it is train-then-sparsify (one shot, then fine-tune).

    Example:
      >>> from jaxsparse import schedules
      >>> t = schedules.constant(0.9, at=10)
      >>> float(t(5).sparsity), bool(t(10).update), bool(t(11).update)
      (0.0, True, False)

    References:
      Hoefler et al. 2021, §2.4.1 and §2.4.5.
    """
    _tree.check_sparsity(sparsity)
    _check_step(at, "at")

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        return _target(jnp.where(count >= at, sparsity, 0.0), count == at)

    return schedule


def polynomial(
    initial: float,
    final: float,
    *,
    begin: int,
    end: int,
    every: int,
    power: float = 3.0,
) -> Schedule:
    """Gradual pruning of Zhu & Gupta (2017).

    .. math:: s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_{end} - t_0))^{p}

    The mask is recomputed at ``begin``, every ``every`` steps after it, and
    at ``end``; the target holds at ``final`` after ``end`` and at
    ``initial`` before ``begin``.

    Args:
      initial: sparsity at ``begin``.
      final: sparsity from ``end`` on.
      begin: first pruning step.
      end: last pruning step (``> begin``).
      every: steps between mask updates.
      power: the exponent (3 in the paper).

    Example:
      >>> t = polynomial(0.0, 0.8, begin=0, end=100, every=50)
      >>> [round(float(t(s).sparsity), 3) for s in (0, 50, 100)], bool(t(50).update)
      ([0.0, 0.7, 0.8], True)

    References:
      Zhu & Gupta 2017, eq. 1; Hoefler et al. 2021, §2.4.2.
    """
    _tree.check_sparsity(initial, where="initial")
    _tree.check_sparsity(final, where="final")
    _check_step(begin, "begin")
    _check_step(end, "end")
    _tree.check_positive_int(every, "every")
    if end <= begin:
        raise ValueError(f"begin must be before end, got begin={begin}, end={end}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power!r}")

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        progress = jnp.clip((count - begin) / (end - begin), 0.0, 1.0)
        sparsity = final + (initial - final) * (1.0 - progress) ** power
        on_grid = ((count - begin) % every == 0) | (count == end)
        update = (count >= begin) & (count <= end) & on_grid
        return _target(sparsity, update)

    return schedule


def iterative(milestones: Sequence[tuple[int, float]]) -> Schedule:
    """Iterative pruning and fine-tuning: at each milestone ``(step,
    sparsity)`` the mask is recomputed at that sparsity and then held.

    Example:
      >>> from jaxsparse import schedules
      >>> t = schedules.iterative([(100, 0.5), (200, 0.75)])
      >>> [round(float(t(s).sparsity), 2) for s in (0, 150, 250)]
      [0.0, 0.5, 0.75]

    References:
      Hoefler et al. 2021, §2.4.2; Han et al. 2015 (prune, retrain, repeat).
    """
    milestones = tuple((int(s), float(v)) for s, v in milestones)
    if not milestones:
        raise ValueError("milestones must not be empty")
    for i, (step, value) in enumerate(milestones):
        _check_step(step, f"milestone {i} step")
        _tree.check_sparsity(value, where=f"milestone {i} sparsity")
    steps = [s for s, _ in milestones]
    if steps != sorted(set(steps)):
        raise ValueError(f"milestone steps must be strictly increasing, got {steps}")
    at = jnp.asarray(steps, jnp.int32)
    values = jnp.asarray([0.0] + [v for _, v in milestones], jnp.float32)

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        passed = jnp.sum(count >= at, dtype=jnp.int32)
        return _target(values[passed], jnp.any(count == at))

    return schedule


class Phase(NamedTuple):
    """A phase of a phased schedule: ``steps`` long, pruned to ``sparsity``
    (recomputed at its first step), or dense when ``sparsity`` is ``None``."""

    steps: int
    sparsity: float | None


def phases(
    phase_list: Sequence[Phase | tuple[int, float | None]], *, restore: bool = False
) -> Schedule:
    """Alternating dense and sparse phases; the last phase lasts forever.

    A sparse phase recomputes the mask (the top-k projection) at its first
    step and holds it; a dense phase frees every weight. Weights pruned
    before it restart from 0, or, with ``restore``, from the values they had
    when they were pruned (the transforms then keep a copy of them: the
    schedule's ``restores`` attribute tells them so).

    References:
      Hoefler et al. 2021, §2.4.3; Jin et al. 2016; Han et al. 2017.
    """
    parsed = [Phase(*p) for p in phase_list]
    if not parsed:
        raise ValueError("phases must not be empty")
    for i, p in enumerate(parsed):
        _tree.check_positive_int(p.steps, f"phase {i} steps")
        if p.sparsity is not None:
            _tree.check_sparsity(p.sparsity, where=f"phase {i} sparsity")
    starts = [0]
    for p in parsed[:-1]:
        starts.append(starts[-1] + p.steps)
    start = jnp.asarray(starts, jnp.int32)
    values = jnp.asarray([p.sparsity or 0.0 for p in parsed], jnp.float32)
    dense = jnp.asarray([p.sparsity is None for p in parsed], jnp.bool_)

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        index = jnp.sum(count >= start, dtype=jnp.int32) - 1
        starts_now = jnp.any((count == start) & ~dense)
        return _target(values[index], starts_now, dense[index])

    schedule.restores = bool(restore)
    return schedule


def iht(
    sparsity: float,
    *,
    sparse_steps: int,
    dense_steps: int,
    cycles: int,
    warmup: int = 0,
    restore: bool = True,
) -> Schedule:
    """Iterative hard thresholding (Jin et al. 2016).

    After ``warmup`` dense steps: ``cycles`` times ``sparse_steps`` steps
    with the top-k projection then ``dense_steps`` steps with every weight
    free, and finally sparse for good.

    As in the paper, a dense phase re-activates the truncated weights with
    the values they had when truncated (Jin et al. 2016, §3: the sparse
    phase "drop[s] connections" and freezes them, the dense phase
    "re-activate[s] the frozen connections and train[s] the entire
    network"); ``restore=False`` restarts them from 0 instead.

    Example:
      >>> t = iht(0.5, sparse_steps=2, dense_steps=1, cycles=1)
      >>> [(float(t(s).sparsity), bool(t(s).dense)) for s in range(4)]
      [(0.5, False), (0.5, False), (0.0, True), (0.5, False)]
      >>> t.restores
      True

    References:
      Jin et al. 2016, "Training skinny deep neural networks with iterative
      hard thresholding methods", Alg. 1; Hoefler et al. 2021, §2.4.3.
    """
    _tree.check_positive_int(cycles, "cycles")
    cycle = [Phase(sparse_steps, sparsity), Phase(dense_steps, None)] * cycles
    head = [Phase(warmup, None)] if warmup else []
    return phases([*head, *cycle, Phase(1, sparsity)], restore=restore)


def dsd(
    sparsity: float, *, dense_steps: int, sparse_steps: int, restore: bool = False
) -> Schedule:
    """Dense-sparse-dense (Han et al. 2017): train dense, prune and train
    sparse, then free the pruned weights and train dense again.

    As in the paper the freed weights restart from 0 (Han et al. 2017, §2:
    "re-initialize the pruned parameters from zero and retrain the whole
    dense network"); ``restore=True`` brings back their pruned values.

    Example:
      >>> t = dsd(0.5, dense_steps=1, sparse_steps=2)
      >>> [bool(t(s).dense) for s in range(4)], t.restores
      ([True, False, False, True], False)

    References:
      Han et al. 2017, "DSD: Dense-sparse-dense training", §2;
      Hoefler et al. 2021, §2.4.3.
    """
    return phases(
        [Phase(dense_steps, None), Phase(sparse_steps, sparsity), Phase(1, None)],
        restore=restore,
    )


def cosine_drop_fraction(initial: float = 0.3, *, end: int) -> Callable:
    """The drop-and-grow fraction of RigL: ``initial / 2 (1 + cos(pi t / end))``,
    0 from ``end`` on.

    Example:
      >>> f = cosine_drop_fraction(0.3, end=100)
      >>> [round(float(f(t)), 3) for t in (0, 50, 100, 200)]
      [0.3, 0.15, 0.0, 0.0]

    References:
      Evci et al. 2020, "Rigging the Lottery", eq. 1; Hoefler et al. 2021, §4.
    """
    value = _tree.concrete_float(initial)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"initial drop fraction must be in [0, 1], got {initial!r}")
    _tree.check_positive_int(end, "end")

    def fraction(count):
        t = jnp.minimum(jnp.asarray(count, jnp.float32), float(end))
        start = jnp.asarray(initial, jnp.float32)
        return start / 2 * (1 + jnp.cos(math.pi * t / end))

    return fraction


class AdaptiveState(NamedTuple):
    """State of :func:`adaptive`: the best validation loss so far and the
    sparsity reached."""

    best_loss: jax.Array
    sparsity: jax.Array


class AdaptiveSchedule(NamedTuple):
    """A schedule with state: ``init() -> state`` and
    ``update(count, state, validation_loss) -> (Target, state)``."""

    init: Callable[[], AdaptiveState]
    update: Callable[..., tuple[Target, AdaptiveState]]


def generalization_loss(validation_loss: ArrayLike, best_loss: ArrayLike) -> jax.Array:
    """Prechelt's generalization loss ``GL = 100 (E_val / E_min - 1)`` in percent."""
    return 100.0 * (jnp.asarray(validation_loss) / jnp.asarray(best_loss) - 1.0)


def adaptive(
    *,
    every: int,
    final: float,
    min_rate: float = 0.05,
    max_rate: float = 0.5,
    gl_scale: float = 5.0,
    begin: int = 0,
) -> AdaptiveSchedule:
    """Adaptive pruning strength after Prechelt (1997).

    Every ``every`` steps from ``begin`` on, a fraction ``rate`` of the
    remaining weights is pruned, up to ``final``. The rate grows with the
    generalization loss ``GL = 100 (E_val / E_min - 1)``:

    .. math:: rate = r_{min} + (r_{max} - r_{min}) \\cdot GL / (GL + g)

    so a model that starts to overfit is pruned harder. Pass the current
    validation loss as ``validation_loss`` (an extra argument of the
    transform's ``update``).

    Args:
      every: steps between pruning steps.
      final: the sparsity at which pruning stops.
      min_rate: fraction of the remaining weights pruned when ``GL = 0``.
      max_rate: the rate approached as ``GL`` grows.
      gl_scale: ``g``, the GL (in percent) at which the rate is halfway.
      begin: first pruning step.

    References:
      Prechelt 1997, "Connection pruning with static and adaptive pruning
      schedules", §3 (lprune); Hoefler et al. 2021, §2.4.2.
    """
    _tree.check_positive_int(every, "every")
    _check_step(begin, "begin")
    _tree.check_sparsity(final, where="final")
    if not 0.0 <= min_rate <= max_rate < 1.0:
        raise ValueError(
            f"need 0 <= min_rate <= max_rate < 1, got {min_rate!r}, {max_rate!r}"
        )
    if not gl_scale > 0:
        raise ValueError(f"gl_scale must be > 0, got {gl_scale!r}")

    def init():
        return AdaptiveState(
            jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0.0, jnp.float32)
        )

    def update(count, state, validation_loss):
        count = jnp.asarray(count, jnp.int32)
        loss = jnp.asarray(validation_loss, jnp.float32)
        best = jnp.minimum(state.best_loss, loss)
        gl = jnp.maximum(generalization_loss(loss, best), 0.0)
        rate = min_rate + (max_rate - min_rate) * gl / (gl + gl_scale)
        step = (count >= begin) & ((count - begin) % every == 0)
        grown = jnp.minimum(state.sparsity + rate * (1.0 - state.sparsity), final)
        sparsity = jnp.where(step, grown, state.sparsity)
        return _target(sparsity, step), AdaptiveState(best, sparsity)

    return AdaptiveSchedule(init, update)


def mask_distance(a: Mask, b: Mask) -> jax.Array:
    """Normalized Hamming distance between two masks of one tree (jittable).

    Example:
      >>> import jax.numpy as jnp
      >>> a = {"w": jnp.array([True, True, False, False])}
      >>> b = {"w": jnp.array([True, False, True, False])}
      >>> float(mask_distance(a, b))
      0.5

    References:
      You et al. 2020, "Drawing early-bird tickets", §3.2.
    """
    _tree.check_same_tree(a, b, name="mask", ref_name="mask")
    pairs = [
        (x, y)
        for (_, x), (_, y) in zip(_tree.leaves_with_path(a), _tree.leaves_with_path(b))
        if x is not None and y is not None
    ]
    size = sum(x.size for x, _ in pairs)
    if size == 0:
        return jnp.zeros((), jnp.float32)
    diff = sum(jnp.sum(x != y, dtype=jnp.int32) for x, y in pairs)
    return (diff / size).astype(jnp.float32)


class EarlyStructureState(NamedTuple):
    """The last mask and the last ``window`` mask distances."""

    previous: Mask
    distances: jax.Array
    count: jax.Array


def early_structure_init(mask: Mask, *, window: int = 5) -> EarlyStructureState:
    """Starts the early-structure detector of You et al. (2020) at ``mask``."""
    _tree.check_positive_int(window, "window")
    return EarlyStructureState(
        mask, jnp.full((window,), jnp.inf, jnp.float32), jnp.zeros((), jnp.int32)
    )


def early_structure_update(
    state: EarlyStructureState, mask: Mask
) -> EarlyStructureState:
    """Records the distance from the previous mask to ``mask`` (jittable)."""
    distance = mask_distance(state.previous, mask)
    distances = jnp.roll(state.distances, -1).at[-1].set(distance)
    return EarlyStructureState(mask, distances, state.count + 1)


def early_structure_found(state: EarlyStructureState, epsilon: float) -> jax.Array:
    """True once the last ``window`` distances all fall below ``epsilon``.

    References:
      You et al. 2020, §3.2 (stop when the mask distance stays below epsilon).
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    return jnp.all(state.distances < epsilon)
