"""Which axes of which arrays must shrink together: a walk over a jaxpr.

Every axis of every value in the jaxpr is written as a product of *atoms*
(mixed radix, most significant first); an atom is a dimension that several
arrays share, found by union-find. Parameter axes start as one atom each;
an operation that ties two axes (an elementwise op, a contraction, a batch
dimension) unifies their atoms, and a reshape that splits or merges axes
splits atoms so that both sides are products of the same atoms.

An atom is *pinned* (it cannot shrink) when its size is fixed by something
other than the parameters: the model's inputs and outputs, constants, a
reduction over it, a contraction between two activations (where its size
may enter the computation, as attention's ``1/sqrt(d)``), or an operation
this walk does not know. The reasons are kept so that the user is told why
an axis stays dense.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.extend as jex
import numpy as np

Dims = list[list[int]]
"""Per axis of one value: its atoms, most significant first (``[]`` for an
axis of size 1)."""

UNSUPPORTED = "unsupported"
"""Prefix of the reasons that name an operation the walk does not follow."""

_ELEMENTWISE = frozenset(
    """
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp
    conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv
    erfc exp exp2 expm1 floor ge gt igamma imag integer_pow is_finite le lgamma
    log log1p logistic lt max min mul ne neg nextafter not or polygamma
    population_count pow real reduce_precision rem round rsqrt select_n
    shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt
    square stop_gradient sub tan tanh xor pvary sharding_constraint mesh_cast
    reshard
    """.split()  # noqa: SIM905 - a list this long reads better as words
)
_REDUCTIONS = frozenset(
    """
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor
    argmax argmin
    """.split()  # noqa: SIM905 - a list this long reads better as words
)
_ALONG_ONE_AXIS = {
    "cumsum": "axis",
    "cumprod": "axis",
    "cummax": "axis",
    "cummin": "axis",
    "cumlogsumexp": "axis",
    "sort": "dimension",
}


class Atoms:
    """Union-find over atoms, with splitting and pin reasons."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.size: list[int] = []
        self._split: dict[int, list[int]] = {}
        self._pins: dict[int, frozenset[str]] = {}

    def new(self, size: int, pin: str | None = None) -> int:
        atom = len(self._parent)
        self._parent.append(atom)
        self.size.append(int(size))
        if pin is not None:
            self._pins[atom] = frozenset((pin,))
        return atom

    def find(self, atom: int) -> int:
        root = atom
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[atom] != root:
            self._parent[atom], atom = root, self._parent[atom]
        return root

    def resolve(self, atoms: Sequence[int]) -> list[int]:
        """The current finest atoms (roots, none split) of ``atoms``."""
        out = []
        for atom in atoms:
            root = self.find(atom)
            if root in self._split:
                out.extend(self.resolve(self._split[root]))
            else:
                out.append(root)
        return out

    def pins(self, atom: int) -> frozenset[str]:
        return self._pins.get(self.find(atom), frozenset())

    def pin(self, atoms: Sequence[int], reason: str) -> None:
        for root in self.resolve(atoms):
            self._pins[root] = self._pins.get(root, frozenset()) | {reason}

    def _union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self._parent[b] = a
        pins = self._pins.pop(b, frozenset()) | self._pins.get(a, frozenset())
        if pins:
            self._pins[a] = pins

    def _split_root(self, root: int, first: int) -> tuple[int, int]:
        pins = self._pins.get(root)
        parts = [self.new(first), self.new(self.size[root] // first)]
        for part in parts:
            if pins:
                self._pins[part] = pins
        self._split[root] = parts
        return parts[0], parts[1]

    def carve(self, atoms: Sequence[int], sizes: Sequence[int]) -> Dims | None:
        """Cuts the product ``atoms`` into consecutive factors of ``sizes``,
        splitting atoms where a factor ends inside one; ``None`` when an atom
        would have to be cut at a size that does not divide it."""
        queue = list(self.resolve(atoms))
        out: Dims = []
        for size in sizes:
            taken: list[int] = []
            need = int(size)
            while need > 1:
                if not queue:
                    return None
                atom = queue.pop(0)
                have = self.size[atom]
                if have <= need:
                    if need % have:
                        return None
                    taken.append(atom)
                    need //= have
                elif have % need == 0:
                    head, rest = self._split_root(atom, need)
                    taken.append(head)
                    queue.insert(0, rest)
                    need = 1
                else:
                    return None
            out.append(taken)
        if queue:
            return None
        return out

    def align(self, a: Sequence[int], b: Sequence[int]) -> bool:
        """Unifies two products of atoms factor by factor (splitting where
        their factorizations differ); ``False`` when they cannot match."""
        a_sizes = [self.size[x] for x in self.resolve(a)]
        b_sizes = [self.size[x] for x in self.resolve(b)]
        if math.prod(a_sizes) != math.prod(b_sizes):
            return False
        # Refine both sides to the common factorization, then unify in order.
        cuts = sorted(set(np.cumprod([1, *a_sizes])) | set(np.cumprod([1, *b_sizes])))
        common = [int(hi // lo) for lo, hi in itertools.pairwise(cuts)]
        if any(c * lo != hi for c, (lo, hi) in zip(common, itertools.pairwise(cuts))):
            return False
        left = self.carve(a, common)
        right = self.carve(b, common)
        if left is None or right is None:
            return False
        for x, y in zip(left, right):
            for p, q in zip(x, y):
                self._union(p, q)
        return True


_SHAPE_ONLY = frozenset(
    """
    reshape broadcast_in_dim convert_element_type transpose squeeze copy copy_p
    reduce_precision
    """.split()  # noqa: SIM905 - as above
)


class Consumer(NamedTuple):
    """A contraction of an activation with a parameter, in the top-level
    jaxpr: the next layer reading the units on the activation's ``axes``."""

    activation: Any
    axes: tuple[int, ...]
    kernel: int
    """Index of the parameter leaf contracted with (through shape-only ops)."""
    output: Any


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in var.aval.shape)


class AxisWalk:
    """Walks a closed jaxpr whose inputs are the flattened parameters (and
    state) followed by the flattened model inputs."""

    def __init__(self) -> None:
        self.atoms = Atoms()
        self._dims: dict[Any, Dims] = {}
        self._activation: dict[Any, bool] = {}
        self._depth = 0
        self.source: dict[Any, int] = {}
        """Top-level values that are one input leaf through shape-only ops."""
        self.consumers: list[Consumer] = []
        self.bias: dict[Any, int] = {}
        """Consumer output -> the input leaf added to it right after."""

    # -- values ---------------------------------------------------------------

    def fresh(self, shape: Sequence[int], pin: str | None) -> Dims:
        return [[] if d == 1 else [self.atoms.new(d, pin)] for d in shape]

    def dims(self, var: Any) -> Dims:
        if isinstance(var, jex.core.Literal):
            return self.fresh(np.shape(var.val), "constant")
        return self._dims[var]

    def is_activation(self, var: Any) -> bool:
        return (not isinstance(var, jex.core.Literal)) and self._activation.get(
            var, False
        )

    def _set(self, var: Any, dims: Dims, activation: bool) -> None:
        self._dims[var] = dims
        self._activation[var] = activation

    def _pin_all(self, dims: Dims, reason: str) -> None:
        for axis in dims:
            self.atoms.pin(axis, reason)

    def _align_or_pin(self, a: list[int], b: list[int], reason: str) -> None:
        if not self.atoms.align(a, b):
            self.atoms.pin(a, reason)
            self.atoms.pin(b, reason)

    # -- the walk -------------------------------------------------------------

    def run(
        self, jaxpr: Any, in_dims: Sequence[Dims], in_act: Sequence[bool]
    ) -> list[Dims]:
        """Walks ``jaxpr`` (open) given its inputs; returns its outputs' dims."""
        for var, dims, act in zip(jaxpr.invars, in_dims, in_act):
            self._set(var, dims, act)
        for eqn in jaxpr.eqns:
            self._equation(eqn)
        return [self.dims(v) for v in jaxpr.outvars]

    def run_closed(
        self, closed: Any, in_dims: Sequence[Dims], in_act: Sequence[bool]
    ) -> list[Dims]:
        for var in closed.jaxpr.constvars:
            self._set(var, self.fresh(_shape(var), "constant"), False)
        return self.run(closed.jaxpr, in_dims, in_act)

    def _equation(self, eqn: Any) -> None:
        name = eqn.primitive.name
        ins = [self.dims(v) for v in eqn.invars]
        act = any(self.is_activation(v) for v in eqn.invars)
        out_shapes = [_shape(v) for v in eqn.outvars]
        outs = self._rule(eqn, name, ins, out_shapes)
        if outs is None:
            reason = f"{UNSUPPORTED}: {name}"
            for dims in ins:
                self._pin_all(dims, reason)
            outs = [self.fresh(shape, reason) for shape in out_shapes]
        for var, dims in zip(eqn.outvars, outs):
            self._set(var, dims, act)
        if self._depth == 0:
            self._note(eqn, name)

    def _note(self, eqn: Any, name: str) -> None:
        """Records leaf sources, consumers and their biases (top level)."""
        ins = [None if isinstance(v, jex.core.Literal) else v for v in eqn.invars]
        src = [self.source.get(v) if v is not None else None for v in ins]
        if name in _SHAPE_ONLY and src[0] is not None:
            self.source[eqn.outvars[0]] = src[0]
        elif name in ("dot_general", "conv_general_dilated"):
            if name == "dot_general":
                (lc, rc), _ = eqn.params["dimension_numbers"]
            else:
                spec = eqn.params["dimension_numbers"]
                lc, rc = (spec[0][1],), (spec[1][1],)
            for a, k, axes in ((0, 1, lc), (1, 0, rc)):
                if self.is_activation(eqn.invars[a]) and src[k] is not None:
                    self.consumers.append(
                        Consumer(
                            ins[a], tuple(int(x) for x in axes), src[k], eqn.outvars[0]
                        )
                    )
        elif name in ("add", "add_any"):
            outputs = {c.output for c in self.consumers}
            for a, k in ((0, 1), (1, 0)):
                if ins[a] in outputs and src[k] is not None:
                    self.bias[ins[a]] = src[k]

    def _rule(self, eqn, name, ins, out_shapes) -> list[Dims] | None:
        params = eqn.params
        in_shapes = [
            tuple(np.shape(v.val)) if isinstance(v, jex.core.Literal) else _shape(v)
            for v in eqn.invars
        ]
        if name == "optimization_barrier":
            return list(ins)
        if name in _ELEMENTWISE:
            out = self._elementwise(ins, in_shapes, out_shapes[0])
            return None if out is None else [out]
        if name == "dot_general":
            return [self._dot_general(eqn, ins)]
        if name == "conv_general_dilated":
            return [self._conv(eqn, ins, in_shapes, out_shapes[0])]
        if name in _REDUCTIONS:
            axes = {int(a) for a in params["axes"]}
            for a in axes:
                self.atoms.pin(ins[0][a], f"reduced over ({name})")
            return [[d for a, d in enumerate(ins[0]) if a not in axes]]
        if name in _ALONG_ONE_AXIS:
            axis = int(params[_ALONG_ONE_AXIS[name]]) % len(in_shapes[0])
            for dims in ins:
                self.atoms.pin(dims[axis], f"{name} along the axis")
            for dims in ins[1:]:
                for a, b in zip(ins[0], dims):
                    self._align_or_pin(a, b, f"{name} operands")
            return [ins[0] for _ in out_shapes]
        if name == "transpose":
            return [[ins[0][p] for p in params["permutation"]]]
        if name == "squeeze":
            drop = {int(d) % len(in_shapes[0]) for d in params["dimensions"]}
            return [[d for a, d in enumerate(ins[0]) if a not in drop]]
        if name == "broadcast_in_dim":
            out = self.fresh(out_shapes[0], "broadcast to a new axis")
            for a, b in enumerate(params["broadcast_dimensions"]):
                if in_shapes[0][a] == out_shapes[0][b]:
                    out[b] = ins[0][a]
            return [out]
        if name == "reshape":
            if params.get("dimensions") is not None:
                return None
            flat = [atom for dims in ins[0] for atom in dims]
            carved = self.atoms.carve(flat, out_shapes[0])
            if carved is None:
                self._pin_all(ins[0], "a reshape that cuts through a dimension")
                return [
                    self.fresh(out_shapes[0], "a reshape that cuts through a dimension")
                ]
            return [carved]
        if name in ("concatenate", "split"):
            axis = int(params["dimension" if name == "concatenate" else "axis"])
            reason = f"{name} along the axis"
            for dims in ins:
                self.atoms.pin(dims[axis], reason)
            others = [d for a, d in enumerate(ins[0]) if a != axis]
            for dims in ins[1:]:
                for a, b in zip(others, [d for i, d in enumerate(dims) if i != axis]):
                    self._align_or_pin(a, b, reason)
            outs = []
            for shape in out_shapes:
                out = list(ins[0])
                out[axis] = (
                    [] if shape[axis] == 1 else [self.atoms.new(shape[axis], reason)]
                )
                outs.append(out)
            return outs
        if name in ("pad", "slice", "dynamic_slice", "rev", "dynamic_update_slice"):
            return [self._windowed(name, params, ins, in_shapes, out_shapes[0])]
        if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min"):
            return [self._pooled(params, ins[0], in_shapes[0], out_shapes[0])]
        if name == "gather":
            return [self._gather(params, ins, in_shapes, out_shapes[0])]
        if name == "iota":
            return [self.fresh(out_shapes[0], "constant")]
        sub = _call_jaxpr(eqn)
        if sub is not None:
            acts = [self.is_activation(v) for v in eqn.invars]
            self._depth += 1
            try:
                if isinstance(sub, jex.core.ClosedJaxpr):
                    return self.run_closed(sub, ins, acts)
                return self.run(sub, ins, acts)
            finally:
                self._depth -= 1
        return None

    def _elementwise(self, ins, in_shapes, out_shape) -> Dims | None:
        # Operands are scalars or of the output's rank, each axis either the
        # output's size or 1 (broadcast).
        rank = len(out_shape)
        if any(
            s != ()
            and (len(s) != rank or any(d not in (1, o) for d, o in zip(s, out_shape)))
            for s in in_shapes
        ):
            return None
        out: Dims = []
        for a, size in enumerate(out_shape):
            axis = [
                d[a] for d, s in zip(ins, in_shapes) if s != () and s[a] == size > 1
            ]
            for other in axis[1:]:
                self._align_or_pin(axis[0], other, "elementwise operands")
            out.append(
                axis[0]
                if axis
                else ([] if size == 1 else [self.atoms.new(size, "constant")])
            )
        return out

    def _dot_general(self, eqn, ins) -> Dims:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        both = self.is_activation(eqn.invars[0]) and self.is_activation(eqn.invars[1])
        for a, b in zip(lc, rc):
            self._align_or_pin(lhs[a], rhs[b], "contraction")
            if both:
                self.atoms.pin(lhs[a], "contracted between activations")
        for a, b in zip(lb, rb):
            self._align_or_pin(lhs[a], rhs[b], "batch dimension")
        lfree = [d for a, d in enumerate(lhs) if a not in lc and a not in lb]
        rfree = [d for a, d in enumerate(rhs) if a not in rc and a not in rb]
        return [lhs[a] for a in lb] + lfree + rfree

    def _conv(self, eqn, ins, in_shapes, out_shape) -> Dims:
        params = eqn.params
        lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
        lhs, rhs = ins
        out = self.fresh(out_shape, "spatial axis set by the data")
        for a in rhs_spec[2:]:
            self.atoms.pin(rhs[a], "convolution window")
        for a in lhs_spec[2:]:
            self.atoms.pin(lhs[a], "spatial axis set by the data")
        if params["batch_group_count"] == 1:
            out[out_spec[0]] = lhs[lhs_spec[0]]
        else:
            self.atoms.pin(lhs[lhs_spec[0]], "batch-grouped convolution")
        groups = params["feature_group_count"]
        lhs_feat, rhs_in, rhs_out = lhs_spec[1], rhs_spec[1], rhs_spec[0]
        if groups == 1:
            self._align_or_pin(lhs[lhs_feat], rhs[rhs_in], "convolution features")
            out[out_spec[1]] = rhs[rhs_out]
        elif (
            groups == in_shapes[0][lhs_feat] == in_shapes[1][rhs_out]
            and in_shapes[1][rhs_in] == 1
        ):
            # Depthwise: channel c of the input makes channel c of the output.
            self._align_or_pin(lhs[lhs_feat], rhs[rhs_out], "depthwise convolution")
            out[out_spec[1]] = rhs[rhs_out]
        else:
            reason = "grouped convolution"
            for dims, axis in ((lhs, lhs_feat), (rhs, rhs_in), (rhs, rhs_out)):
                self.atoms.pin(dims[axis], reason)
            out[out_spec[1]] = (
                []
                if out_shape[out_spec[1]] == 1
                else [self.atoms.new(out_shape[out_spec[1]], reason)]
            )
        return out

    def _windowed(self, name, params, ins, in_shapes, out_shape) -> Dims:
        operand, shape = ins[0], in_shapes[0]
        if name == "pad":
            untouched = [tuple(c) == (0, 0, 0) for c in params["padding_config"]]
        elif name == "slice":
            strides = params["strides"] or (1,) * len(shape)
            untouched = [
                s == 0 and e == n and t == 1
                for s, e, t, n in zip(
                    params["start_indices"], params["limit_indices"], strides, shape
                )
            ]
        elif name == "dynamic_slice":
            untouched = [s == n for s, n in zip(params["slice_sizes"], shape)]
        elif name == "rev":
            axes = {int(d) for d in params["dimensions"]}
            untouched = [a not in axes for a in range(len(shape))]
        else:
            untouched = [u == n for u, n in zip(in_shapes[1], shape)]
            for a, ok in enumerate(untouched):
                if ok:
                    self._align_or_pin(operand[a], ins[1][a], "updated slice")
                else:
                    self.atoms.pin(ins[1][a], f"{name} along the axis")
        out = []
        for a, ok in enumerate(untouched):
            if ok:
                out.append(operand[a])
            else:
                self.atoms.pin(operand[a], f"{name} along the axis")
                out.append(
                    []
                    if out_shape[a] == 1
                    else [self.atoms.new(out_shape[a], f"{name} along the axis")]
                )
        return out

    def _pooled(self, params, operand, shape, out_shape) -> Dims:
        """A windowed reduction (pooling): an axis the window does not
        touch (size 1, stride 1, no padding or dilation) passes through."""
        out = []
        for a in range(len(shape)):
            untouched = (
                params["window_dimensions"][a] == 1
                and params["window_strides"][a] == 1
                and tuple(params["padding"][a]) == (0, 0)
                and params["base_dilation"][a] == 1
                and params["window_dilation"][a] == 1
            )
            if untouched:
                out.append(operand[a])
            else:
                self.atoms.pin(operand[a], "pooled over")
                size = out_shape[a]
                out.append([] if size == 1 else [self.atoms.new(size, "pooled over")])
        return out

    def _gather(self, params, ins, in_shapes, out_shape) -> Dims:
        dn = params["dimension_numbers"]
        operand, shape = ins[0], in_shapes[0]
        out = self.fresh(out_shape, "gathered by index")
        skipped = set(dn.collapsed_slice_dims) | set(
            getattr(dn, "operand_batching_dims", ())
        )
        kept = [a for a in range(len(shape)) if a not in skipped]
        for a in range(len(shape)):
            if a in skipped or params["slice_sizes"][a] != shape[a]:
                self.atoms.pin(operand[a], "gathered by index")
        for a, o in zip(kept, dn.offset_dims):
            if params["slice_sizes"][a] == shape[a]:
                out[o] = operand[a]
        self._pin_all(ins[1], "gathered by index")
        return out


_CALLS = frozenset(
    """
    jit pjit closed_call core_call custom_jvp_call custom_vjp_call
    custom_vjp_call_jaxpr remat checkpoint
    """.split()  # noqa: SIM905 - as above
)


def _call_jaxpr(eqn: Any) -> Any:
    """The jaxpr a call-like equation (jit, custom_jvp, checkpoint) runs once
    on its own inputs and outputs, or ``None``. Loops (scan, while) are not
    calls: their body runs many times."""
    if eqn.primitive.name not in _CALLS:
        return None
    found = []
    for value in eqn.params.values():
        if isinstance(value, (jex.core.ClosedJaxpr, jex.core.Jaxpr)):
            found.append(value)
    if len(found) != 1:
        return None
    sub = found[0]
    inner = sub.jaxpr if isinstance(sub, jex.core.ClosedJaxpr) else sub
    if [_shape(v) for v in inner.invars] != [
        tuple(np.shape(v.val)) if isinstance(v, jex.core.Literal) else _shape(v)
        for v in eqn.invars
    ] or [_shape(v) for v in inner.outvars] != [_shape(v) for v in eqn.outvars]:
        return None
    return sub


def shrunk_mismatch(
    walk: AxisWalk, original: Any, shrunk: Any, root: int
) -> str | None:
    """Where the jaxpr of the model with atom ``root`` one smaller departs
    from the original with that atom shrunk (an operation that differs, a
    shape that does not follow the atom, as a reshape to fixed sizes), or
    ``None`` when they agree everywhere."""
    atoms = walk.atoms

    def expected(var: Any) -> tuple[int, ...]:
        shape = []
        for axis in walk.dims(var):
            sizes = [atoms.size[a] - (a == root) for a in atoms.resolve(axis)]
            shape.append(math.prod(sizes))
        return tuple(shape)

    def compare(a: Any, b: Any) -> str | None:
        if len(a.eqns) != len(b.eqns):
            return "runs other operations"
        for x, y in zip(a.eqns, b.eqns):
            name = x.primitive.name
            if name != y.primitive.name:
                return f"runs {y.primitive.name} where it ran {name}"
            for var, got in zip(x.outvars, y.outvars):
                if _shape(got) != expected(var):
                    return (
                        f"computes {name} with shape {_shape(got)} where "
                        f"{expected(var)} was expected"
                    )
            inner_x, inner_y = _call_jaxpr(x), _call_jaxpr(y)
            if inner_x is not None and inner_y is not None:
                problem = compare(_open(inner_x), _open(inner_y))
                if problem:
                    return problem
        return None

    return compare(_open(original), _open(shrunk))


def _open(jaxpr: Any) -> Any:
    return jaxpr.jaxpr if isinstance(jaxpr, jex.core.ClosedJaxpr) else jaxpr
