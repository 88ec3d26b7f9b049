"""Tests for jaxsparse.fisher against loops and numpy inverses (float64)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_curvature import float64_standard, setup

from jaxsparse import fisher

__all__ = ["float64_standard"]


def test_per_example_grads_and_fisher_diag():
    params, _, loss, x, y, *_ = setup("mlp-dict")
    per = fisher.per_example_grads(loss, params, x, y)
    loop = [
        ravel_pytree(jax.grad(loss)(params, x[i : i + 1], y[i : i + 1]))[0]
        for i in range(6)
    ]
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(per)
    np.testing.assert_allclose(flat, np.stack(loop), atol=1e-14)
    fd = fisher.fisher_diag(per)
    assert fd["dense_0"]["bias"] is None
    np.testing.assert_allclose(
        fd["dense_0"]["kernel"].ravel(), (np.stack(loop) ** 2).mean(0)[4:24], atol=1e-14
    )


def fisher_reference(g, block, damping, b):
    cols = g.reshape(g.shape[0], -1)
    cols = np.pad(cols, ((0, 0), (0, -cols.shape[1] % block)))[
        :, b * block : (b + 1) * block
    ]
    return np.linalg.inv(damping * np.eye(block) + cols.T @ cols / g.shape[0])


@pytest.mark.parametrize("block", [1, 3, 8, 20])
@pytest.mark.parametrize("n", [2, 7, 40])
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_woodbury_equals_numpy_inverse(block, n, damping):
    g = {"w": jax.random.normal(jax.random.key(n), (n, 4, 5))}
    for method in ("woodbury", "cholesky", "auto"):
        inv = fisher.fisher_inverse(g, block_size=block, damping=damping, method=method)
        blocks = np.asarray(inv.blocks["w"])
        assert blocks.shape == (-(-20 // block), block, block)
        for b in range(blocks.shape[0]):
            ref = fisher_reference(np.asarray(g["w"]), block, damping, b)
            err = np.abs(blocks[b] - ref).max() / np.abs(ref).max()
            assert err < 1e-8, (method, b, err)


@pytest.mark.parametrize("rank", [1, 3, 8, 64])
def test_woodbury_update_of_any_rank_equals_numpy_inverse(rank):
    # 19 gradients: every rank but 1 pads the last scan step with zeros.
    g = {"w": jax.random.normal(jax.random.key(rank), (19, 4, 6))}
    inv = fisher.woodbury_init(
        jax.tree.map(lambda t: t[0], g), block_size=8, damping=0.05
    )
    blocks = fisher.woodbury_update(inv, g, num_samples=19, rank=rank).blocks["w"]
    for b in range(3):
        ref = fisher_reference(np.asarray(g["w"]), 8, 0.05, b)
        np.testing.assert_allclose(blocks[b], ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(blocks[b], np.asarray(blocks[b]).T)


def test_woodbury_in_pieces_equals_all_at_once():
    g = {"w": jax.random.normal(jax.random.key(9), (30, 6, 2)), "b": jnp.ones((30, 2))}
    params = jax.tree.map(lambda t: t[0], g)
    inv = fisher.woodbury_init(params, block_size=4, damping=0.1)
    assert inv.blocks["b"] is None
    for start in range(0, 30, 7):
        piece = jax.tree.map(lambda t, s=start: t[s : s + 7], g)
        inv = fisher.woodbury_update(inv, piece, num_samples=30)
    whole = fisher.fisher_inverse(g, block_size=4, damping=0.1, method="cholesky")
    np.testing.assert_allclose(
        inv.blocks["w"], whole.blocks["w"], rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda p, f, x, y: fisher.woodbury_init(p, block_size=0, damping=1.0),
            "block_size must be",
        ),
        (
            lambda p, f, x, y: fisher.woodbury_init(p, block_size=4, damping=0.0),
            "damping must be > 0",
        ),
        (
            lambda p, f, x, y: fisher.fisher_inverse(
                fisher.per_example_grads(f, p, x, y), block_size=4, damping=-1.0
            ),
            "damping must be > 0",
        ),
        (
            lambda p, f, x, y: fisher.woodbury_update(
                fisher.woodbury_init(p, block_size=4, damping=1.0),
                {"a": jnp.ones((2, 3))},
                num_samples=2,
            ),
            "grads tree does not match",
        ),
        (
            lambda p, f, x, y: fisher.fisher_inverse(
                fisher.per_example_grads(f, p, x, y),
                block_size=4,
                damping=1.0,
                method="qr",
            ),
            "method must be",
        ),
    ],
)
def test_bad_input(call, message):
    params, _, loss, x, y, *_ = setup("mlp-dict")
    with pytest.raises(ValueError, match=message):
        call(params, loss, x, y)


def test_fisher_inverse_with_a_mask_is_the_survivors_inverse():
    g = {"w": jax.random.normal(jax.random.key(3), (12, 2, 3)), "b": jnp.ones((12, 3))}
    mask = {"w": jnp.array([[True, False, True], [True, True, False]]), "b": None}
    keep = np.asarray(mask["w"]).ravel()
    cols = np.asarray(g["w"]).reshape(12, 6) * keep
    ref = np.linalg.inv(0.1 * np.eye(6) + cols.T @ cols / 12)
    for method in ("woodbury", "cholesky"):
        inv = fisher.fisher_inverse(
            g, block_size=6, damping=0.1, method=method, mask=mask
        )
        np.testing.assert_allclose(inv.blocks["w"][0], ref, rtol=1e-10, atol=1e-12)
    # On the survivors it is (F_SS + damping I)^-1; pruned entries decouple.
    s = np.flatnonzero(keep)
    full = np.asarray(g["w"]).reshape(12, 6)[:, s]
    np.testing.assert_allclose(
        ref[np.ix_(s, s)], np.linalg.inv(0.1 * np.eye(4) + full.T @ full / 12)
    )
    with pytest.raises(ValueError, match="mask tree does not match"):
        fisher.fisher_inverse(g, block_size=6, damping=0.1, mask={"w": mask["w"]})


_GUARDED = textwrap.dedent(
    """
    import os, sys
    os.sched_setaffinity(0, [int(c) for c in sys.argv[1:]])
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    from jaxsparse import curvature, data, fisher, obs
    from jaxsparse.experiments.models import init_mlp, loss_fn
    split = data.digits(0)
    params = init_mlp(jax.random.key(0), (64, 40, 20, 10))
    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)

    def inverse(p, mask=None):
        g = fisher.per_example_grads(loss_fn, p, x, y)
        return fisher.fisher_inverse(g, block_size=640, damping=1e-4, mask=mask)

    fisher_at = jax.jit(inverse)
    exact_at = jax.jit(
        lambda p: curvature.hessian_inverse(loss_fn, p, x[:64], y[:64], damping=1e-3,
                                            block_size=200)
    )
    pruned_at = jax.jit(lambda p: obs.obs_prune(p, inverse, 0.5, steps=2).params)
    for i in range(12):
        p = jax.tree.map(lambda a: a * (1 + 1e-3 * i), params)
        jax.block_until_ready((fisher_at(p), exact_at(p)))
    jax.block_until_ready(pruned_at(params))
    print("finished")
    """
)


def dense_fisher_inverse(per, damping, keep=None):
    """``(lambda I + F)^-1`` over every entry of the 2-D leaves, by numpy."""
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(
        {k: {"kernel": v["kernel"]} for k, v in per.items()}
    )
    g = np.asarray(flat)
    if keep is not None:
        g = g * keep[None]
    f = damping * np.eye(g.shape[1]) + g.T @ g / g.shape[0]
    return np.linalg.inv(f)


def kernels_flat(tree):
    return np.concatenate([np.ravel(tree[k]["kernel"]) for k in sorted(tree)])


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_mfac_equals_the_dense_inverse_fisher(damping):
    params, _, loss, x, y, *_ = setup("mlp-dict")
    per = fisher.per_example_grads(loss, params, x, y)
    inv = fisher.mfac_inverse(per, damping=damping)
    dense = dense_fisher_inverse(per, damping)
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)
    out = fisher.mfac_apply(inv, v)
    assert out["dense_0"]["bias"] is None
    want = dense @ kernels_flat(v)
    err = np.abs(kernels_flat(out) - want).max() / np.abs(want).max()
    assert err < 1e-10, err
    diag = fisher.mfac_diag(inv, params)
    np.testing.assert_allclose(kernels_flat(diag), np.diag(dense), rtol=1e-10)
    # float32, as users run it: 1e-6 relative.
    per32 = jax.tree.map(lambda a: a.astype(jnp.float32), per)
    with jax.enable_x64(False):
        out32 = fisher.mfac_apply(
            fisher.mfac_inverse(per32, damping=damping),
            jax.tree.map(lambda a: a.astype(jnp.float32), v),
        )
    err32 = np.abs(kernels_flat(out32) - want).max() / np.abs(want).max()
    assert err32 < 1e-6, err32


def test_mfac_restricted_is_the_survivors_inverse():
    params, _, loss, x, y, *_ = setup("mlp-dict")
    per = fisher.per_example_grads(loss, params, x, y)
    mask = jax.tree.map(lambda a: jnp.arange(a.size).reshape(a.shape) % 3 != 0, params)
    keep = kernels_flat(mask)
    dense = dense_fisher_inverse(per, 0.05, keep)
    for inv in (
        fisher.mfac_restrict(fisher.mfac_inverse(per, damping=0.05), mask),
        fisher.mfac_inverse(per, damping=0.05, mask=mask),
    ):
        diag = kernels_flat(fisher.mfac_diag(inv, params))
        np.testing.assert_allclose(diag, np.diag(dense), rtol=1e-10)
        # On the survivors S this is (lambda I + F_SS)^-1 itself.
        flat = jax.vmap(lambda t: ravel_pytree(t)[0])(
            {k: {"kernel": v["kernel"]} for k, v in per.items()}
        )
        g = np.asarray(flat)[:, keep]
        ss = np.linalg.inv(0.05 * np.eye(g.shape[1]) + g.T @ g / g.shape[0])
        np.testing.assert_allclose(diag[keep], np.diag(ss), rtol=1e-10)


def test_mfac_bad_input():
    g = {"w": jnp.ones((3, 2, 2))}
    with pytest.raises(ValueError, match="damping"):
        fisher.mfac_inverse(g, damping=0.0)
    with pytest.raises(ValueError, match="include selects no leaf"):
        fisher.mfac_inverse(g, damping=1.0, include="nothing")
    with pytest.raises(ValueError, match="mask"):
        fisher.mfac_inverse(g, damping=1.0, mask={"v": jnp.ones((2, 2), bool)})


def test_jitted_inverses_finish_on_two_cores():
    """Regression: batched LAPACK solves run per leaf at once deadlocked XLA's
    2-thread CPU pool (it hung within a dozen calls); one stacked batch per
    step does not."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cores = [str(c) for c in sorted(os.sched_getaffinity(0))[:2]]
    result = subprocess.run(
        [sys.executable, "-c", _GUARDED, *cores],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished" in result.stdout
