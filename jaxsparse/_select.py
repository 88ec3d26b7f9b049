"""Exact selection of the lowest-scoring entries without sorting.

Scores are compared through an order key: a float's bit pattern mapped to
an unsigned integer that sorts like the float (NaN lowest). The k lowest of
n are those below a threshold key found by compare-and-count passes, each
O(n), elementwise and a full reduction, so the number selected can be a
traced value and XLA shards every pass without gathers. Ties at the
threshold are broken by position (later positions are pruned first).

:func:`prune_lowest` finds the threshold from a sample and interpolation in
a handful of passes (two probes per pass, and a gathered finish, once the
scores outgrow the cache); :func:`prune_lowest_by_bisection`, one pass per
key bit, is the reference it is tested against.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse._tree import concrete_float

_MAX_GROUP_SIZE = 2**31 - 1


def _key_dtypes(dtype: np.dtype) -> tuple[np.dtype, np.dtype]:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"scores must be floating point, got dtype {dtype}")
    if jnp.dtype(dtype).itemsize == 8:
        return jnp.dtype(jnp.float64), jnp.dtype(jnp.uint64)
    return jnp.dtype(jnp.float32), jnp.dtype(jnp.uint32)


def order_key(scores: jax.Array, float_dtype: np.dtype | None = None) -> jax.Array:
    """Unsigned integer keys that sort exactly like ``scores``, NaN lowest.

    Float16 and bfloat16 widen to float32 exactly; ``-0.0`` and ``0.0`` get one
    key so they tie, as they compare equal.
    """
    fdt, udt = _key_dtypes(float_dtype or scores.dtype)
    bits = lax.bitcast_convert_type(scores.astype(fdt), udt)
    # Integer tests only: XLA's CPU backend treats subnormals as zero in float
    # compares, and not in every fusion alike, which would tie them in one
    # pass and order them in the next.
    sign_bit = jnp.asarray(1 << (8 * udt.itemsize - 1), udt)
    magnitude = bits & ~sign_bit
    bits = jnp.where(magnitude == 0, magnitude, bits)
    key = jnp.where((bits & sign_bit) != 0, ~bits, bits | sign_bit)
    inf_bits = lax.bitcast_convert_type(jnp.asarray(jnp.inf, fdt), udt)
    return jnp.where(magnitude > inf_bits, jnp.zeros((), udt), key)


def _key_value(key: jax.Array, float_dtype: np.dtype) -> jax.Array:
    """The float whose :func:`order_key` is ``key`` (NaN for key 0 and for
    keys above infinity's)."""
    udt = key.dtype
    sign_bit = jnp.asarray(1 << (8 * udt.itemsize - 1), udt)
    bits = jnp.where((key & sign_bit) != 0, key ^ sign_bit, ~key)
    value = lax.bitcast_convert_type(bits, float_dtype)
    return jnp.where(key == 0, jnp.asarray(jnp.nan, float_dtype), value)


def num_pruned(sparsity, size: int) -> jax.Array | int:
    """``round(sparsity * size)``, rounding half to even, clipped to ``[0, size]``.

    A concrete sparsity is multiplied in float64 on the host. A traced one is
    multiplied in its own precision (float32 unless x64 is on), which gives
    the same count unless ``sparsity * size`` lies within a relative 2**-24 of
    a half-integer.
    """
    value = concrete_float(sparsity)
    if value is not None:
        return min(max(round(value * size), 0), size)
    s = jnp.asarray(sparsity)
    if not jnp.issubdtype(s.dtype, jnp.floating) or s.dtype.itemsize < 4:
        s = s.astype(jnp.float32)
    count = jnp.round(s * size).astype(jnp.int32)
    return jnp.clip(count, 0, size)


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
    return (jnp.arange(int(np.prod(shape)), dtype=jnp.uint32) + offset).reshape(shape)


def _prepared(groups, counts, valid, count_true):
    """Float and key dtypes, valid arrays, group sizes, valid counts and
    clipped counts, as both searches start."""
    wide = any(jnp.dtype(s.dtype).itemsize == 8 for g in groups for s in g)
    fdt = jnp.dtype(jnp.float64 if wide else jnp.float32)
    _, udt = _key_dtypes(fdt)
    if valid is None:
        valid = [[None] * len(g) for g in groups]
    sizes = [sum(int(np.prod(s.shape)) for s in g) for g in groups]
    if max(sizes) > _MAX_GROUP_SIZE:
        raise ValueError(
            f"selection over {max(sizes)} entries exceeds the supported "
            f"{_MAX_GROUP_SIZE}; select layer-wise or in smaller groups"
        )
    n_valid, ks = [], []
    for g, k in enumerate(counts):
        n = sum(
            count_true(v) if v is not None else int(np.prod(s.shape))
            for s, v in zip(groups[g], valid[g])
        )
        n_valid.append(jnp.asarray(n, jnp.int32))
        ks.append(jnp.clip(jnp.asarray(k, jnp.int32), 0, n))
    return fdt, udt, valid, sizes, n_valid, ks


def prune_lowest_by_bisection(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array | int],
    valid: Sequence[Sequence[jax.Array | None]] | None = None,
) -> list[list[jax.Array]]:
    """The reference for :func:`prune_lowest`: the same result, bit by bit.

    Builds each group's threshold one key bit per pass (about log2(n)
    compare-and-count passes), then breaks ties by bisecting on the
    position. Kept as the independent computation the faster search is
    tested against.

    Each group is a list of score arrays sharing one threshold (one leaf for
    layer-wise selection, every leaf for global selection). All groups are
    bisected in the same loop so a layer-wise mask is one loop, not one per
    leaf. Entries where ``valid`` is False are never counted nor pruned.
    Arguments and result as :func:`prune_lowest`.
    """
    all_scores = [s for g in groups for s in g]
    if not all_scores:
        return [[] for _ in groups]
    count_true = functools.partial(jnp.sum, dtype=jnp.int32)
    fdt, udt, valid, sizes, _, ks = _prepared(groups, counts, valid, count_true)
    keys = [[order_key(s, fdt) for s in g] for g in groups]
    nbits = 8 * udt.itemsize

    def masked(x, v):
        return x if v is None else x & v

    def count(pred_per_leaf, g):
        return sum(count_true(masked(p, v)) for p, v in zip(pred_per_leaf, valid[g]))

    # Build the k-th smallest key bit by bit from the top. A candidate that
    # has exactly k keys below it ends the search for its group early (the
    # usual case for continuous scores: about log2(n) steps, not 32).
    def threshold_cond(state):
        i, _, _, done = state
        return (i < nbits) & ~jnp.all(jnp.stack(done))

    def threshold_step(state):
        i, ts, cuts, done = state
        bit = jnp.left_shift(jnp.ones((), udt), (nbits - 1 - i).astype(udt))
        new_t, new_cut, new_done = [], [], []
        for g, (t, cut, fin) in enumerate(zip(ts, cuts, done)):
            cand = t | bit
            below = count([k < cand for k in keys[g]], g)
            hit = ~fin & (below == ks[g])
            new_t.append(jnp.where(~fin & (below < ks[g]), cand, t))
            new_cut.append(jnp.where(hit, cand, cut))
            new_done.append(fin | hit)
        return i + 1, tuple(new_t), tuple(new_cut), tuple(new_done)

    zeros = tuple(jnp.zeros((), udt) for _ in groups)
    _, thresholds, exact_cuts, done = lax.while_loop(
        threshold_cond,
        threshold_step,
        (jnp.zeros((), jnp.int32), zeros, zeros, tuple(k == 0 for k in ks)),
    )
    strict = [jnp.where(d, c, t) for d, c, t in zip(done, exact_cuts, thresholds)]

    below = [
        [masked(k < t, v) for k, v in zip(kg, vg)]
        for kg, t, vg in zip(keys, strict, valid)
    ]
    ties = [
        [masked((k == t) & ~d, v) for k, v in zip(kg, vg)]
        for kg, t, d, vg in zip(keys, thresholds, done, valid)
    ]
    need = [ks[g] - count(below[g], g) for g in range(len(groups))]
    n_ties = [count(ties[g], g) for g in range(len(groups))]
    positions = []
    for g in groups:
        offsets = np.cumsum([0] + [int(np.prod(s.shape)) for s in g])
        positions.append([_flat_index(s.shape, int(o)) for s, o in zip(g, offsets)])
    # Only a threshold shared by more entries than still need pruning needs
    # the position bisection; otherwise every tie is pruned (cut at 0).
    partial = jnp.any(jnp.stack([n > r for n, r in zip(n_ties, need)]))
    cuts = lax.cond(
        partial,
        lambda: _position_cuts(ties, positions, need, sizes, count_true),
        lambda: tuple(jnp.zeros((), jnp.uint32) for _ in groups),
    )
    return [
        [b | (t & (p >= c)) for b, t, p in zip(bg, tg, pg)]
        for bg, tg, pg, c in zip(below, ties, positions, cuts)
    ]


