"""The analytical storage model over formats and the storage report of a
params tree.

For formats whose size depends on where the non-zeros are, the model takes
those facts (:func:`facts` reads them off a tensor) or assumes uniformly
random positions (:func:`jaxsparse.formats.expected_max_gap`,
:func:`jaxsparse.formats.expected_padded_entries`).
Given the same facts as a tensor, :func:`model_bits` equals the encoder's
``bits`` (:func:`jaxsparse.formats.encode`).

References:
  Hoefler et al. 2021, §2.2 (Fig. 5: storage overheads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxsparse import _tree
from jaxsparse.formats import (
    FORMATS,
    as_flat,
    distances,
    encode,
    get_format,
    matrix_shape,
    padded_width,
)


def model_bits(
    format: str,
    n: int,
    m: int,
    k: int,
    **facts: Any,
) -> float:
    """The analytical size in bits of ``m`` non-zeros of ``k`` bits in ``n``
    slots.

    Formats that depend on where the non-zeros are take that as keyword
    facts; left out, they assume uniformly random positions: ``max_gap``
    (delta, :func:`~jaxsparse.formats.expected_max_gap`), ``padded_entries``
    and ``span`` (padded delta,
    :func:`~jaxsparse.formats.expected_padded_entries`), ``rows`` (CSR/CSC: the
    tensor as ``rows x n / rows``, default square), ``block`` and ``blocks``
    (BCSR), ``nm`` (N:M).

    Given the same facts as the tensor, this equals the encoder's ``bits``.

    Example:
      >>> model_bits("bitmap", 100, 10, 8)
      180
      >>> model_bits("coo", 100, 10, 8)
      150
    """
    return get_format(format).model(n, m, k, **facts)


def facts(x) -> dict[str, Any]:
    """The position facts :func:`model_bits` needs for the tensor ``x``."""
    flat, shape = as_flat(x)
    offsets = np.flatnonzero(flat)
    gaps = distances(offsets)
    m = offsets.size
    span = int(offsets[-1]) + 1 if m else 0
    width = padded_width(flat.size, m, span)
    pads = int(np.sum(-(-gaps // 2**width) - 1)) if m else 0
    return {
        "max_gap": int(gaps.max()) if m else 1,
        "span": span,
        "padded_entries": m + pads,
        "rows": matrix_shape(shape)[0],
    }


def best_format(
    n: int, m: int, k: int, *, formats=FORMATS, **info
) -> tuple[str, float]:
    """The cheapest of ``formats`` by :func:`model_bits` and its size.

    Example:
      >>> best_format(10**8, 10**7, 8)[0]  # 90 % sparse
      'padded_delta'
    """
    sizes = {f: model_bits(f, n, m, k, **info) for f in formats}
    name = min(sizes, key=sizes.get)
    return name, sizes[name]


@dataclasses.dataclass(frozen=True)
class LeafStorage:
    """Storage of one leaf: the cheapest format for its actual non-zeros."""

    path: str
    shape: tuple[int, ...]
    nonzeros: int
    format: str
    bits: int
    dense_bits: int


@dataclasses.dataclass(frozen=True)
class StorageReport:
    """Per-leaf storage and the total against dense; ``str()`` is a table."""

    leaves: tuple[LeafStorage, ...]

    @property
    def bits(self) -> int:
        return sum(leaf.bits for leaf in self.leaves)

    @property
    def dense_bits(self) -> int:
        return sum(leaf.dense_bits for leaf in self.leaves)

    def __str__(self) -> str:
        header = ("path", "shape", "nnz", "format", "bytes", "dense bytes")
        lines = ["{:<24} {:<16} {:>9} {:<13} {:>11} {:>11}".format(*header)]
        for leaf in self.leaves:
            shape = str(leaf.shape)
            lines.append(
                f"{leaf.path:<24} {shape:<16} {leaf.nonzeros:>9} "
                f"{leaf.format:<13} {leaf.bits / 8:>11.0f} {leaf.dense_bits / 8:>11.0f}"
            )
        ratio = self.bits / max(self.dense_bits, 1)
        lines.append(
            f"{'total':<24} {'':<16} {'':>9} {'':<13} {self.bits / 8:>11.0f} "
            f"{self.dense_bits / 8:>11.0f}  ({ratio:.1%} of dense)"
        )
        return "\n".join(lines)


def storage_report(params, *, k: int | None = None, formats=FORMATS) -> StorageReport:
    """Encodes every array leaf in each of ``formats`` and keeps the smallest.

    Args:
      params: a pytree of (pruned) arrays.
      k: bits per value (default: each leaf's dtype width).
      formats: the formats to consider.
    """
    leaves = []
    for path, x in _tree.leaves_with_path(params):
        if x is None:
            continue
        sizes = {f: encode(x, f, k=k).bits for f in formats}
        name = min(sizes, key=sizes.get)
        leaves.append(
            LeafStorage(
                _tree.path_str(path),
                tuple(np.shape(x)),
                int(np.count_nonzero(np.asarray(x))),
                name,
                sizes[name],
                encode(x, "dense", k=k).bits,
            )
        )
    return StorageReport(tuple(leaves))
