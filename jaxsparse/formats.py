"""Storage formats for sparse tensors with exact bit accounting.

Every encoder returns an :class:`Encoding` whose ``bits`` are the payload the
format prescribes (values at ``k`` bits, indices at the format's width) and
equal :func:`model_bits` for the same tensor; ``metadata_bits`` counts the
header (shape, counts, widths) on top. Decoders invert exactly and raise
``ValueError`` on inconsistent encodings. Encoding runs on the host (numpy),
since the sizes depend on the data; jax arrays are accepted.

For ``n`` slots holding ``m`` non-zeros of ``k`` bits (``lg = ceil(log2)``):

================  ==================================================
dense             ``n k``
bitmap            ``n + m k``
coo               ``m (k + lg n)``
delta             ``m (k + lg d_max)``; gaps ``d >= 1`` stored as ``d - 1``
padded_delta      ``m' (k + b)``, ``b = lg d_mean``; each distance ``d`` is
                  stored as ``d - 1`` (``b`` bits hold ``1 ... 2^b``), a
                  distance above ``2^b`` is bridged by explicit zero
                  entries that each advance ``2^b`` slots; ``m'`` counts
                  them
csr / csc         ``m lg n_c + (n_r + 1) lg(m + 1) + m k`` (rows / columns
                  of the tensor viewed as ``shape[0] x rest``)
bcsr              the same over blocks: one column index per non-zero block
nm                ``(n / M) N (k + lg M)``: ``N`` values and in-group indices
                  per group of ``M``
================  ==================================================

The survey's simpler CSR count, ``m lg n_c + n_r lg m + m k``, is
:func:`survey_csr_bits`; the exact one above also stores the final row
pointer and lets it reach ``m``.

References:
  Hoefler et al. 2021, §2.2 (Fig. 5: storage overheads); Saad 2003 (CSR).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxsparse import _tree

FORMATS = ("dense", "bitmap", "coo", "delta", "padded_delta", "csr", "csc")
_HEADER_FIELD_BITS = 64


def lg(x: int) -> int:
    """``ceil(log2 x)`` for ``x >= 1`` (0 for ``x <= 1``), exactly, for any size."""
    return max(int(x) - 1, 0).bit_length()


def index_dtype(n: int) -> np.dtype:
    """Smallest signed integer type that holds offsets below ``n``: int64
    from ``n >= 2**31`` on."""
    return np.dtype(np.int64) if n > 2**31 - 1 else np.dtype(np.int32)


@dataclasses.dataclass(frozen=True)
class Encoding:
    """An encoded tensor.

    Attributes:
      format: the format's name.
      shape: the tensor's shape.
      dtype: the values' dtype.
      k: bits per stored value.
      arrays: the stored arrays by name.
      meta: small integers the decoder needs (widths, block shape, ...).
      bits: the payload size in bits, as the format prescribes.
    """

    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    k: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    bits: int

    @property
    def metadata_bits(self) -> int:
        """Header: the shape, the number of stored entries and each meta field
        at 64 bits."""
        return _HEADER_FIELD_BITS * (len(self.shape) + 1 + len(self.meta))

    @property
    def total_bits(self) -> int:
        return self.bits + self.metadata_bits


def _flat(x) -> tuple[np.ndarray, tuple[int, ...]]:
    a = np.asarray(x)
    return a.reshape(-1), tuple(a.shape)


def _value_bits(a: np.ndarray, k: int | None) -> int:
    return int(a.dtype.itemsize * 8 if k is None else k)


def _gaps(offsets: np.ndarray) -> np.ndarray:
    """Gaps between consecutive offsets, the first from -1 (all >= 1)."""
    return np.diff(offsets.astype(np.int64), prepend=-1)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def encode(x, format: str, *, k: int | None = None, block=None, nm=None) -> Encoding:
    """Encodes ``x`` in ``format`` (see the module table).

    Args:
      x: a numpy or jax array of any shape.
      format: one of :data:`FORMATS`, ``"bcsr"`` (needs ``block=(r, c)``)
        or ``"nm"`` (needs ``nm=(N, M)``, groups along the last axis).
      k: bits per value (default: the dtype's width).

    Returns:
      An :class:`Encoding`.

    Raises:
      ValueError: an unknown format, or a tensor the pattern does not fit.
    """
    flat, shape = _flat(x)
    kk = _value_bits(flat, k)
    n = flat.size
    offsets = np.flatnonzero(flat).astype(index_dtype(n))
    values = flat[offsets]
    m = offsets.size

    def make(arrays, meta, bits):
        return Encoding(format, shape, flat.dtype, kk, arrays, meta, int(bits))

    if format == "dense":
        return make({"values": flat.copy()}, {}, n * kk)
    if format == "bitmap":
        return make({"bitmap": flat != 0, "values": values}, {}, n + m * kk)
    if format == "coo":
        return make({"offsets": offsets, "values": values}, {}, m * (kk + lg(n)))
    if format == "delta":
        gaps = _gaps(offsets)
        width = lg(int(gaps.max())) if m else 0
        return make(
            {"gaps": (gaps - 1).astype(index_dtype(n)), "values": values},
            {"width": width},
            m * (kk + width),
        )
    if format == "padded_delta":
        gaps = _gaps(offsets)
        width = padded_width(n, m, int(offsets[-1]) + 1 if m else 0)
        reach = 2**width
        stored, stored_values = [], []
        for gap, value in zip(gaps.tolist(), values.tolist()):
            # A padding entry (value 0) advances the full reach of a code.
            pads = -(-gap // reach) - 1
            stored.extend([reach - 1] * pads)
            stored_values.extend([0] * pads)
            stored.append(gap - pads * reach - 1)
            stored_values.append(value)
        count = len(stored)
        return make(
            {
                "gaps": np.asarray(stored, index_dtype(n)),
                "values": np.asarray(stored_values, flat.dtype),
            },
            {"width": width},
            count * (kk + width),
        )
    if format in ("csr", "csc"):
        rows, cols = _matrix_shape(shape)
        matrix = flat.reshape(rows, cols)
        if format == "csc":
            matrix = matrix.T
        r, c = np.nonzero(matrix)
        counts = np.bincount(r, minlength=matrix.shape[0])
        pointer = np.concatenate([[0], np.cumsum(counts)])
        return make(
            {
                "indices": c.astype(index_dtype(matrix.shape[1])),
                "pointer": pointer.astype(index_dtype(m + 1)),
                "values": matrix[r, c],
            },
            {},
            csr_bits(matrix.shape[0], matrix.shape[1], m, kk),
        )
    if format == "bcsr":
        if block is None:
            raise ValueError("bcsr needs block=(rows, cols)")
        rows, cols = _matrix_shape(shape)
        br, bc = block
        if rows % br or cols % bc:
            raise ValueError(
                f"shape {shape} viewed as ({rows}, {cols}) is not divisible "
                f"by block {block}"
            )
        blocks = flat.reshape(rows // br, br, cols // bc, bc).transpose(0, 2, 1, 3)
        nonzero = np.any(blocks != 0, axis=(2, 3))
        r, c = np.nonzero(nonzero)
        pointer = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=rows // br))])
        mb = r.size
        return make(
            {
                "indices": c.astype(index_dtype(cols // bc)),
                "pointer": pointer.astype(index_dtype(mb + 1)),
                "values": blocks[r, c].reshape(-1),
            },
            {"block_rows": br, "block_cols": bc},
            bcsr_bits(rows, cols, br, bc, mb, kk),
        )
    if format == "nm":
        if nm is None:
            raise ValueError("nm needs nm=(N, M)")
        keep, group = nm
        if not shape or shape[-1] % group:
            raise ValueError(f"shape {shape} is not divisible by groups of {group}")
        groups = flat.reshape(-1, group)
        counts = np.count_nonzero(groups, axis=1)
        if np.any(counts > keep):
            raise ValueError(
                f"the tensor has more than {keep} non-zeros in a group of {group}"
            )
        # The positions of the non-zeros first (stably), then the earliest
        # zeros to fill N slots.
        order = np.argsort(groups == 0, axis=1, kind="stable")[:, :keep]
        order = np.sort(order, axis=1)
        return make(
            {
                "indices": order.astype(np.int32),
                "values": np.take_along_axis(groups, order, axis=1),
            },
            {"n": keep, "m": group},
            nm_bits(n, keep, group, kk),
        )
    raise ValueError(f"unknown format {format!r}; known: {(*FORMATS, 'bcsr', 'nm')}")


def padded_width(n: int, m: int, span: int) -> int:
    """``b = ceil(log2 d_mean)`` with ``d_mean = span / m`` the mean distance
    (``span`` = last offset + 1); 0 when every slot up to ``span`` is
    non-zero (each distance is then 1)."""
    if m == 0 or span <= m:
        return 0
    return math.ceil(math.log2(span / m))


def csr_bits(rows: int, cols: int, m: int, k: int) -> int:
    """Exact CSR payload: ``m lg cols + (rows + 1) lg(m + 1) + m k``."""
    return m * lg(cols) + (rows + 1) * lg(m + 1) + m * k


def survey_csr_bits(rows: int, cols: int, m: int, k: int) -> int:
    """The survey's CSR count ``m lg cols + rows lg m + m k`` (§2.2)."""
    return m * lg(cols) + rows * lg(m) + m * k


def bcsr_bits(rows: int, cols: int, br: int, bc: int, blocks: int, k: int) -> int:
    """Block CSR: one column index per non-zero block, block-row pointers,
    and every value of the stored blocks."""
    return (
        blocks * lg(cols // bc)
        + (rows // br + 1) * lg(blocks + 1)
        + blocks * br * bc * k
    )


def nm_bits(n: int, keep: int, group: int, k: int) -> int:
    """N:M compressed storage: ``(n / M) N (k + lg M)``."""
    return (n // group) * keep * (k + lg(group))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"inconsistent encoding: {message}")


def decode(enc: Encoding) -> np.ndarray:
    """The dense tensor an :class:`Encoding` stores.

    Raises:
      ValueError: arrays whose lengths disagree, offsets or indices out of
        range, or pointers that are not monotone.
    """
    n = math.prod(enc.shape)
    a = enc.arrays
    out = np.zeros(n, enc.dtype)
    fmt = enc.format
    if fmt == "dense":
        _check(a["values"].size == n, "dense values do not fill the shape")
        return a["values"].reshape(enc.shape).copy()
    if fmt == "bitmap":
        bitmap = a["bitmap"].reshape(-1)
        _check(bitmap.size == n, "bitmap length differs from the shape")
        _check(int(bitmap.sum()) == a["values"].size, "bitmap and values disagree")
        out[bitmap] = a["values"]
        return out.reshape(enc.shape)
    if fmt == "coo":
        off = a["offsets"]
        _check(off.size == a["values"].size, "offsets and values differ in length")
        _check(bool(np.all((off >= 0) & (off < n))), "an offset is out of range")
        out[off] = a["values"]
        return out.reshape(enc.shape)
    if fmt in ("delta", "padded_delta"):
        gaps = a["gaps"].astype(np.int64)
        _check(gaps.size == a["values"].size, "gaps and values differ in length")
        width = enc.meta["width"]
        _check(bool(np.all((gaps >= 0) & (gaps < 2**width))), "a gap exceeds its width")
        offsets = np.cumsum(gaps + 1) - 1
        _check(offsets.size == 0 or offsets[-1] < n, "an offset is out of range")
        out[offsets] = a["values"]
        return out.reshape(enc.shape)
    if fmt in ("csr", "csc"):
        rows, cols = _matrix_shape(enc.shape)
        if fmt == "csc":
            rows, cols = cols, rows
        pointer, indices = a["pointer"].astype(np.int64), a["indices"]
        _check(pointer.size == rows + 1, "the pointer length differs from the rows")
        _check(
            pointer[0] == 0 and bool(np.all(np.diff(pointer) >= 0)),
            "pointers are not monotone",
        )
        _check(
            pointer[-1] == indices.size == a["values"].size,
            "pointer, indices and values disagree",
        )
        _check(
            bool(np.all((indices >= 0) & (indices < cols))), "an index is out of range"
        )
        matrix = np.zeros((rows, cols), enc.dtype)
        r = np.repeat(np.arange(rows), np.diff(pointer))
        matrix[r, indices] = a["values"]
        if fmt == "csc":
            matrix = matrix.T
        return matrix.reshape(enc.shape)
    if fmt == "bcsr":
        rows, cols = _matrix_shape(enc.shape)
        br, bc = enc.meta["block_rows"], enc.meta["block_cols"]
        pointer, indices = a["pointer"].astype(np.int64), a["indices"]
        _check(
            pointer.size == rows // br + 1,
            "the pointer length differs from the block rows",
        )
        _check(
            pointer[0] == 0 and bool(np.all(np.diff(pointer) >= 0)),
            "pointers are not monotone",
        )
        _check(pointer[-1] == indices.size, "pointer and indices disagree")
        _check(
            a["values"].size == indices.size * br * bc, "values do not fill the blocks"
        )
        _check(
            bool(np.all((indices >= 0) & (indices < cols // bc))),
            "an index is out of range",
        )
        blocks = np.zeros((rows // br, cols // bc, br, bc), enc.dtype)
        r = np.repeat(np.arange(rows // br), np.diff(pointer))
        blocks[r, indices] = a["values"].reshape(-1, br, bc)
        return blocks.transpose(0, 2, 1, 3).reshape(enc.shape)
    if fmt == "nm":
        keep, group = enc.meta["n"], enc.meta["m"]
        idx, vals = a["indices"], a["values"]
        _check(
            idx.shape == vals.shape == (n // group, keep),
            "indices and values do not fit",
        )
        _check(
            bool(np.all((idx >= 0) & (idx < group))),
            "an in-group index is out of range",
        )
        _check(
            bool(np.all(np.diff(np.sort(idx, axis=1), axis=1) > 0)),
            "in-group indices repeat",
        )
        groups = np.zeros((n // group, group), enc.dtype)
        np.put_along_axis(groups, idx, vals, axis=1)
        return groups.reshape(enc.shape)
    raise ValueError(f"unknown format {fmt!r}")


def expected_padded_entries(n: int, m: int, width: int) -> float:
    """Expected stored entries of ``padded_delta`` when the ``m`` non-zeros
    are placed uniformly at random among ``n`` slots: distances are close to
    geometric with ``P(d > t) = s^t``, ``s = 1 - m/n``, so each needs
    ``sum_j P(d > j L) = s^L / (1 - s^L)`` pads on average, ``L = 2^width``
    (the reach of one code)."""
    if m == 0:
        return 0.0
    s = 1.0 - m / n
    limit = 2**width
    tail = s**limit
    return m * (1.0 + tail / (1.0 - tail)) if tail < 1 else math.inf


def expected_max_gap(n: int, m: int) -> int:
    """Expected largest gap of ``m`` uniformly random non-zeros among ``n``
    (the ``1 - 1/m`` quantile of the geometric gap), at least 1."""
    if m == 0 or m >= n:
        return 1
    s = 1.0 - m / n
    return max(1, math.ceil(math.log(m) / -math.log(s)) if m > 1 else 1)


def model_bits(
    format: str,
    n: int,
    m: int,
    k: int,
    *,
    max_gap: int | None = None,
    padded_entries: float | None = None,
    span: int | None = None,
    rows: int | None = None,
    block: tuple[int, int] | None = None,
    blocks: int | None = None,
    nm: tuple[int, int] | None = None,
) -> float:
    """The analytical size in bits of ``m`` non-zeros of ``k`` bits in ``n``
    slots.

    Formats that depend on where the non-zeros are take that as arguments;
    left out, they assume uniformly random positions: ``max_gap`` (delta,
    :func:`expected_max_gap`), ``padded_entries`` and ``span`` (padded
    delta, :func:`expected_padded_entries`), ``rows`` (CSR/CSC: the tensor
    as ``rows x n / rows``, default square), ``block`` and ``blocks`` (BCSR),
    ``nm`` (N:M).

    Given the same facts as the tensor, this equals the encoder's ``bits``.
    """
    if format == "dense":
        return n * k
    if format == "bitmap":
        return n + m * k
    if format == "coo":
        return m * (k + lg(n))
    if format == "delta":
        return m * (k + lg(max_gap if max_gap is not None else expected_max_gap(n, m)))
    if format == "padded_delta":
        width = padded_width(n, m, span if span is not None else n)
        entries = (
            padded_entries
            if padded_entries is not None
            else expected_padded_entries(n, m, width)
        )
        return entries * (k + width)
    if format in ("csr", "csc"):
        r = rows if rows is not None else math.isqrt(n)
        c = n // r
        if format == "csc":
            r, c = c, r
        return csr_bits(r, c, m, k)
    if format == "bcsr":
        if block is None or blocks is None or rows is None:
            raise ValueError("bcsr needs rows, block and blocks")
        return bcsr_bits(rows, n // rows, block[0], block[1], blocks, k)
    if format == "nm":
        if nm is None:
            raise ValueError("nm needs nm=(N, M)")
        return nm_bits(n, nm[0], nm[1], k)
    raise ValueError(f"unknown format {format!r}")


def facts(x) -> dict[str, Any]:
    """The position facts :func:`model_bits` needs for the tensor ``x``."""
    flat, shape = _flat(x)
    offsets = np.flatnonzero(flat)
    gaps = _gaps(offsets)
    m = offsets.size
    span = int(offsets[-1]) + 1 if m else 0
    width = padded_width(flat.size, m, span)
    pads = int(np.sum(-(-gaps // 2**width) - 1)) if m else 0
    return {
        "max_gap": int(gaps.max()) if m else 1,
        "span": span,
        "padded_entries": m + pads,
        "rows": _matrix_shape(shape)[0],
    }


def best_format(
    n: int, m: int, k: int, *, formats=FORMATS, **info
) -> tuple[str, float]:
    """The cheapest of ``formats`` by :func:`model_bits` and its size."""
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


def to_bcoo(x):
    """A ``jax.experimental.sparse.BCOO`` holding the non-zeros of ``x``."""
    from jax.experimental import sparse

    return sparse.BCOO.fromdense(x)


def to_bcsr(x):
    """A ``jax.experimental.sparse.BCSR`` of a 2-D ``x``."""
    from jax.experimental import sparse

    if np.ndim(x) != 2:
        raise ValueError(f"BCSR needs a 2-D array, got shape {np.shape(x)}")
    return sparse.BCSR.fromdense(x)


def sparse_kernel(kernel, *, format: str = "bcsr"):
    """A dense layer's ``(in, out)`` kernel as a sparse ``(out, in)`` matrix
    (BCSR or BCOO), ready for :func:`sparse_dense_layer`: the sparse operand
    goes on the left, where both formats multiply."""
    if np.ndim(kernel) != 2:
        raise ValueError(f"a dense kernel is 2-D, got shape {np.shape(kernel)}")
    if format == "bcsr":
        return to_bcsr(kernel.T)
    if format == "bcoo":
        return to_bcoo(kernel.T)
    raise ValueError(f"format must be 'bcsr' or 'bcoo', got {format!r}")


def sparse_dense_layer(x, kernel_t, bias=None):
    """``x @ kernel + bias`` from :func:`sparse_kernel`'s transposed sparse
    kernel, computed as ``(kernel^T x^T)^T``."""
    import jax.numpy as jnp

    out = (kernel_t @ jnp.asarray(x).T).T
    return out if bias is None else out + bias[None, :]
