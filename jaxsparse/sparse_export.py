"""Export of pruned tensors to ``jax.experimental.sparse`` and a dense layer
that multiplies by a sparse kernel.

References:
  Hoefler et al. 2021, §2.2 and §6 (sparse storage and execution).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse


def to_bcoo(x):
    """A ``jax.experimental.sparse.BCOO`` holding the non-zeros of ``x``."""
    return sparse.BCOO.fromdense(x)


def to_bcsr(x):
    """A ``jax.experimental.sparse.BCSR`` of a 2-D ``x``."""
    if np.ndim(x) != 2:
        raise ValueError(f"BCSR needs a 2-D array, got shape {np.shape(x)}")
    return sparse.BCSR.fromdense(x)


def sparse_kernel(kernel, *, format: str = "bcsr"):
    """A dense layer's ``(in, out)`` kernel as a sparse ``(out, in)`` matrix
    (BCSR or BCOO), ready for :func:`sparse_dense_layer`: the sparse operand
    goes on the left, where both formats multiply."""
    if np.ndim(kernel) != 2:
        raise ValueError(f"a dense kernel is 2-D, got shape {np.shape(kernel)}")
    if format == "bcsr":
        return to_bcsr(kernel.T)
    if format == "bcoo":
        return to_bcoo(kernel.T)
    raise ValueError(f"format must be 'bcsr' or 'bcoo', got {format!r}")


def sparse_dense_layer(x, kernel_t, bias=None):
    """``x @ kernel + bias`` from :func:`sparse_kernel`'s transposed sparse
    kernel, computed as ``(kernel^T x^T)^T``.

    Example:
      >>> import jax.numpy as jnp
      >>> kernel = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
      >>> layer = sparse_kernel(kernel)
      >>> sparse_dense_layer(jnp.ones((1, 3)), layer, jnp.array([0.5, 0.5]))
      Array([[1.5, 2.5]], dtype=float32)
    """
    out = (kernel_t @ jnp.asarray(x).T).T
    return out if bias is None else out + bias[None, :]
