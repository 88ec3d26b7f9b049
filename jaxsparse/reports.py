"""Sparsity statistics of params and masks: a jittable fraction and an
eager per-leaf report.

References:
  Hoefler et al. 2021, §2.2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _tree
from jaxsparse._types import LeafSelector


def _zero(x: jax.Array) -> jax.Array:
    return ~x if x.dtype == jnp.bool_ else x == 0


def sparsity(tree: Any, *, include: LeafSelector = None) -> jax.Array:
    """Fraction of zero entries (``False`` for masks) over the selected leaves.

    Jittable; returns a float32 scalar (0 when nothing is selected).

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> float(js.sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 0.0]])}))
      0.75
    """
    leaves = [x for _, x in _tree.selected(tree, include)]
    size = sum(x.size for x in leaves)
    if size == 0:
        return jnp.zeros((), jnp.float32)
    zeros = sum(jnp.sum(_zero(jnp.asarray(x)), dtype=jnp.int32) for x in leaves)
    return (zeros / size).astype(jnp.float32)


class LeafSparsity(NamedTuple):
    """Sparsity of one leaf."""

    path: str
    shape: tuple[int, ...]
    size: int
    nonzeros: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.size if self.size else 0.0


class SparsityReport(NamedTuple):
    """Per-leaf and total sparsity; ``str()`` gives a table."""

    leaves: tuple[LeafSparsity, ...]

    @property
    def size(self) -> int:
        return sum(leaf.size for leaf in self.leaves)

    @property
    def nonzeros(self) -> int:
        return sum(leaf.nonzeros for leaf in self.leaves)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.size if self.size else 0.0

    def __str__(self) -> str:
        header = ("path", "shape", "size", "non-zeros", "sparsity")
        rows = [
            (leaf.path, str(leaf.shape), leaf.size, leaf.nonzeros, leaf.sparsity)
            for leaf in self.leaves
        ]
        rows.append(("total", "", self.size, self.nonzeros, self.sparsity))
        cells = [header] + [
            (path, shape, str(size), str(nnz), f"{sp:.2%}")
            for path, shape, size, nnz, sp in rows
        ]
        widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if c < 2 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
            for row in cells
        )


def sparsity_report(tree: Any, *, include: LeafSelector = None) -> SparsityReport:
    """Counts the non-zero entries (``True`` for masks) of the selected leaves.

    Eager: reads values on the host. Works for params and for masks.

    Example:
      >>> import jax.numpy as jnp, jaxsparse as js
      >>> print(js.sparsity_report({"w": jnp.array([[0.0, 1.0], [0.0, 2.0]])}))
      path   shape   size  non-zeros  sparsity
      w      (2, 2)     4          2    50.00%
      total             4          2    50.00%
    """
    leaves = []
    for path, leaf in _tree.selected(tree, include):
        values = np.asarray(leaf)
        leaves.append(
            LeafSparsity(
                _tree.path_str(path),
                tuple(values.shape),
                int(values.size),
                int(np.count_nonzero(values)),
            )
        )
    return SparsityReport(tuple(leaves))
