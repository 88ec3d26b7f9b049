"""Dependency groups traced from a model, and the physical removal of units.

A *unit* is everything that must go together when one hidden neuron,
filter or attention head is removed: its kernel column, its bias entry, the
normalization scale, shift and statistics of its feature, and the next
layer's input row. :func:`trace` finds the units of any model by walking the
jaxpr of its apply function: which axis of which parameter feeds which axis
of which other parameter. Nothing is listed per layer type; an axis whose
size is fixed by something else (the model's inputs and outputs, a
reduction over it, an operation the walk does not follow) stays dense, and
:attr:`Groups.dense` says why.

A :class:`Groups` is a granularity: ``prune(..., granularity=groups)``,
:func:`~jaxsparse.layerwise_mask`, :func:`~jaxsparse.global_mask` and every
distribution reduce element scores to one score per unit, select units, and
expand the choice back to an element mask over all the unit's leaves.
:func:`shrink` then removes the masked units, giving smaller arrays whose
outputs equal the masked model's.

References:
  Hoefler et al. 2021, §2.3 (neurons, filters, heads) and §3.1 (structured
  sparsity); Fang et al. 2023 (DepGraph: dependency groups for structural
  pruning of any architecture).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import tree_util

from jaxsparse import _tree
from jaxsparse._axis_trace import UNSUPPORTED, AxisWalk, shrunk_mismatch
from jaxsparse._types import Mask, Params, Scores
from jaxsparse.masks import apply_mask
from jaxsparse.structure import Reduce, reduce_scores

UnitMask = dict[str, jax.Array]
"""One ``bool`` array per unit set (``True`` keeps the unit), keyed by the
set's name."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One leaf axis that a unit set runs along.

    Index ``i`` of the axis belongs to unit ``(i // stride) % size`` of the
    set (``stride`` is 1 unless a reshape merged the unit axis with a faster
    one, as heads with head dimensions)."""

    path: str
    axis: int
    stride: int
    state: bool = False
    """A state leaf (batch statistics), not a parameter."""


@dataclasses.dataclass(frozen=True)
class UnitSet:
    """A set of interchangeable units (the neurons of one hidden layer, the
    heads of one attention block) and the leaf axes they run along."""

    name: str
    size: int
    members: tuple[Member, ...]


@dataclasses.dataclass(frozen=True)
class Groups:
    """The units of a model, as :func:`trace` found them.

    Attributes:
      sets: the unit sets, in the order their first leaf appears.
      dense: ``(path, axis, reasons)`` for every parameter axis that stays
        dense, with why (``"model input"``, ``"reduced over (reduce_sum)"``,
        ``"unsupported: cumsum"``...).
      shapes: ``(path, shape)`` of every parameter leaf.
      state_shapes: ``(path, shape)`` of every state leaf.
    """

    sets: tuple[UnitSet, ...]
    dense: tuple[tuple[str, int, tuple[str, ...]], ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    state_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    fixed_sparsity = None

    @property
    def unsupported(self) -> tuple[tuple[str, int, str], ...]:
        """``(path, axis, reason)`` of the axes left dense because the walk
        met an operation it does not follow."""
        return tuple(
            (path, axis, r)
            for path, axis, reasons in self.dense
            for r in reasons
            if r.startswith(UNSUPPORTED)
        )

    def unit_set(self, name: str) -> UnitSet:
        """The unit set called ``name``; ``KeyError`` naming the known ones."""
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(f"no unit set {name!r}; these are {[s.name for s in self.sets]}")

    def _leaves(
        self, tree: Any, what: str, state: bool = False, allow_none: bool = False
    ) -> dict[str, Any]:
        """``path -> leaf`` of ``tree``, checked against the traced shapes
        (``None`` leaves allowed with ``allow_none``)."""
        found = {_tree.path_str(p): x for p, x in _tree.leaves_with_path(tree)}
        for path, shape in self.state_shapes if state else self.shapes:
            if not any(
                m.path == path and m.state == state
                for s in self.sets
                for m in s.members
            ):
                continue
            if path in found and found[path] is None and allow_none:
                continue
            if path not in found or found[path] is None:
                raise ValueError(
                    f"{what} has no leaf at {path!r}; were these groups traced "
                    "from another model?"
                )
            if tuple(np.shape(found[path])) != shape:
                raise ValueError(
                    f"{path}: {what} shape {tuple(np.shape(found[path]))} does not "
                    f"match the traced shape {shape}; were these groups traced "
                    "from another model?"
                )
        return found

    def unit_scores(
        self, scores: Scores, reduce: Reduce = "l1"
    ) -> dict[str, jax.Array]:
        """Reduces element scores to one score per unit, over all the
        unit's parameter entries (``"l1"``: sum of absolute values, ``"l2"``:
        Euclidean norm, ``"sum"``: plain sum).

        Args:
          scores: a pytree of float scores mirroring the traced params
            (``None`` leaves, as a criterion gives for leaves it skips, add
            nothing).
          reduce: the reduction.

        Returns:
          ``{set name: (size,) float array}``.
        """
        leaves = self._leaves(scores, "scores", allow_none=True)
        out = {}
        for s in self.sets:
            parts = []
            for m in s.members:
                if m.state or leaves[m.path] is None:
                    continue
                x = jnp.asarray(leaves[m.path])
                view = _unit_view(x, m, s.size)
                axes = tuple(a for a in range(view.ndim) if a != m.axis + 1)
                parts.append(
                    reduce_scores(view, axes, "l2" if reduce == "l2" else reduce)
                )
            if not parts:
                out[s.name] = jnp.zeros((s.size,), jnp.float32)
            elif reduce == "l2":
                out[s.name] = jnp.sqrt(sum(jnp.square(p) for p in parts))
            else:
                out[s.name] = sum(parts[1:], parts[0])
        return out

    def element_mask(self, units: UnitMask | None, like: Params) -> Mask:
        """Expands a unit mask to an element mask mirroring ``like``: an
        entry is kept when every unit it belongs to is kept; leaves outside
        every unit set are ``None``.

        Args:
          units: ``{set name: (size,) bool or None}`` (``None`` keeps the
            whole set), or ``None`` to keep every unit.
          like: the params (or scores) the mask mirrors; a unit's leaf that
            is ``None`` there (a criterion that skipped biases) still gets
            its mask, so that the whole unit goes.
        """
        self._check_units(units)
        self._leaves(like, "params", allow_none=True)
        shapes = dict(self.shapes)
        masks: dict[str, jax.Array] = {}
        for s in self.sets:
            chosen = None if units is None else units[s.name]
            keep = None if chosen is None else jnp.asarray(chosen)
            for m in s.members:
                if m.state:
                    continue
                shape = shapes[m.path]
                mask = masks.get(m.path, jnp.ones(shape, bool))
                if keep is not None:
                    mask = mask & _expand(keep, m, s.size, shape)
                masks[m.path] = mask
        return tree_util.tree_map_with_path(
            lambda p, x: masks.get(_tree.path_str(p)), like, is_leaf=_tree.is_none
        )

    def unit_mask(self, mask: Mask) -> UnitMask:
        """The units an element mask removes: a unit goes when every entry
        of it is masked, in every parameter it runs through (``None`` leaves
        keep everything)."""
        leaves = {_tree.path_str(p): x for p, x in _tree.leaves_with_path(mask)}
        out = {}
        for s in self.sets:
            kept = jnp.zeros((s.size,), bool)
            for m in s.members:
                if m.state:
                    continue
                leaf = leaves.get(m.path)
                if leaf is None:
                    if m.path not in leaves:
                        raise ValueError(
                            f"mask has no leaf at {m.path!r}; were these groups "
                            "traced from another model?"
                        )
                    kept = jnp.ones((s.size,), bool)
                    continue
                view = _unit_view(jnp.asarray(leaf, bool), m, s.size)
                axes = tuple(a for a in range(view.ndim) if a != m.axis + 1)
                kept = kept | jnp.any(view, axis=axes)
            out[s.name] = kept
        return out

    def _check_units(self, units: Any) -> None:
        if units is None:
            return
        if not isinstance(units, Mapping):
            raise TypeError(
                "a unit mask is a dict {set name: bool array}, got "
                f"{type(units).__name__}"
            )
        names = {s.name for s in self.sets}
        if set(units) != names:
            raise ValueError(
                "unit mask does not match these groups: missing "
                f"{sorted(names - set(units))[:3]}, unexpected "
                f"{sorted(set(units) - names)[:3]}"
            )
        for s in self.sets:
            if units[s.name] is not None and np.shape(units[s.name]) != (s.size,):
                raise ValueError(
                    f"{s.name}: unit mask shape {np.shape(units[s.name])} does not "
                    f"match the set's {s.size} units"
                )

    def dense_mask(self, params: Params) -> Mask:
        """The all-kept element mask of :meth:`element_mask`."""
        return self.element_mask(None, params)


def units_include(include: Any) -> Any:
    """The selector of unit sets: every set by default (their score arrays
    are 1-D, which the default leaf selector skips), else ``include`` on
    the set names."""
    return (lambda path, leaf: True) if include is None else include


def split_shape(
    shape: tuple[int, ...], axis: int, size: int, stride: int
) -> tuple[int, ...]:
    """``shape`` with ``axis`` split as ``(outer, size, stride)``: index ``i``
    of the axis becomes ``(i // (size * stride), (i // stride) % size, i %
    stride)``, so a unit's index sits at ``axis + 1``."""
    n = shape[axis]
    return (*shape[:axis], n // (size * stride), size, stride, *shape[axis + 1 :])


def _unit_view(x: jax.Array, member: Member, size: int) -> jax.Array:
    return x.reshape(split_shape(x.shape, member.axis, size, member.stride))


def along_units(
    values: jax.Array, shape: tuple[int, ...], axis: int, size: int, stride: int
) -> jax.Array:
    """``values`` (one per unit, ``(size,)``, or per example and unit,
    ``(shape[0], size)``) broadcast over an array of ``shape`` whose ``axis``
    holds the units."""
    split = split_shape(tuple(shape), axis, size, stride)
    target = [1] * len(split)
    target[axis + 1] = size
    if values.ndim == 2:
        target[0] = shape[0]
    return jnp.broadcast_to(values.reshape(target), split).reshape(shape)


def _expand(
    keep: jax.Array, member: Member, size: int, shape: tuple[int, ...]
) -> jax.Array:
    return along_units(keep, shape, member.axis, size, member.stride)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    return [
        (_tree.path_str(p), x) for p, x in tree_util.tree_flatten_with_path(tree)[0]
    ]


def trace(
    fn: Callable[..., Any],
    params: Params,
    *args: Any,
    state: Any = None,
    probe: bool = True,
    **kwargs: Any,
) -> Groups:
    """Finds the units of the model ``fn(params, *args, **kwargs)``.

    With ``state`` (batch statistics, for a flax linen model
    ``{"batch_stats": ...}``), the model is ``fn(params, state, *args,
    **kwargs)`` and the state leaves join the units they run along, so that
    :func:`shrink` slices them too. ``args`` are example inputs (only their
    shapes and dtypes matter); ``kwargs`` are passed as they are (flags such
    as ``train=False``).

    Args:
      fn: the apply function.
      params: the parameters the units are made of (what the optimizer sees).
      *args: example inputs.
      state: other variables the model reads, or ``None``.
      probe: check each unit set by running the model (shapes only, with
        :func:`jax.eval_shape`) one unit smaller, and leave dense the sets it
        refuses: a shape check in Python does not show in the jaxpr.
      **kwargs: static keyword arguments of ``fn``.

    Returns:
      The :class:`Groups`. Axes that stay dense because of an operation the
      walk does not follow are also reported by a ``UserWarning`` naming
      their paths.

    Example:
      >>> import jax, jax.numpy as jnp, jaxsparse as js
      >>> params = {"l1": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)},
      ...           "l2": {"w": jnp.ones((8, 3)), "b": jnp.zeros(3)}}
      >>> def mlp(p, x):
      ...     h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"][None])
      ...     return h @ p["l2"]["w"] + p["l2"]["b"][None]
      >>> groups = js.groups.trace(mlp, params, jnp.ones((2, 4)))
      >>> [(m.path, m.axis) for m in groups.sets[0].members]
      [('l1/b', 0), ('l1/w', 1), ('l2/w', 0)]

    References:
      Hoefler et al. 2021, §3.1; Fang et al. 2023 (DepGraph).
    """
    call = model_call(fn, state is not None, kwargs)
    walked = walk_model(call, params, state, args)
    groups = _probe(walked, call, params, state, args) if probe else walked.groups
    if groups.unsupported:
        listed = "; ".join(f"{p} axis {a} ({r})" for p, a, r in groups.unsupported[:8])
        warnings.warn(
            f"left dense, not understood by the trace: {listed}",
            stacklevel=2,
        )
    return groups


def model_call(fn: Callable[..., Any], has_state: bool, kwargs: dict) -> Callable:
    """``fn`` as ``call(params, state, args)``, the form every walk traces."""

    def call(p, s, a):
        return fn(p, s, *a, **kwargs) if has_state else fn(p, *a, **kwargs)

    return call


class Walked(NamedTuple):
    """A model's jaxpr walked: the groups, each set's atom, and the walk."""

    closed: Any
    walk: AxisWalk
    groups: Groups
    roots: list[int]
    leaves: list[tuple[str, Any]]
    """The params' then the state's ``(path, leaf)``, as the jaxpr's inputs."""


def walk_model(call: Callable, params: Params, state: Any, args: tuple) -> Walked:
    """Traces ``call(params, state, args)`` and walks its jaxpr."""
    closed = jax.make_jaxpr(call)(params, state, args)
    param_leaves = _flat(params)
    state_leaves = _flat(state) if state is not None else []
    arg_leaves = tree_util.tree_leaves(args)
    walk = AxisWalk()
    in_dims, in_act = [], []
    for var, (_, x) in zip(closed.jaxpr.invars, param_leaves + state_leaves):
        walk.source[var] = len(in_dims)
        in_dims.append(walk.fresh(np.shape(x), None))
        in_act.append(False)
    for x in arg_leaves:
        in_dims.append(walk.fresh(np.shape(x), "model input"))
        in_act.append(True)
    used = {
        v for e in closed.jaxpr.eqns for v in e.invars if not isinstance(v, jex.Literal)
    } | set(closed.jaxpr.outvars)
    for var, dims in zip(closed.jaxpr.invars, in_dims):
        if var not in used:
            for axis in dims:
                walk.atoms.pin(axis, "unused by the model")
    outs = walk.run_closed(closed, in_dims, in_act)
    for dims in outs:
        for axis in dims:
            walk.atoms.pin(axis, "model output")
    groups, roots = _assemble(walk, param_leaves, state_leaves, in_dims)
    return Walked(closed, walk, groups, roots, param_leaves + state_leaves)


def _probe(walked: Walked, call, params, state, args) -> Groups:
    """Leaves dense the unit sets the model does not run one unit smaller
    with the same computation: a shape check in Python, or a reshape to
    fixed sizes, which a jaxpr of one size cannot show."""
    groups = walked.groups
    kept, unchecked = [], []
    dense = {(path, axis): set(reasons) for path, axis, reasons in groups.dense}
    for s, root in zip(groups.sets, walked.roots):
        if s.size == 1:
            kept.append(s)
            continue
        units = {t.name: np.ones(t.size, bool) for t in groups.sets}
        units[s.name][-1] = False
        shapes = _shrunk_shapes(groups, units, params, state)
        try:
            problem = shrunk_mismatch(
                walked.walk, walked.closed, jax.make_jaxpr(call)(*shapes, args), root
            )
        except flax.errors.ScopeParamShapeError:
            # A linen module checks its params against its own width
            # attributes: the model one unit smaller is another module.
            unchecked.append(s.name)
            problem = None
        except Exception as e:
            first = str(e).splitlines()[0][:160] if str(e) else ""
            problem = f"raises {type(e).__name__}: {first}"
        if problem is None:
            kept.append(s)
        else:
            reason = f"{UNSUPPORTED}: one unit smaller, the model {problem}"
            for m in s.members:
                if not m.state:
                    dense.setdefault((m.path, m.axis), set()).add(reason)
    if unchecked:
        warnings.warn(
            "a flax linen module checks its params against its width "
            "attributes, so the unit sets could not be checked one unit "
            f"smaller ({', '.join(unchecked[:4])}); run shrunk params with the "
            "module built at the new widths",
            stacklevel=3,
        )
    return dataclasses.replace(
        groups,
        sets=tuple(kept),
        dense=tuple((p, a, tuple(sorted(r))) for (p, a), r in sorted(dense.items())),
    )


def _shrunk_shapes(groups: Groups, units, params, state) -> tuple[Any, Any]:
    def structs(tree, is_state):
        indices = _kept_indices(groups, units, is_state)

        def leaf(path, x):
            shape = list(np.shape(x))
            name = _tree.path_str(path)
            for (p, axis), idx in indices.items():
                if p == name:
                    shape[axis] = len(idx)
            return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(x))

        return tree_util.tree_map_with_path(leaf, tree)

    return structs(params, False), None if state is None else structs(state, True)


