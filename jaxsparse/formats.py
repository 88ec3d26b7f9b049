"""Storage formats for sparse tensors with exact bit accounting.

Every encoder returns an :class:`Encoding` whose ``bits`` are the payload the
format prescribes (values at ``k`` bits, indices at the format's width) and
equal :func:`model_bits` for the same tensor; ``metadata_bits`` counts the
header (shape, counts, widths) on top. Decoders invert exactly and raise
``ValueError`` on inconsistent encodings. Encoding and decoding run on the
host (numpy; CSR and CSC expand through ``scipy.sparse``), since the sizes
depend on the data; jax arrays are accepted.

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

Each format is one :class:`Format` object holding its encoder, decoder
and analytical bit count together; :mod:`jaxsparse.storage` holds the model
over formats and the storage report, :mod:`jaxsparse.sparse_export` the
export to ``jax.experimental.sparse``.

References:
  Hoefler et al. 2021, §2.2 (Fig. 5: storage overheads); Saad 2003 (CSR).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import scipy.sparse

FORMATS = ("dense", "bitmap", "coo", "delta", "padded_delta", "csr", "csc")
_HEADER_FIELD_BITS = 64


def lg(x: int) -> int:
    """``ceil(log2 x)`` for ``x >= 1`` (0 for ``x <= 1``), exactly, for any size.

    Example:
      >>> [lg(x) for x in (1, 2, 3, 8, 9, 2**40)]
      [0, 1, 2, 3, 4, 40]
    """
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


def as_flat(x) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` as a flat numpy array and its shape."""
    a = np.asarray(x)
    return a.reshape(-1), tuple(a.shape)


def _value_bits(a: np.ndarray, k: int | None) -> int:
    return int(a.dtype.itemsize * 8 if k is None else k)


def distances(offsets: np.ndarray) -> np.ndarray:
    """Gaps between consecutive offsets, the first from -1 (all >= 1)."""
    return np.diff(offsets.astype(np.int64), prepend=-1)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The tensor viewed as ``shape[0] x rest`` (CSR/CSC/BCSR rows, columns)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


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


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"inconsistent encoding: {message}")


class Format:
    """One storage format: its encoder, decoder and bit counts together.

    Attributes:
      name: the format's name.
    """

    name: str = ""

    def encode(self, flat: np.ndarray, shape: tuple[int, ...], k: int, **options):
        """``(arrays, meta, bits)`` for the flattened tensor."""
        raise NotImplementedError

    def decode(self, enc: Encoding, n: int) -> np.ndarray:
        """The flattened (or shaped) dense tensor; checks consistency."""
        raise NotImplementedError

    def model(self, n: int, m: int, k: int, **facts) -> float:
        """The analytical size in bits (see :mod:`jaxsparse.storage`)."""
        raise NotImplementedError


class _Dense(Format):
    name = "dense"

    def encode(self, flat, shape, k, **options):
        return {"values": flat.copy()}, {}, flat.size * k

    def decode(self, enc, n):
        _check(enc.arrays["values"].size == n, "dense values do not fill the shape")
        return enc.arrays["values"].copy()

    def model(self, n, m, k, **facts):
        return n * k


class _Bitmap(Format):
    name = "bitmap"

    def encode(self, flat, shape, k, **options):
        nonzero = flat != 0
        return (
            {"bitmap": nonzero, "values": flat[nonzero]},
            {},
            flat.size + int(nonzero.sum()) * k,
        )

    def decode(self, enc, n):
        a = enc.arrays
        bitmap = a["bitmap"].reshape(-1)
        _check(bitmap.size == n, "bitmap length differs from the shape")
        _check(int(bitmap.sum()) == a["values"].size, "bitmap and values disagree")
        out = np.zeros(n, enc.dtype)
        out[bitmap] = a["values"]
        return out

    def model(self, n, m, k, **facts):
        return n + m * k


class _COO(Format):
    name = "coo"

    def encode(self, flat, shape, k, **options):
        n = flat.size
        offsets = np.flatnonzero(flat).astype(index_dtype(n))
        return (
            {"offsets": offsets, "values": flat[offsets]},
            {},
            offsets.size * (k + lg(n)),
        )

    def decode(self, enc, n):
        a = enc.arrays
        off = a["offsets"]
        _check(off.size == a["values"].size, "offsets and values differ in length")
        _check(bool(np.all((off >= 0) & (off < n))), "an offset is out of range")
        out = np.zeros(n, enc.dtype)
        out[off] = a["values"]
        return out

    def model(self, n, m, k, **facts):
        return m * (k + lg(n))


