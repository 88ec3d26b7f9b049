"""Tests for jaxsparse.formats: exact round trips, bits equal to the model,
padding counts, corrupt encodings, index widths and the survey's crossovers."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import formats as F
from jaxsparse import sparse_export as X
from jaxsparse import storage as S

ALL = (*F.FORMATS, "bcsr", "nm")


def options(fmt, x):
    if fmt == "bcsr":
        return {"block": (1, 1)}
    if fmt == "nm":
        return {"nm": (x.shape[-1], x.shape[-1])}
    return {}


def model_kwargs(fmt, x, enc):
    info = S.facts(x)
    if fmt == "bcsr":
        info["block"] = enc.meta["block_rows"], enc.meta["block_cols"]
        info["blocks"] = enc.arrays["indices"].size
    if fmt == "nm":
        info["nm"] = enc.meta["n"], enc.meta["m"]
    return info


@st.composite
def tensors(draw):
    shape = draw(
        st.sampled_from([(7,), (1,), (5, 6), (3, 1), (2, 3, 2, 4), (1, 1, 1, 5)])
    )
    dtype = draw(st.sampled_from([np.float32, np.float16, np.int8, np.int32]))
    values = draw(
        hnp.arrays(dtype, shape, elements=st.integers(-100, 100).map(lambda v: v or 1))
    )
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0]))
    drop = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
    return np.where(drop < sparsity, np.zeros((), dtype), values).astype(dtype)


@settings(max_examples=60, deadline=None)
@given(x=tensors())
def test_every_format_round_trips_and_reports_model_bits(x):
    for fmt in ALL:
        enc = F.encode(x, fmt, **options(fmt, x))
        out = F.decode(enc)
        assert out.dtype == x.dtype and out.shape == x.shape, fmt
        np.testing.assert_array_equal(out, x, err_msg=fmt)
        m = int(np.count_nonzero(x))
        k = x.dtype.itemsize * 8
        assert enc.bits == S.model_bits(
            fmt, x.size, m, k, **model_kwargs(fmt, x, enc)
        ), fmt
        assert enc.total_bits > enc.bits


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize(
    "dtype",
    [jnp.bfloat16, np.float16, np.float64, np.complex64, np.complex128, np.bool_],
)
def test_compressed_formats_copy_every_dtype_bit_for_bit(fmt, dtype):
    rng = np.random.default_rng(0)
    x = np.where(rng.random((5, 7)) < 0.4, rng.normal(size=(5, 7)), 0).astype(dtype)
    if np.issubdtype(x.dtype, np.floating):
        # A NaN with a payload survives only a copy, never an addition.
        payload = np.array(0x7FF8000000000123, np.uint64).view(np.float64)
        x[0, 0] = payload.astype(x.dtype)
    out = F.decode(F.encode(x, fmt))
    assert out.dtype == x.dtype
    width = f"u{x.dtype.itemsize}" if x.dtype.itemsize <= 8 else "u8"
    np.testing.assert_array_equal(np.ascontiguousarray(out).view(width), x.view(width))


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("fill", ["zeros", "full"])
def test_all_zero_and_all_nonzero(fmt, fill):
    x = (
        np.zeros((4, 6), np.float32)
        if fill == "zeros"
        else np.arange(1, 25, dtype=np.float32).reshape(4, 6)
    )
    if fmt == "nm":
        enc = F.encode(x, fmt, nm=(6, 6))
    else:
        enc = F.encode(x, fmt, **options(fmt, x))
    np.testing.assert_array_equal(F.decode(enc), x)


def test_jax_input_and_explicit_k():
    x = jnp.asarray([[0.0, 1.5, 0.0, -2.0]], jnp.bfloat16)
    enc = F.encode(x, "coo", k=4)
    assert enc.bits == 2 * (4 + 2)
    np.testing.assert_array_equal(F.decode(enc), np.asarray(x))


def test_padded_delta_inserts_pads_exactly_where_gaps_exceed_the_width():
    x = np.zeros(64, np.float32)
    x[[0, 1, 2, 40]] = [1, 2, 3, 4]
    enc = F.encode(x, "padded_delta")
    # Distances 1, 1, 1, 38; mean 41 / 4 = 10.25, so b = 4 bits hold the
    # distances 1 ... 16 as 0 ... 15; 38 takes two pads (16 + 16 + 6).
    assert enc.meta["width"] == 4
    np.testing.assert_array_equal(enc.arrays["gaps"], [0, 0, 0, 15, 15, 5])
    np.testing.assert_array_equal(enc.arrays["values"], [1, 2, 3, 0, 0, 4])
    assert enc.bits == 6 * (32 + 4)
    np.testing.assert_array_equal(F.decode(enc), x)


@pytest.mark.parametrize("distance", [1, 2, 3, 8])
def test_padded_delta_uses_every_code_of_its_width(distance):
    """Regression: codes stored the distance itself, so a distance of
    exactly 2^b was padded: every distance 8 cost 560 bits where delta costs
    280, and every second slot cost more than dense."""
    n = 70 * distance
    x = np.zeros(n, np.float32)
    x[distance - 1 :: distance] = 1.0
    m = n // distance
    padded, delta = F.encode(x, "padded_delta"), F.encode(x, "delta")
    assert padded.meta["width"] == F.lg(distance)
    assert padded.bits == delta.bits == m * (32 + F.lg(distance))
    assert padded.bits < n * 32 or distance == 1
    np.testing.assert_array_equal(F.decode(padded), x)
    assert padded.bits == S.model_bits("padded_delta", n, m, 32, **S.facts(x))


def _padded_delta_by_loop(flat):
    """The padded delta encoding one gap at a time (the loop the vectorized
    encoder replaced), as the reference."""
    offsets = np.flatnonzero(flat)
    gaps = F.distances(offsets)
    reach = 2 ** F.padded_width(flat.size, offsets.size, int(offsets[-1]) + 1)
    stored, values = [], []
    for gap, value in zip(gaps.tolist(), flat[offsets].tolist()):
        pads = -(-gap // reach) - 1
        stored += [reach - 1] * pads + [gap - pads * reach - 1]
        values += [0] * pads + [value]
    return np.asarray(stored), np.asarray(values, flat.dtype)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [0.001, 0.03, 0.5])
def test_padded_delta_encodes_as_the_loop(seed, density):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=5000).astype(np.float32)
    x[rng.random(x.size) >= density] = 0
    x[rng.integers(0, x.size)] = 1.0  # at least one entry
    enc = F.encode(x, "padded_delta")
    gaps, values = _padded_delta_by_loop(x)
    np.testing.assert_array_equal(enc.arrays["gaps"], gaps)
    np.testing.assert_array_equal(enc.arrays["values"], values)
    assert enc.bits == gaps.size * (32 + enc.meta["width"])


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_compressed_encodes_as_row_by_row(fmt):
    """Against the row-major nonzero, bincount and cumsum (the old encoder,
    and what scipy.sparse stores), with an empty row and column."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 53)).astype(np.float32)
    x[rng.random(x.shape) < 0.9] = 0
    x[5] = 0
    x[:, 7] = 0
    matrix = x if fmt == "csr" else x.T
    r, c = np.nonzero(matrix)
    enc = F.encode(x, fmt)
    pointer = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=len(matrix)))])
    np.testing.assert_array_equal(enc.arrays["pointer"], pointer)
    np.testing.assert_array_equal(enc.arrays["indices"], c)
    np.testing.assert_array_equal(enc.arrays["values"], matrix[r, c])
    np.testing.assert_array_equal(F.decode(enc), x)