def _assemble(
    walk: AxisWalk, param_leaves, state_leaves, in_dims
) -> tuple[Groups, list[int]]:
    """The groups, and the atom of each unit set."""
    atoms = walk.atoms
    members: dict[int, list[Member]] = {}
    first_param: dict[int, tuple[str, int]] = {}
    dense = []
    leaves = [(p, x, False) for p, x in param_leaves] + [
        (p, x, True) for p, x in state_leaves
    ]
    for (path, _, is_state), dims in zip(leaves, in_dims):
        for axis, axis_atoms in enumerate(dims):
            resolved = atoms.resolve(axis_atoms)
            sizes = [atoms.size[a] for a in resolved]
            reasons: set[str] = set()
            for j, atom in enumerate(resolved):
                pins = atoms.pins(atom)
                if resolved.count(atom) > 1:
                    pins = pins | {"a unit repeated along one axis"}
                if pins:
                    reasons |= pins
                    continue
                stride = math.prod(sizes[j + 1 :])
                members.setdefault(atom, []).append(
                    Member(path, axis, stride, is_state)
                )
                if not is_state:
                    first_param.setdefault(atom, (path, axis))
            if reasons and not is_state:
                dense.append((path, axis, tuple(sorted(reasons))))
    ndims = {p: np.ndim(x) for p, x in param_leaves}
    order = {p: i for i, (p, _) in enumerate(param_leaves)}
    sets, used = [], {}
    roots = sorted(first_param, key=lambda a: _position(first_param[a], order))
    for atom in roots:
        params_only = [m for m in members[atom] if not m.state]
        # Name a set after the kernel whose output axis it is, where one is.
        named = min(
            params_only,
            key=lambda m: (_rank(m, ndims), -ndims[m.path], order[m.path]),
        )
        name = f"{named.path}:{named.axis}"
        used[name] = used.get(name, -1) + 1
        if used[name]:
            name += f"#{used[name]}"
        sets.append(UnitSet(name, atoms.size[atom], tuple(members[atom])))
    groups = Groups(
        tuple(sets),
        tuple(dense),
        tuple((p, tuple(np.shape(x))) for p, x in param_leaves),
        tuple((p, tuple(np.shape(x))) for p, x in state_leaves),
    )
    return groups, roots


