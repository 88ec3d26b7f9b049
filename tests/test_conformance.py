"""One suite over every optax transform jaxsparse ships, as optax runs one
over its optimizers: jit, extra args, one compilation across mask updates,
chain and MultiSteps, the mask in the state, stable state dtypes and
structure for float32 and bfloat16, inject_hyperparams, exact zeros.

A new transform registers itself in TRANSFORMS; a test fails if a public
factory returning a GradientTransformation is missing from it.
"""

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_helpers import standard

import jaxsparse as js
from jaxsparse import regularizers as rg
from jaxsparse import schedules


class Case(NamedTuple):
    """How to build one transform for the suite."""

    factory: Any
    kwargs: dict
    static: tuple[str, ...] = ()
    """Arguments inject_hyperparams must not treat as numbers or schedules."""
    hyperparams: tuple[str, ...] = ()
    """The numeric hyperparameters inject_hyperparams exposes."""
    masks: bool = True
    """Whether the state holds a mask and pruned weights stay exactly 0."""
    wraps: bool = False
    """Whether it wraps an inner optimizer (else it goes after one)."""


def _mask(params):
    return jax.tree.map(
        lambda p: jnp.arange(p.size).reshape(p.shape) % 3 != 0 if p.ndim >= 2 else None,
        params,
    )


EVERY = 4  # mask updates at steps 4, 8, 12 within the 14 steps run below

TRANSFORMS: dict[str, Case] = {
    "keep_masked": Case(js.keep_masked, {"mask": None}, static=("mask",)),
    "prune": Case(
        js.prune,
        {
            "criterion": js.saliency.magnitude,
            "schedule": schedules.polynomial(0.0, 0.75, begin=0, end=12, every=EVERY),
        },
        static=("criterion", "schedule"),
    ),
    "sparsify": Case(
        js.sparsify,
        {
            "criterion": js.saliency.taylor,
            "schedule": schedules.iterative([(4, 0.25), (8, 0.5), (12, 0.75)]),
        },
        static=("criterion", "schedule"),
        wraps=True,
    ),
    "dynamic_sparse": Case(
        js.dynamic_sparse,
        {
            "grow": js.saliency.random,
            "sparsity": 0.5,
            "every": EVERY,
            "end": 100,
            "key": 0,
            "drop_fraction": 0.3,
        },
        static=("grow", "every", "end", "key", "init_criterion"),
        hyperparams=("sparsity", "drop_fraction"),
        wraps=True,
    ),
    "rigl": Case(
        js.rigl,
        {"sparsity": 0.5, "every": EVERY, "end": 100, "key": 0, "drop_fraction": 0.3},
        static=("every", "end", "key"),
        hyperparams=("sparsity", "drop_fraction"),
        wraps=True,
    ),
    "sparse_evolutionary": Case(
        js.sparse_evolutionary,
        {
            "sparsity": 0.5,
            "every": EVERY,
            "end": 100,
            "key": 0,
            "drop_fraction": 0.3,
            "grow_scale": 0.1,
        },
        static=("every", "end", "key"),
        hyperparams=("sparsity", "drop_fraction", "grow_scale"),
        wraps=True,
    ),
    "add_penalty": Case(
        rg.add_penalty,
        {"penalty_fn": rg.l1, "strength": 1e-3},
        static=("penalty_fn",),
        hyperparams=("strength",),
        masks=False,
    ),
    "proximal_l1": Case(
        rg.proximal_l1,
        {"strength": 0.5, "learning_rate": 0.1},
        hyperparams=("strength", "learning_rate"),
        masks=False,
    ),
    "proximal_group_lasso": Case(
        rg.proximal_group_lasso,
        {"strength": 0.5, "learning_rate": 0.1, "granularity": js.Channel(-1)},
        hyperparams=("strength", "learning_rate"),
        masks=False,
    ),
}


def params_of(dtype):
    k = jax.random.key(0)
    return {
        "dense": {
            "kernel": jax.random.normal(k, (4, 6)).astype(dtype),
            "bias": jnp.zeros((6,), dtype),
        },
        "out": jax.random.normal(jax.random.fold_in(k, 1), (6, 3)).astype(dtype),
    }


def grads_at(params, step):
    """A gradient that changes every step, in the params' dtypes."""

    def leaf(p):
        wave = jnp.sin(step + jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape))
        return p - (0.1 * wave).astype(p.dtype)

    return jax.tree.map(leaf, params)


def kwargs_for(case, params):
    kwargs = dict(case.kwargs)
    if "mask" in kwargs:
        kwargs["mask"] = _mask(params)
    return kwargs


