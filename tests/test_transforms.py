"""Tests for jaxsparse.transforms: exact zeros, exact sparsity, one
compilation, moment resets, and clear errors."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_helpers import standard

import jaxsparse as js
from jaxsparse import schedules
from jaxsparse.experiments.models import init_mlp, loss_fn

ROOT = Path(__file__).resolve().parents[1]


PARAMS = init_mlp(jax.random.key(0), (20, 30, 10))
X = jax.random.normal(jax.random.key(1), (64, 20))
Y = jnp.arange(64) % 10


def base():
    return optax.chain(
        standard(optax.clip_by_global_norm(1.0)),
        standard(optax.adamw(1e-2, weight_decay=1e-2)),
    )


def run(tx, steps, params=PARAMS, on_step=None, **extra):
    """Trains with one jitted step; returns params, state and trace count."""
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        x = X.astype(jax.tree.leaves(params)[0].dtype)
        grads = jax.grad(loss_fn)(params, x, Y)
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state)
        if on_step is not None:
            on_step(t, params, state)
    return params, state, len(traces)


def kernels(tree):
    return [tree["dense_0"]["kernel"], tree["dense_1"]["kernel"]]


def assert_pruned_exactly_zero(params, mask):
    for p, m in zip(kernels(params), kernels(mask)):
        m = np.asarray(m)
        assert np.all(np.asarray(p)[~m] == 0.0)


FIXED = js.layerwise_mask(js.saliency.random(PARAMS, jax.random.key(5)), 0.7)

TRANSFORMS = {
    "keep_masked": lambda: optax.chain(base(), js.keep_masked(FIXED)),
    "prune-polynomial": lambda: optax.chain(
        base(),
        js.prune(
            js.saliency.magnitude,
            schedules.polynomial(0.0, 0.9, begin=10, end=200, every=10),
        ),
    ),
    "prune-iterative-global": lambda: optax.chain(
        base(),
        js.prune(
            js.saliency.magnitude,
            schedules.iterative([(50, 0.5), (150, 0.8)]),
            distribution=js.Global(),
        ),
    ),
    "prune-iht": lambda: optax.chain(
        base(),
        js.prune(
            js.saliency.magnitude,
            schedules.iht(0.8, sparse_steps=50, dense_steps=30, cycles=2),
        ),
    ),
    "prune-static-random": lambda: optax.chain(
        base(), js.prune(js.saliency.random, schedules.constant(0.6), key=3)
    ),
    "prune-channels": lambda: optax.chain(
        base(),
        js.prune(
            js.saliency.magnitude,
            schedules.constant(0.5, at=20),
            granularity=js.Channel(-1),
        ),
    ),
    "sparsify-taylor": lambda: js.sparsify(
        base(), js.saliency.taylor, schedules.iterative([(0, 0.5), (100, 0.8)])
    ),
    "rigl": lambda: js.rigl(base(), 0.9, every=20, end=250, key=0),
    "set": lambda: js.sparse_evolutionary(base(), 0.9, every=20, end=250, key=1),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_300_steps_pruned_weights_exactly_zero_and_one_compilation(name):
    params, state, traces = run(TRANSFORMS[name](), 300)
    mask = optax.tree.get(state, "mask")
    assert_pruned_exactly_zero(params, mask)
    assert mask["dense_0"]["bias"] is None
    assert traces == 1
    assert float(js.sparsity(mask)) > 0.4


def test_sparsity_after_each_milestone_is_exact():
    milestones = [(10, 0.3), (40, 0.6), (80, 0.85)]
    tx = optax.chain(
        base(), js.prune(js.saliency.magnitude, schedules.iterative(milestones))
    )
    seen = {}

    def record(t, params, state):
        seen[t] = optax.tree.get(state, "mask")

    run(tx, 100, on_step=record)
    for step, target in milestones:
        for t in (step, step + 5):
            for m in kernels(seen[t]):
                assert int((~np.asarray(m)).sum()) == round(target * m.size), (
                    t,
                    m.shape,
                )
    assert float(js.sparsity(seen[9])) == 0.0


def test_global_distribution_is_exact_overall():
    tx = optax.chain(
        base(),
        js.prune(
            js.saliency.magnitude,
            schedules.constant(0.77, at=5),
            distribution=js.Global(),
        ),
    )
    _, state, _ = run(tx, 10)
    mask = optax.tree.get(state, "mask")
    total = sum(m.size for m in kernels(mask))
    assert sum(int((~np.asarray(m)).sum()) for m in kernels(mask)) == round(
        0.77 * total
    )


@pytest.mark.parametrize("make", [js.rigl, js.sparse_evolutionary])
def test_dynamic_sparsity_constant_and_mask_moves_only_on_update_steps(make):
    tx = make(base(), 0.8, every=10, end=60, key=4)
    history = []
    _, _, traces = run(tx, 80, on_step=lambda t, p, s: history.append((t, p, s)))
    assert traces == 1
    previous = None
    for t, params, state in history:
        mask = optax.tree.get(state, "mask")
        for m in kernels(mask):
            assert int((~np.asarray(m)).sum()) == round(0.8 * m.size)
        assert_pruned_exactly_zero(params, mask)
        if previous is not None:
            moved = float(js.schedules.mask_distance(previous, mask))
            if t % 10 == 0 and 0 < t < 60:
                assert moved > 0.0, t
            else:
                assert moved == 0.0, t
        previous = mask


def test_drop_smallest_grow_largest_gradient():
    params = {"w": jnp.array([[3.0, 2.0, 1.0, 0.5]]) * jnp.ones((2, 1))}
    grads = {"w": jnp.array([[0.0, 0.0, 0.0, 9.0]]) * jnp.ones((2, 1))}
    tx = js.dynamic_sparse(
        standard(optax.sgd(0.0)),
        lambda grads: jax.tree.map(jnp.abs, grads),
        0.5,
        every=1,
        end=100,
        key=0,
        drop_fraction=1.0,
        init_criterion=js.saliency.magnitude,
    )
    state = tx.init(params)
    np.testing.assert_array_equal(
        np.asarray(state.mask["w"])[0], [True, True, False, False]
    )
    state = state._replace(count=jnp.asarray(50, jnp.int32))
    _, state = tx.update(grads, state, params)
    # Drop fraction 0.5 at t = 50 of 100: one of the two active weights per
    # row goes (the smaller, 2.0) and the largest gradient (last) grows.
    np.testing.assert_array_equal(
        np.asarray(state.mask["w"])[0], [True, False, False, True]
    )


@pytest.mark.parametrize(
    "inner,field",
    [
        (lambda: standard(optax.adam(1e-2)), "mu"),
        (lambda: standard(optax.sgd(1e-2, momentum=0.9)), "trace"),
        (lambda: standard(optax.adamw(1e-2)), "nu"),
        (lambda: standard(optax.lion(1e-3)), "mu"),
    ],
)
def test_sparsify_zeroes_moments_where_mask_changes(inner, field):
    tx = js.sparsify(inner(), js.saliency.magnitude, schedules.constant(0.6, at=5))
    history = []
    run(tx, 7, on_step=lambda t, p, s: history.append((p, s)))
    before = optax.tree.get(history[4][1], field)
    after = optax.tree.get(history[5][1], field)
    mask = optax.tree.get(history[5][1], "mask")
    for b, a, m in zip(kernels(before), kernels(after), kernels(mask)):
        m = np.asarray(m)
        assert np.all(np.asarray(b)[~m] != 0.0)  # the moments had built up
        assert np.all(np.asarray(a)[~m] == 0.0)
    moments = optax.tree.get(history[6][1], field)
    for mo, m in zip(kernels(moments), kernels(mask)):
        assert np.all(np.asarray(mo)[~np.asarray(m)] == 0.0)


def test_regrown_weights_start_at_zero_with_zero_moments():
    tx = js.rigl(standard(optax.adam(1e-2)), 0.8, every=5, end=50, key=2)
    history = []
    run(tx, 6, on_step=lambda t, p, s: history.append((p, s)))
    old = optax.tree.get(history[4][1], "mask")
    params, state = history[5]
    new = optax.tree.get(state, "mask")
    mu = optax.tree.get(state, "mu")
    grew = 0
    for o, n, p, m in zip(kernels(old), kernels(new), kernels(params), kernels(mu)):
        regrown = np.asarray(n) & ~np.asarray(o)
        grew += regrown.sum()
        assert np.all(np.asarray(p)[regrown] == 0.0)
        assert np.all(np.asarray(m)[regrown] == 0.0)
    assert grew > 0


def test_chain_form_sees_updates_wrapper_sees_raw_gradients():
    params = {"w": jnp.ones((1, 4))}
    grads = {"w": jnp.array([[1.0, 2.0, -3.0, -4.0]])}

    def signed(grads):
        return grads

    chain = optax.chain(optax.scale(-1.0), js.prune(signed, schedules.constant(0.5)))
    _, state = chain.update(grads, chain.init(params), params)
    np.testing.assert_array_equal(
        np.asarray(state[1].mask["w"]), [[False, False, True, True]]
    )
    wrapped = js.sparsify(optax.scale(-1.0), signed, schedules.constant(0.5))
    _, state = wrapped.update(grads, wrapped.init(params), params)
    np.testing.assert_array_equal(
        np.asarray(state.mask["w"]), [[True, True, False, False]]
    )


def test_extra_args_reach_adaptive_schedule_and_criterion():
    seen = []

    def criterion(params, validation_loss):
        seen.append(validation_loss)
        return js.saliency.magnitude(params)

    tx = optax.chain(
        base(),
        js.prune(criterion, schedules.adaptive(every=10, final=0.9, min_rate=0.2)),
    )
    _, state, traces = run(tx, 30, validation_loss=jnp.float32(1.0))
    assert traces == 1 and seen
    sparsity = 1 - (1 - 0.2) ** 3
    for m in kernels(optax.tree.get(state, "mask")):
        assert int((~np.asarray(m)).sum()) == round(np.float32(sparsity) * m.size)
    with pytest.raises(ValueError, match="needs the validation loss"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS)


def test_works_inside_multisteps():
    tx = standard(
        optax.MultiSteps(
            optax.chain(
                optax.adam(1e-2),
                js.prune(js.saliency.magnitude, schedules.constant(0.5)),
            ),
            every_k_schedule=2,
        )
    )
    params, state, traces = run(tx, 6)
    assert traces == 1
    # MultiSteps applies the inner chain every 2nd step; the mask it made
    # at its first real step keeps the kernels at exactly 50 %.
    assert float(js.sparsity(params)) == 0.5
    assert_pruned_exactly_zero(params, optax.tree.get(state, "mask"))


@pytest.mark.parametrize(
    "make,error,message",
    [
        (
            lambda: js.keep_masked(FIXED).update(
                PARAMS, js.keep_masked(FIXED).init(PARAMS)
            ),
            ValueError,
            "keep_masked needs the params",
        ),
        (
            lambda: js.keep_masked({"dense_0": None}).init(PARAMS),
            ValueError,
            "mask tree does not match",
        ),
        (
            lambda: js.prune(js.saliency.random, schedules.constant(0.5)),
            ValueError,
            "needs a PRNG key",
        ),
        (lambda: js.prune(js.saliency.magnitude, 0.5), TypeError, "schedule must be"),
        (
            lambda: js.sparsify("adam", js.saliency.magnitude, schedules.constant(0.5)),
            TypeError,
            "inner must be an optax",
        ),
        (
            lambda: js.rigl(standard(optax.adam(1e-3)), 1.0, every=10, end=100, key=0),
            ValueError,
            r"sparsity must be in \[0, 1\)",
        ),
        (
            lambda: js.rigl(standard(optax.adam(1e-3)), 0.5, every=0, end=100, key=0),
            ValueError,
            "every must be a positive int",
        ),
    ],
)
def test_bad_configuration(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_prune_without_params_raises():
    tx = js.prune(js.saliency.magnitude, schedules.constant(0.5))
    with pytest.raises(ValueError, match="prune needs the params"):
        tx.update(PARAMS, tx.init(PARAMS))


def test_bf16_params_keep_dtype_and_zeros():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    tx = optax.chain(
        standard(optax.sgd(1e-2)),
        js.prune(js.saliency.magnitude, schedules.constant(0.5)),
    )
    out, state, _ = run(tx, 5, params=params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    assert_pruned_exactly_zero(out, optax.tree.get(state, "mask"))


def load_example(name):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def as_users_run_it():
    """The examples are user code calling optax directly: standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_example_nnx_optimizer(as_users_run_it):
    assert load_example("nnx_prune").main(steps=60, sparsity=0.8) == pytest.approx(
        0.8, abs=1e-3
    )


