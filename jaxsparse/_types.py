"""The vocabulary of jaxsparse, defined once and imported everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
from jax.typing import ArrayLike

KeyPath: TypeAlias = tuple[Any, ...]
"""A key path as produced by :func:`jax.tree_util.tree_flatten_with_path`."""

Params: TypeAlias = Any
"""A pytree of parameter arrays (dict, tuple, NamedTuple, ``nnx.State``...)."""

Scores: TypeAlias = Any
"""A pytree of float arrays mirroring the params; higher means keep."""

Mask: TypeAlias = Any
"""A pytree mirroring the params: a ``bool`` array per pruned leaf (``True``
keeps the entry) and ``None`` per leaf left dense."""

Sparsity: TypeAlias = ArrayLike
"""A fraction of entries to remove, in ``[0, 1)``; a Python number or a
(possibly traced) scalar array."""

SparsityTree: TypeAlias = Any
"""A pytree mirroring the params with a :data:`Sparsity` per pruned leaf and
``None`` per dense leaf."""

LeafSelector: TypeAlias = Callable[[KeyPath, jax.Array], bool] | str | None
"""Which leaves are pruned: ``None`` (floating arrays with ``ndim >= 2``), a predicate
on ``(key_path, leaf)``, or a regular expression searched for in the
``/``-joined key path (``"Dense_0/kernel"``)."""

LossFn: TypeAlias = Callable[..., jax.Array]
"""``loss_fn(params, *batch) -> scalar``: the params first, then the batch."""

Criterion: TypeAlias = Callable[..., Scores]
"""``criterion(params=..., grads=..., key=..., **extra) -> scores``: called
by keyword, taking only the arguments it names (``js.saliency.magnitude``
takes ``params``; ``taylor`` takes ``params`` and ``grads``)."""

Schedule: TypeAlias = Callable[[ArrayLike], Any]
"""``schedule(count) -> Target``: a function of the step count returning a
:class:`jaxsparse.schedules.Target` (the sparsity, whether to recompute the
mask, whether the phase is dense); jittable."""
