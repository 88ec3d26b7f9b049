"""Sparsity as optax transforms: fixed masks, pruning schedules, dense and
sparse phases, and dynamic sparse training (SET, RigL), all under ``jit``.

Two forms:

- **Chain form**, last in an ``optax.chain``: :func:`keep_masked` and
  :func:`prune`. A pruned entry's update is ``-param``, so after
  ``optax.apply_updates`` it is exactly 0 whatever came before it in the
  chain (momentum, weight decay, clipping). A criterion in chain form sees
  the *updates* arriving at the transform, not the raw gradients.
- **Wrapper form**: :func:`sparsify`, :func:`rigl`,
  :func:`sparse_evolutionary` and :func:`dynamic_sparse` wrap an inner
  optimizer. They hand criteria the raw gradients, mask the gradients before
  the inner optimizer and zero its per-parameter state (moments) wherever a
  weight is pruned or regrown; a regrown weight starts at 0 (at a random
  value in SET).

Masks are recomputed inside ``lax.cond`` on the steps the schedule marks, so
ordinary steps pay one ``where`` per leaf; the state's tree and dtypes never
change, so a training step compiles once.

A criterion is called with keyword arguments: ``params``, ``grads``,
``key`` (``fold_in(key, count)``) and the extra arguments given to
``update``; it takes those it names (all of them if it has ``**kwargs``).
``jaxsparse.saliency.magnitude``, ``taylor`` and ``random`` fit as they are.

References:
  Hoefler et al. 2021, §2.4 (schedules) and §4 (dynamic sparsity);
  Zhu & Gupta 2017; Jin et al. 2016; Han et al. 2017; Mocanu et al. 2018
  (SET); Evci et al. 2020 (RigL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax, tree_util

from jaxsparse import _tree
from jaxsparse._select import prune_lowest
from jaxsparse._types import Criterion, LeafSelector, Mask, Params, Schedule, Scores
from jaxsparse.distribution import Distribution, Uniform, topk_mask
from jaxsparse.groups import Groups
from jaxsparse.masks import apply_mask, dense_mask
from jaxsparse.saliency import random as random_scores
from jaxsparse.schedules import AdaptiveSchedule, cosine_drop_fraction
from jaxsparse.structure import Element, Granularity, Reduce

_CRITERION_ARGS = ("params", "grads", "key")
# Keeps the draws of grown weights apart from the criterion's fold_in(key, count).
_GROW_SALT = 0x5E7


def _normal_init(scale: Any) -> jax.nn.initializers.Initializer:
    """``N(0, scale^2)``; ``scale`` may be traced (``inject_hyperparams``)."""
    value = _tree.concrete_float(scale)
    if value is not None and value < 0:
        raise ValueError(f"grow_scale must be >= 0, got {value}")

    def init(key, shape, dtype):
        return jax.random.normal(key, shape, dtype) * jnp.asarray(scale, dtype)

    return init


def _criterion_caller(criterion: Criterion, name: str):
    call, wanted = _tree.keyword_caller(criterion, name)
    return call, wanted is None or "key" in wanted


def _key_maker(key: Any, needed: bool, name: str) -> Callable[[], jax.Array]:
    """The key's raw data, made anew by each ``init`` (so that under a mesh
    it has the same type as the state a step returns)."""
    if key is None:
        if needed:
            raise ValueError(f"{name} needs a PRNG key: pass key=jax.random.key(...)")
        # A placeholder of the right type: no criterion of this transform reads it.
        key = 0
    if isinstance(key, int):
        data = jax.random.key_data(jax.random.key(key))
    elif jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key)
    else:
        data = jnp.asarray(key, jnp.uint32)
    if isinstance(data, jax.core.Tracer):
        return lambda: data
    host = np.asarray(data)
    return lambda: jnp.asarray(host)


def _like_params(mask: Mask, params: Params) -> Mask:
    """Each mask leaf sharded as its param (for Explicit mesh axes)."""
    return tree_util.tree_map(
        lambda m, p: None if m is None else _tree.sharded_like(m, p),
        mask,
        params,
        is_leaf=_tree.is_none,
    )


def _masked_updates(updates: Any, mask: Mask, params: Params) -> Any:
    """Kept entries take the update, pruned ones ``-param`` (exact zero)."""
    return tree_util.tree_map(
        lambda m, u, p: (
            u if m is None else jnp.where(m, u, jnp.negative(p).astype(u.dtype))
        ),
        mask,
        updates,
        params,
        is_leaf=_tree.is_none,
    )


def _saved_init(rule, params: Params) -> Any:
    """The copy of pruned values a restoring schedule needs (else ``None``)."""
    if not rule.restores:
        return None
    return tree_util.tree_map(jnp.zeros_like, params)


def _restore(updates, saved, old: Mask, new: Mask, params: Params):
    """Remembers the values of weights pruned now and brings back those freed
    now: their update becomes ``saved - param + update``."""
    if saved is None:
        return updates, saved

    def leaf(u, s, o, n, p):
        if n is None:
            return u, s
        pruned_now = o & ~n
        freed_now = ~o & n
        s = jnp.where(pruned_now, p, s)
        return jnp.where(freed_now, (s - p).astype(u.dtype) + u, u), s

    pairs = tree_util.tree_map(
        leaf, updates, saved, old, new, params, is_leaf=_tree.is_none
    )
    outer = tree_util.tree_structure(updates)
    return tree_util.tree_transpose(outer, tree_util.tree_structure((0, 0)), pairs)


def _fill_like(mask: Mask, template: Mask) -> Mask:
    """``mask`` with an all-True leaf wherever ``template`` has one and
    ``mask`` has ``None`` (a distribution that left a leaf dense)."""
    return tree_util.tree_map(
        lambda t, m: None if t is None else (jnp.ones_like(t) if m is None else m),
        template,
        mask,
        is_leaf=_tree.is_none,
    )


class KeepMaskedState(NamedTuple):
    """State of :func:`keep_masked`: the fixed mask."""

    mask: Mask


def keep_masked(mask: Mask) -> optax.GradientTransformation:
    """Keep the entries that ``mask`` prunes exactly at zero.

    Place it last in a chain: a pruned entry's update becomes ``-param``, so
    after ``apply_updates`` the entry is exactly 0 and stays there.

    Args:
      mask: a mask pytree mirroring the params (``None`` for dense leaves).

    Returns:
      An ``optax.GradientTransformation`` whose state holds the mask.

    Raises:
      ValueError: at ``init`` if the mask does not mirror the params; at
        ``update`` if called without params.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsparse as js
      >>> params = {"w": jnp.array([[1.0, -2.0]])}
      >>> mask = {"w": jnp.array([[True, False]])}
      >>> tx = optax.chain(optax.sgd(0.1), js.keep_masked(mask))
      >>> updates, _ = tx.update({"w": jnp.ones((1, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [[0.8999999761581421, 0.0]]

    References:
      Hoefler et al. 2021, §2.4.1 (fine-tuning with a fixed mask).
    """

    def init(params):
        _tree.check_same_tree(params, mask, name="mask", ref_name="params")
        return KeepMaskedState(mask)

    def update(updates, state, params=None, **extra):
        del extra
        _tree.need_params(params, "keep_masked", updates)
        return _masked_updates(updates, state.mask, params), state

    return optax.GradientTransformationExtraArgs(init, update)


class _MaskRule(NamedTuple):
    """How a transform's mask starts and changes (shared by every form)."""

    needs_key: bool
    restores: bool
    """Whether freed weights come back with their pruned values."""
    init_mask: Callable[[Params, jax.Array], Mask]
    init_schedule: Callable[[], Any]
    step: Callable[..., tuple[Mask, Any, jax.Array]]
    """``step(...) -> (mask, schedule_state, may_have_changed)``."""
    grow_init: Any = None
    """Initializer of weights that become active (``None``: they start at 0)."""


def _schedule_rule(
    criterion: Criterion,
    schedule: Schedule | AdaptiveSchedule,
    granularity: Granularity,
    distribution: Distribution,
    include: LeafSelector,
    reduce: Reduce,
) -> _MaskRule:
    call, needs_key = _criterion_caller(criterion, "criterion")
    # A stateful schedule answers init() and update(); a plain one is a
    # function of the step count.
    adaptive = callable(getattr(schedule, "init", None)) and callable(
        getattr(schedule, "update", None)
    )
    if not callable(schedule) and not adaptive:
        raise TypeError(f"schedule must be a schedule function, got {schedule!r}")

    def init_mask(params, key):
        del key
        if isinstance(granularity, Groups):
            return granularity.dense_mask(params)
        return dense_mask(params, include=include)

    def init_schedule():
        return schedule.init() if adaptive else ()

    def step(count, mask, schedule_state, key, params, grads, extra):
        if adaptive:
            if "validation_loss" not in extra:
                raise ValueError(
                    "an adaptive schedule needs the validation loss: pass "
                    "update(..., validation_loss=...)"
                )
            target, schedule_state = schedule.update(
                count, schedule_state, extra["validation_loss"]
            )
        else:
            target = schedule(count)

        def recompute():
            scores = call(
                params=params, grads=grads, key=jax.random.fold_in(key, count), **extra
            )
            new = topk_mask(
                scores,
                target.sparsity,
                distribution=distribution,
                granularity=granularity,
                include=include,
                reduce=reduce,
            )
            return _fill_like(new, mask)

        new = lax.cond(target.update, recompute, lambda: mask)
        new = tree_util.tree_map(
            lambda m: None if m is None else m | target.dense,
            new,
            is_leaf=_tree.is_none,
        )
        # Entering a dense phase frees weights without an update step.
        return new, schedule_state, target.update | target.dense

    restores = bool(getattr(schedule, "restores", False))
    return _MaskRule(needs_key, restores, init_mask, init_schedule, step)


class PruneState(NamedTuple):
    """State of :func:`prune` (``saved``: the pruned weights' values, kept
    only for a schedule that restores them, else ``None``)."""

    count: jax.Array
    mask: Mask
    key: jax.Array
    schedule_state: Any
    saved: Any = None


def _chain_form(rule: _MaskRule, key: Any, name: str):
    new_key = _key_maker(key, rule.needs_key, name)

    def init(params):
        key_data = new_key()
        key_ = jax.random.wrap_key_data(key_data)
        return PruneState(
            jnp.zeros((), jnp.int32),
            _like_params(rule.init_mask(params, key_), params),
            key_data,
            rule.init_schedule(),
            _saved_init(rule, params),
        )

    def update(updates, state, params=None, **extra):
        _tree.need_params(params, name, updates)
        mask, schedule_state, _ = rule.step(
            state.count,
            state.mask,
            state.schedule_state,
            jax.random.wrap_key_data(state.key),
            params,
            updates,
            extra,
        )
        masked = _masked_updates(updates, mask, params)
        masked, saved = _restore(masked, state.saved, state.mask, mask, params)
        return masked, PruneState(
            optax.safe_increment(state.count), mask, state.key, schedule_state, saved
        )

    return optax.GradientTransformationExtraArgs(init, update)


def prune(
    criterion: Criterion,
    schedule: Schedule | AdaptiveSchedule,
    *,
    granularity: Granularity = Element(),
    distribution: Distribution = Uniform(),
    include: LeafSelector = None,
    reduce: Reduce = "l1",
    key: jax.Array | int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Prune on the steps ``schedule`` marks, keeping pruned weights at zero.

    Chain form: put it last, ``optax.chain(optax.adam(1e-3), prune(...))``.
    On an update step the mask is recomputed inside ``lax.cond`` from
    ``criterion`` at the schedule's sparsity; in a dense phase every weight
    is free. The criterion's ``grads`` are the updates arriving here (use
    :func:`sparsify` for raw gradients).

    Args:
      criterion: scores from ``params``, ``grads``, ``key`` and extra args.
      schedule: a function of the step count (see :mod:`jaxsparse.schedules`)
        or an adaptive schedule.
      granularity: which entries are pruned together; a
        :class:`~jaxsparse.groups.Groups` prunes whole units (kernel
        columns with their biases, normalization entries and the next
        layer's rows), and ``include`` then selects unit sets by name.
      distribution: how the sparsity is spread over leaves.
      include: which leaves are pruned.
      reduce: group reduction for structured granularities.
      key: a PRNG key (or int seed) for criteria that take ``key``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state's ``mask``
      is readable with ``optax.tree.get(state, "mask")``.

    Raises:
      ValueError: at ``update`` without params; at construction for a
        criterion that takes ``key`` when no key is given.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsparse as js
      >>> params = {"w": jnp.array([[4.0, -1.0, 3.0, 0.5]])}
      >>> tx = optax.chain(optax.sgd(0.0), js.prune(js.saliency.magnitude,
      ...                                           js.schedules.constant(0.5)))
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [[4.0, 0.0, 3.0, 0.0]]

    References:
      Hoefler et al. 2021, §2.4.2; Zhu & Gupta 2017.
    """
    rule = _schedule_rule(
        criterion, schedule, granularity, distribution, include, reduce
    )
    return _chain_form(rule, key, "prune")


class SparsifyState(NamedTuple):
    """State of the wrapper-form transforms (``saved`` as in
    :class:`PruneState`)."""

    count: jax.Array
    mask: Mask
    key: jax.Array
    schedule_state: Any
    inner_state: Any
    saved: Any = None


def _reset_moments(inner, inner_state, changed: Mask, params: Params):
    """Zeroes every params-shaped leaf of the inner state where ``changed``."""
    flags = tree_util.tree_map(
        lambda c, p: jnp.zeros((), jnp.bool_) if c is None else c,
        changed,
        params,
        is_leaf=_tree.is_none,
    )
    return optax.tree_utils.tree_map_params(
        inner,
        lambda leaf, flag: jnp.where(flag, jnp.zeros((), leaf.dtype), leaf),
        inner_state,
        flags,
        transform_non_params=lambda x: x,
    )


def _grown_start(init, key, count, updates, old: Mask, new: Mask, params: Params):
    """Updates that set each weight growing now to a fresh draw of ``init``."""
    key = jax.random.fold_in(jax.random.fold_in(key, count), _GROW_SALT)
    news, treedef = tree_util.tree_flatten(new, is_leaf=_tree.is_none)
    olds = treedef.flatten_up_to(old)
    weights = treedef.flatten_up_to(params)
    out = treedef.flatten_up_to(updates)
    for i, (o, n, p) in enumerate(zip(olds, news, weights)):
        if n is not None:
            start = init(jax.random.fold_in(key, i), p.shape, p.dtype)
            out[i] = jnp.where(n & ~o, (start - p).astype(out[i].dtype), out[i])
    return treedef.unflatten(out)


def _wrapper_form(inner: optax.GradientTransformation, rule: _MaskRule, key, name):
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"{name}: inner must be an optax GradientTransformation")
    inner = optax.with_extra_args_support(inner)
    new_key = _key_maker(key, rule.needs_key, name)

    def init(params):
        key_data = new_key()
        return SparsifyState(
            jnp.zeros((), jnp.int32),
            _like_params(
                rule.init_mask(params, jax.random.wrap_key_data(key_data)), params
            ),
            key_data,
            rule.init_schedule(),
            inner.init(params),
            _saved_init(rule, params),
        )

    def update(grads, state, params=None, **extra):
        _tree.need_params(params, name, grads)
        mask, schedule_state, may_change = rule.step(
            state.count,
            state.mask,
            state.schedule_state,
            jax.random.wrap_key_data(state.key),
            params,
            grads,
            extra,
        )
        updates, inner_state = inner.update(
            apply_mask(grads, mask), state.inner_state, params, **extra
        )

        # Computed on every step rather than under a cond: on ordinary steps
        # nothing changed and these selects fuse into the inner update,
        # where a cond would keep the update (and the user's apply_updates)
        # from fusing with it.
        changed = tree_util.tree_map(
            lambda old, new: None if new is None else old != new,
            state.mask,
            mask,
            is_leaf=_tree.is_none,
        )
        # Only weights kept before and after take the update; changed ones
        # restart from 0 (their update is -param).
        settled = tree_util.tree_map(
            lambda new, old: None if new is None else new & old,
            mask,
            state.mask,
            is_leaf=_tree.is_none,
        )
        masked = _masked_updates(updates, settled, params)
        inner_state = _reset_moments(inner, inner_state, changed, params)
        if rule.grow_init is not None:
            # Drawing the new weights' start costs a pass of the random
            # generator: only on the steps that may grow.
            masked = lax.cond(
                may_change,
                lambda: _grown_start(
                    rule.grow_init,
                    jax.random.wrap_key_data(state.key),
                    state.count,
                    masked,
                    state.mask,
                    mask,
                    params,
                ),
                lambda: masked,
            )
        masked, saved = _restore(masked, state.saved, state.mask, mask, params)
        return masked, SparsifyState(
            optax.safe_increment(state.count),
            mask,
            state.key,
            schedule_state,
            inner_state,
            saved,
        )

    return optax.GradientTransformationExtraArgs(init, update)


def sparsify(
    inner: optax.GradientTransformation,
    criterion: Criterion,
    schedule: Schedule | AdaptiveSchedule,
    *,
    granularity: Granularity = Element(),
    distribution: Distribution = Uniform(),
    include: LeafSelector = None,
    reduce: Reduce = "l1",
    key: jax.Array | int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so it trains a network pruned as ``schedule`` says.

    The criterion sees the raw gradients; the gradients of pruned entries
    are zeroed before ``inner``; wherever the mask changes (pruned or
    regrown) every params-shaped leaf of ``inner``'s state (Adam's moments,
    momentum) is zeroed, and the weight is set to 0.

    Args:
      inner: the optimizer to wrap (adam, sgd with momentum, lion, ...).
      criterion, schedule, granularity, distribution, include, reduce, key:
        as in :func:`prune`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a
      :class:`SparsifyState`.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsparse as js
      >>> params = {"w": jnp.array([[4.0, -1.0], [3.0, 0.5]])}
      >>> tx = js.sparsify(optax.sgd(0.0), js.saliency.magnitude,
      ...                  js.schedules.constant(0.5))
      >>> _, state = tx.update(params, tx.init(params), params)
      >>> state.mask["w"].tolist()
      [[True, False], [True, False]]

    References:
      Hoefler et al. 2021, §2.4; Jin et al. 2016; Han et al. 2017.
    """
    rule = _schedule_rule(
        criterion, schedule, granularity, distribution, include, reduce
    )
    return _wrapper_form(inner, rule, key, "sparsify")


def _drop_and_grow_rule(
    grow: Criterion,
    sparsity: float,
    every: int,
    end: int,
    drop_fraction: float,
    distribution: Distribution,
    include: LeafSelector,
    init_criterion: Criterion,
    drop: str,
    decay: str,
    grow_init: jax.nn.initializers.Initializer | None,
) -> _MaskRule:
    _tree.check_sparsity(sparsity)
    for value, label in ((every, "every"), (end, "end")):
        _tree.check_positive_int(value, label)
    if drop not in ("magnitude", "signed"):
        raise ValueError(f"drop must be 'magnitude' or 'signed', got {drop!r}")
    if decay not in ("cosine", "constant"):
        raise ValueError(f"drop_decay must be 'cosine' or 'constant', got {decay!r}")
    if callable(drop_fraction):
        # A schedule of the step count, as optax's hyperparameters take.
        def fraction(count):
            return jnp.asarray(drop_fraction(count), jnp.float32)
    elif decay == "cosine":
        fraction = cosine_drop_fraction(drop_fraction, end=end)
    else:
        _tree.check_sparsity(drop_fraction, where="drop_fraction")

        def fraction(count):
            del count
            return jnp.asarray(drop_fraction, jnp.float32)

    call_grow, _ = _criterion_caller(grow, "grow")
    call_init, _ = _criterion_caller(init_criterion, "init_criterion")

    def init_mask(params, key):
        scores = call_init(params=params, key=key)
        return _fill_like(
            topk_mask(scores, sparsity, distribution=distribution, include=include),
            dense_mask(params, include=include),
        )

    def step(count, mask, schedule_state, key, params, grads, extra):
        def drop_and_grow():
            masks, treedef = tree_util.tree_flatten(mask, is_leaf=_tree.is_none)
            weights = treedef.flatten_up_to(params)
            scores = treedef.flatten_up_to(
                call_grow(
                    params=params,
                    grads=grads,
                    key=jax.random.fold_in(key, count),
                    **extra,
                )
            )
            idx = [i for i, m in enumerate(masks) if m is not None]
            frac = fraction(count)

            def share(active):
                total = jnp.sum(active, dtype=jnp.int32).astype(jnp.float32)
                return jnp.round(frac * total).astype(jnp.int32)

            if drop == "signed":
                # SET: the fraction of the smallest positive weights and of
                # the largest negative ones, each counted on its own side.
                positive = [masks[i] & (weights[i] > 0) for i in idx]
                negative = [masks[i] & (weights[i] < 0) for i in idx]
                low = prune_lowest(
                    [[weights[i].astype(jnp.float32)] for i in idx],
                    [share(a) for a in positive],
                    [[a] for a in positive],
                )
                high = prune_lowest(
                    [[-weights[i].astype(jnp.float32)] for i in idx],
                    [share(a) for a in negative],
                    [[a] for a in negative],
                )
                dropped = [[lo[0] | hi[0]] for lo, hi in zip(low, high)]
                counts = [share(p) + share(n) for p, n in zip(positive, negative)]
            else:
                counts = [share(masks[i]) for i in idx]
                dropped = prune_lowest(
                    [[jnp.abs(weights[i])] for i in idx],
                    counts,
                    [[masks[i]] for i in idx],
                )
            # Each leaf regrows as many as it dropped, so its sparsity never
            # moves.
            after = [masks[i] & ~d[0] for i, d in zip(idx, dropped)]
            grown = prune_lowest(
                [[-scores[i].astype(jnp.float32)] for i in idx],
                counts,
                [[~a] for a in after],
            )
            out = list(masks)
            for j, i in enumerate(idx):
                out[i] = after[j] | grown[j][0]
            return treedef.unflatten(out)

        update_now = (count > 0) & (count % every == 0) & (count < end)
        new = lax.cond(update_now, drop_and_grow, lambda: mask)
        return new, schedule_state, update_now

    if grow_init is not None and not callable(grow_init):
        raise TypeError(
            "grow_init must be an initializer (key, shape, dtype) -> array, "
            f"got {grow_init!r}"
        )
    return _MaskRule(True, False, init_mask, lambda: (), step, grow_init)


def dynamic_sparse(
    inner: optax.GradientTransformation,
    grow: Criterion,
    sparsity: float,
    *,
    every: int,
    end: int,
    key: jax.Array | int,
    drop_fraction: optax.ScalarOrSchedule = 0.3,
    distribution: Distribution = Uniform(),
    include: LeafSelector = None,
    init_criterion: Criterion = random_scores,
    drop: Literal["magnitude", "signed"] = "magnitude",
    drop_decay: Literal["cosine", "constant"] = "cosine",
    grow_init: jax.nn.initializers.Initializer | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic sparse training at constant sparsity: drop and grow.

    The mask starts from ``init_criterion`` (random by default) at
    ``sparsity``. Every ``every`` steps before ``end`` (not at step 0), each
    leaf drops a fraction of its active weights and grows as many where
    ``grow`` scores highest among the inactive ones (a weight just dropped
    may be regrown). Grown weights start at 0 (RigL), or at a draw of
    ``grow_init`` (SET), with zeroed optimizer state.

    - ``drop="magnitude"`` drops the fraction with the smallest ``|w|``
      (RigL); ``drop="signed"`` drops the fraction of the smallest positive
      weights and the same fraction of the largest negative ones (SET).
    - ``drop_decay="cosine"`` decays the fraction as
      ``drop_fraction / 2 (1 + cos(pi t / end))`` (RigL, eq. 1);
      ``"constant"`` keeps ``drop_fraction`` (SET's zeta).

    Args:
      inner: the optimizer to wrap.
      grow: scores for growing, from ``params``, ``grads`` (raw, dense),
        ``key`` and extra args.
      sparsity: the constant sparsity, in ``[0, 1)``.
      every: steps between mask updates (``Delta T``).
      end: no updates from this step on (``T_end``).
      key: PRNG key (or int seed) for the initial mask and random growth.
      drop_fraction: the (initial) drop fraction (0.3 in RigL and SET), or a
        schedule of the step count giving the fraction itself (then
        ``drop_decay`` does not apply).
      distribution: how ``sparsity`` is spread over leaves (RigL uses ERK).
      include: which leaves are sparse.
      init_criterion: scores for the initial mask.
      drop: which active weights are dropped.
      drop_decay: how the drop fraction changes over steps.
      grow_init: initializer ``(key, shape, dtype) -> array`` (as in
        ``jax.nn.initializers``) of the weights grown at an update; ``None``
        starts them at 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`SparsifyState`.

    References:
      Evci et al. 2020, Alg. 1 and eq. 1; Mocanu et al. 2018;
      Hoefler et al. 2021, §4.
    """
    rule = _drop_and_grow_rule(
        grow,
        sparsity,
        every,
        end,
        drop_fraction,
        distribution,
        include,
        init_criterion,
        drop,
        drop_decay,
        grow_init,
    )
    return _wrapper_form(inner, rule, key, "dynamic_sparse")


def _gradient_magnitude(grads: Any) -> Scores:
    return tree_util.tree_map(jnp.abs, grads)


def rigl(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    every: int,
    end: int,
    key: jax.Array | int,
    drop_fraction: optax.ScalarOrSchedule = 0.3,
    distribution: Distribution = Uniform(),
    include: LeafSelector = None,
) -> optax.GradientTransformationExtraArgs:
    """RigL: drop the smallest magnitudes, grow where the dense gradient is
    largest (see :func:`dynamic_sparse` for the arguments).

    Example:
      >>> import jax.numpy as jnp, optax, jaxsparse as js
      >>> params = {"w": jnp.ones((4, 5))}
      >>> tx = js.rigl(optax.adam(1e-3), 0.8, every=100, end=1000, key=0)
      >>> int((~tx.init(params).mask["w"]).sum())  # 80 % of 20 entries
      16

    References:
      Evci et al. 2020, "Rigging the Lottery: Making all tickets winners".
    """
    return dynamic_sparse(
        inner,
        _gradient_magnitude,
        sparsity,
        every=every,
        end=end,
        key=key,
        drop_fraction=drop_fraction,
        distribution=distribution,
        include=include,
    )


def sparse_evolutionary(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    every: int,
    end: int,
    key: jax.Array | int,
    drop_fraction: optax.ScalarOrSchedule = 0.3,
    distribution: Distribution = Uniform(),
    include: LeafSelector = None,
    drop: Literal["magnitude", "signed"] = "signed",
    drop_decay: Literal["cosine", "constant"] = "constant",
    grow_scale: float = 0.1,
) -> optax.GradientTransformationExtraArgs:
    """SET: every ``every`` steps (an epoch in the paper) remove the fraction
    ``zeta = drop_fraction`` of the smallest positive weights and of the
    largest negative weights of each layer, and regrow as many at random
    positions with random values (see :func:`dynamic_sparse` for the
    arguments).

    The defaults follow the paper: a constant ``zeta = 0.3``, the signed
    drop rule (Mocanu et al. 2018, Methods, "SET": "the fraction zeta of
    the smallest positive weights and the largest negative weights ... is
    removed") and new weights drawn from ``N(0, grow_scale^2)`` with
    ``grow_scale = 0.1`` as the authors' code does. A weight regrown at
    exactly 0 behind a dead input gets no gradient and is never dropped
    again by the signed rule (it is neither positive nor negative), so
    zero-initialized growth piles up dead connections. ``drop="magnitude"``,
    ``drop_decay="cosine"`` and ``grow_scale=0`` give RigL's rules with
    random growth instead. ``grow_scale`` is a number, so
    ``optax.inject_hyperparams`` exposes it; :func:`dynamic_sparse` takes
    any initializer.

    References:
      Mocanu et al. 2018, "Scalable training of artificial neural networks
      with adaptive sparse connectivity", Methods and Algorithm 1;
      Hoefler et al. 2021, §4.
    """
    return dynamic_sparse(
        inner,
        random_scores,
        sparsity,
        every=every,
        end=end,
        key=key,
        drop_fraction=drop_fraction,
        distribution=distribution,
        include=include,
        drop=drop,
        drop_decay=drop_decay,
        grow_init=_normal_init(grow_scale),
    )