def _rank(member: Member, ndims: dict[str, int]) -> int:
    ndim = ndims[member.path]
    if ndim >= 2 and member.axis == ndim - 1:
        return 0
    return 1 if ndim >= 2 else 2


def _position(where: tuple[str, int], order: dict[str, int]) -> tuple[int, int]:
    return order[where[0]], where[1]


def trace_module(model: nnx.Module, *args: Any, **kwargs: Any) -> Groups:
    """:func:`trace` for a flax nnx module called as ``model(*args, **kwargs)``.

    The parameters are ``nnx.state(model, nnx.Param)`` (what
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands to the transforms);
    every other variable (batch statistics) is state.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> groups = js.groups.trace_module(model, jnp.ones((1, 4)))
      >>> [(s.name, s.size) for s in groups.sets]
      [('layers/0/kernel/value:1', 8)]
    """
    graphdef, params, state = nnx.split(model, nnx.Param, ...)

    def apply(p, s, *a, **k):
        merged = nnx.merge(graphdef, p, s)
        _update_sizes(model, merged)
        return merged(*a, **k)

    return trace(apply, params, *args, state=state, **kwargs)


def _is_unit_mask(groups: Groups, mask: Any) -> bool:
    return isinstance(mask, Mapping) and set(mask) == {s.name for s in groups.sets}