def _position_cuts(
    ties, positions, need, sizes: Sequence[int], count_true, piled=None
) -> tuple:
    """Per group the largest position cut with at least ``need[g]`` ties at or
    after it, one position bit per pass (positions are distinct, so exactly
    ``need[g]`` of them). Positions of group ``g`` are below ``sizes[g]``.

    Without ``piled``, every group is counted in every pass, one per bit of
    the largest size. With it, only the groups ``piled`` says have ties to
    cut, each in the passes of its own positions' bits (the cut of any other
    group is 0): a tie pile in a small leaf does not cost passes over the
    large ones.
    """
    bits = [max(int(n).bit_length(), 1) for n in sizes]
    ibits = max(bits)

    def position_step(i, js):
        bit = jnp.left_shift(
            jnp.ones((), jnp.uint32), (ibits - 1 - i).astype(jnp.uint32)
        )
        out = []
        for g, j in enumerate(js):
            cand = j | bit

            def at_or_after(g=g, cand=cand):
                return sum(
                    count_true(t & (p >= cand)) for t, p in zip(ties[g], positions[g])
                )

            if piled is None:
                out.append(jnp.where(at_or_after() >= need[g], cand, j))
                continue
            on = piled[g] & (i >= ibits - bits[g])
            if len(ties) == 1:
                n = at_or_after()
            else:
                n = lax.cond(on, at_or_after, lambda: jnp.zeros((), jnp.int32))
            out.append(jnp.where(on & (n >= need[g]), cand, j))
        return tuple(out)

    start = tuple(jnp.zeros((), jnp.uint32) for _ in ties)
    if piled is None:
        return lax.fori_loop(0, ibits, position_step, start)
    # From the top bit of the largest piled group: higher bits cut past all
    # of its positions.
    top = functools.reduce(
        jnp.maximum, [jnp.where(p, b, 0) for p, b in zip(piled, bits)]
    )
    return lax.fori_loop(ibits - top, ibits, position_step, start)


# Fixed pseudo-random sample positions: the sample only guides the search,
# so any positions give the same result, and fixed ones keep it jittable.
# About 4 sqrt(n) of them puts the bracket around 1 % of 10^8 scores.
_MIN_SAMPLE, _MAX_SAMPLE = 256, 65536
# Selections whose groups all hold fewer entries than this probe once per
# pass, with a sample of 256 and no finish: their keys stay in cache, where a
# pass costs less than the paired search's sample sort and finish (which
# also compile to twice the code); beyond it a pass reads memory.
_PAIRS_FROM = 2**22
# The most rows a count sums down its columns. XLA's CPU backend fuses a
# compare into a column sum of up to 32 rows; a longer sum it splits in two,
# writing the compare's result out in between, which made a pass over a
# 784x300 leaf 1.4x as costly.
_ROWS = 32
# The most rows of a pair count, whose column sums share a byte.
_PAIR_ROWS = 15