def test_example_linen_train_state(as_users_run_it):
    assert load_example("linen_rigl").main(steps=60, sparsity=0.7) == pytest.approx(
        0.7, abs=1e-3
    )


def test_example_general_schedule(as_users_run_it):
    report = load_example("general_schedule").main(steps_per_phase=15)
    assert report.sparsity == pytest.approx(0.9, abs=1e-3)


def test_set_drops_smallest_positive_and_largest_negative_by_a_constant_zeta():
    """Mocanu et al. 2018: remove zeta of the smallest positive weights and
    zeta of the largest negative ones, regrow as many; zeta is constant."""
    active = [0.2, 0.3, 0.5, 0.9, 1.5, 3.0, -0.05, -0.06, -0.07, -3.0]
    params = {"w": jnp.array([active + [0.0] * 10])}
    # Grow where the weights were inactive, so the drop is seen alone.
    grow_scores = {"w": jnp.array([[0.0] * 10 + [1.0] * 10])}
    for t in (10, 90):
        tx = js.dynamic_sparse(
            standard(optax.sgd(0.0)),
            lambda params: grow_scores,
            0.5,
            every=10,
            end=100,
            key=0,
            drop_fraction=0.5,
            init_criterion=js.saliency.magnitude,
            drop="signed",
            drop_decay="constant",
        )
        state = tx.init(params)
        state = state._replace(count=jnp.asarray(t, jnp.int32))
        _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        kept = np.asarray(state.mask["w"])[0]
        # 3 of 6 positives (0.2, 0.3, 0.5), 2 of 4 negatives (-0.05, -0.06);
        # magnitude would have dropped -0.07 instead of 0.5.
        want = [False, False, False, True, True, True, False, False, True, True]
        np.testing.assert_array_equal(kept[:10], want, err_msg=str(t))
        assert kept[10:].sum() == 5
    with pytest.raises(ValueError, match="drop must be"):
        js.dynamic_sparse(
            standard(optax.sgd(0.1)),
            js.saliency.magnitude,
            0.5,
            every=1,
            end=2,
            key=0,
            drop="largest",
        )


