"""Exact selection of the lowest-scoring entries without sorting.

Scores are compared through an order key: a float's bit pattern mapped to
an unsigned integer that sorts like the float (NaN lowest). The k lowest of
n are those below a threshold key found by compare-and-count passes, each
O(n), elementwise and a full reduction, so the number selected can be a
traced value and XLA shards every pass without gathers. Ties at the
threshold are broken by position (later positions are pruned first).

:func:`prune_lowest` finds the threshold from a sample and interpolation in
a handful of passes; :func:`prune_lowest_by_bisection`, one pass per key bit,
is the reference it is tested against.
"""

from __future__ import annotations

import functools
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
    """Keys, key dtype, valid arrays, group sizes, valid counts and clipped
    counts, as both searches start."""
    wide = any(jnp.dtype(s.dtype).itemsize == 8 for g in groups for s in g)
    fdt = jnp.dtype(jnp.float64 if wide else jnp.float32)
    _, udt = _key_dtypes(fdt)
    keys = [[order_key(s, fdt) for s in g] for g in groups]
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
    return keys, udt, valid, sizes, n_valid, ks


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
    keys, udt, valid, sizes, _, ks = _prepared(groups, counts, valid, count_true)
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
        lambda: _position_cuts(ties, positions, need, max(sizes), count_true),
        lambda: tuple(jnp.zeros((), jnp.uint32) for _ in groups),
    )
    return [
        [b | (t & (p >= c)) for b, t, p in zip(bg, tg, pg)]
        for bg, tg, pg, c in zip(below, ties, positions, cuts)
    ]


def _position_cuts(ties, positions, need, size: int, count_true) -> tuple:
    """Per group the largest position cut with at least ``need[g]`` ties at or
    after it, one position bit per pass (positions are distinct, so exactly
    ``need[g]`` of them)."""
    ibits = max(size.bit_length(), 1)

    def position_step(i, js):
        bit = jnp.left_shift(
            jnp.ones((), jnp.uint32), (ibits - 1 - i).astype(jnp.uint32)
        )
        out = []
        for g, j in enumerate(js):
            cand = j | bit
            at_or_after = sum(
                count_true(t & (p >= cand)) for t, p in zip(ties[g], positions[g])
            )
            out.append(jnp.where(at_or_after >= need[g], cand, j))
        return tuple(out)

    start = tuple(jnp.zeros((), jnp.uint32) for _ in ties)
    return lax.fori_loop(0, ibits, position_step, start)


# Fixed pseudo-random sample positions: the sample only guides the search,
# so any positions give the same result, and fixed ones keep it jittable.
_SAMPLE_SIZE = 256
_COLUMNS = 128


def _count(pred: jax.Array) -> jax.Array:
    """The number of True entries, as int32.

    Counted in uint8 down columns of 128 first: XLA's CPU backend vectorizes
    a same-type column sum but not a widening one, which is 5x slower; the
    partial counts cannot overflow (at most 128 each).
    """
    if _sharded(pred):  # each device sums its shard; no reshape to resolve
        return jnp.sum(pred, dtype=jnp.int32)
    flat = pred.reshape(-1)
    main = flat.size // _COLUMNS * _COLUMNS
    if main == 0:
        return jnp.sum(flat, dtype=jnp.int32)
    columns = jnp.sum(
        flat[:main].reshape(_COLUMNS, -1).astype(jnp.uint8), axis=0, dtype=jnp.uint8
    )
    total = jnp.sum(columns, dtype=jnp.int32)
    if main < flat.size:
        total = total + jnp.sum(flat[main:], dtype=jnp.int32)
    return total


