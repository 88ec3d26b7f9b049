"""Tests for jaxsparse.obs on quadratics with closed-form answers (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_helpers import standard

import jaxsparse as js
from jaxsparse import curvature as cv
from jaxsparse import obs
from jaxsparse.blocks import BlockInverse


@pytest.fixture(autouse=True)
def float64_standard():
    with jax.enable_x64(True):
        yield


N = 8


def quadratic(seed=0):
    """``L(w) = 1/2 (w - w*)^T A (w - w*)`` over one (2, 4) leaf."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(N, N))
    a = m @ m.T + N * np.eye(N)
    w_star = rng.normal(size=N)

    def loss(p):
        d = p["w"].reshape(-1) - w_star
        return 0.5 * d @ jnp.asarray(a) @ d

    return a, w_star, loss


def constrained_minimum(a, w_star, pruned):
    """Exact minimizer of the quadratic with ``w_Q = 0`` (numpy KKT)."""
    free = [i for i in range(N) if i not in pruned]
    w = np.zeros(N)
    w[free] = np.linalg.solve(a[np.ix_(free, free)], (a @ w_star)[free])
    return w


def as_params(w):
    return {"w": jnp.asarray(np.asarray(w).reshape(2, 4))}


def pruned_set(mask):
    return sorted(np.flatnonzero(~np.asarray(mask["w"]).reshape(-1)).tolist())


def test_obs_removes_the_weight_of_least_true_increase():
    a, w_star, loss = quadratic()
    params = as_params(w_star)
    inverse = cv.hessian_inverse(loss, params, damping=1e-12)
    res = obs.obs_prune(params, inverse, 1 / N)
    true_increase = [
        float(loss(as_params(constrained_minimum(a, w_star, [q]))) - loss(params))
        for q in range(N)
    ]
    assert pruned_set(res.mask) == [int(np.argmin(true_increase))]
    np.testing.assert_allclose(
        np.asarray(res.params["w"]).ravel(),
        constrained_minimum(a, w_star, pruned_set(res.mask)),
        atol=1e-12,
    )
    assert float(res.predicted_increase) == pytest.approx(min(true_increase), rel=1e-10)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_joint_update_is_the_exact_constrained_minimum(count):
    a, w_star, loss = quadratic(count)
    params = as_params(w_star)
    inverse = cv.hessian_inverse(loss, params, damping=1e-12)
    res = obs.obs_prune(params, inverse, count / N, method="joint")
    q = pruned_set(res.mask)
    assert len(q) == count
    best = constrained_minimum(a, w_star, q)
    np.testing.assert_allclose(np.asarray(res.params["w"]).ravel(), best, atol=1e-11)
    true = float(loss(res.params) - loss(params))
    assert float(res.predicted_increase) == pytest.approx(true, rel=1e-9)
    # It is the minimum over the set: no other feasible point is lower.
    rng = np.random.default_rng(1)
    for _ in range(20):
        other = best + rng.normal(size=N) * 0.1
        other[q] = 0.0
        assert float(loss(as_params(other))) >= float(loss(res.params)) - 1e-12


def test_independent_sum_matches_single_weight_updates():
    a, w_star, loss = quadratic(4)
    params = as_params(w_star)
    inverse = cv.hessian_inverse(loss, params, damping=1e-12)
    res = obs.obs_prune(params, inverse, 3 / N, method="independent")
    q = pruned_set(res.mask)
    hinv = np.linalg.inv(a)
    delta = -sum(w_star[i] / hinv[i, i] * hinv[:, i] for i in q)
    expected = w_star + delta
    expected[q] = 0.0
    np.testing.assert_allclose(
        np.asarray(res.params["w"]).ravel(), expected, atol=1e-11
    )
    true = float(loss(res.params) - loss(params))
    assert float(res.predicted_increase) == pytest.approx(true, rel=1e-9)


def test_not_at_a_minimum_keeps_the_gradient_term():
    a, w_star, loss = quadratic(5)
    params = as_params(w_star + np.random.default_rng(2).normal(size=N))
    inverse = cv.hessian_inverse(loss, params, damping=1e-12)
    grads = jax.grad(loss)(params)
    res = obs.obs_prune(params, inverse, 3 / N, grads=grads)
    q = pruned_set(res.mask)
    np.testing.assert_allclose(
        np.asarray(res.params["w"]).ravel(),
        constrained_minimum(a, w_star, q),
        atol=1e-10,
    )
    # Of all 3-sets, the chosen one is within the single-weight ranking's
    # reach; its predicted change is the true change on a quadratic.
    assert float(res.predicted_increase) == pytest.approx(
        float(loss(res.params) - loss(params)), rel=1e-9
    )
    ignoring = obs.obs_prune(params, inverse, 3 / N)
    assert float(loss(res.params)) < float(loss(ignoring.params))