def _concrete_units(groups: Groups, mask: Any) -> dict[str, np.ndarray]:
    units = mask if _is_unit_mask(groups, mask) else groups.unit_mask(mask)
    groups._check_units(units)
    out = {}
    for s in groups.sets:
        value = units[s.name]
        if isinstance(value, jax.core.Tracer):
            raise TypeError("shrink changes array shapes; call it outside jax.jit")
        keep = np.ones(s.size, bool) if value is None else np.asarray(value, bool)
        if not keep.any():
            paths = ", ".join(sorted({m.path for m in s.members}))
            raise ValueError(
                f"{s.name}: the mask removes all {s.size} units, which would "
                f"empty {paths}"
            )
        out[s.name] = keep
    return out


def _kept_indices(
    groups: Groups, units: dict[str, np.ndarray], state: bool
) -> dict[tuple[str, int], np.ndarray]:
    """``(path, axis) -> kept indices`` for every axis a unit set runs along."""
    shapes = dict(groups.state_shapes if state else groups.shapes)
    keep: dict[tuple[str, int], np.ndarray] = {}
    for s in groups.sets:
        for m in s.members:
            if m.state != state:
                continue
            n = shapes[m.path][m.axis]
            ok = units[s.name][(np.arange(n) // m.stride) % s.size]
            keep[m.path, m.axis] = keep.get((m.path, m.axis), np.ones(n, bool)) & ok
    return {k: np.flatnonzero(v) for k, v in keep.items()}


def _slice_tree(tree: Any, indices: dict[tuple[str, int], np.ndarray]) -> Any:
    def cut(path, x):
        if x is None:
            return None
        name = _tree.path_str(path)
        for (p, axis), idx in indices.items():
            if p == name:
                x = jnp.take(x, jnp.asarray(idx), axis=axis)
        return x

    return tree_util.tree_map_with_path(cut, tree, is_leaf=_tree.is_none)


def shrink(
    model: Any,
    groups: Groups,
    mask: Mask | UnitMask,
    *,
    state: Any = None,
) -> Any:
    """Removes the masked units: smaller arrays whose outputs equal the
    masked model's.

    Args:
      model: the params the groups were traced from, or a flax nnx module
        (traced by :func:`trace_module`).
      groups: the model's units.
      mask: an element mask mirroring the params (as a transform with
        ``granularity=groups`` keeps; a unit is removed when all of its
        entries are masked) or a unit mask ``{set name: bool array}``.
      state: the state the groups were traced with (params form only).

    Returns:
      The shrunk params (with ``state``: ``(params, state)``), or a new nnx
      module whose variables (and size attributes) are shrunk.

    Raises:
      ValueError: a mask or params from another model, a unit set the mask
        would empty (naming it); nothing is shrunk then.
      TypeError: called under ``jit`` (shapes would depend on values).

    Example:
      >>> import jax, jax.numpy as jnp, jaxsparse as js
      >>> params = {"l1": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)},
      ...           "l2": {"w": jnp.ones((8, 3)), "b": jnp.zeros(3)}}
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"][None]) @ p["l2"]["w"]
      >>> groups = js.groups.trace(mlp, params, jnp.ones((2, 4)))
      >>> units = {groups.sets[0].name: jnp.arange(8) < 3}
      >>> small = js.groups.shrink(params, groups, units)
      >>> small["l1"]["w"].shape, small["l2"]["w"].shape
      ((4, 3), (3, 3))

    References:
      Hoefler et al. 2021, §2.3, §3.1 (structured sparsity as a smaller
      dense model).
    """
    if isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        small_params, small_rest = _shrink_trees(groups, mask, params, rest)
        small = nnx.merge(graphdef, small_params, small_rest)
        _update_sizes(model, small)
        return small
    if (
        state is None
        and groups.state_shapes
        and any(m.state for s in groups.sets for m in s.members)
    ):
        raise ValueError(
            "these groups run through state leaves (batch statistics); pass "
            "shrink(..., state=...) so that they shrink too"
        )
    small_params, small_state = _shrink_trees(groups, mask, model, state)
    return small_params if state is None else (small_params, small_state)


def _shrink_trees(
    groups: Groups, mask: Any, params: Params, state: Any
) -> tuple[Any, Any]:
    groups._leaves(params, "params")
    if state is not None:
        groups._leaves(state, "state", state=True)
    units = _concrete_units(groups, mask)
    if not _is_unit_mask(groups, mask):
        # Entries the element mask removes inside kept units stay, as zeros.
        params = apply_mask(params, mask)
    small = _slice_tree(params, _kept_indices(groups, units, False))
    small_state = (
        None
        if state is None
        else _slice_tree(state, _kept_indices(groups, units, True))
    )
    return small, small_state


def _size_attributes(module: nnx.Module) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(module).items()
        if (isinstance(v, int) and not isinstance(v, bool))
        or (
            isinstance(v, tuple)
            and v
            and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        )
    }


def _update_sizes(old: nnx.Module, new: nnx.Module) -> None:
    """Rewrites the size attributes a module keeps beside its arrays
    (``out_features``, ``num_features``...) to the shrunk shapes.

    Flax modules read some of them when called (a general linear layer
    reshapes its bias to ``out_features``), so they must follow the arrays.
    An attribute is matched to an axis by value: a tuple equal to a run of
    a variable's old shape, an int equal to one changed dimension; where an
    int matches a changed and an unchanged axis alike (a square kernel), the
    name decides (``in...`` is the leading axis, anything else the last).
    """
    old_modules = dict(nnx.iter_modules(old))
    for path, module in nnx.iter_modules(new):
        before = old_modules[path]
        changes = []
        for name, var in vars(module).items():
            if isinstance(var, nnx.Variable) and hasattr(var.get_value(), "shape"):
                old_shape = tuple(getattr(before, name).get_value().shape)
                new_shape = tuple(var.get_value().shape)
                if old_shape != new_shape:
                    changes.append((old_shape, new_shape))
        if not changes:
            continue
        for name, value in _size_attributes(module).items():
            updated = _updated_size(name, value, changes)
            if updated is not None and updated != value:
                setattr(module, name, updated)


def _updated_size(name: str, value: Any, changes) -> Any:
    if isinstance(value, tuple):
        for old_shape, new_shape in changes:
            for i in range(len(old_shape) - len(value) + 1):
                j = i + len(value)
                if old_shape[i:j] == value and old_shape[i:j] != new_shape[i:j]:
                    return tuple(new_shape[i:j])
        return None
    found = set()
    for old_shape, new_shape in changes:
        last = len(old_shape) - 1
        for a, d in enumerate(old_shape):
            if d != value:
                continue
            if name.startswith("in") and a == last:
                continue
            if name.startswith("out") and a != last:
                continue
            found.add(new_shape[a])
    return found.pop() if len(found) == 1 else None
