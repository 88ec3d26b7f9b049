"""Tests for jaxsparse.schedules against closed forms and hand-built tables."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import schedules
from jaxsparse.schedules import Phase


def table(schedule, steps):
    """(sparsity, update, dense) for each step, eager and jitted agreeing
    (XLA may fuse the float arithmetic differently: to the last ulp)."""
    eager = [schedule(t) for t in steps]
    jitted = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
    for i, t in enumerate(eager):
        assert float(t.sparsity) == pytest.approx(float(jitted.sparsity[i]), rel=1e-6)
        assert bool(t.update) == bool(jitted.update[i])
        assert bool(t.dense) == bool(jitted.dense[i])
    return (
        np.array([float(t.sparsity) for t in eager]),
        np.array([bool(t.update) for t in eager]),
        np.array([bool(t.dense) for t in eager]),
    )


@pytest.mark.parametrize("power", [3.0, 1.0])
def test_polynomial_matches_zhu_gupta(power):
    sched = schedules.polynomial(0.1, 0.9, begin=100, end=2000, every=100, power=power)
    steps = np.arange(0, 2300, 7).tolist() + list(range(100, 2001, 100))
    sp, up, dense = table(sched, steps)
    for t, s in zip(steps, sp):
        progress = min(max((t - 100) / 1900, 0.0), 1.0)
        expected = 0.9 + (0.1 - 0.9) * (1 - progress) ** power
        assert s == pytest.approx(expected, abs=1e-6), t
    assert {t for t, u in zip(steps, up) if u} == set(range(100, 2001, 100))
    assert not dense.any()


def test_polynomial_updates_at_end_off_grid():
    _, up, _ = table(
        schedules.polynomial(0.0, 0.5, begin=0, end=25, every=10), list(range(40))
    )
    assert np.flatnonzero(up).tolist() == [0, 10, 20, 25]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"begin": 200, "end": 100, "every": 10}, "begin must be before end"),
        ({"begin": 100, "end": 100, "every": 10}, "begin must be before end"),
        ({"begin": 0, "end": 100, "every": 0}, "every must be a positive int"),
        ({"begin": -1, "end": 100, "every": 1}, "begin must be a non-negative int"),
    ],
)
def test_polynomial_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedules.polynomial(0.0, 0.9, **kwargs)


@pytest.mark.parametrize("initial,final", [(-0.1, 0.5), (0.0, 1.0), (0.0, 1.5)])
def test_polynomial_bad_sparsity(initial, final):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        schedules.polynomial(initial, final, begin=0, end=10, every=1)


def test_constant_is_one_shot():
    sp, up, _ = table(schedules.constant(0.8, at=3), list(range(6)))
    np.testing.assert_allclose(sp, [0, 0, 0, 0.8, 0.8, 0.8], atol=1e-7)
    assert np.flatnonzero(up).tolist() == [3]
    with pytest.raises(ValueError, match="sparsity must be in"):
        schedules.constant(1.0)


def test_iterative_milestones():
    sp, up, _ = table(
        schedules.iterative([(10, 0.5), (20, 0.75), (30, 0.9)]), list(range(40))
    )
    expected = [0.0] * 10 + [0.5] * 10 + [0.75] * 10 + [0.9] * 10
    np.testing.assert_allclose(sp, expected, atol=1e-7)
    assert np.flatnonzero(up).tolist() == [10, 20, 30]
    with pytest.raises(ValueError, match="strictly increasing"):
        schedules.iterative([(20, 0.5), (10, 0.6)])
    with pytest.raises(ValueError, match="milestone 1 sparsity"):
        schedules.iterative([(10, 0.5), (20, 1.0)])


def test_iht_phases():
    sched = schedules.iht(0.7, sparse_steps=3, dense_steps=2, cycles=2, warmup=1)
    sp, up, dense = table(sched, list(range(14)))
    # warmup D | S S S | D D | S S S | D D | S forever
    assert "".join("D" if d else "S" for d in dense) == "DSSSDDSSSDDSSS"
    assert np.flatnonzero(up).tolist() == [1, 6, 11]
    assert np.all(sp[~dense] == np.float32(0.7))


def test_dsd_ends_dense():
    sp, up, dense = table(
        schedules.dsd(0.5, dense_steps=2, sparse_steps=3), list(range(8))
    )
    assert "".join("D" if d else "S" for d in dense) == "DDSSSDDD"
    assert np.flatnonzero(up).tolist() == [2]
    assert np.all(sp[~dense] == np.float32(0.5))


def test_phases_validation():
    with pytest.raises(ValueError, match="phase 0 steps"):
        schedules.phases([Phase(0, 0.5)])
    with pytest.raises(ValueError, match="phase 1 sparsity"):
        schedules.phases([Phase(3, None), Phase(2, 1.2)])
    with pytest.raises(ValueError, match="must not be empty"):
        schedules.phases([])


def test_cosine_drop_fraction():
    f = schedules.cosine_drop_fraction(0.3, end=100)
    for t in (0, 25, 50, 99, 100, 150):
        expected = 0.15 * (1 + math.cos(math.pi * min(t, 100) / 100))
        assert float(f(t)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        schedules.cosine_drop_fraction(1.5, end=10)


def test_adaptive_rate_grows_with_generalization_loss():
    sched = schedules.adaptive(
        every=10, final=0.9, min_rate=0.1, max_rate=0.5, gl_scale=5.0
    )
    state = sched.init()
    # Validation loss falls: GL = 0, so the rate is min_rate.
    target, state = sched.update(0, state, 1.0)
    assert bool(target.update) and float(target.sparsity) == pytest.approx(0.1)
    target, state = sched.update(5, state, 0.8)
    assert not bool(target.update) and float(state.best_loss) == pytest.approx(0.8)
    # Validation loss 10 % above the best: GL = 10, rate = 0.1 + 0.4 * 10 / 15.
    target, state = sched.update(10, state, 0.88)
    rate = 0.1 + 0.4 * 10 / 15
    assert float(target.sparsity) == pytest.approx(0.1 + rate * 0.9, rel=1e-5)
    assert float(schedules.generalization_loss(0.88, 0.8)) == pytest.approx(10.0)
    for t in range(20, 400, 10):
        target, state = sched.update(t, state, 2.0)
    assert float(target.sparsity) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="min_rate"):
        schedules.adaptive(every=1, final=0.5, min_rate=0.6, max_rate=0.5)


def test_mask_distance_and_early_structure():
    a = {"w": jnp.array([[True, False, True, True]]), "b": None}
    b = {"w": jnp.array([[True, True, True, False]]), "b": None}
    assert float(jax.jit(schedules.mask_distance)(a, b)) == 0.5
    with pytest.raises(ValueError, match="does not match"):
        schedules.mask_distance(a, {"w": a["w"]})
    state = schedules.early_structure_init(a, window=3)
    update = jax.jit(schedules.early_structure_update)
    found = []
    for m in [b, b, a, a, a, a]:
        state = update(state, m)
        found.append(bool(schedules.early_structure_found(state, 0.1)))
    # Distances: 0.5, 0, 0.5, 0, 0, 0: found once the last three are all 0.
    assert found == [False, False, False, False, False, True]
