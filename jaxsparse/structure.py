"""Granularity of pruning: which entries are removed together.

A granularity is a small frozen (hashable) object, so it can be a static
argument of a jitted function. Each one reduces element scores to group
scores and expands a group mask back to the element shape; :class:`NM` keeps
exactly ``n`` of every ``m`` entries and selects on its own.

References:
  Hoefler et al. 2021, §3.1 (structured sparsity: blocks, strides, N:M,
  channels, filters and neurons); Mishra et al. 2021 (N:M);
  Anwar et al. 2017 (strided intra-kernel sparsity).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxsparse import _tree
from jaxsparse._select import order_key

Reduce = Literal["l1", "l2", "sum"]
_REDUCTIONS = ("l1", "l2", "sum")


@runtime_checkable
class Granularity(Protocol):
    """What every granularity provides."""

    def check(self, shape: tuple[int, ...], path: str) -> None:
        """Raises ``ValueError`` naming ``path`` if ``shape`` does not fit."""

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the group scores of a leaf of ``shape``."""

    def group_scores(self, scores: jax.Array, reduce: Reduce = "l1") -> jax.Array:
        """Reduces element scores to one score per group."""

    def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Broadcasts a group mask back to the element shape."""

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself fixes (:class:`NM`), or ``None``
        when a target chooses it. A pattern that fixes it selects alone,
        with ``keep(scores) -> element mask``."""


def reduce_scores(x: jax.Array, axes: tuple[int, ...], reduce: Reduce) -> jax.Array:
    """Reduces element scores over ``axes`` to group scores: ``"l1"`` (sum
    of absolute values), ``"l2"`` (Euclidean norm) or ``"sum"``, in at
    least float32."""
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    if jnp.dtype(x.dtype).itemsize < 4:
        x = x.astype(jnp.float32)
    if reduce == "l1":
        return jnp.sum(jnp.abs(x), axis=axes)
    if reduce == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))
    return jnp.sum(x, axis=axes)


def _axis(axis: int, shape: tuple[int, ...], path: str, pattern: object) -> int:
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"{path}: axis {axis} is out of range for shape {shape} ({pattern})"
        )
    return axis % len(shape)