def _decode_distances(enc, n):
    """Shared by both delta formats: codes ``d - 1`` at ``width`` bits."""
    a = enc.arrays
    gaps = a["gaps"].astype(np.int64)
    _check(gaps.size == a["values"].size, "gaps and values differ in length")
    width = enc.meta["width"]
    _check(bool(np.all((gaps >= 0) & (gaps < 2**width))), "a gap exceeds its width")
    offsets = np.cumsum(gaps + 1) - 1
    _check(offsets.size == 0 or offsets[-1] < n, "an offset is out of range")
    out = np.zeros(n, enc.dtype)
    out[offsets] = a["values"]
    return out


class _Delta(Format):
    name = "delta"

    def encode(self, flat, shape, k, **options):
        n = flat.size
        offsets = np.flatnonzero(flat)
        gaps = distances(offsets)
        m = offsets.size
        width = lg(int(gaps.max())) if m else 0
        return (
            {"gaps": (gaps - 1).astype(index_dtype(n)), "values": flat[offsets]},
            {"width": width},
            m * (k + width),
        )

    def decode(self, enc, n):
        return _decode_distances(enc, n)

    def model(self, n, m, k, *, max_gap=None, **facts):
        return m * (k + lg(max_gap if max_gap is not None else expected_max_gap(n, m)))