def test_k_steps_with_recomputed_inverse():
    a, w_star, loss = quadratic(6)
    params = as_params(w_star)
    calls = []

    def inverse_of(p):
        calls.append(1)
        return cv.hessian_inverse(loss, p, damping=1e-12)

    res = obs.obs_prune(params, inverse_of, 4 / N, steps=4)
    assert len(calls) == 4
    q = pruned_set(res.mask)
    assert len(q) == 4
    np.testing.assert_allclose(
        np.asarray(res.params["w"]).ravel(),
        constrained_minimum(a, w_star, q),
        atol=1e-10,
    )
    assert float(res.predicted_increase) == pytest.approx(
        float(loss(res.params) - loss(params)), rel=1e-9
    )


def test_obs_with_identity_is_magnitude():
    params = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(4, 6)))}
    ones = {"w": jnp.ones((4, 6))}
    scores = obs.obs_saliency(params, ones)
    np.testing.assert_allclose(scores["w"], np.asarray(params["w"]) ** 2 / 2)
    np.testing.assert_array_equal(
        np.asarray(js.layerwise_mask(scores, 0.5)["w"]),
        np.asarray(js.layerwise_mask(js.saliency.magnitude(params), 0.5)["w"]),
    )
    identity = cv.BlockInverse({"w": jnp.broadcast_to(jnp.eye(6), (4, 6, 6))}, 6, 1.0)
    res = obs.obs_prune(params, identity, 0.5)
    np.testing.assert_array_equal(
        np.asarray(res.mask["w"]),
        np.asarray(js.global_mask(js.saliency.magnitude(params), 0.5)["w"]),
    )
    # With H = I there is nothing to compensate: kept weights are unchanged.
    kept = np.asarray(res.mask["w"])
    np.testing.assert_array_equal(
        np.asarray(res.params["w"])[kept], np.asarray(params["w"])[kept]
    )


def test_obd_matches_formula_with_exact_diagonal():
    a, w_star, loss = quadratic(7)
    params = as_params(w_star)
    diag = cv.hessian_diag(loss, params)
    np.testing.assert_allclose(np.asarray(diag["w"]).ravel(), np.diag(a), rtol=1e-12)
    scores = obs.obd_saliency(params, diag)
    np.testing.assert_allclose(
        np.asarray(scores["w"]).ravel(), np.diag(a) * w_star**2 / 2
    )


def test_predicted_loss_change_is_exact_on_a_quadratic():
    _, w_star, loss = quadratic(8)
    params = as_params(w_star + 1.0)
    delta = as_params(np.random.default_rng(4).normal(size=N))
    after = jax.tree.map(jnp.add, params, delta)
    assert float(obs.predicted_loss_change(loss, params, delta)) == pytest.approx(
        float(loss(after) - loss(params)), rel=1e-12
    )


def test_mask_starts_keep_masked_and_prune():
    _, w_star, loss = quadratic(9)
    params = as_params(w_star)
    res = obs.obs_prune(params, cv.hessian_inverse(loss, params, damping=1e-9), 0.5)
    for tx in (
        optax.chain(standard(optax.adam(0.1)), js.keep_masked(res.mask)),
        optax.chain(
            standard(optax.adam(0.1)),
            js.prune(js.saliency.magnitude, js.schedules.constant(0.5, at=10**6)),
        ),
    ):
        state = optax.tree.set(tx.init(res.params), mask=res.mask)
        p = res.params
        for _ in range(20):
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, updates)
        assert np.all(np.asarray(p["w"])[~np.asarray(res.mask["w"])] == 0.0)
        np.testing.assert_array_equal(
            np.asarray(optax.tree.get(state, "mask")["w"]), np.asarray(res.mask["w"])
        )


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"method": "greedy"}, ValueError, "method must be"),
        ({"steps": 0}, ValueError, "steps must be a positive int"),
        ({"steps": 2}, ValueError, "pass a function of the params"),
        ({"grads": {"v": jnp.ones(3)}}, ValueError, "grads tree does not match"),
    ],
)
def test_bad_input(kwargs, error, message):
    _, w_star, loss = quadratic()
    params = as_params(w_star)
    inverse = cv.hessian_inverse(loss, params, damping=1e-9)
    with pytest.raises(error, match=message):
        obs.obs_prune(params, inverse, 0.5, **kwargs)
    with pytest.raises(ValueError, match="sparsity must be in"):
        obs.obs_prune(params, inverse, 1.0)
    with pytest.raises(ValueError, match="hessian_diag tree does not match"):
        obs.obd_saliency(params, {"v": None})


def test_every_pair_agrees_with_brute_force_ranking():
    # OBS ranks single weights exactly; check the chosen single weight
    # against the brute force for several random quadratics.
    for seed in range(5):
        a, w_star, loss = quadratic(20 + seed)
        params = as_params(w_star)
        res = obs.obs_prune(
            params, cv.hessian_inverse(loss, params, damping=1e-12), 1 / N
        )
        increases = {
            q: float(
                loss(as_params(constrained_minimum(a, w_star, [q]))) - loss(params)
            )
            for q in range(N)
        }
        assert pruned_set(res.mask) == [min(increases, key=increases.get)]