def _split_axis(shape: tuple[int, ...], axis: int, inner: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` split into ``(shape[axis] // inner, inner)``."""
    return (*shape[:axis], shape[axis] // inner, inner, *shape[axis + 1 :])


class _SplitAxis:
    """Groups made by splitting ``axis`` into ``(outer, inner)`` and reducing
    one of the two: the inner part (runs of consecutive entries, as N:M) or
    the outer part (entries with the same residue, as strides)."""

    axis: int
    _reduce_inner: bool
    # Each subclass defines _inner, the length of the split-off inner axis.
    _inner: int
    fixed_sparsity = None

    def _reduced(self, axis: int) -> int:
        return axis + 1 if self._reduce_inner else axis

    def check(self, shape: tuple[int, ...], path: str) -> None:
        axis = _axis(self.axis, shape, path, self)
        if shape[axis] % self._inner:
            raise ValueError(
                f"{path}: shape {tuple(shape)} is not divisible by {self} "
                f"along axis {self.axis}"
            )

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = self.axis % len(shape)
        split = _split_axis(tuple(shape), axis, self._inner)
        return split[: self._reduced(axis)] + split[self._reduced(axis) + 1 :]

    def group_scores(self, scores: jax.Array, reduce: Reduce = "l1") -> jax.Array:
        axis = self.axis % scores.ndim
        split = _split_axis(scores.shape, axis, self._inner)
        return reduce_scores(scores.reshape(split), (self._reduced(axis),), reduce)

    def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        axis = self.axis % len(shape)
        split = _split_axis(tuple(shape), axis, self._inner)
        wide = jnp.expand_dims(group_mask, self._reduced(axis))
        return jnp.broadcast_to(wide, split).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Element:
    """Unstructured: every entry is its own group; scores are used as given."""

    fixed_sparsity = None

    def check(self, shape: tuple[int, ...], path: str) -> None:
        del shape, path

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def group_scores(self, scores: jax.Array, reduce: Reduce = "l1") -> jax.Array:
        del reduce
        return scores

    def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        del shape
        return group_mask


@dataclasses.dataclass(frozen=True)
class Block:
    """Dense blocks of ``shape`` over the trailing dimensions of a leaf.

    A block with fewer dimensions than the leaf covers its last dimensions
    (size 1 along the leading ones). Stored with one index per block.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> js.Block((2, 2)).group_scores(jnp.arange(16.0).reshape(4, 4))
      Array([[10., 18.],
             [42., 50.]], dtype=float32)
    """

    fixed_sparsity = None

    shape: tuple[int, ...]

    def __post_init__(self):
        shape = tuple(self.shape) if not isinstance(self.shape, int) else (self.shape,)
        if not shape:
            raise ValueError("Block: shape must have at least one dimension")
        for dim in shape:
            _tree.check_positive_int(dim, f"Block{shape}: every block dimension")
        object.__setattr__(self, "shape", shape)

    def _full(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * (len(shape) - len(self.shape)) + self.shape

    def check(self, shape: tuple[int, ...], path: str) -> None:
        if len(self.shape) > len(shape) or any(
            d % b for d, b in zip(shape, self._full(shape))
        ):
            raise ValueError(f"{path}: shape {tuple(shape)} is not divisible by {self}")

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(d // b for d, b in zip(shape, self._full(shape)))

    def group_scores(self, scores: jax.Array, reduce: Reduce = "l1") -> jax.Array:
        full = self._full(scores.shape)
        split = [x for d, b in zip(scores.shape, full) for x in (d // b, b)]
        return reduce_scores(
            scores.reshape(split), tuple(range(1, len(split), 2)), reduce
        )

    def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        full = self._full(shape)
        split = [x for d, b in zip(shape, full) for x in (d // b, b)]
        wide = jnp.expand_dims(group_mask, tuple(range(1, len(split), 2)))
        return jnp.broadcast_to(wide, split).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Channel:
    """All entries sharing an index along ``axis``: a neuron of a dense kernel
    ``(in, out)`` with ``axis=-1``, a filter of a conv kernel ``HWIO`` with
    ``axis=-1``, an input channel with ``axis=-2``.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> scores = jnp.array([[1.0, -5.0, 0.5], [2.0, 1.0, 0.5]])
      >>> js.Channel(-1).group_scores(scores)  # one score per output neuron
      Array([3., 6., 1.], dtype=float32)
    """

    fixed_sparsity = None

    axis: int = -1

    def check(self, shape: tuple[int, ...], path: str) -> None:
        _axis(self.axis, shape, path, self)

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[self.axis],)

    def group_scores(self, scores: jax.Array, reduce: Reduce = "l1") -> jax.Array:
        axis = self.axis % scores.ndim
        others = tuple(a for a in range(scores.ndim) if a != axis)
        return reduce_scores(scores, others, reduce)

    def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        axis = self.axis % len(shape)
        others = tuple(a for a in range(len(shape)) if a != axis)
        return jnp.broadcast_to(jnp.expand_dims(group_mask, others), shape)


@dataclasses.dataclass(frozen=True)
class Strided(_SplitAxis):
    """Entries along ``axis`` whose index has the same residue modulo
    ``stride``, separately for every position of the other axes.

    A kept group is then described by an offset and the stride: index
    ``r, r + stride, r + 2 * stride, ...`` of each fibre along ``axis``.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> js.Strided(2).group_scores(jnp.array([[1.0, 10.0, 2.0, 20.0]]))
      Array([[ 3., 30.]], dtype=float32)
    """

    stride: int
    axis: int = -1

    def __post_init__(self):
        _tree.check_positive_int(
            self.stride, f"Strided(stride={self.stride!r}): stride"
        )

    _reduce_inner = False

    @property
    def _inner(self) -> int:
        return self.stride


@dataclasses.dataclass(frozen=True)
class NM(_SplitAxis):
    """Keep exactly ``n`` of every ``m`` consecutive entries along ``axis``.

    The sparsity is fixed at ``1 - n / m``. Within a group the higher scores
    are kept; equal scores keep the earlier entry; NaN ranks lowest.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> js.NM(2, 4).keep(jnp.array([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]]))
      Array([[False,  True,  True, False,  True,  True, False, False]], dtype=bool)
    """

    n: int
    m: int
    axis: int = -1

    def __post_init__(self):
        _tree.check_positive_int(self.n, f"NM({self.n!r}, {self.m!r}): n")
        _tree.check_positive_int(self.m, f"NM({self.n!r}, {self.m!r}): m")
        if self.n > self.m:
            raise ValueError(f"NM: n must not exceed m, got {self.n}:{self.m}")

    @property
    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    _reduce_inner = True

    @property
    def _inner(self) -> int:
        return self.m

    def keep(self, scores: jax.Array) -> jax.Array:
        """Element mask keeping the ``n`` highest scores of each group of ``m``."""
        axis = self.axis % scores.ndim
        keys = jnp.moveaxis(order_key(scores), axis, -1)
        moved = keys.shape
        keys = keys.reshape(_split_axis(moved, len(moved) - 1, self.m))
        ki, kj = keys[..., :, None], keys[..., None, :]
        earlier = jnp.arange(self.m)[None, :] < jnp.arange(self.m)[:, None]
        earlier = earlier.reshape((1,) * (keys.ndim - 1) + earlier.shape)
        rank = jnp.sum((kj > ki) | ((kj == ki) & earlier), axis=-1)
        keep = (rank < self.n).reshape(moved)
        return jnp.moveaxis(keep, -1, axis)


def num_groups(granularity: Granularity, shape: tuple[int, ...]) -> int:
    """Number of groups a leaf of ``shape`` has under ``granularity``.

    Example:
      >>> import jaxsparse as js
      >>> num_groups(js.Block((2, 4)), (8, 8)), num_groups(js.Channel(0), (8, 3))
      (8, 8)
    """
    return math.prod(granularity.group_shape(shape))


def check_granularity(granularity: object) -> None:
    """Raises ``TypeError`` unless ``granularity`` is a :class:`Granularity`."""
    if not isinstance(granularity, Granularity):
        raise TypeError(
            "granularity must be Element(), Block(...), NM(...), Channel(...) or "
            f"Strided(...), got {granularity!r}"
        )
