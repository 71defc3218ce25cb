"""`zero`: an optax transformation whose state is sharded over the devices (ZeRO).

Each device keeps, for every parameter, one slice of its flattened elements (padded to
a multiple of the number of devices), and the state of the wrapped transformation for
that slice only. `update` reduce-scatters the gradients (their mean over the devices),
runs the wrapped transformation on this device's slices, and all-gathers the updates.

The wrapped transformation is traced on the parameters' real shapes, then that program
is evaluated on slices (`_Evaluator`): an elementwise operation runs on the slice, a
reduction over a whole parameter (a global norm) is reduced on the slice and summed over
the devices, and any other operation is given the whole values (all-gathered). So the
result is the one the transformation gives on the whole parameters, whatever it reads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._dataflow import reached_unreduced
from ._jax_compat import Literal, open_jaxpr, subjaxprs, Tracer
from ._tree import path_name


# Operations whose every output element depends only on the operands' element at the
# same position (operands of one shape; scalars broadcast).
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2
    expm1 floor ge gt igamma igammac imag integer_pow is_finite le lgamma log log1p
    logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem round
    rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh
    sqrt square sub tan tanh xor""".split()
)
# Reductions over a whole parameter: reduced on the slice, then over the devices.
_REDUCTIONS = {
    "reduce_sum": (jnp.sum, jax.lax.psum),
    "reduce_max": (jnp.max, jax.lax.pmax),
    "reduce_min": (jnp.min, jax.lax.pmin),
}
# Operations that call their one sub-jaxpr on their operands: evaluated inline.
_CALLS = frozenset(
    {
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)


class _Sliced(NamedTuple):
    """A value of the whole shape `shape`, held as this device's slice of its
    flattened elements (the padding at the end holds anything)."""

    local: Any
    shape: tuple


class _Axis(NamedTuple):
    name: str
    size: int
    index: Any  # `jax.lax.axis_index`

    def length(self, shape) -> int:
        """The length of one device's slice of a value of `shape`."""
        return -(-int(np.prod(shape, dtype=np.int64)) // self.size)

    def slice_of(self, x):
        """This device's slice of a whole value."""
        k, flat = self.length(jnp.shape(x)), jnp.ravel(x)
        flat = jnp.pad(flat, (0, k * self.size - flat.size))
        return _Sliced(
            jax.lax.dynamic_slice_in_dim(flat, self.index * k, k), jnp.shape(x)
        )

    def whole_of(self, s: _Sliced):
        """The whole value of a slice (gathered from every device: replicated)."""
        size = int(np.prod(s.shape, dtype=np.int64))
        if size == 0:  # no element to gather (XLA refuses an all-gather of none)
            return jnp.zeros(s.shape, s.local.dtype)
        flat = jax.lax.all_gather(s.local, self.name, tiled=True)
        return flat[:size].reshape(s.shape)

    def mean_slices(self, grads: Sequence) -> list[_Sliced]:
        """This device's slice of the mean over the devices of each of `grads`: one
        reduce-scatter per dtype, of every gradient's padded elements side by side."""
        out: list = [None] * len(grads)
        for dtype, at in _by_dtype(grads).items():
            ks = [self.length(jnp.shape(grads[i])) for i in at]
            rows = [self._rows(grads[i], k) for i, k in zip(at, ks)]
            flat = jnp.concatenate(rows, axis=1).reshape(-1)
            total = jax.lax.psum_scatter(flat, self.name, tiled=True) / self.size
            for i, part in zip(at, _split(total, ks)):
                out[i] = _Sliced(part.astype(dtype), jnp.shape(grads[i]))
        return out

    def wholes(self, values: Sequence) -> list:
        """The whole value of each of `values` (slices are gathered, one all-gather per
        dtype; the others are whole already)."""
        out = [self.whole_of(v) if _no_element(v) else v for v in values]
        slices = [i for i, v in enumerate(out) if isinstance(v, _Sliced)]
        for _, at in _by_dtype([values[i].local for i in slices]).items():
            at = [slices[j] for j in at]
            ks = [values[i].local.shape[0] for i in at]
            local = jnp.concatenate([values[i].local for i in at])
            rows = jax.lax.all_gather(local, self.name, tiled=True)
            rows = rows.reshape(self.size, sum(ks))
            for i, part in zip(at, _split(rows, ks, axis=1)):
                shape = values[i].shape
                size = int(np.prod(shape, dtype=np.int64))
                out[i] = part.reshape(-1)[:size].reshape(shape)
        return out

    def _rows(self, x, k: int):
        """`x` flattened, padded to `n * k` elements, as `(n, k)`: row `i` is device
        `i`'s slice."""
        flat = jnp.ravel(x)
        return jnp.pad(flat, (0, k * self.size - flat.size)).reshape(self.size, k)

    def valid(self, s: _Sliced):
        """Which elements of the slice are elements of the value (not padding)."""
        k = s.local.shape[0]
        at = self.index * k + jnp.arange(k)
        return at < int(np.prod(s.shape, dtype=np.int64))

    def vary(self, s: _Sliced) -> _Sliced:
        """The same slice, computed from the device's index, so that `pmap2`'s proof
        sees it differ between devices and lays it out with a device axis."""
        return _Sliced(jnp.where(self.index >= 0, s.local, s.local), s.shape)


def _no_element(v) -> bool:
    """Whether `v` is a slice of a value with no element (a zero-size parameter)."""
    return isinstance(v, _Sliced) and 0 in v.shape


def _by_dtype(xs: Sequence) -> dict:
    """The positions of `xs`, grouped by dtype (in order of first appearance)."""
    groups: dict = {}
    for i, x in enumerate(xs):
        groups.setdefault(jnp.result_type(x), []).append(i)
    return groups


def _split(x, sizes: Sequence[int], axis: int = 0) -> list:
    """`x` cut along `axis` into consecutive pieces of `sizes`."""
    out, start = [], 0
    for k in sizes:
        out.append(jax.lax.slice_in_dim(x, start, start + k, axis=axis))
        start += k
    return out


def _whole(ax: _Axis, v):
    return ax.whole_of(v) if isinstance(v, _Sliced) else v


def _bind(eqn, ins: Sequence) -> list:
    # As `jax.extend.core.jaxpr_as_fun` evaluates an equation.
    out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


class _Evaluator:
    """Evaluates a jaxpr traced on whole values, on slices where it can."""

    def __init__(self, ax: _Axis):
        self.ax = ax

    def run(self, closed, args: Sequence) -> list:
        jaxpr, n_consts = open_jaxpr(closed)
        consts = list(getattr(closed, "consts", []))
        env: dict = {}
        for var, val in zip(jaxpr.constvars + jaxpr.invars, consts + list(args)):
            env[var] = val

        def read(atom):
            return atom.val if isinstance(atom, Literal) else env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            outs = self.equation(eqn, ins)
            for var, val in zip(eqn.outvars, outs, strict=True):
                env[var] = val
        return [read(a) for a in jaxpr.outvars]

    def equation(self, eqn, ins: list) -> list:
        name = eqn.primitive.name
        if name == "broadcast_in_dim" and not isinstance(ins[0], _Sliced):
            out = self._broadcast_scalar(eqn, ins[0])
            if out is not None:
                return [out]
        if not any(isinstance(v, _Sliced) for v in ins):
            return _bind(eqn, ins)
        out = self._on_slices(eqn, ins)
        if out is not None:
            return out
        return _bind(eqn, [_whole(self.ax, v) for v in ins])

    def _on_slices(self, eqn, ins: list) -> list | None:
        name = eqn.primitive.name
        out_shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if name in _ELEMENTWISE:
            return self._elementwise(eqn, ins, out_shape)
        if name in _REDUCTIONS:
            return self._reduction(eqn, ins[0])
        if name in ("reshape", "squeeze", "broadcast_in_dim"):
            return self._same_order(eqn, ins[0], out_shape)
        if name in _CALLS:
            subs = subjaxprs(eqn.params)
            if len(subs) == 1:
                jaxpr, _ = open_jaxpr(subs[0])
                if len(jaxpr.invars) == len(ins):
                    return self.run(subs[0], ins)
        if name == "cond":
            return self._cond(eqn, ins)
        return None

    def _broadcast_scalar(self, eqn, x):
        # A scalar broadcast to a whole shape (`zeros_like`): made as a slice directly.
        shape = tuple(eqn.outvars[0].aval.shape)
        if jnp.ndim(x) != 0 or not shape or _extended(eqn.outvars[0].aval.dtype):
            return None
        return _Sliced(jnp.broadcast_to(x, (self.ax.length(shape),)), shape)

    def _elementwise(self, eqn, ins, shape) -> list | None:
        k = self.ax.length(shape)
        local = []
        for v in ins:
            if isinstance(v, _Sliced):
                if v.shape != shape:
                    return None
                local.append(v.local)
            elif jnp.ndim(v) == 0:
                local.append(jnp.broadcast_to(v, (k,)))
            elif tuple(jnp.shape(v)) == shape:
                local.append(self.ax.slice_of(v).local)
            else:
                return None
        return [_Sliced(out, shape) for out in _bind(eqn, local)]

    def _reduction(self, eqn, x) -> list | None:
        if not isinstance(x, _Sliced) or tuple(eqn.params["axes"]) != tuple(
            range(len(x.shape))
        ):
            return None
        reduce, over = _REDUCTIONS[eqn.primitive.name]
        dtype = eqn.outvars[0].aval.dtype
        identity = _identity(eqn.primitive.name, x.local.dtype)
        kept = jnp.where(self.ax.valid(x), x.local, identity)
        return [over(reduce(kept), self.ax.name).astype(dtype)]

    def _same_order(self, eqn, x, shape) -> list | None:
        # Shapes that keep the elements in their flattened order keep the slice.
        if not isinstance(x, _Sliced) or np.prod(shape) != np.prod(x.shape):
            return None
        if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
            return None  # a transpose first
        dims = eqn.params.get("broadcast_dimensions")
        if dims is not None and list(dims) != sorted(dims):
            return None
        return [_Sliced(x.local, shape)]

    def _cond(self, eqn, ins) -> list | None:
        index, ops = ins[0], ins[1:]
        if isinstance(index, _Sliced):
            return None
        # An output with at least one dimension comes out sliced from every branch.
        outs = eqn.outvars
        sliced_out = [len(v.aval.shape) > 0 for v in outs]
        shapes = [tuple(v.aval.shape) for v in outs]
        meta = [v.shape if isinstance(v, _Sliced) else None for v in ops]
        flat = [v.local if isinstance(v, _Sliced) else v for v in ops]

        def branch_fn(branch):
            def fn(*xs):
                args = [x if m is None else _Sliced(x, m) for x, m in zip(xs, meta)]
                got = self.run(branch, args)
                return [
                    self._as(g, s, shape).local if s else _whole(self.ax, g)
                    for g, s, shape in zip(got, sliced_out, shapes)
                ]

            return fn

        branches = [branch_fn(b) for b in eqn.params["branches"]]
        results = jax.lax.switch(index, branches, *flat)
        return [
            _Sliced(r, shape) if s else r
            for r, s, shape in zip(results, sliced_out, shapes)
        ]

    def _as(self, v, sliced: bool, shape) -> Any:
        """`v` as a slice (`sliced`) or as a whole value."""
        if sliced:
            return v if isinstance(v, _Sliced) else self.ax.slice_of(v)
        return _whole(self.ax, v)


def _extended(dtype) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.extended)


def _identity(name: str, dtype):
    if name == "reduce_sum":
        return jnp.zeros((), dtype)
    low = name == "reduce_max"  # the identity of a max is the lowest value
    if jnp.issubdtype(dtype, jnp.bool_):
        return jnp.array(not low)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.array(-jnp.inf if low else jnp.inf, dtype)
    info = jnp.iinfo(dtype)
    return jnp.array(info.min if low else info.max, dtype)


def _is_sliced_leaf(struct) -> bool:
    """Whether a leaf of the state, of this whole shape and dtype, is kept sliced."""
    return len(struct.shape) > 0 and not _extended(struct.dtype)


def _struct(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(
        jnp.shape(x), jnp.result_type(x), weak_type=bool(getattr(x, "weak_type", False))
    )


def _bound_axis(axis_name: str, what: str) -> _Axis:
    try:
        size = jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"`zero(...).{what}` must be called inside a function mapped over the "
            f"devices of the axis {axis_name!r} (an `eqx_pmapstate.pmap2` step), where "
            "each device holds its own slice of the optimizer state. Call it inside "
            f"the step, or give the axis's name with `zero(tx, axis_name=...)`."
        ) from None
    return _Axis(axis_name, int(size), jax.lax.axis_index(axis_name))


class Zero(eqx.Module):
    """An optax transformation with its state sharded over the devices; made by
    [`eqx_pmapstate.zero`][]. Its `init` and `update` are called inside a `pmap2`
    step, as those of the transformation it wraps would be."""

    tx: Any
    axis_name: str = eqx.field(static=True)

    def init(self, params):
        """The state of the wrapped transformation for this device's slice of every
        parameter (inside a `pmap2` function: outside, its array leaves have a device
        axis at 0, and its scalars are replicated).

        **Arguments:**

        - `params`: the parameters (replicated), as the wrapped `init` takes them.

        **Returns:**

        The wrapped transformation's state, of its usual tree structure: each leaf of
        a parameter's shape holds this device's slice of it.
        """
        ax = _bound_axis(self.axis_name, "init")
        closed, out_tree = jax.make_jaxpr(self.tx.init, return_shape=True)(
            jtu.tree_map(_struct, params)
        )
        ins = [ax.slice_of(p) for p in jtu.tree_leaves(params)]
        outs = _Evaluator(ax).run(closed, ins)
        structs, treedef = jtu.tree_flatten(out_tree)
        ties = _ties(ax, closed, ins)
        return treedef.unflatten(
            [
                _state_leaf(ax, v, s, t)
                for v, s, t in zip(outs, structs, ties, strict=True)
            ]
        )

    def update(self, updates, state, params=None, **extra_args):
        """The mean of this device's gradients over the devices, transformed as the
        wrapped transformation does it; and the new state (this device's slices).

        **Arguments:**

        - `updates`: this device's gradients, not averaged (averaging them first with
            `jax.lax.pmean` gives the same result, at the cost of a second reduction).
        - `state`: the state from `init` or from the previous `update`.
        - `params`: the parameters (replicated), for transformations that read them.
        - `extra_args`: passed on to the wrapped `update`, whole; floating-point
            arrays averaged over the devices first (the loss for
            `optax.contrib.reduce_on_plateau`: its mean), other arrays as they are
            (they must be the same on every device: one that may differ, or a value
            of the step the transformation closes over and uses unaveraged, makes the
            updates a `ReplicationError`, as without `zero`); a function (the `value_fn` of a
            line search) is called on whole values, and the floating-point arrays it
            returns are averaged over the devices too (a loss of this device's batch
            becomes the mean loss).

        **Returns:**

        `(updates, state)`: the updates of every parameter, whole and the same on every
        device (proved so, so that parameters updated with them stay replicated), and
        the new state.
        """
        ax = _bound_axis(self.axis_name, "update")
        like = params if params is not None else updates
        made = jax.eval_shape(self.tx.init, jtu.tree_map(_struct, like))
        _check_state(ax, state, made)
        # The dtypes are the state's own, not those `init` gives these parameters: a
        # parameter may have changed dtype since (`eqx.apply_updates` makes a bfloat16
        # parameter float32 with the float32 updates of `optax.inject_hyperparams`),
        # and the wrapped transformation keeps its state's dtypes, as without `zero`.
        full_state = jtu.tree_map(_whole_struct, made, state)

        # What is not an array (the `value_fn` of a line search) is a constant of the
        # traced `update`; a function returns its floats averaged over the devices.
        dynamic, static = eqx.partition(extra_args, eqx.is_array_like)

        def whole(g, s, p, extra):
            extra = eqx.combine(extra, static)
            return self.tx.update(g, s, p, **_averaging_functions(ax, extra))

        args = (updates, state, params, dynamic)
        closed, out_tree = jax.make_jaxpr(whole, return_shape=True)(
            jtu.tree_map(_struct, updates),
            full_state,
            None if params is None else jtu.tree_map(_struct, params),
            dynamic,
        )
        ins = _sliced_inputs(ax, args, full_state)
        outs = _Evaluator(ax).run(closed, ins)
        up_structs, up_def = jtu.tree_flatten(out_tree[0])
        st_structs, st_def = jtu.tree_flatten(out_tree[1])
        n_up = len(up_structs)
        ties = _ties(ax, closed, ins)
        wholes = ax.wholes(outs[:n_up])
        new_updates = up_def.unflatten([t(u) for t, u in zip(ties, wholes)])
        new_state = st_def.unflatten(
            [
                _state_leaf(ax, v, s, t)
                for v, s, t in zip(outs[n_up:], st_structs, ties[n_up:], strict=True)
            ]
        )
        return new_updates, new_state


def _ties(ax: _Axis, closed, ins) -> list:
    """For each output of the traced `closed` run on `ins`, a function that makes it
    depend, for `pmap2`'s proof, on the values it is computed from that may differ
    between devices and are not reduced over them on the way: the inputs held whole,
    and the values of the step that the transformation closes over (a learning rate
    made from this device's loss). Computed with such a value, each device's slice
    would be computed otherwise, and the all-gather would hide it. A value reduced on
    the way (the loss a `value_fn` returns, which is averaged) ties nothing."""
    consts = list(getattr(closed, "consts", []))
    n = len(consts)
    values = consts + list(ins)
    maybe = [
        j
        for j, v in enumerate(values)
        if (isinstance(v, Tracer) if j < n else not isinstance(v, _Sliced))
    ]
    reached: list[list] = [[] for _ in closed.out_avals]
    if not maybe or not any(_reach(ax, closed, n, len(values), maybe)):
        return [_untied] * len(reached)
    for j in maybe:
        for k, flag in enumerate(_reach(ax, closed, n, len(values), [j])):
            if flag:
                reached[k].append(values[j])
    return [_tie(deps) if deps else _untied for deps in reached]


def _reach(ax: _Axis, closed, n_consts: int, n: int, at: Sequence[int]) -> tuple:
    """Per output of `closed`, whether the values at positions `at` (constants, then
    inputs) reach it without a reduction over the devices."""
    flags = [j in at for j in range(n)]
    return reached_unreduced(closed, flags[:n_consts], flags[n_consts:], ax.name)


def _untied(v):
    return v


def _tie(deps):
    """A function that makes a value depend on `deps` for `pmap2`'s proof (the value is
    unchanged): updates and state gathered from slices computed with a value that
    differs between devices (a learning rate from this device's loss, not averaged)
    are then refused as not replicated, as they are without `zero`, where the
    all-gather alone would make them look replicated."""
    flags = [jnp.all(d == d) for d in deps if not _extended(jnp.result_type(d))]
    if not flags:
        return lambda v: v
    flag = functools.reduce(jnp.logical_and, flags)

    def tie(v):
        return v if _extended(jnp.result_type(v)) else jnp.where(flag, v, v)

    return tie


def _whole_struct(made, x) -> jax.ShapeDtypeStruct:
    """The whole shape of a leaf of the state (`made`: as `init` makes it), with the
    dtype of `x`, the leaf as passed (one device's slice, or the whole value)."""
    passed = _struct(x)
    return jax.ShapeDtypeStruct(made.shape, passed.dtype, weak_type=passed.weak_type)


def _state_leaf(ax: _Axis, v, struct, tie):
    """A leaf of the state as it is kept: this device's slice, or the whole value
    (made to depend on what `tie` ties it to)."""
    if _is_sliced_leaf(struct):
        return ax.vary(v if isinstance(v, _Sliced) else ax.slice_of(v)).local
    return tie(_whole(ax, v))


def _sliced_inputs(ax: _Axis, args, full_state) -> list:
    """The inputs of the traced `update`, as the evaluator takes them: the gradients'
    mean and the parameters as slices, the state's sliced leaves as slices."""
    updates, state, params, extra = args
    ins: list = ax.mean_slices(jtu.tree_leaves(updates))
    for x, s in zip(jtu.tree_leaves(state), jtu.tree_leaves(full_state), strict=True):
        ins.append(_Sliced(x, tuple(s.shape)) if _is_sliced_leaf(s) else x)
    ins += [ax.slice_of(p) for p in jtu.tree_leaves(params)]
    return ins + [_mean_if_inexact(ax, x) for x in jtu.tree_leaves(extra)]


def _mean_if_inexact(ax: _Axis, x):
    # A per-device value (a loss not averaged) would be mixed with the others' through
    # the slices: its mean over the devices is taken, as for the gradients.
    if eqx.is_inexact_array(x):
        return jax.lax.pmean(x, ax.name)
    return x


def _averaging_functions(ax: _Axis, extra: dict) -> dict:
    """`extra` with each function made to return its floating-point arrays averaged
    over the devices, as the arrays of `extra` are: a `value_fn` of this device's
    batch gives the mean loss, the same on every device."""

    def averaging(f):
        @functools.wraps(f)
        def averaged(*args, **kwargs):
            return jtu.tree_map(lambda x: _mean_if_inexact(ax, x), f(*args, **kwargs))

        return averaged

    return {k: averaging(f) if _is_function(f) else f for k, f in extra.items()}


def _is_function(x) -> bool:
    """Whether `x` is callable and holds no array (not a tree of gradients, though an
    `eqx.Module` of them is callable)."""
    return callable(x) and not any(map(eqx.is_array, jtu.tree_leaves(x)))


def _check_state(ax: _Axis, state, full_state) -> None:
    """`state` must be what `init` or `update` made for these parameters: the same
    tree, of the same shapes (`full_state`: as `init` makes it; an `update` may change
    a dtype)."""
    got = jtu.tree_structure(state)
    if got != jtu.tree_structure(full_state):
        raise ValueError(
            "The optimizer state passed to `zero(...).update` does not have the tree "
            "structure the wrapped transformation's state has for these parameters: "
            f"got {got}, expected {jtu.tree_structure(full_state)}. Pass the state made "
            "by this `zero(...)`'s `init` (or returned by its last `update`), for the "
            "same parameters."
        )
    flat = jtu.tree_flatten_with_path(state)[0]
    for (path, x), s in zip(flat, jtu.tree_leaves(full_state)):
        shape = tuple(s.shape)
        want = (ax.length(shape),) if _is_sliced_leaf(s) else shape
        got = (tuple(jnp.shape(x)), jnp.result_type(x))
        if got[0] != want:
            raise ValueError(
                f"The leaf state{path_name(path, state) if path else ''} of the "
                f"optimizer state is {got[1]}{list(got[0])} on each device, but `zero` "
                "keeps it as "
                f"{s.dtype}{list(want)} (the whole shape {shape} over {ax.size} "
                "devices). Pass the state made "
                "by `zero(...).init` inside a `pmap2` function over the same devices "
                "(a state of the unwrapped transformation, or one made for another "
                "number of devices, does not fit)."
            )


def zero(tx, *, axis_name: str = "devices") -> Zero:
    """Wraps an optax `GradientTransformation` so that its state is sharded over the
    devices (ZeRO stage 1-2): for use inside a [`eqx_pmapstate.pmap2`][] step.

    Write the step as a data-parallel step, without the `pmean` of the gradients:
    `update` takes this device's gradients, reduce-scatters them (each device gets its
    slice of their mean over the devices), updates its own slice of the state with the
    wrapped transformation, and all-gathers the updates, which come back whole and the
    same on every device (proved so: the parameters updated with them stay replicated).
    Each device holds, for every parameter, `1/n` of its flattened elements (padded to a
    multiple of `n`) in every leaf of the state of a parameter's shape; scalar leaves
    (a step count) are replicated.

    The result is that of the wrapped transformation on the whole mean gradients, also
    for transformations that read the whole tree (`optax.clip_by_global_norm`, masks,
    `optax.MultiSteps`, schedules): the wrapped `update` is traced on the parameters'
    real shapes, and that program runs on slices where it reads elements one by one
    (sums over a whole parameter, such as a norm, are summed over the devices too), and
    on whole values, gathered, anywhere else.

    **Arguments:**

    - `tx`: an optax `GradientTransformation` (anything with `init(params)` and
        `update(updates, state, params)`).
    - `axis_name`: the axis of the `pmap2` step.

    **Returns:**

    A [`eqx_pmapstate.Zero`][] with `init` and `update`, used as `tx`'s are.

    !!! example

        ```python
        opt = ep.zero(optax.adamw(1e-3))
        opt_state = ep.pmap2(lambda m: opt.init(eqx.filter(m, eqx.is_inexact_array)))(model)

        @ep.pmap2
        def step(model, opt_state, x, y):
            params, static = eqx.partition(model, eqx.is_inexact_array)
            loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
            updates, opt_state = opt.update(grads, opt_state, params)
            return eqx.apply_updates(model, updates), opt_state, jax.lax.pmean(loss, "devices")
        ```
    """
    if not (
        callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))
    ):
        raise TypeError(
            "`zero` wraps an optax `GradientTransformation` (an object with `init` and "
            f"`update`), but got {tx!r} of type {type(tx).__name__}."
        )
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"`axis_name` must be a non-empty str, but got {axis_name!r}.")
    return Zero(tx, axis_name)