def _sample_positions(sizes: Sequence[int]) -> list[np.ndarray]:
    """Per leaf, sorted flat positions of about ``_SAMPLE_SIZE`` in all."""
    total = sum(sizes)
    rng = np.random.default_rng(0)
    out = []
    for size in sizes:
        take = min(size, max(1, -(-_SAMPLE_SIZE * size // total)))
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


def _sample_guesses(keys, valid, k, n_valid) -> tuple[jax.Array, jax.Array]:
    """Two probes from a sample that bracket the k-th lowest key with high
    probability: the sampled key about two standard deviations of the
    estimate below it, and the key just above the one as far above it (so a
    value shared by many entries, such as the zeros of pruned weights, ends
    up inside the bracket as a whole)."""
    sizes = [int(np.prod(x.shape)) for x in keys]
    pos = _sample_positions(sizes)
    sample = jnp.concatenate([_take(x, p) for x, p in zip(keys, pos)])
    ok = jnp.concatenate(
        [
            jnp.ones(p.size, bool) if v is None else _take(v, p)
            for v, p in zip(valid, pos)
        ]
    )
    # Each sampled key's rank among the valid sample, ties by position.
    index = jnp.arange(sample.size)
    earlier = (sample[None, :] < sample[:, None]) | (
        (sample[None, :] == sample[:, None]) & (index[None, :] < index[:, None])
    )
    rank = jnp.sum(earlier & ok[None, :], axis=1, dtype=jnp.int32)
    m = jnp.sum(ok, dtype=jnp.int32).astype(jnp.float32)
    f = k.astype(jnp.float32) / jnp.maximum(n_valid, 1).astype(jnp.float32)
    r = f * m
    # A sample of the whole group gives the k-th key itself.
    whole = sum(p.size for p in pos) == sum(sizes)
    spread = 0.0 if whole else 2.0 * jnp.sqrt(r * (1.0 - f)) + 1.0
    last = jnp.maximum(m - 1.0, 0.0)

    def at_rank(x):
        j = jnp.clip(jnp.floor(x), 0.0, last).astype(jnp.int32)
        return jnp.max(jnp.where(ok & (rank == j), sample, 0).astype(sample.dtype))

    return at_rank(r - spread), at_rank(r + spread) + 1


def _search(count, ks, hi, c_hi, guesses, udt, float_dtype):
    """Per group, a threshold ``t`` with ``count(t) == k``, or where there is
    none (ties straddle the k-th entry), the key ``lo`` with
    ``count(lo) < k < count(lo + 1)``.

    ``count`` maps one threshold per group to the number of entries below
    each; it is monotone, ``count(0) == 0`` and ``count(hi) == c_hi``. Each
    step probes inside the bracket by interpolating between its counts, which
    on smooth data takes a handful of passes; a probe that fails to halve the
    bracket's count makes the next one a bisection of its keys, so a bracket
    of 2**b keys closes in at most about 3b steps whatever the data. Guesses
    ``(step, key)`` replace the probe of that step when inside the bracket.

    The keys are order keys of ``float_dtype``: the interpolation runs on
    their values once both ends are finite numbers, since on most data the
    count is closer to linear in the value than in the key, whose slope
    halves at every power of two.

    Returns:
      Lists ``lo, c_lo, hit, t`` per group: ``hit`` says ``count(t) == k``;
      otherwise ``count(lo) = c_lo < k < count(lo + 1)``.
    """
    groups = range(len(ks))
    n_guessed = max((at + 1 for g in guesses for at, _ in g), default=0)
    fdt = jnp.float64 if udt.itemsize == 8 else jnp.float32
    # The largest float below 2**bits, so the conversion back cannot overflow.
    top = float(np.nextafter(np.asarray(2.0 ** (8 * udt.itemsize), fdt), 0))
    one = jnp.ones((), udt)
    zero = jnp.zeros((), udt)

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
            frac = (target - c_lo[g].astype(fdt)) / width.astype(fdt)
            offset = jnp.minimum(jnp.floor(frac * span.astype(fdt)), top).astype(udt)
            a, b = _key_value(lo[g], float_dtype), _key_value(hi[g], float_dtype)
            value = a + frac.astype(float_dtype) * (b - a)
            by_value = jnp.clip(order_key(value, float_dtype), lo[g], hi[g]) - lo[g]
            offset = jnp.where(
                jnp.isfinite(a) & jnp.isfinite(b) & jnp.isfinite(value),
                by_value,
                offset,
            )
            t = jnp.where(
                bisect[g], lo[g] + span // 2, lo[g] + jnp.clip(offset, one, span - one)
            )
            for at, key in guesses[g]:
                t = jnp.where((i == at) & (lo[g] < key) & (key < hi[g]), key, t)
            probes.append(t)
        counts = count(probes)
        new = [[] for _ in range(7)]
        for g in groups:
            t, c = probes[g], counts[g]
            live = ~hit[g] & (hi[g] - lo[g] > one)
            below, above = live & (c < ks[g]), live & (c > ks[g])
            nlo, nc_lo = jnp.where(below, t, lo[g]), jnp.where(below, c, c_lo[g])
            nhi, nc_hi = jnp.where(above, t, hi[g]), jnp.where(above, c, c_hi[g])
            found = live & (c == ks[g])
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
        return ~jnp.all(jnp.stack([h | (b - a == one) for a, b, h in zip(lo, hi, hit)]))

    zeros = tuple(jnp.zeros((), jnp.int32) for _ in groups)
    state = (
        jnp.zeros((), jnp.int32),
        tuple(zero for _ in groups),
        tuple(hi),
        zeros,
        tuple(c_hi),
        tuple((k == 0) | (k == c) for k, c in zip(ks, c_hi)),
        tuple(jnp.where(k == 0, zero, h) for k, h in zip(ks, hi)),
        tuple(jnp.zeros((), bool) for _ in groups),
    )
    _, lo, _, c_lo, _, hit, t_hit, _ = lax.while_loop(unfinished, step, state)
    return list(lo), list(c_lo), list(hit), list(t_hit)


def prune_lowest(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array | int],
    valid: Sequence[Sequence[jax.Array | None]] | None = None,
) -> list[list[jax.Array]]:
    """Boolean "pruned" arrays marking exactly ``counts[g]`` lowest entries.

    Each group is a list of score arrays sharing one threshold (one leaf for
    layer-wise selection, every leaf for global selection). All groups are
    searched in the same loop so a layer-wise mask is one loop, not one per
    leaf. Entries where ``valid`` is False are never counted nor pruned.

    A sample of the scores brackets the threshold and interpolation closes
    the bracket, each step one compare-and-count pass (9 to 15 on the MLP
    and 10^8-score cases of ``benchmarks/bench_masks.py``, against 20 to 32
    for one pass per key bit). Ties that straddle the threshold are broken by
    bisecting on the position, as the reference does. Nothing is sorted and
    the extra memory is one key array per leaf. The result is bit for bit
    that of :func:`prune_lowest_by_bisection`.

    Args:
      groups: score arrays, grouped by shared threshold.
      counts: number of entries to prune in each group (int or int32 scalar,
        clipped to the group's valid size).
      valid: optional bool arrays (or ``None`` for all valid), as ``groups``.

    Returns:
      Bool arrays, ``True`` where pruned, in the layout of ``groups``.
    """
    all_scores = [s for g in groups for s in g]
    if not all_scores:
        return [[] for _ in groups]
    keys, udt, valid, sizes, n_valid, ks = _prepared(groups, counts, valid, _count)

    def masked(x, v):
        return x if v is None else x & v

    def below(ts):
        return [
            sum(_count(masked(k < t, v)) for k, v in zip(keys[g], valid[g]))
            for g, t in enumerate(ts)
        ]

    guesses = []
    for g in range(len(groups)):
        below_guess, above_guess = _sample_guesses(keys[g], valid[g], ks[g], n_valid[g])
        guesses.append([(0, below_guess), (1, above_guess)])
    top = jnp.asarray(np.iinfo(udt).max, udt)
    fdt = jnp.dtype(jnp.float64 if udt.itemsize == 8 else jnp.float32)
    lo, c_lo, hit, t_hit = _search(
        below, ks, [top] * len(groups), n_valid, guesses, udt, fdt
    )
    # A hit prunes the keys below it; otherwise those below lo and some ties.
    thresholds = [jnp.where(h, t, a) for h, t, a in zip(hit, t_hit, lo)]
    offsets = [np.cumsum([0] + [int(np.prod(s.shape)) for s in g]) for g in groups]
    positions = [
        [_flat_index(s.shape, int(o)) for s, o in zip(g, offs)]
        for g, offs in zip(groups, offsets)
    ]
    # Without a hit, ties at lo straddle the k-th entry: the latest `need`
    # of them are pruned, found by bisecting on the position as the
    # reference does (rare, so its fixed number of passes costs little).
    ties = [
        [masked((k == t) & ~h, v) for k, v in zip(keys[g], valid[g])]
        for g, (t, h) in enumerate(zip(lo, hit))
    ]
    need = [k - c for k, c in zip(ks, c_lo)]
    cuts = lax.cond(
        jnp.all(jnp.stack(hit)),
        lambda: tuple(jnp.zeros((), jnp.uint32) for _ in groups),
        lambda: _position_cuts(ties, positions, need, max(sizes), _count),
    )
    return [
        [
            masked(k < t, v) | (tie & (p >= c))
            for k, v, tie, p in zip(keys[g], valid[g], ties[g], positions[g])
        ]
        for g, (t, c) in enumerate(zip(thresholds, cuts))
    ]
