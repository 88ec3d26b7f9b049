"""Exact selection of the lowest-scoring entries without sorting.

The k lowest of n scores are found by bisection on the bits of an order key:
a float's bit pattern mapped to an unsigned integer that sorts like the float
(NaN lowest). Each of the key's 32 (64 for float64) bits costs one fused
compare-and-count pass, so the work is O(n) per bit, the number selected can
be a traced value, and everything is elementwise or a full reduction, which
XLA shards without gathers. Ties at the threshold are broken by a second
bisection on the position (later positions are pruned first).
"""

from __future__ import annotations

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
    x = scores.astype(fdt)
    x = jnp.where(x == 0, jnp.zeros((), fdt), x)
    bits = lax.bitcast_convert_type(x, udt)
    sign_bit = jnp.asarray(1 << (8 * udt.itemsize - 1), udt)
    key = jnp.where((bits & sign_bit) != 0, ~bits, bits | sign_bit)
    return jnp.where(jnp.isnan(x), jnp.zeros((), udt), key)


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


def prune_lowest(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array | int],
    valid: Sequence[Sequence[jax.Array | None]] | None = None,
) -> list[list[jax.Array]]:
    """Boolean "pruned" arrays marking exactly ``counts[g]`` lowest entries.

    Each group is a list of score arrays sharing one threshold (one leaf for
    layer-wise selection, every leaf for global selection). All groups are
    bisected in the same loop so a layer-wise mask is one loop, not one per
    leaf. Entries where ``valid`` is False are never counted nor pruned.

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
    wide = any(jnp.dtype(s.dtype).itemsize == 8 for s in all_scores)
    fdt = jnp.dtype(jnp.float64 if wide else jnp.float32)
    _, udt = _key_dtypes(fdt)
    nbits = 8 * udt.itemsize
    keys = [[order_key(s, fdt) for s in g] for g in groups]
    if valid is None:
        valid = [[None] * len(g) for g in groups]

    def masked(x, v):
        return x if v is None else x & v

    def count(pred_per_leaf, g):
        return sum(
            jnp.sum(masked(p, v), dtype=jnp.int32)
            for p, v in zip(pred_per_leaf, valid[g])
        )

    sizes = [sum(int(np.prod(s.shape)) for s in g) for g in groups]
    if max(sizes) > _MAX_GROUP_SIZE:
        raise ValueError(
            f"selection over {max(sizes)} entries exceeds the supported "
            f"{_MAX_GROUP_SIZE}; select layer-wise or in smaller groups"
        )
    ks = []
    for g, k in enumerate(counts):
        n_valid = sum(
            jnp.sum(v, dtype=jnp.int32) if v is not None else int(np.prod(s.shape))
            for s, v in zip(groups[g], valid[g])
        )
        ks.append(jnp.clip(jnp.asarray(k, jnp.int32), 0, n_valid))

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
    ibits = max(max(sizes).bit_length(), 1)

    def position_step(i, js):
        bit = jnp.left_shift(
            jnp.ones((), jnp.uint32), (ibits - 1 - i).astype(jnp.uint32)
        )
        out = []
        for g, j in enumerate(js):
            cand = j | bit
            at_or_after = sum(
                jnp.sum(t & (p >= cand), dtype=jnp.int32)
                for t, p in zip(ties[g], positions[g])
            )
            out.append(jnp.where(at_or_after >= need[g], cand, j))
        return tuple(out)

    # Only a threshold shared by more entries than still need pruning needs
    # the position bisection; otherwise every tie is pruned (cut at 0).
    partial = jnp.any(jnp.stack([n > r for n, r in zip(n_ties, need)]))
    cuts = lax.cond(
        partial,
        lambda: lax.fori_loop(
            0, ibits, position_step, tuple(jnp.zeros((), jnp.uint32) for _ in groups)
        ),
        lambda: tuple(jnp.zeros((), jnp.uint32) for _ in groups),
    )
    return [
        [b | (t & (p >= c)) for b, t, p in zip(bg, tg, pg)]
        for bg, tg, pg, c in zip(below, ties, positions, cuts)
    ]