class _PaddedDelta(Format):
    name = "padded_delta"

    def encode(self, flat, shape, k, **options):
        n = flat.size
        offsets = np.flatnonzero(flat)
        values = flat[offsets]
        gaps = distances(offsets)
        m = offsets.size
        width = padded_width(n, m, int(offsets[-1]) + 1 if m else 0)
        reach = 2**width
        # A padding entry (value 0) advances the full reach of a code; a gap
        # of g needs ceil(g / reach) - 1 of them before its own entry.
        pads = -(-gaps // reach) - 1 if m else np.zeros(0, np.int64)
        own = np.cumsum(pads + 1) - 1
        stored = np.full(int(own[-1]) + 1 if m else 0, reach - 1, np.int64)
        stored[own] = gaps - pads * reach - 1
        stored_values = np.zeros(stored.size, flat.dtype)
        stored_values[own] = values
        return (
            {
                "gaps": stored.astype(index_dtype(n)),
                "values": stored_values,
            },
            {"width": width},
            stored.size * (k + width),
        )

    def decode(self, enc, n):
        return _decode_distances(enc, n)

    def model(self, n, m, k, *, padded_entries=None, span=None, **facts):
        width = padded_width(n, m, span if span is not None else n)
        entries = (
            padded_entries
            if padded_entries is not None
            else expected_padded_entries(n, m, width)
        )
        return entries * (k + width)


class _Compressed(Format):
    """CSR (``by_columns=False``) or CSC over the tensor viewed as
    ``shape[0] x rest``."""

    def __init__(self, name: str, by_columns: bool):
        self.name = name
        self.by_columns = by_columns

    def encode(self, flat, shape, k, **options):
        rows, cols = matrix_shape(shape)
        matrix = flat.reshape(rows, cols)
        if self.by_columns:
            matrix = np.ascontiguousarray(matrix.T)
        # One pass for the nonzeros; a row's pointer is where its first flat
        # index would sort among them.
        rows, cols = matrix.shape
        at = np.flatnonzero(matrix)
        m = at.size
        pointer = np.searchsorted(at, np.arange(rows + 1) * cols)
        return (
            {
                "indices": (at % cols).astype(index_dtype(cols)),
                "pointer": pointer.astype(index_dtype(m + 1)),
                "values": matrix.reshape(-1)[at],
            },
            {},
            csr_bits(matrix.shape[0], matrix.shape[1], m, k),
        )

    def decode(self, enc, n):
        a = enc.arrays
        rows, cols = matrix_shape(enc.shape)
        if self.by_columns:
            rows, cols = cols, rows
        pointer, indices, values = a["pointer"], a["indices"], a["values"]
        _check(pointer.size == rows + 1, "the pointer length differs from the rows")
        lengths = np.diff(pointer.astype(np.int64))
        _check(
            pointer[0] == 0 and bool(np.all(lengths >= 0)), "pointers are not monotone"
        )
        _check(
            pointer[-1] == indices.size == values.size,
            "pointer, indices and values disagree",
        )
        _check(indices.dtype.kind in "iu", "the indices are not integers")
        # Seen as unsigned, a negative index is out of range too: one pass.
        unsigned = indices.view(f"u{indices.dtype.itemsize}")
        _check(
            indices.size == 0 or int(unsigned.max()) < cols, "an index is out of range"
        )
        if values.dtype.itemsize in (1, 2, 4, 8):
            # scipy (which jax depends on) expands in compiled code. The values
            # travel as unsigned integers of their width, so every dtype
            # (float16, bfloat16, ...) is copied bit for bit, never added.
            bits = values.view(f"u{values.dtype.itemsize}")
            matrix = scipy.sparse.csr_array(
                (bits, indices, pointer), shape=(rows, cols)
            ).toarray()
            matrix = matrix.view(values.dtype)
        else:
            matrix = np.zeros(rows * cols, enc.dtype)
            at = np.repeat(np.arange(0, rows * cols, cols, dtype=np.intp), lengths)
            at += indices
            matrix[at] = values
            matrix = matrix.reshape(rows, cols)
        return matrix.T if self.by_columns else matrix

    def model(self, n, m, k, *, rows=None, **facts):
        r = rows if rows is not None else math.isqrt(n)
        c = n // r
        if self.by_columns:
            r, c = c, r
        return csr_bits(r, c, m, k)


class _BlockCSR(Format):
    name = "bcsr"

    def encode(self, flat, shape, k, *, block=None, **options):
        if block is None:
            raise ValueError("bcsr needs block=(rows, cols)")
        rows, cols = matrix_shape(shape)
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
        return (
            {
                "indices": c.astype(index_dtype(cols // bc)),
                "pointer": pointer.astype(index_dtype(mb + 1)),
                "values": blocks[r, c].reshape(-1),
            },
            {"block_rows": br, "block_cols": bc},
            bcsr_bits(rows, cols, br, bc, mb, k),
        )

    def decode(self, enc, n):
        a = enc.arrays
        rows, cols = matrix_shape(enc.shape)
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
        return blocks.transpose(0, 2, 1, 3)

    def model(self, n, m, k, *, rows=None, block=None, blocks=None, **facts):
        if block is None or blocks is None or rows is None:
            raise ValueError("bcsr needs rows, block and blocks")
        return bcsr_bits(rows, n // rows, block[0], block[1], blocks, k)


class _NM(Format):
    name = "nm"

    def encode(self, flat, shape, k, *, nm=None, **options):
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
        return (
            {
                "indices": order.astype(np.int32),
                "values": np.take_along_axis(groups, order, axis=1),
            },
            {"n": keep, "m": group},
            nm_bits(flat.size, keep, group, k),
        )

    def decode(self, enc, n):
        keep, group = enc.meta["n"], enc.meta["m"]
        idx, vals = enc.arrays["indices"], enc.arrays["values"]
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
        return groups

    def model(self, n, m, k, *, nm=None, **facts):
        if nm is None:
            raise ValueError("nm needs nm=(N, M)")
        return nm_bits(n, nm[0], nm[1], k)


_REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        _Dense(),
        _Bitmap(),
        _COO(),
        _Delta(),
        _PaddedDelta(),
        _Compressed("csr", by_columns=False),
        _Compressed("csc", by_columns=True),
        _BlockCSR(),
        _NM(),
    )
}


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name``.

    Raises:
      ValueError: an unknown name.

    Example:
      >>> get_format("bitmap").model(100, 10, 8)  # n + m k
      180
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = tuple(_REGISTRY)
        raise ValueError(f"unknown format {name!r}; known: {known}") from None


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

    Example:
      >>> import numpy as np
      >>> enc = encode(np.array([0.0, 0.0, 3.0, 0.0, 5.0], np.float32), "delta")
      >>> enc.arrays["gaps"].tolist(), enc.meta["width"], enc.bits
      ([2, 1], 2, 68)
      >>> decode(enc).tolist()
      [0.0, 0.0, 3.0, 0.0, 5.0]
    """
    codec = get_format(format)
    flat, shape = as_flat(x)
    kk = _value_bits(flat, k)
    arrays, meta, bits = codec.encode(flat, shape, kk, block=block, nm=nm)
    return Encoding(format, shape, flat.dtype, kk, arrays, meta, int(bits))


def decode(enc: Encoding) -> np.ndarray:
    """The dense tensor an :class:`Encoding` stores.

    Raises:
      ValueError: arrays whose lengths disagree, offsets or indices out of
        range, or pointers that are not monotone.
    """
    n = math.prod(enc.shape)
    return get_format(enc.format).decode(enc, n).reshape(enc.shape)