def block_quadratic(seed):
    """A quadratic over one (2, 4) leaf whose Hessian is block-diagonal in
    two blocks of 4, ill-conditioned enough that OBS choices differ from
    magnitude and from a wrong inverse."""
    rng = np.random.default_rng(seed)
    a = np.zeros((N, N))
    for b in range(2):
        m = rng.normal(size=(4, 4))
        a[4 * b : 4 * b + 4, 4 * b : 4 * b + 4] = m @ m.T + 0.3 * np.eye(4)
    w_star = rng.normal(size=N)

    def loss(p):
        d = p["w"].reshape(-1) - w_star
        return 0.5 * d @ jnp.asarray(a) @ d

    return a, w_star, loss


@pytest.mark.parametrize("seed", range(16))
def test_k_step_obs_matches_brute_force_step_by_step(seed):
    a, w_star, _ = block_quadratic(seed)
    params = as_params(w_star)
    # The Hessian of a quadratic is constant: its exact block inverse.
    blocks = np.stack([np.linalg.inv(a[i : i + 4, i : i + 4]) for i in (0, 4)])
    exact = BlockInverse({"w": jnp.asarray(blocks)}, 4, 1e-12)

    def inverse(p):
        return exact

    def increase(pruned):
        w = constrained_minimum(a, w_star, pruned)
        return 0.5 * (w - w_star) @ a @ (w - w_star)

    greedy = []
    for k in range(1, 5):
        best = min(
            (q for q in range(N) if q not in greedy),
            key=lambda q: increase([*greedy, q]),
        )
        greedy.append(best)
        res = obs.obs_prune(params, inverse, k / N, steps=k)
        assert pruned_set(res.mask) == sorted(greedy), (k, greedy)
        np.testing.assert_allclose(
            np.asarray(res.params["w"]).ravel(),
            constrained_minimum(a, w_star, greedy),
            atol=1e-9,
        )


def fisher_problem(seed, m=5):
    rng = np.random.default_rng(seed)
    grads = {"w": jnp.asarray(rng.normal(size=(m, 2, 4)))}
    g = np.asarray(grads["w"]).reshape(m, -1)
    f = 0.1 * np.eye(N) + g.T @ g / m
    return grads, f, as_params(rng.normal(size=N))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("with_grads", [False, True])
def test_mfac_prunes_as_the_dense_inverse_does(steps, with_grads):
    """M-FAC through obs_prune equals OBS with the dense inverse Fisher as
    one block (independent updates; between steps both are restricted to
    the survivors)."""
    grads, f, params = fisher_problem(steps)
    g = as_params(np.random.default_rng(9).normal(size=N)) if with_grads else None
    mfac = js.fisher.mfac_inverse(grads, damping=0.1)
    dense = BlockInverse({"w": jnp.asarray(np.linalg.inv(f))[None]}, N, 0.1)

    def prune(inverse):
        return obs.obs_prune(
            params,
            (lambda p: inverse) if steps > 1 else inverse,
            5 / N,
            method="independent",
            steps=steps,
            grads=g,
        )

    a, b = prune(mfac), prune(dense)
    np.testing.assert_array_equal(a.mask["w"], b.mask["w"])
    np.testing.assert_allclose(a.params["w"], b.params["w"], atol=1e-10)
    assert float(a.predicted_increase) == pytest.approx(
        float(b.predicted_increase), rel=1e-9
    )
    assert int((~a.mask["w"]).sum()) == 5


def test_mfac_couples_leaves_across_the_whole_model():
    rng = np.random.default_rng(3)
    m = 6
    grads = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(m, 3, 2)))},
        "b": {"kernel": jnp.asarray(rng.normal(size=(m, 2, 2)))},
    }
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape[1:])), grads)
    res = obs.obs_prune(
        params, js.fisher.mfac_inverse(grads, damping=0.2), 0.5, method="independent"
    )
    # numpy: one 10 x 10 inverse over both leaves, global ranking, the sum
    # of single-weight updates.
    g = np.concatenate([np.asarray(grads[k]["kernel"]).reshape(m, -1) for k in "ab"], 1)
    hinv = np.linalg.inv(0.2 * np.eye(10) + g.T @ g / m)
    w = np.concatenate([np.ravel(params[k]["kernel"]) for k in "ab"])
    rho = w**2 / (2 * np.diag(hinv))
    q = np.argsort(rho)[:5]
    z = np.zeros(10)
    z[q] = w[q] / np.diag(hinv)[q]
    want = w - hinv @ z
    want[q] = 0.0
    got = np.concatenate([np.ravel(res.params[k]["kernel"]) for k in "ab"])
    np.testing.assert_allclose(got, want, atol=1e-10)
    with pytest.raises(ValueError, match="M-FAC inverse takes method='independent'"):
        obs.obs_prune(params, js.fisher.mfac_inverse(grads, damping=0.2), 0.5)
