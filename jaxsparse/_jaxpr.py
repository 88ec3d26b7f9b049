"""Private jaxpr interpreter shared by the modules that watch or change a
model's intermediate values: the curvature of a dense layer's outputs,
ReLU activation sparsity, the inputs of each kernel (layer-wise pruning)
and hooked unit outputs (neuron pruning)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.extend.core as jex

# step(index, equation, input values) -> the equation's output values.
Step = Callable[[int, Any, list], Sequence[Any]]


def bind(eqn: Any, ins: Sequence[Any]) -> list:
    """The outputs of one equation applied to ``ins``, as a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        ans = eqn.primitive.bind(*ins, **params)
    return list(ans) if eqn.primitive.multiple_results else [ans]


def evaluate(closed: Any, args: Sequence[Any], step: Step) -> list:
    """Evaluates a closed jaxpr equation by equation and returns its outputs.

    Args:
      closed: a ``ClosedJaxpr``.
      args: one value per input variable.
      step: computes each equation's outputs from its index, the equation
        and its input values, mostly by :func:`bind`; it may record values
        or return others in place of the equation's.

    Returns:
      The values of the jaxpr's output variables.
    """
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    env.update(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))
    for i, eqn in enumerate(closed.jaxpr.eqns):
        env.update(zip(eqn.outvars, step(i, eqn, [read(v) for v in eqn.invars])))
    return [read(v) for v in closed.jaxpr.outvars]