def build(name, params, *, inner=None):
    """The transform alone: wrappers wrap ``inner``, the rest follow it."""
    case = TRANSFORMS[name]
    kwargs = kwargs_for(case, params)
    adam = inner if inner is not None else standard(optax.adam(1e-2))
    if case.wraps:
        return case.factory(adam, **kwargs)
    return optax.chain(adam, case.factory(**kwargs))


def run(tx, params, steps=14, *, extra=None):
    traces = []

    @jax.jit
    def step(params, state, i):
        traces.append(1)
        updates, state = tx.update(grads_at(params, i), state, params, **(extra or {}))
        with jax.numpy_dtype_promotion("standard"):
            params = optax.apply_updates(params, updates)
        return params, state

    state = jax.jit(tx.init)(params)
    states = [state]
    for i in range(steps):
        params, state = step(params, state, jnp.asarray(i, jnp.float32))
        states.append(state)
    return params, states, len(traces)


NAMES = sorted(TRANSFORMS)
# The transforms whose mask moves during training (keep_masked holds its own,
# the regularizers hold none).
MASK_UPDATES = {n for n, c in TRANSFORMS.items() if c.masks} - {"keep_masked"}


def test_every_public_transform_is_registered():
    shipped = set()
    for module in (js.transforms, rg):
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn):
                continue
            if fn.__module__ != module.__name__:
                continue
            returns = str(inspect.signature(fn).return_annotation)
            if "GradientTransformation" in returns:
                shipped.add(name)
    assert shipped == set(TRANSFORMS), shipped ^ set(TRANSFORMS)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_jit_one_compilation_stable_state_and_extra_args(name, dtype):
    params = params_of(dtype)
    tx = build(name, params)
    final, states, traces = run(tx, params, extra={"unused_by_anyone": 1.0})
    assert traces == 1
    first = jax.tree.structure(states[0])
    for s in states[1:]:
        assert jax.tree.structure(s) == first
        assert [x.dtype for x in jax.tree.leaves(s)] == [
            x.dtype for x in jax.tree.leaves(states[0])
        ]
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
    if TRANSFORMS[name].masks:
        mask = optax.tree.get(states[-1], "mask")
        kernels = [(final["dense"]["kernel"], mask["dense"]["kernel"])]
        kernels.append((final["out"], mask["out"]))
        for w, m in kernels:
            assert m.dtype == jnp.bool_
            np.testing.assert_array_equal(np.asarray(w)[~np.asarray(m)], 0)
        assert mask["dense"]["bias"] is None


@pytest.mark.parametrize("name", [n for n in NAMES if n in MASK_UPDATES])
def test_mask_updates_happen_and_compile_once(name):
    """Three mask updates (steps 4, 8, 12) under one compilation."""
    params = params_of(jnp.float32)
    _, states, traces = run(build(name, params), params)
    assert traces == 1
    masks = [optax.tree.get(s, "mask") for s in states]
    moved = [
        i
        for i in range(1, len(masks))
        if float(js.schedules.mask_distance(masks[i - 1], masks[i])) > 0
    ]
    assert {4, 8, 12} <= {i - 1 for i in moved}


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain_and_multisteps(name):
    params = params_of(jnp.float32)
    case = TRANSFORMS[name]
    tx = build(name, params)
    chained = optax.chain(standard(optax.identity()), tx)
    a, _, _ = run(tx, params, steps=6)
    b, _, traces = run(chained, params, steps=6)
    assert traces == 1
    jax.tree.map(np.testing.assert_array_equal, a, b)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    with jax.numpy_dtype_promotion("standard"):
        final, states, traces = run(multi, params, steps=8)
    assert traces == 1
    if case.masks:
        mask = optax.tree.get(states[-1], "mask")
        np.testing.assert_array_equal(
            np.asarray(final["out"])[~np.asarray(mask["out"])], 0
        )


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
    """inject_hyperparams exposes every numeric hyperparameter and gives the
    same steps as the plain transform."""
    case = TRANSFORMS[name]
    params = params_of(jnp.float32)
    kwargs = kwargs_for(case, params)
    inner = standard(optax.adam(1e-2))
    injected = optax.inject_hyperparams(case.factory, static_args=case.static)
    if case.wraps:
        hyper = injected(inner, **kwargs)
    else:
        hyper = optax.chain(inner, injected(**kwargs))
    plain = build(name, params, inner=inner)
    a, _, _ = run(plain, params, steps=9)
    with jax.numpy_dtype_promotion("standard"):
        b, states, traces = run(hyper, params, steps=9)
    assert traces == 1
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b
    )
    found = optax.tree_utils.tree_get_all_with_path(states[-1], "hyperparams")
    exposed = set().union(*(set(h) for _, h in found)) if found else set()
    assert set(case.hyperparams) <= exposed
    assert set(case.hyperparams) == {
        k
        for k in kwargs
        if k not in case.static
        and not callable(kwargs[k])
        and isinstance(kwargs[k], (int, float))
    }
