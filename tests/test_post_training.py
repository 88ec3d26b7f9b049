"""Tests for jaxsparse/experiments/post_training.py: each pruner is the
library method it names with the documented settings, hits its target,
leaves the trained params alone, and bad requests are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse import curvature, fisher, layerwise, obs
from jaxsparse.experiments import post_training as pt
from jaxsparse.experiments.config import PRUNERS
from jaxsparse.experiments.models import init_lenet5, init_mlp, lenet5, mlp


@pytest.fixture(scope="module")
def model():
    split = js.data.digits(0)
    params = init_mlp(jax.random.key(0), (64, 12, 10))
    x, y = jnp.asarray(split.x_train[:96]), jnp.asarray(split.y_train[:96])
    return params, x, y


def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, x), y).mean()


@pytest.mark.parametrize("pruner", PRUNERS)
def test_every_pruner_hits_its_target_per_kernel_and_leaves_params_alone(model, pruner):
    params, x, y = model
    before = jax.tree.map(np.array, params)
    ready = pt.one_shot_pruner(pruner, mlp, params, x, y, block_size=16)
    for s in (0.5, 0.75):
        pruned = ready.prune(s)
        for layer in ("dense_0", "dense_1"):
            kernel = np.asarray(pruned[layer]["kernel"])
            assert np.mean(kernel == 0) == pytest.approx(s, abs=1 / kernel.shape[0])
            np.testing.assert_array_equal(pruned[layer]["bias"], params[layer]["bias"])
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert (ready.seconds > 0) == (pruner in ("obd", "woodfisher", "mfac"))


def test_each_pruner_is_the_library_method_it_names(model):
    params, x, y = model
    x, y = x[:32], y[:32]  # the exact diagonal takes one HVP per weight
    uniform = js.Uniform()

    def by(scores):
        return js.apply_mask(params, js.topk_mask(scores, 0.6, distribution=uniform))

    per = fisher.per_example_grads(loss, params, x, y)
    diag = fisher.fisher_diag(per)
    damping = float(
        np.mean(np.concatenate([np.ravel(d) for d in jax.tree.leaves(diag)]))
    )
    want = {
        ("obd", "gauss-newton"): by(
            obs.obd_saliency(params, curvature.ggn_diag_softmax_ce(mlp, params, x))
        ),
        ("obd", "exact"): by(
            obs.obd_saliency(params, curvature.hessian_diag(loss, params, x, y))
        ),
        ("woodfisher", "gauss-newton"): obs.obs_prune(
            params,
            fisher.fisher_inverse(per, block_size=64, damping=damping),
            0.6,
            distribution=uniform,
        ).params,
        ("mfac", "gauss-newton"): obs.obs_prune(
            params,
            fisher.mfac_inverse(per, damping=damping),
            0.6,
            method="independent",
            distribution=uniform,
        ).params,
        ("sparsegpt", "gauss-newton"): layerwise.prune_layers(
            mlp, params, [x], 0.6, damp=0.01
        )[0],
    }
    for (pruner, diagonal), expected in want.items():
        got = pt.one_shot_pruner(
            pruner, mlp, params, x, y, obd_diagonal=diagonal
        ).prune(0.6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            got,
            expected,
        )


def test_magnitude_n_m_keeps_the_largest_n_of_every_m_inputs_of_a_conv():
    params = init_lenet5(jax.random.key(1), 8, 10)
    x = jnp.zeros((4, 64))
    ready = pt.one_shot_pruner(
        "magnitude",
        lenet5,
        params,
        x,
        jnp.zeros(4, jnp.int32),
        pattern=js.NM(2, 4, axis=0),
        include="conv_1/kernel",
    )
    pruned = ready.prune(None)
    kernel = np.asarray(params["conv_1"]["kernel"])  # (5, 5, 20, 50)
    # By hand: rows of the (H * W * I, O) view in groups of 4 consecutive
    # input channels; the 2 largest |w| of each group and output survive.
    groups = np.abs(kernel).reshape(5, 5, 5, 4, 50)
    rank = np.argsort(np.argsort(-groups, axis=3, kind="stable"), axis=3)
    np.testing.assert_array_equal(
        np.asarray(pruned["conv_1"]["kernel"]) != 0, (rank < 2).reshape(kernel.shape)
    )
    for leaf in ("conv_0", "dense_0", "dense_1"):
        np.testing.assert_array_equal(pruned[leaf]["kernel"], params[leaf]["kernel"])


def test_bad_requests_are_refused(model):
    params, x, y = model
    with pytest.raises(ValueError, match="pruner must be one of magnitude, obd"):
        pt.one_shot_pruner("snip", mlp, params, x, y)
    with pytest.raises(ValueError, match="pruner 'mfac' has no N:M pattern"):
        pt.one_shot_pruner("mfac", mlp, params, x, y, pattern=js.NM(2, 4, axis=0))
    with pytest.raises(ValueError, match="obd_diagonal must be 'gauss-newton'"):
        pt.one_shot_pruner("obd", mlp, params, x, y, obd_diagonal="fisher")