def test_sparse_evolutionary_defaults_to_the_paper():
    def states(tx):
        out = []
        run(tx, 45, on_step=lambda t, p, s: out.append(optax.tree.get(s, "mask")))
        return out

    paper = js.dynamic_sparse(
        base(),
        js.saliency.random,
        0.8,
        every=10,
        end=100,
        key=3,
        drop="signed",
        drop_decay="constant",
        grow_init=jax.nn.initializers.normal(0.1),
    )
    set_ = js.sparse_evolutionary(base(), 0.8, every=10, end=100, key=3)
    rigl_like = js.sparse_evolutionary(
        base(),
        0.8,
        every=10,
        end=100,
        key=3,
        drop="magnitude",
        drop_decay="cosine",
    )
    a, b, c = states(paper), states(set_), states(rigl_like)
    for x, y in zip(a, b):
        jax.tree.map(np.testing.assert_array_equal, x, y)
    assert any(float(js.schedules.mask_distance(x, z)) > 0 for x, z in zip(a, c))


@pytest.mark.parametrize("grow_init", [None, "set"])
def test_grown_weights_start_at_zero_or_at_a_draw(grow_init):
    """RigL grows at 0; SET draws new weights from N(0, 0.1^2) (Mocanu et al.
    2018, the authors' code) so that none starts dead at exactly 0."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 128)).astype(np.float32)
    params = {"w": jnp.asarray(w), "b": jnp.zeros(128)}
    kwargs = {} if grow_init == "set" else {"grow_scale": 0.0}
    tx = js.sparse_evolutionary(
        standard(optax.adam(0.0)),
        0.75,
        every=1,
        end=10,
        key=7,
        drop_fraction=0.5,
        **kwargs,
    )
    state = tx.init(params)
    # One step moves the mask: kept weights stay (learning rate 0), dropped
    # ones become 0, grown ones start where the rule says.
    grads = jax.tree.map(jnp.ones_like, params)
    state = state._replace(count=jnp.asarray(1, jnp.int32))
    params["w"] = jnp.where(state.mask["w"], params["w"], 0.0)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    old_m, new_m = np.asarray(state.mask["w"]), np.asarray(new_state.mask["w"])
    grown, dropped, kept = new_m & ~old_m, old_m & ~new_m, old_m & new_m
    assert grown.sum() == dropped.sum() > 800
    out = np.asarray(new["w"])
    np.testing.assert_array_equal(out[kept], np.asarray(params["w"])[kept])
    assert np.all(out[~new_m] == 0.0)
    if grow_init is None:
        assert np.all(out[grown] == 0.0)
    else:
        assert np.all(out[grown] != 0.0)
        assert np.std(out[grown]) == pytest.approx(0.1, rel=0.1)
        assert abs(np.mean(out[grown])) < 0.01
    for moment in (new_state.inner_state[0].mu, new_state.inner_state[0].nu):
        assert np.all(np.asarray(moment["w"])[grown | dropped] == 0.0)
    with pytest.raises(TypeError, match="grow_init must be an initializer"):
        js.dynamic_sparse(
            standard(optax.adam(0.1)),
            js.saliency.random,
            0.5,
            every=1,
            end=2,
            key=0,
            grow_init=0.1,
        )
    with pytest.raises(ValueError, match=r"grow_scale must be >= 0, got -0\.1"):
        js.sparse_evolutionary(
            standard(optax.adam(0.1)), 0.5, every=1, end=2, key=0, grow_scale=-0.1
        )


@pytest.mark.parametrize("form", ["chain", "wrapper"])
@pytest.mark.parametrize(
    "make,restored",
    [
        (
            lambda **k: schedules.iht(
                0.5, sparse_steps=2, dense_steps=2, cycles=1, warmup=1, **k
            ),
            True,
        ),
        (
            lambda **k: schedules.iht(
                0.5,
                sparse_steps=2,
                dense_steps=2,
                cycles=1,
                warmup=1,
                restore=False,
                **k,
            ),
            False,
        ),
        (lambda **k: schedules.phases([(1, None), (2, 0.5), (2, None)], **k), False),
        (
            lambda **k: schedules.phases(
                [(1, None), (2, 0.5), (2, None)], restore=True, **k
            ),
            True,
        ),
    ],
)
def test_dense_phase_restores_or_restarts_pruned_weights(form, make, restored):
    """IHT (Jin et al. 2016) brings the truncated weights back with their
    values; DSD (Han et al. 2017) restarts them from 0."""
    w0 = jnp.array([[4.0, -1.0, 3.0, 0.5], [-2.0, 0.25, 1.5, -6.0]])
    params = {"w": w0}
    schedule = make()
    if form == "chain":
        tx = optax.chain(
            standard(optax.sgd(0.0)), js.prune(js.saliency.magnitude, schedule)
        )
    else:
        tx = js.sparsify(standard(optax.sgd(0.0)), js.saliency.magnitude, schedule)
    state = tx.init(params)
    step = jax.jit(tx.update)
    seen = []
    for _ in range(5):
        updates, state = step(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
        seen.append(np.asarray(params["w"]))
    small = np.abs(np.asarray(w0)) < 1.6
    np.testing.assert_array_equal(seen[1][small], 0.0)  # sparse phase
    np.testing.assert_array_equal(seen[1][~small], np.asarray(w0)[~small])
    expected = np.asarray(w0) if restored else np.where(small, 0.0, w0)
    np.testing.assert_array_equal(seen[3], expected)  # dense phase


def test_dsd_restarts_from_zero_by_default():
    assert not schedules.dsd(0.5, dense_steps=2, sparse_steps=2).restores
    assert schedules.dsd(0.5, dense_steps=2, sparse_steps=2, restore=True).restores
    assert schedules.iht(0.5, sparse_steps=2, dense_steps=2, cycles=1).restores


def test_custom_per_layer_targets_follow_a_schedule():
    """Regression: Custom with a schedule raised at the first update (prune,
    sparsify) or at init (rigl). Han et al.'s per-layer ratios reached by an
    iterative schedule: each leaf ends at its own target."""
    params = {
        "fc1": jax.random.normal(jax.random.key(0), (20, 30)),
        "fc2": jax.random.normal(jax.random.key(1), (30, 10)),
        "fc3": jax.random.normal(jax.random.key(2), (10, 4)),
    }
    custom = js.Custom({"fc1": 0.92, "fc2": 0.9, "fc3": 0.75})
    final = custom.overall(params)
    schedule = schedules.iterative([(2, final / 3), (4, 2 * final / 3), (6, final)])
    want = {"fc1": 0.92, "fc2": 0.9, "fc3": 0.75}
    for tx in (
        optax.chain(
            standard(optax.sgd(0.0)),
            js.prune(js.saliency.magnitude, schedule, distribution=custom),
        ),
        js.sparsify(
            standard(optax.sgd(0.0)),
            js.saliency.magnitude,
            schedule,
            distribution=custom,
        ),
    ):
        state = tx.init(params)
        step = jax.jit(tx.update)
        for t in range(8):
            _, state = step(jax.tree.map(jnp.zeros_like, params), state, params)
            mask = optax.tree.get(state, "mask")
            if t == 3:  # a third of the way
                for k, s in want.items():
                    pruned = int((~np.asarray(mask[k])).sum())
                    assert pruned == round(s / 3 * mask[k].size), (k, t)
        for k, s in want.items():
            assert int((~np.asarray(mask[k])).sum()) == round(s * mask[k].size), k
    rigl = js.rigl(
        standard(optax.sgd(0.1)), final, every=2, end=10, key=0, distribution=custom
    )
    mask = rigl.init(params).mask
    for k, s in want.items():
        assert int((~np.asarray(mask[k])).sum()) == round(s * mask[k].size), k


@pytest.mark.parametrize(
    "name,tx",
    [
        ("keep_masked", lambda p: js.keep_masked(js.dense_mask(p))),
        ("prune", lambda p: js.prune(js.saliency.magnitude, schedules.constant(0.5))),
        (
            "sparsify",
            lambda p: js.sparsify(
                optax.sgd(0.1), js.saliency.magnitude, schedules.constant(0.5)
            ),
        ),
        ("add_penalty", lambda p: js.regularizers.add_penalty(js.regularizers.l1, 0.1)),
    ],
)
def test_updates_of_another_tree_name_the_transform_and_leaf(name, tx):
    """Regression: a mismatched updates tree surfaced JAX's raw pytree error."""
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2))}
    t = tx(params)
    state = t.init(params)
    with pytest.raises(ValueError, match=rf"{name}: updates tree does not match.*b"):
        t.update({"a": jnp.ones((2, 3))}, state, params)
    with pytest.raises(ValueError, match=rf"b: {name}: updates shape \(2, 3\)"):
        t.update({"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}, state, params)
