"""Strict numerics for the whole suite, as equinox does: implicit dtype
promotion and rank promotion raise, so the library cannot rely on them."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled."""
    with jax.enable_x64(True):
        yield