@functools.cache
def _count_rows(size: int, most: int = _ROWS) -> int:
    """How many rows the counts view ``size`` entries as: ``most`` where it
    divides the size, else its largest divisor from half of ``most``, else
    ``most`` with a remainder counted apart."""
    if size % most:
        for rows in range(most - 1, most // 2 - 1, -1):
            if size % rows == 0:
                return rows
    return most


def _column_sums(
    flat: jax.Array, dtype, most: int = _ROWS
) -> tuple[jax.Array, jax.Array]:
    """Sums in ``dtype`` down the columns of the whole columns of ``flat``
    viewed as ``(rows, size // rows)``, and the entries left over."""
    rows = _count_rows(flat.size, most)
    main = flat.size // rows * rows
    columns = flat[:main].reshape(rows, -1).astype(dtype)
    return jnp.sum(columns, axis=0, dtype=dtype), flat[main:]


def _total(x: jax.Array) -> jax.Array:
    """The sum of a 1-D array as int32."""
    return jnp.sum(x, dtype=jnp.int32)


def _count(pred: jax.Array) -> jax.Array:
    """The number of True entries, as int32.

    Counted in uint8 down columns of at most 32 rows first: XLA's CPU
    backend vectorizes a same-type column sum but not a widening one, which
    is 5x slower, and the partial counts cannot overflow. (Summing those
    counts the same way fuses into the first sum, on a 784x300 leaf at
    twice the cost of the widening sum it saves.)
    """
    if _sharded(pred):  # each device sums its shard; no reshape to resolve
        return _total(pred)
    flat = pred.reshape(-1)
    if flat.size < _ROWS:
        return _total(flat)
    columns, rest = _column_sums(flat, jnp.uint8)
    total = _total(rest) if rest.size else 0
    return total + _total(columns)


def _has_columns(x: jax.Array) -> bool:
    """Whether :func:`_count_pair` returns the column sums of ``x``: for
    unsharded leaves of at least 15 entries."""
    return not _sharded(x) and x.size >= _PAIR_ROWS


def _count_pair(a: jax.Array, b: jax.Array):
    """``_count(a), _count(b)`` in one pass, and the column sums they come
    from (``None`` for sharded arrays and those under 15 entries).

    The two predicates are packed into the two halves of a byte, whose
    column sums over at most 15 rows cannot carry. From memory that costs
    what one count does, half as much as two; in cache, as much as two
    (its column sums are twice as many).
    """
    if not _has_columns(a):
        return _total(a), _total(b), None
    a, b = a.reshape(-1), b.reshape(-1)
    packed = a.astype(jnp.uint8) | (b.astype(jnp.uint8) << 4)
    columns, rest = _column_sums(packed, jnp.uint8, _PAIR_ROWS)
    count_a = _total(rest & 15) if rest.size else 0
    count_b = _total(rest >> 4) if rest.size else 0
    # The column sums summed the same way, in the bytes of a uint16 (at most
    # 16 x 15 each): widening sums of them all cost half the pass. (Unlike
    # _count's, these column sums have other uses, so XLA does not fuse the
    # first sum into the second.)
    wide = (columns & 15).astype(jnp.uint16) | ((columns >> 4).astype(jnp.uint16) << 8)
    sums, rest = _column_sums(wide, jnp.uint16, 16)
    count_a = count_a + _total(sums & 255) + (_total(rest & 255) if rest.size else 0)
    count_b = count_b + _total(sums >> 8) + (_total(rest >> 8) if rest.size else 0)
    return count_a, count_b, columns


def _sample_positions(sizes: Sequence[int], want: int) -> list[np.ndarray]:
    """Per leaf, sorted flat positions of about ``want`` in all."""
    total = sum(sizes)
    rng = np.random.default_rng(0)
    out = []
    for size in sizes:
        take = min(size, max(1, -(-want * size // total)))
        pos = rng.choice(size, take, replace=False) if take < size else np.arange(size)
        out.append(np.sort(pos))
    return out


def _sharded(x: jax.Array) -> bool:
    """Whether ``x``'s type carries a sharding (Explicit mesh axes), under
    which reshapes and gathers must say where their result lives."""
    return any(axis is not None for axis in getattr(jax.typeof(x).sharding, "spec", ()))


def _take(x: jax.Array, positions: np.ndarray) -> jax.Array:
    """``x``'s entries at flat ``positions``, replicated."""
    if not _sharded(x):
        return x.reshape(-1)[positions]
    index = tuple(jnp.asarray(i) for i in np.unravel_index(positions, x.shape))
    return x.at[index].get(out_sharding=jax.sharding.PartitionSpec())


def _largest(dtype) -> jax.Array:
    """The largest key of an unsigned ``dtype``, above every order key."""
    return jnp.asarray(np.iinfo(dtype).max, dtype)


def _sample(sources, key, valid, want: int) -> tuple[jax.Array, jax.Array, bool]:
    """About ``want`` keys (``key`` of the ``sources``' entries) at fixed
    positions, whether each is valid, and whether they are the whole
    group."""
    sizes = [int(np.prod(x.shape)) for x in sources]
    pos = _sample_positions(sizes, want)
    sample = jnp.concatenate([key(_take(x, p)) for x, p in zip(sources, pos)])
    ok = jnp.concatenate(
        [
            jnp.ones(p.size, bool) if v is None else _take(v, p)
            for v, p in zip(valid, pos)
        ]
    )
    return sample, ok, sum(p.size for p in pos) == sum(sizes)


def _sample_bounds(sources, key, valid, k, n_valid, want: int):
    """Functions of a number of standard deviations of the estimate, giving
    the sampled key that many below the k-th lowest, and the key just above
    the one that many above it (so a value shared by many entries, such as
    the zeros of pruned weights, ends up between the two as a whole)."""
    sample, ok, whole = _sample(sources, key, valid, want)
    # Sorted, not ranked by comparing every pair: XLA's CPU runtime pays on
    # every call for each reduction a program holds, run or not, and an
    # unsigned sort's comparator is one compare.
    ordered = jnp.sort(jnp.where(ok, sample, _largest(sample.dtype)))
    if all(v is None for v in valid):
        m = float(sample.size)
    else:
        m = jnp.sum(ok, dtype=jnp.int32).astype(jnp.float32)
    f = k.astype(jnp.float32) / jnp.maximum(n_valid, 1).astype(jnp.float32)
    r = f * m
    # A sample of the whole group gives the k-th key itself.
    sigma = 0.0 if whole else jnp.sqrt(r * (1.0 - f)) + 0.5
    last = jnp.maximum(m - 1.0, 0.0)

    def at(x):
        return ordered[jnp.clip(jnp.floor(x), 0.0, last).astype(jnp.int32)]

    def below(deviations):
        return at(r - deviations * sigma)

    def above(deviations):
        return at(r + deviations * sigma) + 1

    return below, above


def _sample_guesses(
    sources, key, valid, k, n_valid
) -> list[tuple[int, int, jax.Array]]:
    """Probes ``(step, slot, key)`` from a sample of about ``4 sqrt(n)``. The
    first step's pair, three standard deviations of the estimate either side
    of the k-th lowest key, brackets it but for odds of 1 in 400. The second
    step's pairs, five and eight deviations out, are the ones inside the
    bracket when the first pair fell on one side."""
    sizes = [int(np.prod(x.shape)) for x in sources]
    want = min(max(4 * int(np.sqrt(sum(sizes))), _MIN_SAMPLE), _MAX_SAMPLE)
    below, above = _sample_bounds(sources, key, valid, k, n_valid, want)
    return [
        (0, 0, below(3.0)),
        (0, 1, above(3.0)),
        (1, 0, below(8.0)),
        (1, 1, below(5.0)),
        (1, 0, above(5.0)),
        (1, 1, above(8.0)),
    ]


def _start(ks, hi, c_hi, udt, flags: int) -> tuple:
    """The searches' first state: step 0, per group the bracket ``[0, hi)``
    with its counts, a hit where ``k`` is 0 or all of them (its threshold),
    and ``flags`` per-group flags, all False."""
    groups = range(len(ks))
    zero = jnp.zeros((), udt)
    return (
        jnp.zeros((), jnp.int32),
        tuple(zero for _ in groups),
        tuple(hi),
        tuple(jnp.zeros((), jnp.int32) for _ in groups),
        tuple(c_hi),
        tuple((k == 0) | (k == c) for k, c in zip(ks, c_hi)),
        tuple(jnp.where(k == 0, zero, h) for k, h in zip(ks, hi)),
        *(tuple(jnp.zeros((), bool) for _ in groups) for _ in range(flags)),
    )


def _interpolate(lo, hi, c_lo, width, target, float_dtype: np.dtype) -> jax.Array:
    """The key strictly inside ``(lo, hi)`` where the count reaches
    ``target`` if it rises linearly from ``c_lo`` at ``lo`` by ``width``
    (floats) to ``hi``: linear in the keys' values when both ends are finite
    numbers, since on most data the count is closer to linear in the value
    than in the key, whose slope halves at every power of two; linear in the
    keys otherwise."""
    udt = lo.dtype
    fdt = jnp.float64 if udt.itemsize == 8 else jnp.float32
    # The largest float below 2**bits, so the conversion back cannot overflow.
    top = float(np.nextafter(np.asarray(2.0 ** (8 * udt.itemsize), fdt), 0))
    one = jnp.ones((), udt)
    span = hi - lo
    frac = jnp.clip((target - c_lo.astype(fdt)) / width, 0.0, 1.0)
    offset = jnp.minimum(jnp.floor(frac * span.astype(fdt)), top).astype(udt)
    a, b = _key_value(lo, float_dtype), _key_value(hi, float_dtype)
    value = a + frac.astype(float_dtype) * (b - a)
    by_value = jnp.clip(order_key(value, float_dtype), lo, hi) - lo
    offset = jnp.where(
        jnp.isfinite(a) & jnp.isfinite(b) & jnp.isfinite(value), by_value, offset
    )
    return lo + jnp.clip(offset, one, span - one)


def _search(count, ks, hi, c_hi, ends, guesses, udt, float_dtype, stop_widths):
    """Per group, a threshold ``t`` with ``count(t) == k``, or a bracket
    ``lo < hi`` with ``count(lo) < k < count(hi)`` that holds at most
    ``stop_widths[g]`` entries or a single key.

    ``count`` maps two thresholds per group to the numbers of entries below
    each, in one pass, and to per-column counts packed as
    :func:`_count_pair` gives them; it is monotone, ``count(0) == 0`` and
    ``count(hi) == c_hi``. Its second argument says per group whether the
    search still needs that group's counts (others may be anything).
    ``ends`` are the packed column counts below ``0`` and ``hi``, and follow
    the bracket's ends, so the entries inside the final bracket are counted
    per column without another pass. Each
    step probes about two standard deviations either side of where
    interpolating between the bracket's counts puts the k-th entry, so on
    smooth data a bracket of w entries becomes one of about 4 sqrt(w). A
    step that fails to halve the bracket's count makes the next one cut its
    keys in thirds, so a bracket of 2**b keys closes in at most about 2b
    steps whatever the data. Guesses
    ``(step, slot, key)`` replace that step's lower (slot 0) or upper probe
    when inside the bracket.

    The keys are order keys of ``float_dtype``, interpolated as
    :func:`_interpolate` does.

    Returns:
      Lists ``lo, c_lo, hi, c_hi, hit, t, ends`` per group: ``hit`` says
      ``count(t) == k``.
    """
    groups = range(len(ks))
    fdt = jnp.float64 if udt.itemsize == 8 else jnp.float32
    one = jnp.ones((), udt)

    def searching(lo, hi, c_lo, c_hi, hit):
        return [
            ~h & (b - a > one) & (d - c > w)
            for a, b, c, d, h, w in zip(lo, hi, c_lo, c_hi, hit, stop_widths)
        ]

    def step(state):
        i, lo, hi, c_lo, c_hi, hit, t_hit, thirds, missed, ends = state
        probes = []
        for g in groups:
            width = jnp.maximum(c_hi[g] - c_lo[g], 1).astype(fdt)
            f = (ks[g] - c_lo[g]).astype(fdt) / width
            # Where the count bends inside the bracket (a tail), linear
            # interpolation is biased by a few percent of a wide bracket's
            # count: the pair allows for 3 %, and after probes that both
            # fell on one side it is set four times wider.
            spread = jnp.where(missed[g], 8.0, 2.0)
            delta = spread * jnp.sqrt(width * f * (1.0 - f)) + width / 32 + 1.0
            target = ks[g].astype(fdt)
            t1 = _interpolate(lo[g], hi[g], c_lo[g], width, target - delta, float_dtype)
            t2 = _interpolate(lo[g], hi[g], c_lo[g], width, target + delta, float_dtype)
            span = hi[g] - lo[g]
            t1 = jnp.where(thirds[g], lo[g] + jnp.maximum(span // 3, one), t1)
            t2 = jnp.where(thirds[g], hi[g] - jnp.maximum(span // 3, one), t2)
            for at, slot, key in guesses[g]:
                inside = (i == at) & (lo[g] < key) & (key < hi[g])
                if slot == 0:
                    t1 = jnp.where(inside, key, t1)
                else:
                    t2 = jnp.where(inside, key, t2)
            probes.append((jnp.minimum(t1, t2), jnp.maximum(t1, t2)))
        live = searching(lo, hi, c_lo, c_hi, hit)
        counts = count(probes, live)
        new = [[] for _ in range(9)]
        for g in groups:
            (t1, t2), (c1, c2, columns), live_g = probes[g], counts[g], live[g]
            # c1 <= c2: the bracket's new ends are the tightest probes.
            up1, up2 = live_g & (c1 < ks[g]), live_g & (c2 < ks[g])
            down1, down2 = live_g & (c1 > ks[g]), live_g & (c2 > ks[g])
            nlo = jnp.where(up2, t2, jnp.where(up1, t1, lo[g]))
            nc_lo = jnp.where(up2, c2, jnp.where(up1, c1, c_lo[g]))
            nhi = jnp.where(down1, t1, jnp.where(down2, t2, hi[g]))
            nc_hi = jnp.where(down1, c1, jnp.where(down2, c2, c_hi[g]))
            found1, found2 = live_g & (c1 == ks[g]), live_g & (c2 == ks[g])
            new[0].append(nlo)
            new[1].append(nhi)
            new[2].append(nc_lo)
            new[3].append(nc_hi)
            new[4].append(hit[g] | found1 | found2)
            new[5].append(jnp.where(found1, t1, jnp.where(found2, t2, t_hit[g])))
            new[6].append(
                (i >= 2) & ~thirds[g] & (2 * (nc_hi - nc_lo) > c_hi[g] - c_lo[g])
            )
            new[7].append(up2 | down1)
            new[8].append(
                tuple(
                    _moved_ends(e, c, (up1, up2, down1, down2))
                    for e, c in zip(ends[g], columns)
                )
            )
        return (i + 1, *map(tuple, new))

    def unfinished(state):
        _, lo, hi, c_lo, c_hi, hit, *_ = state
        return functools.reduce(operator.or_, searching(lo, hi, c_lo, c_hi, hit))

    state = (*_start(ks, hi, c_hi, udt, flags=2), tuple(ends))
    _, lo, hi, c_lo, c_hi, hit, t_hit, _, _, ends = lax.while_loop(
        unfinished, step, state
    )
    return (
        list(lo),
        list(c_lo),
        list(hi),
        list(c_hi),
        list(hit),
        list(t_hit),
        list(ends),
    )


def _moved_ends(ends: jax.Array, columns: jax.Array, moves) -> jax.Array:
    """Packed column counts below a bracket's ends after a step of
    :func:`_search`: ``columns`` packs those below its two probes, and
    ``moves`` say whether the low end moved to the first or the second
    probe and the high end to the first or the second."""
    up1, up2, down1, down2 = moves
    lo, hi = ends & 15, ends >> 4
    below1, below2 = columns & 15, columns >> 4
    lo = jnp.where(up2, below2, jnp.where(up1, below1, lo))
    hi = jnp.where(down1, below1, jnp.where(down2, below2, hi))
    return lo | (hi << 4)


def _sample_pair(sources, key, valid, k, n_valid) -> tuple[jax.Array, jax.Array]:
    """Two probes from a sample of 256 that bracket the k-th lowest key with
    high probability: two standard deviations of the estimate either side."""
    below, above = _sample_bounds(sources, key, valid, k, n_valid, _MIN_SAMPLE)
    return below(2.0), above(2.0)


def _search_by_one(count, ks, hi, c_hi, guesses, udt, float_dtype):
    """:func:`_search` for small selections: one probe per step, which
    compiles to half the code. Per group, a threshold ``t`` with
    ``count(t) == k``, or where there is none (ties straddle the k-th
    entry), the key ``lo`` with ``count(lo) < k < count(lo + 1)``.

    ``count`` maps one threshold per group to the number of entries below
    each; it is monotone, ``count(0) == 0`` and ``count(hi) == c_hi``. Its
    second argument says per group whether the search still needs that
    group's count (others may be anything). Each
    step probes inside the bracket by interpolating between its counts, which
    on smooth data takes a handful of passes; a probe that fails to halve the
    bracket's count makes the next one a bisection of its keys, so a bracket
    of 2**b keys closes in at most about 3b steps whatever the data. Guesses
    ``(step, key)`` replace the probe of that step when inside the bracket.

    The keys are order keys of ``float_dtype``, interpolated as
    :func:`_interpolate` does.

    Returns:
      Lists ``lo, c_lo, hit, t`` per group: ``hit`` says ``count(t) == k``;
      otherwise ``count(lo) = c_lo < k < count(lo + 1)``.
    """
    groups = range(len(ks))
    n_guessed = max((at + 1 for g in guesses for at, _ in g), default=0)
    fdt = jnp.float64 if udt.itemsize == 8 else jnp.float32
    one = jnp.ones((), udt)

    def searching(lo, hi, hit):
        return [~h & (b - a > one) for a, b, h in zip(lo, hi, hit)]

    def step(state):
        i, lo, hi, c_lo, c_hi, hit, t_hit, bisect = state
        probes = []
        for g in groups:
            span = hi[g] - lo[g]
            width = jnp.maximum(c_hi[g] - c_lo[g], 1)
            # Aim a little short of the target from the end farther from it,
            # so that end jumps close and the near one is not crept up on.
            margin = jnp.floor(0.5 * jnp.sqrt(width.astype(fdt)))
            far_low = ks[g] - c_lo[g] > c_hi[g] - ks[g]
            target = ks[g].astype(fdt) + jnp.where(far_low, -margin, margin)
            t = jnp.where(
                bisect[g],
                lo[g] + span // 2,
                _interpolate(
                    lo[g], hi[g], c_lo[g], width.astype(fdt), target, float_dtype
                ),
            )
            for at, key in guesses[g]:
                t = jnp.where((i == at) & (lo[g] < key) & (key < hi[g]), key, t)
            probes.append(t)
        live = searching(lo, hi, hit)
        counts = count(probes, live)
        new = [[] for _ in range(7)]
        for g in groups:
            t, c = probes[g], counts[g]
            below, above = live[g] & (c < ks[g]), live[g] & (c > ks[g])
            nlo, nc_lo = jnp.where(below, t, lo[g]), jnp.where(below, c, c_lo[g])
            nhi, nc_hi = jnp.where(above, t, hi[g]), jnp.where(above, c, c_hi[g])
            found = live[g] & (c == ks[g])
            new[0].append(nlo)
            new[1].append(nhi)
            new[2].append(nc_lo)
            new[3].append(nc_hi)
            new[4].append(hit[g] | found)
            new[5].append(jnp.where(found, t, t_hit[g]))
            new[6].append(
                (i >= n_guessed)
                & ~bisect[g]
                & (2 * (nc_hi - nc_lo) > c_hi[g] - c_lo[g])
            )
        return (i + 1, *map(tuple, new))

    def unfinished(state):
        _, lo, hi, _, _, hit, _, _ = state
        return functools.reduce(operator.or_, searching(lo, hi, hit))

    state = _start(ks, hi, c_hi, udt, flags=1)
    _, lo, _, c_lo, _, hit, t_hit, _ = lax.while_loop(unfinished, step, state)
    return list(lo), list(c_lo), list(hit), list(t_hit)


def _bracket_width(size: int) -> int:
    """How many entries a bracket may hold for :func:`_finish` to take over:
    it gathers as many columns of up to 15, which stays a small part of a
    pass over ``size`` scores."""
    return min(max(size // 1024, 16), 4096)


def fullest_columns(columns: list[jax.Array], width: int) -> jax.Array:
    """The indices, into the leaves' column counts (each at most 15) laid end
    to end, of the ``width`` largest: all that are positive when at most
    ``width`` are.

    Many columns are first summed in blocks of 16, and only the ``width``
    fullest blocks' columns are ranked: a partial sort (the float
    ``top_k`` on XLA's CPU backend; an integer one sorts all) of 10^7
    columns costs a tenth of a pass over 10^8 scores.
    """
    counts = jnp.concatenate(columns)
    if counts.size < 64 * width:
        return lax.top_k(counts.astype(jnp.float32), min(width, counts.size))[1]
    main = counts.size // 16 * 16
    blocks = jnp.sum(counts[:main].reshape(-1, 16), axis=1, dtype=jnp.uint8)
    fullest = lax.top_k(blocks.astype(jnp.float32), width)[1]
    inside = jnp.arange(16, dtype=fullest.dtype)
    candidates = jnp.concatenate(
        [
            (fullest[:, None] * 16 + inside[None, :]).reshape(-1),
            jnp.arange(main, counts.size, dtype=fullest.dtype),
        ]
    )
    ranked = lax.top_k(counts[candidates].astype(jnp.float32), width)[1]
    return candidates[ranked]


def _finish(sources, key, valid, offsets, lo, hi, need, width: int, ends):
    """The exact cut inside a bracket of at most ``width`` valid entries:
    ``(t, tied, tie, cut)`` such that the keys below ``t``, and where
    ``tied`` the entries keyed ``tie`` at positions from ``cut`` on, are
    the bracket's ``need`` lowest (ties broken as the reference does).

    ``ends`` hold per leaf (but those under 15 entries) the packed column
    counts below ``lo`` and ``hi`` that :func:`_search` kept: the columns
    holding any of the bracket's entries (at most ``width``) are gathered
    by the largest counts, with the entries each leaf has left over, and
    the bracket's entries among them sorted.
    """
    columns, laid_out, cand_keys, cand_pos, cand_in = [], [], [], [], []
    ends = iter(ends)
    for s, v, o in zip(sources, valid, offsets):
        flat = s.reshape(-1)
        main = 0
        if _has_columns(s):
            e = next(ends)
            columns.append((e >> 4) - (e & 15))
            rows = _count_rows(flat.size, _PAIR_ROWS)
            laid_out.append((s, v, o, rows, e.size))
            main = e.size * rows
        if main < flat.size:
            x = key(flat[main:])
            inside = (lo <= x) & (x < hi)
            cand_keys.append(x)
            cand_pos.append(
                jnp.arange(int(o) + main, int(o) + flat.size, dtype=jnp.uint32)
            )
            cand_in.append(inside if v is None else inside & v.reshape(-1)[main:])
    if columns:
        chosen = fullest_columns(columns, width)
        start = 0
        for x, v, o, rows, n in laid_out:
            local = jnp.clip(chosen - start, 0, n - 1)
            mine = (chosen >= start) & (chosen < start + n)
            start += n

            def gather(a, n=n, rows=rows, local=local):
                return a.reshape(-1)[: n * rows].reshape(rows, n)[:, local]

            k = key(gather(x))
            row_starts = jnp.arange(rows, dtype=jnp.uint32)[:, None] * n
            q = jnp.uint32(o) + row_starts + local.astype(jnp.uint32)[None, :]
            inside = mine[None, :] & (lo <= k) & (k < hi)
            if v is not None:
                inside = inside & gather(v)
            cand_keys.append(k.reshape(-1))
            cand_pos.append(q.reshape(-1))
            cand_in.append(inside.reshape(-1))
    k, q, inside = map(jnp.concatenate, (cand_keys, cand_pos, cand_in))
    if k.size > width:  # keep the bracket's entries only, before sorting
        kept = lax.top_k(inside.astype(jnp.float32), width)[1]
        k, q, inside = k[kept], q[kept], inside[kept]
    last = k.size - 1
    ordered = jnp.sort(jnp.where(inside, k, _largest(k.dtype)))
    tie = ordered[jnp.clip(need - 1, 0, last)]
    below = jnp.sum(inside & (k < tie), dtype=jnp.int32)
    equal = inside & (k == tie)
    # The reference prunes the latest ties first: the cut is the position of
    # the `need - below`-th last of them.
    latest = jnp.sort(jnp.where(equal, q, 0))
    cut = latest[jnp.clip(k.size - (need - below), 0, last)]
    exact = need - below == jnp.sum(equal, dtype=jnp.int32)
    return jnp.where(exact, tie + 1, tie), ~exact, tie, cut


def prune_lowest(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array | int],
    valid: Sequence[Sequence[jax.Array | None]] | None = None,
    *,
    paired: bool | None = None,
) -> list[list[jax.Array]]:
    """Boolean "pruned" arrays marking exactly ``counts[g]`` lowest entries.

    Each group is a list of score arrays sharing one threshold (one leaf for
    layer-wise selection, every leaf for global selection). All groups are
    searched in the same loop so a layer-wise mask is one loop, not one per
    leaf. Entries where ``valid`` is False are never counted nor pruned.

    A sample of the scores brackets the threshold and interpolation closes
    the bracket, each step one compare-and-count pass. Small selections
    (every group under 2**22 entries, whose keys stay in cache) probe once
    per pass from a sample of 256: 9 to 15 passes on the MLP of
    ``benchmarks/bench_masks.py``, against 20 to 32 for one pass per key
    bit; their keys are written once. Large ones (``paired``) count two
    probes per pass from a sample of about ``4 sqrt(n)``, computing the keys
    in each pass (reading memory hides that work, and writing the keys
    would cost as much as two passes), and once the bracket holds at most
    ``n / 1024`` entries (at most 4096) gather it from the columns that the
    passes' column counts say hold it: 3 or 4 passes over the scores of
    10^8, then one to write the mask. Ties that straddle the threshold are
    broken by position as the reference does, by sorting the gathered
    bracket or, for a tie larger than it, by bisecting on the position.
    Only the sample and the gathered bracket are sorted, and the extra
    memory is at most one key array per leaf. The result is bit for bit
    that of :func:`prune_lowest_by_bisection`.

    Args:
      groups: score arrays, grouped by shared threshold.
      counts: number of entries to prune in each group (int or int32 scalar,
        clipped to the group's valid size).
      valid: optional bool arrays (or ``None`` for all valid), as ``groups``.
      paired: the large selections' search (``True``) or the small ones'
        (``False``); by default chosen by the largest group's size.

    Returns:
      Bool arrays, ``True`` where pruned, in the layout of ``groups``.
    """
    if not any(groups):
        return [[] for _ in groups]
    # Compiled as one function even when called eagerly: op by op, the
    # searches' loops would compile per call (their bodies close over the
    # counts), and every count would be a new compilation.
    counts = [jnp.asarray(k, jnp.int32) for k in counts]
    return _prune_lowest(groups, counts, valid, paired=paired)


@functools.partial(jax.jit, static_argnames="paired")
def _prune_lowest(groups, counts, valid, *, paired):
    fdt, udt, valid, sizes, n_valid, ks = _prepared(groups, counts, valid, _count)
    if paired is None:
        paired = max(sizes) >= _PAIRS_FROM
    if paired:
        # Keys computed from the scores wherever they are compared: a key
        # array the size of the scores would cost more to write than the
        # conversion costs in each pass that reads memory anyway.
        sources = groups
        key = functools.partial(order_key, float_dtype=fdt)
    else:
        sources = [[order_key(s, fdt) for s in g] for g in groups]
        key = lambda x: x  # noqa: E731
    # A bracket small enough is finished by gathering it; sharded leaves
    # keep searching (their columns would be gathered across devices).
    widths = [
        _bracket_width(size) if paired and not any(map(_sharded, g)) else 0
        for g, size in zip(groups, sizes)
    ]

    def masked(x, v):
        return x if v is None else x & v

    def column_ends(s, v):
        # Below the key 0 no entry, below the largest key every valid one.
        rows = _count_rows(s.size, _PAIR_ROWS)
        if v is None:
            return jnp.full(s.size // rows, rows << 4, jnp.uint8)
        return _column_sums(v.reshape(-1), jnp.uint8, _PAIR_ROWS)[0] << 4

    ends = [
        tuple(column_ends(s, v) for s, v in zip(g, vg) if _has_columns(s)) if w else ()
        for g, vg, w in zip(groups, valid, widths)
    ]

    def live_groups_only(count_group, zero_of):
        # A search loops until its last group ends; the groups that ended
        # earlier are not counted again (a cond costs far less than a pass,
        # whose fixed cost alone is a few microseconds on a small leaf).
        def count(ts, live):
            if len(groups) == 1:
                return [count_group(0, ts[0])]
            return [
                lax.cond(
                    on,
                    functools.partial(count_group, g, t),
                    functools.partial(zero_of, g),
                )
                for g, (t, on) in enumerate(zip(ts, live))
            ]

        return count

    def below_group(g, t):
        return sum(_count(masked(key(s) < t, v)) for s, v in zip(sources[g], valid[g]))

    def below_pair_group(g, ts):
        t1, t2 = ts
        # Tied to the probes, the scores' keys are not loop invariant, so
        # XLA computes them in the pass instead of writing them out before.
        scores, t1 = lax.optimization_barrier((sources[g], t1))
        c1, c2, columns = 0, 0, []
        for s, v in zip(scores, valid[g]):
            a, b, c = _count_pair(masked(key(s) < t1, v), masked(key(s) < t2, v))
            c1, c2 = c1 + a, c2 + b
            if widths[g] and c is not None:
                columns.append(c)
        return c1, c2, tuple(columns)

    zero = jnp.zeros((), jnp.int32)
    below = live_groups_only(below_group, lambda g: zero)
    below_pairs = live_groups_only(
        below_pair_group,
        lambda g: (zero, zero, tuple(jnp.zeros_like(e) for e in ends[g])),
    )

    top = _largest(udt)
    if not paired:
        guesses = [
            list(enumerate(_sample_pair(s, key, v, c, n)))
            for s, v, c, n in zip(sources, valid, ks, n_valid)
        ]
        lo, c_lo, hit, t_hit = _search_by_one(
            below, ks, [top] * len(groups), n_valid, guesses, udt, fdt
        )
        c_hi, hi = c_lo, lo
    else:
        guesses = [
            _sample_guesses(s, key, v, c, n)
            for s, v, c, n in zip(sources, valid, ks, n_valid)
        ]
        lo, c_lo, hi, c_hi, hit, t_hit, ends = _search(
            below_pairs,
            ks,
            [top] * len(groups),
            n_valid,
            ends,
            guesses,
            udt,
            fdt,
            widths,
        )
    offsets = [np.cumsum([0] + [int(np.prod(s.shape)) for s in g]) for g in groups]

    def positions():
        # Built where each use needs them, so that they fuse into it: shared,
        # they would be written out as one more array per leaf.
        return [
            [_flat_index(s.shape, int(o)) for s, o in zip(g, offs)]
            for g, offs in zip(groups, offsets)
        ]

    need = [k - c for k, c in zip(ks, c_lo)]
    gathered = [
        ~h & (b - a <= w) if w else jnp.zeros((), bool)
        for h, a, b, w in zip(hit, c_lo, c_hi, widths)
    ]
    finishing = [g for g, w in enumerate(widths) if w]

    def finish():
        out = []
        for g in finishing:
            out.append(
                _finish(
                    sources[g],
                    key,
                    valid[g],
                    offsets[g],
                    lo[g],
                    hi[g],
                    need[g],
                    widths[g],
                    ends[g],
                )
            )
        return tuple(out)

    def no_finish():
        return tuple(
            (lo[g], jnp.zeros((), bool), lo[g], jnp.zeros((), jnp.uint32))
            for g in finishing
        )

    finished = {}
    if finishing:
        any_gathered = jnp.any(jnp.stack([gathered[g] for g in finishing]))
        finished = dict(zip(finishing, lax.cond(any_gathered, finish, no_finish)))
    # Otherwise the bracket is one key shared by more entries than the
    # finish takes: the latest `need` of them are pruned, found by bisecting
    # on the position as the reference does.
    pile = [~h & ~f for h, f in zip(hit, gathered)]

    def pile_cuts_of():
        # The tie masks built inside the branch: outside it, they would cost
        # a pass over the keys on every call, for a case that is rare.
        ties = [
            [masked((key(s) == t) & p, v) for s, v in zip(sources[g], valid[g])]
            for g, (t, p) in enumerate(zip(lo, pile))
        ]
        return _position_cuts(ties, positions(), need, sizes, _count, pile)

    pile_cuts = lax.cond(
        jnp.any(jnp.stack(pile)),
        pile_cuts_of,
        lambda: tuple(jnp.zeros((), jnp.uint32) for _ in groups),
    )
    thresholds, tie_keys, tie_on, cuts = [], [], [], []
    for g in range(len(groups)):
        t, on, tie, cut = finished.get(g, (lo[g], False, lo[g], pile_cuts[g]))
        gather_g = gathered[g]
        thresholds.append(jnp.where(hit[g], t_hit[g], jnp.where(gather_g, t, lo[g])))
        tie_keys.append(jnp.where(gather_g, tie, lo[g]))
        tie_on.append(jnp.where(gather_g, on, pile[g]))
        cuts.append(jnp.where(gather_g, cut, pile_cuts[g]))
    ties = [
        [masked((key(s) == t) & on, v) for s, v in zip(sources[g], valid[g])]
        for g, (t, on) in enumerate(zip(tie_keys, tie_on))
    ]
    at = positions()
    return [
        [
            masked(key(s) < t, v) | (tie & (p >= c))
            for s, v, tie, p in zip(sources[g], valid[g], ties[g], at[g])
        ]
        for g, (t, c) in enumerate(zip(thresholds, cuts))
    ]