def test_delta_width_from_the_largest_gap():
    x = np.zeros(20, np.float32)
    x[[3, 4, 12]] = 1
    enc = F.encode(x, "delta")
    # Gaps 4, 1, 8 stored as 3, 0, 7 in lg(8) = 3 bits.
    np.testing.assert_array_equal(enc.arrays["gaps"], [3, 0, 7])
    assert enc.meta["width"] == 3 and enc.bits == 3 * (32 + 3)


def corrupt(enc, **arrays):
    return F.Encoding(
        enc.format,
        enc.shape,
        enc.dtype,
        enc.k,
        {**enc.arrays, **arrays},
        enc.meta,
        enc.bits,
    )


@pytest.mark.parametrize(
    "fmt,change,message",
    [
        ("coo", lambda e: {"offsets": e.arrays["offsets"] + 100}, "out of range"),
        ("coo", lambda e: {"values": e.arrays["values"][:-1]}, "differ in length"),
        ("bitmap", lambda e: {"values": e.arrays["values"][:-1]}, "disagree"),
        ("delta", lambda e: {"gaps": e.arrays["gaps"] + 64}, "exceeds its width"),
        (
            "padded_delta",
            lambda e: {"gaps": e.arrays["gaps"] + 16},
            "exceeds its width",
        ),
        ("csr", lambda e: {"pointer": e.arrays["pointer"][::-1]}, "monotone"),
        ("csr", lambda e: {"indices": e.arrays["indices"] + 50}, "out of range"),
        ("csc", lambda e: {"indices": e.arrays["indices"] - 5}, "out of range"),
        (
            "csr",
            lambda e: {"indices": e.arrays["indices"].astype(np.float32)},
            "not integers",
        ),
        ("csc", lambda e: {"pointer": e.arrays["pointer"][:-1]}, "pointer length"),
        ("dense", lambda e: {"values": e.arrays["values"][:3]}, "do not fill"),
        ("nm", lambda e: {"indices": e.arrays["indices"] * 0}, "repeat"),
    ],
)
def test_corrupt_encodings_raise(fmt, change, message):
    x = np.zeros((4, 8), np.float32)
    x[0, 1], x[2, 5], x[3, 7] = 1.0, 2.0, 3.0
    enc = F.encode(x, fmt, nm=(2, 4)) if fmt == "nm" else F.encode(x, fmt)
    with pytest.raises(ValueError, match=message):
        F.decode(corrupt(enc, **change(enc)))


