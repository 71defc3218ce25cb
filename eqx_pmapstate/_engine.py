"""The one pipeline, shared by `pmap2`, `Map`, `pmap2_new_states`, `eval_new_states`
and `vmap2_new_states`: `compile_program`.

A per-device function is handled in four named steps, once per call signature:

1. `_trace.trace`: trace it once to a jaxpr, with `jax.pmap`'s semantics (a replicated
   input is an identical copy on each device), recording the output's structure;
2. `_dataflow.varying_outputs`: prove which outputs are the same on every device;
3. a layout decision: the caller's policy, a pure function (`_layout`) of those facts
   and of what the caller asked for, giving each output its axis, or "hand back input
   j unchanged";
4. `build`: the program (`_program`) compiled from that same jaxpr, and how to put the
   outputs back into the output's structure.

Callers read their inputs' layouts, choose the policy, and keep the result, a
`Compiled`, in the library's cache (`_cache`, through `cached`) under a key they make
(`_keys`); they never assemble these steps themselves.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence, Set
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import _program
from ._dataflow import varying_outputs
from ._jax_compat import hoist_consts, trace_context, Tracer
from ._layout import Layout, OutLeaf, Pass
from ._mesh import put_global, shardings
from ._trace import per_device_avals, trace, Traced


class Compiled:
    """One call signature's program, and how to assemble its outputs.

    Call it with the list of dynamic inputs (global arrays); it returns the output tree
    and, when some outputs are checked at run time, the flags of the check (else None).

    `plan` has one entry per flat output leaf, `(kind, value, axis)`: `("array", i,
    axis)` for the program's output `i`, `("pass", j, axis)` for input `j` handed back,
    `("empty", (shape, dtype, sharding), axis)` for a zero-size array made outside the
    program (XLA gives such arrays broken shards under an explicit output sharding), and
    `("static", obj, None)` for a non-array leaf.
    """

    def __init__(
        self, treedef, plan, run, consts, in_shardings, checked_paths, structs, n_inputs
    ):
        self.structs = structs  # per plan entry: the global `ShapeDtypeStruct`, or None
        self.run = run  # the jitted program, over `(*consts, *dynamic inputs)`
        self.in_shardings = in_shardings  # per input, or None (no placement)
        self.consts = consts  # per jaxpr constant, a callable returning it
        self.treedef = treedef
        self.plan = plan
        self.checked_paths = checked_paths
        self.extra_out = bool(checked_paths)
        self._only_arrays = all(kind == "array" for kind, _, _ in plan)
        # For `assemble`: the statics in place, and where the outputs and inputs go.
        self._template = [v if k == "static" else None for k, v, _ in plan]
        self._at = {
            kind: [(i, v) for i, (k, v, _) in enumerate(plan) if k == kind]
            for kind in ("array", "pass", "empty")
        }
        self._pick, self._statics = _picker(plan, n_inputs)
        self._loose: tuple = ()  # see `settle`
        self._strict: Callable[[], Callable] | None = None

    def leave_layouts(
        self, loose: Sequence[tuple[int, NamedSharding]], strict: Callable[[], Callable]
    ) -> None:
        """Records that `run` leaves the layout of the program's outputs `loose`
        (`(position, sharding)` pairs) to XLA, and how to make a program that names
        them all (`strict`)."""
        self._loose, self._strict = tuple(loose), strict

    def exact_run(self) -> Any:
        """A program that names the layout of every output: `run`, or one made for
        compiling ahead of time, whose executable `settle` never sees."""
        return self.run if self._strict is None else self._strict()

    def settle(self, outs: Sequence) -> Sequence:
        """`outs` (the program's outputs), each in the layout the plan gives it.

        Naming an output's layout costs XLA compile time even where its propagation
        would choose the same, so `run` leaves to it the outputs whose layout follows
        from the inputs' (see `_loose`). This checks them; if XLA chose another layout
        for one, that output is moved, and `run` becomes a program that names every
        layout (compiled at the next call). Called after every run but the quick
        path's, which runs only an executable checked here before."""
        if not self._loose:
            return outs
        wrong = [(i, s) for i, s in self._loose if not _laid_out(outs[i], s)]
        if not wrong:
            return outs
        outs = list(outs)
        for i, sharding in wrong:
            outs[i] = jax.device_put(outs[i], sharding)
        assert self._strict is not None
        self.run, self._loose, self._strict = self._strict(), (), None
        return outs

    def const_values(self) -> list:
        return [c() for c in self.consts]

    def place(self, dyn: Sequence, names: Callable[[int], str] | None = None) -> list:
        """`dyn`, each concrete input moved to the layout the program expects.
        `names(i)` names input `i` in messages."""
        if self.in_shardings is None:
            return list(dyn)
        return [
            x if placed(x, s) else put_global(x, s, names(i) if names else None)
            for i, (x, s) in enumerate(zip(dyn, self.in_shardings))
        ]

    def __call__(self, dyn: Sequence) -> tuple[Any, Any]:
        with _program.tracing_allowed():
            outs = self.settle(self.run(*self.const_values(), *self.place(dyn)))
        flags = None
        if self.extra_out:
            *outs, flags = outs
        return self.assemble(dyn, outs), flags

    def assemble(self, dyn, outs):
        return self.treedef.unflatten(self.out_leaves(dyn, outs))

    def out_leaves(self, dyn, outs) -> Sequence:
        """The flat output leaves, in order: the program's outputs `outs`, the inputs
        `dyn` handed back, the statics, and the zero-size arrays made here."""
        if self._only_arrays:
            return outs
        if self._pick is not None:  # no zero-size array to make
            return self._pick([*outs, *dyn, *self._statics])
        leaves = self._template.copy()
        for i, k in self._at["array"]:
            leaves[i] = outs[k]
        for i, j in self._at["pass"]:
            leaves[i] = dyn[j]
        for i, (shape, dtype, sharding) in self._at["empty"]:
            leaves[i] = jax.device_put(_zeros(shape, dtype), sharding)
        return leaves

    def abstract(self, dyn: Sequence):
        """The output tree with every array replaced by its `jax.ShapeDtypeStruct`
        (global shape, dtype, sharding), without running anything."""
        leaves = []
        for (kind, value, _), struct in zip(self.plan, self.structs):
            if kind == "pass":
                x = dyn[value]
                struct = jax.ShapeDtypeStruct(
                    np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
                )
            leaves.append(value if kind == "static" else struct)
        return self.treedef.unflatten(leaves)

    def mismatched(self, flags) -> list[tuple]:
        """The key paths of the checked outputs whose flag is set (waits for the flags)."""
        bad = np.asarray(flags)
        return [p for p, b in zip(self.checked_paths, bad) if b]


def _laid_out(x, sharding: NamedSharding) -> bool:
    got = getattr(x, "sharding", None)
    if got is None:
        # A `float0` output (the gradient of an integer input): JAX returns it as a
        # host array, which holds no data and has no layout to check.
        return True
    return got == sharding or got.is_equivalent_to(sharding, x.ndim)


def _picker(plan, n_inputs: int) -> tuple[Callable | None, tuple]:
    """For `assemble`: a function taking `[*outputs, *inputs, *statics]` to the flat
    output leaves in order, and the statics; None when some leaf is a zero-size array
    made outside the program."""
    if any(kind == "empty" for kind, _, _ in plan):
        return None, ()
    n_out = sum(kind == "array" for kind, _, _ in plan)
    at = {"array": 0, "pass": n_out}
    statics, order = [], []
    for kind, value, _ in plan:
        if kind == "static":
            order.append(n_out + n_inputs + len(statics))
            statics.append(value)
        else:
            order.append(at[kind] + value)
    return getter(order), tuple(statics)


def getter(indices: Sequence) -> Callable[[Sequence], tuple]:
    """`operator.itemgetter` (of indices, or of names) that always returns a tuple."""
    if len(indices) == 0:
        return lambda seq: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda seq: (seq[i],)
    return operator.itemgetter(*indices)


def _is_empty(aval) -> bool:
    return aval.size == 0


def _zeros(shape, dtype):
    """A zero-size array, made outside the program (with JAX 0.10, a program naming
    the layout of a zero-size key array gives every device the whole array)."""
    if jnp.issubdtype(dtype, jax.dtypes.extended):  # a key array: NumPy has no such
        return jnp.zeros(shape, dtype)
    return np.zeros(shape, dtype)


def _global_shape(shape, axis, n: int) -> tuple:
    return (
        tuple(shape)
        if axis is None
        else tuple(shape[:axis]) + (n,) + tuple(shape[axis:])
    )


def _plan(traced: Traced, layout: Layout, mesh, axis_name, n: int):
    """The output plan (see `Compiled`), the program's outputs `(k, axis)`, and per plan
    entry the global `ShapeDtypeStruct` of an array made (else None)."""
    by_leaf = {flat_i: k for k, flat_i in enumerate(traced.arrays)}
    avals = traced.jaxpr.out_avals
    plan, outputs, structs = [], [], []
    laid: dict = {}  # one sharding object per axis
    for flat_i, static in enumerate(traced.statics):
        k = by_leaf.get(flat_i)
        axis = None if k is None else layout.axes[k]
        struct = None
        if k is None:
            plan.append(("static", static, None))
        elif isinstance(axis, Pass):
            plan.append(("pass", axis.input, None))
        else:
            if mesh is None:
                sharding = None
            elif axis in laid:
                sharding = laid[axis]
            else:
                sharding = laid[axis] = shardings(mesh, axis_name, [axis])[0]
            shape = _global_shape(avals[k].shape, axis, n)
            struct = jax.ShapeDtypeStruct(shape, avals[k].dtype, sharding=sharding)
            if _is_empty(avals[k]):
                plan.append(("empty", (shape, avals[k].dtype, sharding), axis))
            else:
                plan.append(("array", len(outputs), axis))
                outputs.append((k, axis))
        structs.append(struct)
    return tuple(plan), outputs, tuple(structs)


def placed(x, sharding) -> bool:
    if isinstance(x, Tracer):
        return True  # inside another transformation: the program lays it out itself
    return getattr(x, "sharding", None) == sharding


def hold_consts(
    consts: Sequence, mesh: Mesh | None, user: Set[int]
) -> tuple[list, bool]:
    """How a cached program gets the constants of its jaxpr: per constant a callable.

    A constant that is one of the user's arrays (`user`: ids of the arrays a cache key
    holds weakly) and already laid out as the program needs is held by weak reference;
    any other constant becomes a copy of ours, laid out replicated. Returns the
    callables and whether the program may be cached (not if a constant is a tracer of an
    enclosing transformation).
    """
    sharding = NamedSharding(mesh, P()) if mesh is not None else None
    held, cacheable = [], True
    for c in consts:
        if isinstance(c, Tracer):
            held.append(lambda c=c: c)
            cacheable = False
        elif id(c) in user and isinstance(c, jax.Array) and placed(c, sharding):
            held.append(weakref.ref(c))
        else:
            copy = jax.device_put(
                np.asarray(c) if not isinstance(c, jax.Array) else c, sharding
            )
            held.append(lambda copy=copy: copy)
    return held, cacheable


def build(
    traced: Traced,
    layout: Layout,
    *,
    in_axes: Sequence[int | None],
    mesh: Mesh | None,
    axis_name,
    axis_size: int,
    donate: Sequence[int] = (),
    user_arrays: Set[int] = frozenset(),
    fix_inputs: bool = False,
    varying: Sequence[bool] | None = None,
) -> tuple[Compiled, bool]:
    """Compiles the program for `traced` laid out by `layout`. Returns it and whether it
    may be cached. `fix_inputs`: the program's input layouts fixed (when no input is a
    tracer). `varying`: per jaxpr output, whether it may differ between devices (lets
    XLA lay out the outputs whose layout follows from the inputs', see `_loose`)."""
    closed = traced.jaxpr
    consts, cacheable = hold_consts(closed.consts, mesh, set(user_arrays))
    plan, outputs, structs = _plan(traced, layout, mesh, axis_name, axis_size)
    jaxpr = hoist_consts(closed)  # holds no constant: they are inputs
    checked = [k for k, _ in outputs if k in layout.checked]
    n_consts = len(closed.consts)
    in_shardings = None
    # (Outputs are tracers where a constant is one: nothing can check them after.)
    loose = _loose(outputs, varying, mesh, fix_inputs and cacheable)

    def program(loose: Set[int]) -> Callable:
        if mesh is None:
            return _program.vmapped(
                jaxpr, n_consts, in_axes, outputs, checked, axis_size, axis_name, donate
            )
        return _program.sharded(
            jaxpr,
            n_consts,
            in_axes,
            outputs,
            checked,
            mesh,
            axis_name,
            donate,
            fix_inputs=fix_inputs,
            loose=loose,
            call=traced.call,
        )

    run = program(loose)
    if mesh is not None:
        in_shardings = tuple(shardings(mesh, axis_name, in_axes))
    checked_paths = tuple(traced.paths[traced.arrays[k]] for k in checked)
    compiled = Compiled(
        traced.treedef,
        plan,
        run,
        consts,
        in_shardings,
        checked_paths,
        structs,
        len(in_axes),
    )
    if loose:
        assert mesh is not None
        named = shardings(mesh, axis_name, [a for _, a in outputs])
        compiled.leave_layouts(
            [(i, s) for i, s in enumerate(named) if i in loose],
            lambda: program(frozenset()),
        )
    return compiled, cacheable


def _loose(
    outputs: Sequence[tuple[int, int | None]],
    varying: Sequence[bool] | None,
    mesh: Mesh | None,
    fix_inputs: bool,
) -> frozenset[int]:
    """The positions in `outputs` whose layout XLA's propagation gives as the plan
    wants, on a mesh of several devices with the inputs' layouts fixed: an output that
    may differ between devices, laid out along its axis, and one proved the same on
    every device, replicated. (One proved the same but given a device axis is a
    broadcast, which XLA may leave replicated, as it does `jnp.broadcast_to` under
    `jax.jit`: its layout is named; so is every layout on one device, where XLA would
    give a single device's.) `Compiled.settle` checks them all the same."""
    if mesh is None or mesh.size == 1 or not fix_inputs or varying is None:
        return frozenset()
    return frozenset(
        i for i, (k, axis) in enumerate(outputs) if varying[k] == (axis is not None)
    )


class Program(NamedTuple):
    """What `compile_program` made: the program, and the facts it was decided from."""

    compiled: Compiled
    traced: Traced
    leaves: tuple  # per jaxpr output, its `OutLeaf`
    layout: Layout
    cacheable: bool  # False when a constant is a tracer of an enclosing transformation


def out_leaves(traced: Traced, varying: Sequence[bool]) -> tuple:
    """The facts about each array output that the layout decision reads."""
    return tuple(
        OutLeaf(traced.paths[i], aval.ndim, v, j, traced.treedef, _is_empty(aval))
        for i, aval, v, j in zip(
            traced.arrays, traced.jaxpr.out_avals, varying, traced.input_of
        )
    )


def compile_program(
    fn: Callable[[list], Any],
    dyn: Sequence,
    in_axes: Sequence[int | None],
    want: Callable | None,
    decide: Callable[[tuple, Any], Layout],
    *,
    mesh: Mesh | None,
    axis_name,
    axis_size: int,
    donate: Sequence[int] = (),
    user_arrays: Set[int] = frozenset(),
) -> Program:
    """The pipeline: traces the per-device `fn` on `dyn` mapped over `in_axes`, proves
    which outputs are the same on every device, lets `decide(leaves, wanted)` (a layout
    policy from `_layout`; `wanted` is what `want` returned in the trace) choose the
    layout, and builds the program.

    **Arguments:**

    - `fn`: the per-device function, of the list of per-device inputs.
    - `dyn`: the inputs (global arrays, or tracers of an enclosing transformation).
    - `in_axes`: per input, its device axis, or None (replicated).
    - `want`: called inside the trace with the output (see `_trace.trace`).
    - `decide`: the layout policy.
    - `mesh`, `axis_name`, `axis_size`: where it runs (`mesh=None`: an ensemble on one
        device, vectorised).
    - `donate`: the inputs whose buffers the program may reuse.
    - `user_arrays`: ids of the arrays a cache key holds weakly (see `hold_consts`).

    **Returns:**

    A `Program`.
    """
    avals = per_device_avals(dyn, in_axes)
    traced = trace(fn, avals, axis_name, axis_size, want, mesh=mesh)
    mapped = [a is not None for a in in_axes]
    varying = varying_outputs(traced.jaxpr, mapped, axis_name)
    leaves = out_leaves(traced, varying)
    layout = decide(leaves, traced.wanted)
    traced_inputs = any(isinstance(x, Tracer) for x in dyn)
    compiled, cacheable = build(
        traced,
        layout,
        in_axes=in_axes,
        mesh=mesh,
        axis_name=axis_name,
        axis_size=axis_size,
        donate=donate,
        user_arrays=user_arrays,
        fix_inputs=not traced_inputs,
        varying=varying,
    )
    if traced_inputs:
        # Inside a transformation: an outer `jax.jit` that names no layout, so that
        # the transposed program (a VJP) takes a cotangent laid out otherwise than
        # the output, as `jax.pmap`'s does; the inner one lays it out.
        compiled.run = jax.jit(compiled.run)
    return Program(compiled, traced, leaves, layout, cacheable)


_V = TypeVar("_V")


def cached(cache, key, weak, make: Callable[[], tuple[_V, bool]]) -> _V:
    """The program under `key` in `cache`, made by `make` when missing. The key is
    taken with the JAX settings in force that change what a function traces to
    (`jax.numpy_dtype_promotion`, `jax.default_matmul_precision`, ...), as `jax.jit`
    takes its own."""
    if key is not None:
        key = (key, trace_context())
        found = cache.get(key)
        if found is not None:
            return found
    compiled, cacheable = make()
    if key is not None and cacheable:
        cache.put(key, compiled, weak)
    return compiled
