"""Private pytree helpers shared by every module: key paths, leaf selection,
mask-tree checks and concrete-number checks."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax import tree_util

from jaxsparse._types import KeyPath, LeafSelector


def is_none(x: Any) -> bool:
    return x is None


def path_str(path: KeyPath) -> str:
    """Joins a key path with ``/``: ``("params", "Dense_0", "kernel")``."""
    parts = []
    for key in path:
        if isinstance(key, tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts) or "<root>"


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def leaf_selector(include: LeafSelector) -> Callable[[KeyPath, Any], bool]:
    """Turns ``include`` into a predicate on ``(key_path, leaf)``."""
    if include is None:
        # Floating leaves are the prunable ones; bool leaves are masks, which
        # the same selection must find (reports count masks too).
        return lambda path, leaf: (
            _is_array(leaf)
            and leaf.ndim >= 2
            and (
                jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)
                or leaf.dtype == np.bool_
            )
        )
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda path, leaf: (
            _is_array(leaf) and bool(pattern.search(path_str(path)))
        )
    if callable(include):
        return lambda path, leaf: _is_array(leaf) and bool(include(path, leaf))
    raise TypeError(
        "include must be None, a regular expression or a callable "
        f"(key_path, leaf) -> bool, got {type(include).__name__}"
    )


def leaves_with_path(tree: Any) -> list[tuple[KeyPath, Any]]:
    """Flattens ``tree`` keeping ``None`` leaves in place."""
    return tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]


def selected(tree: Any, include: LeafSelector) -> Iterator[tuple[KeyPath, Any]]:
    """Yields ``(path, leaf)`` for the leaves that ``include`` selects."""
    select = leaf_selector(include)
    for path, leaf in leaves_with_path(tree):
        if leaf is not None and select(path, leaf):
            yield path, leaf


def map_selected(
    fn: Callable[[KeyPath, Any], Any], tree: Any, include: LeafSelector
) -> Any:
    """``fn(path, leaf)`` on the selected leaves, ``None`` on the others."""
    select = leaf_selector(include)
    return tree_util.tree_map_with_path(
        lambda p, x: fn(p, x) if x is not None and select(p, x) else None,
        tree,
        is_leaf=is_none,
    )


def check_same_tree(
    reference: Any, other: Any, *, name: str, ref_name: str, shapes: bool = True
) -> None:
    """Raises ``ValueError`` unless ``other`` has ``reference``'s tree structure
    (``None`` counting as a leaf in both) and, if ``shapes``, the same shape
    wherever both have a leaf."""
    ref_leaves = leaves_with_path(reference)
    other_leaves = leaves_with_path(other)
    ref_paths = [path_str(p) for p, _ in ref_leaves]
    other_paths = [path_str(p) for p, _ in other_leaves]
    if ref_paths != other_paths or tree_util.tree_structure(
        reference, is_leaf=is_none
    ) != tree_util.tree_structure(other, is_leaf=is_none):
        missing = sorted(set(ref_paths) - set(other_paths))
        extra = sorted(set(other_paths) - set(ref_paths))
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}")
        if extra:
            detail.append(f"unexpected {extra[:3]}")
        if not detail:
            detail.append("leaves are in a different order or container type")
        raise ValueError(
            f"{name} tree does not match the {ref_name} tree: " + ", ".join(detail)
        )
    for (path, ref), (_, leaf) in zip(ref_leaves, other_leaves):
        if not shapes or leaf is None or ref is None:
            continue
        if np.shape(leaf) != np.shape(ref):
            raise ValueError(
                f"{path_str(path)}: {name} shape {np.shape(leaf)} does not match "
                f"{ref_name} shape {np.shape(ref)}"
            )


def concrete_float(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a concrete number, ``None`` when traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    if np.ndim(x) != 0:
        raise ValueError(f"expected a scalar, got shape {np.shape(x)}")
    return float(x)


def check_sparsity(
    sparsity: Any, *, where: str = "sparsity", whole: bool = False
) -> None:
    """Raises ``ValueError`` if a concrete sparsity is outside ``[0, 1)``
    (``[0, 1]`` with ``whole``: a per-leaf target may remove a whole leaf;
    an overall target may not remove everything)."""
    value = concrete_float(sparsity)
    if value is None:
        return
    if whole and not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {value!r}")
    if not whole and not 0.0 <= value < 1.0:
        raise ValueError(f"{where} must be in [0, 1), got {value!r}")


def need_params(params: Any, name: str, updates: Any = None) -> None:
    """Raises ``ValueError`` when a transform that needs params gets none, or
    updates whose tree or shapes differ from them (naming the transform and
    the leaf, instead of JAX's raw pytree error)."""
    if params is None:
        raise ValueError(
            f"{name} needs the params: call update(updates, state, params)"
        )
    if updates is not None:
        check_same_tree(params, updates, name=f"{name}: updates", ref_name="params")


def check_positive_int(value: Any, name: str) -> None:
    """Raises ``ValueError`` unless ``value`` is an ``int`` above 0 (``bool``
    is refused: ``True`` is an int to Python but never meant as a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive(value: Any, name: str) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is above 0 (a traced
    value passes through)."""
    number = concrete_float(value)
    if number is not None and not number > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def keyword_caller(
    fn: Callable[..., Any], name: str
) -> tuple[Callable[..., Any], set[str] | None]:
    """Wraps ``fn`` to be called by keyword with whatever is available,
    passing only the arguments it names (all of them if it takes
    ``**kwargs``).

    Returns:
      ``(call, wanted)``: ``wanted`` is the set of names ``fn`` takes, or
      ``None`` when it takes every keyword.
    """
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {fn!r}")
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return (lambda **available: fn(**available)), None
    wanted = {p.name for p in parameters}

    def call(**available):
        return fn(**{k: v for k, v in available.items() if k in wanted})

    return call, wanted


def sharded_like(x: jax.Array, ref: Any) -> jax.Array:
    """``x`` with ``ref``'s sharding where ``ref``'s type carries one
    (Explicit mesh axes), else ``x`` as it is: a mask built from scratch
    then has the type of the masks later steps compute from the params."""
    sharding = jax.typeof(ref).sharding
    if all(axis is None for axis in getattr(sharding, "spec", ())):
        return x
    concrete = getattr(ref, "sharding", None)
    if not isinstance(ref, jax.core.Tracer) and isinstance(
        concrete, jax.sharding.NamedSharding
    ):
        return jax.device_put(x, concrete)
    return jax.sharding.reshard(x, sharding)