def test_index_width_and_model_at_two_to_the_31():
    assert F.index_dtype(2**31 - 1) == np.int32
    assert F.index_dtype(2**31) == np.int64
    n = 2**31 + 5
    assert F.lg(n) == 32 and F.lg(2**31) == 31 and F.lg(1) == 0 and F.lg(2) == 1
    assert S.model_bits("coo", n, 1000, 8) == 1000 * (8 + 32)
    assert S.model_bits("bitmap", n, 1000, 8) == n + 8000
    assert S.model_bits("csr", 2**40, 10**6, 8, rows=2**20) == (
        10**6 * 20 + (2**20 + 1) * F.lg(10**6 + 1) + 8 * 10**6
    )


def test_survey_csr_count_side_by_side():
    assert F.survey_csr_bits(100, 100, 50, 8) == 50 * 7 + 100 * 6 + 400
    assert F.csr_bits(100, 100, 50, 8) == 50 * 7 + 101 * 6 + 400


def cheapest_ranges(n=10**8, k=8, step=1e-4):
    grid = np.round(np.arange(0, 1, step), 4)
    best = [S.best_format(n, n - round(s * n), k)[0] for s in grid]
    return grid, best


def test_survey_figure_crossovers():
    grid, best = cheapest_ranges()
    bitmap = grid[[b == "bitmap" for b in best]]
    # The model (uniformly random positions): dense is cheapest below
    # 12.5 % (where dense, bitmap and 1-bit padded delta all cost about 8n),
    # the bitmap from 12.51 % to 85.71 % sparsity, delta-type encodings
    # above.
    assert (bitmap.min(), bitmap.max()) == (0.1251, 0.8571)
    assert set(best[: int(np.argmax(grid >= 0.125))]) == {"dense"}
    above = {b for s, b in zip(grid, best) if s > 0.8571}
    assert above == {"delta", "padded_delta"}


def test_storage_report():
    params = {"w": np.zeros((100, 100), np.float32), "b": np.ones(10, np.float32)}
    params["w"][::10, ::10] = 1.0
    report = S.storage_report(params)
    by_path = {leaf.path: leaf for leaf in report.leaves}
    assert by_path["b"].format == "dense" and by_path["b"].bits == 320
    assert by_path["w"].nonzeros == 100 and by_path["w"].format in (
        "delta",
        "padded_delta",
        "csr",
        "coo",
    )
    assert report.bits < report.dense_bits
    assert "of dense" in str(report)


def test_bcoo_bcsr_export_and_sparse_dense_layer():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(12, 5)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.8] = 0
    x = jnp.asarray(rng.normal(size=(3, 12)), jnp.float32)
    bias = jnp.arange(5.0)
    for fmt in ("bcoo", "bcsr"):
        kernel_t = X.sparse_kernel(jnp.asarray(kernel), format=fmt)
        np.testing.assert_allclose(kernel_t.todense(), kernel.T)
        out = jax.jit(X.sparse_dense_layer)(x, kernel_t, bias)
        np.testing.assert_allclose(
            out, x @ kernel + bias[None, :], rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(X.to_bcoo(jnp.asarray(kernel)).todense(), kernel)
    with pytest.raises(ValueError, match="BCSR needs a 2-D array"):
        X.to_bcsr(jnp.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="format must be"):
        X.sparse_kernel(jnp.ones((2, 2)), format="csr")


def test_bad_format_and_patterns():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="unknown format"):
        F.encode(x, "ell")
    with pytest.raises(ValueError, match="not divisible by block"):
        F.encode(x, "bcsr", block=(3, 4))
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        F.encode(x, "nm", nm=(2, 3))
