"""The public decorator, `pmap2`, and the object it makes, `Pmap2`: settings, the
cache key of a call, the full path (read the inputs, run the pipeline, keep the entry)
and the quick path of the steady state. See this package's README."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import jax.tree_util as jtu
from jax.sharding import Mesh

from .. import _engine
from .._cache import programs
from .._explain import CompileLog, leaf_names
from .._jax_compat import trace_context, Tracer
from .._keys import KeyedWalk
from .._layout import CheckMode, DEFAULT, step_layout
from .._mesh import manual_axes, resolve_mesh
from .._program import tracing_allowed
from .._trace import active_axis
from .._tree import is_arraylike
from . import _memo
from ._axes import check_axes_spec
from ._dispatch import Entry, Fast, Lowered, make_quick, MISS, run_entry, STALE_LIMIT
from ._inputs import code_of, is_callable_tree, read_inputs, signature, where
from ._outputs import numbers_as_arrays, rule1_candidates, want_of


class Pmap2:
    """A function mapped over the devices of a mesh axis; made by [`eqx_pmapstate.pmap2`][]."""

    def __init__(
        self,
        fun,
        *,
        axis_name,
        in_axes,
        out_axes,
        donate,
        check_replicated,
        devices,
        explain: bool = True,
    ):
        if not callable(fun):
            raise TypeError(f"`pmap2` needs a callable, but got {fun!r}.")
        if check_replicated not in (True, False, "runtime"):
            raise ValueError(
                "`check_replicated` must be True, False or 'runtime', but got "
                f"{check_replicated!r}."
            )
        if donate not in ("all", "all-except-first", "none"):
            raise ValueError(
                f"`donate` must be 'all', 'all-except-first' or 'none', but got {donate!r}."
            )
        if not isinstance(axis_name, str) or not axis_name:
            raise TypeError(
                f"`axis_name` must be a non-empty str, but got {axis_name!r}."
            )
        check_axes_spec(in_axes, "in_axes")
        check_axes_spec(out_axes, "out_axes")
        if devices is not None:
            resolve_mesh(None, devices, axis_name)  # refuses bad `devices` at once
        functools.update_wrapper(self, fun)
        # As a function has: `jaxtyping.jaxtyped` reads the wrapped function's globals.
        self.__globals__ = getattr(fun, "__globals__", {})
        self.fun = fun
        # A callable pytree's arrays are inputs after the arguments, and its program is
        # keyed on the code it runs, so that a new instance reuses it.
        self._fun_tree = is_callable_tree(fun)
        self.axis_name = axis_name
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.donate = donate
        self.check_replicated = check_replicated
        self.devices = devices
        modes: dict[Any, CheckMode] = {
            True: "trace",
            False: "off",
            "runtime": "runtime",
        }
        self._check: CheckMode = modes[check_replicated]
        self._fast: dict = {}  # full signature -> `Fast`
        self._quick: dict = {}  # tree structure -> `Quick` (see `_dispatch`)
        self._replaced: dict = {}  # tree structure -> how often its `Quick` changed entry
        self._compiles = CompileLog() if explain else None
        programs.listen(self)

    def clear_fast_path(self) -> None:
        self._fast.clear()
        self._quick.clear()
        self._replaced.clear()
        if self._compiles is not None:
            self._compiles.clear()

    def forget(self, values) -> None:
        """Drops the shortcuts to entries the library's cache no longer holds."""
        gone = {id(v) for v in values}
        for sig, fast in list(self._fast.items()):
            if id(fast.entry) in gone:
                self._fast.pop(sig, None)
        for treedef, quick in list(self._quick.items()):
            if id(quick.entry) in gone:
                self._quick.pop(treedef, None)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return functools.partial(self, instance)

    def _tree(self, args, kwargs) -> tuple:
        """What a call's inputs are: `(args, kwargs)`, and the function if it is a
        callable pytree."""
        return (args, kwargs, self.fun) if self._fun_tree else (args, kwargs)

    def __call__(self, *args, **kwargs):
        tree = self._tree(args, kwargs)
        items, shape = _memo.flatten(tree)
        quick = self._quick.get(shape)
        if quick is not None:
            out = quick(items)
            if out is not MISS:
                return out
        return self._call(args, kwargs, tree, items, shape)

    def _call(self, args, kwargs, tree, items, shape):
        """The full path: the signature, its entry (made on a miss), the call, and the
        `Quick` record for the next call of this structure."""
        leaves, treedef = jtu.tree_flatten(tree)
        sig = (treedef, signature(leaves), trace_context())
        fast = self._fast.get(sig)
        if fast is None or not fast.valid():
            fast = self._entry(args, kwargs, leaves, sig)
        entry = fast.entry
        with tracing_allowed():
            out = run_entry(entry, entry.dyn_of(leaves), entry.compiled.run)
        self._keep_quick(shape, items, leaves, fast)
        return out

    def _keep_quick(self, shape, items, leaves, fast: Fast) -> None:
        old = self._quick.get(shape)
        if old is not None and old.entry is not fast.entry:
            # Another signature for this structure: a shape or layout that changes
            # from call to call. Past a few, each quick call would only trace in vain.
            self._replaced[shape] = self._replaced.get(shape, 0) + 1
        if self._replaced.get(shape, 0) >= STALE_LIMIT:
            self._quick.pop(shape, None)
            return
        quick = make_quick(fast.entry, items, leaves, fast.guards)
        if quick is None:
            self._quick.pop(shape, None)
        else:
            self._quick[shape] = quick

    def lower(self, *args, **kwargs) -> Lowered:
        """Lowers the program for these arguments, as `jax.jit(f).lower(...)` does.

        **Returns:**

        An object with `.as_text()` and `.compile()`; the compiled program is called with
        the same arguments as this function.
        """
        leaves, treedef = jtu.tree_flatten(self._tree(args, kwargs))
        sig = (treedef, signature(leaves), trace_context())
        entry = self._entry(args, kwargs, leaves, sig).entry
        compiled = entry.compiled
        dyn = compiled.place(entry.dyn_of(leaves))
        with tracing_allowed():
            lowered = compiled.exact_run().lower(*compiled.const_values(), *dyn)
        return Lowered(lowered, entry, treedef, sig[1], self._tree)

    # -- once per signature

    def _key(self, walk: KeyedWalk, leaves, sig) -> tuple:
        treedef, per_leaf, _ = sig  # (`_engine.cached` adds the JAX settings)
        # Static leaves by value (a function by its code and what it reads), so that an
        # equal but new object (a lambda made anew) finds the program.
        leaf_keys = tuple(
            k if is_arraylike(x) else walk.value(x) for x, k in zip(leaves, per_leaf)
        )
        settings = (
            self.axis_name,
            walk.spec(self.in_axes),
            walk.spec(self.out_axes),
            self.donate,
            self._check,
            walk.spec(self.devices),
        )
        fun = code_of(self.fun) if self._fun_tree else self.fun
        return ("pmap2", walk.value(fun), settings, treedef, leaf_keys)

    def _entry(self, args, kwargs, leaves, sig) -> Fast:
        if active_axis() is not None:
            raise ValueError(
                "A `pmap2` function was called inside a function that `eqx_pmapstate` is "
                "mapping over devices (another `pmap2` step, a `Map` call or an "
                "initialisation). Inside it you are already on one device: call the "
                "function it wraps directly, and use collectives over the axis."
            )
        manual = manual_axes()
        if manual:
            raise ValueError(
                "A `pmap2` function was called inside `jax.shard_map` or `jax.pmap`, "
                f"which map over the mesh axes {list(manual)} by hand: there the call "
                "runs on one device, and `pmap2` cannot map over the devices again. Call "
                "it outside, or call the function it wraps directly and use collectives "
                f"over {manual[0]!r}."
            )
        walk = KeyedWalk()
        key = self._key(walk, leaves, sig)
        missed = []

        def compile_on_miss():
            missed.append(key)
            return self._compile(args, kwargs, leaves, walk)

        entry = _engine.cached(programs, key, walk.weak, compile_on_miss)
        if missed and self._compiles is not None:
            tree = self._tree(args, kwargs)
            names = lambda: leaf_names(tree, lambda p: where(p, tree))  # noqa: E731
            self._compiles.compiled(self.fun, key, names)
        # One guard per global name or cell (a name read by two functions of one
        # module is checked once).
        unique = {(id(g.container), g.name): g for g in walk.guards}
        fast = Fast(entry, tuple(unique.values()))
        if not any(isinstance(c(), Tracer) for c in entry.compiled.consts):
            self._fast[sig] = fast
        return fast

    def _compile(self, args, kwargs, leaves, walk: KeyedWalk):
        tree = self._tree(args, kwargs)
        flat, structure = jtu.tree_flatten_with_path(tree)
        inputs = read_inputs(
            args,
            kwargs,
            flat,
            leaves,
            fun=self.fun,
            axis_name=self.axis_name,
            in_axes=self.in_axes,
            donate=self.donate,
            devices=self.devices,
        )
        mesh, n = inputs.mesh, inputs.mesh.shape[self.axis_name]
        dyn = [leaves[i] for i in inputs.dyn_index]
        candidates = rule1_candidates(
            args, inputs, self.axis_name, self.fun if self._fun_tree else None
        )

        def decide(out_leaves, wanted):
            return step_layout(
                out_leaves,
                wanted,
                check=self._check,
                in_axes=inputs.in_axes,
                passable=inputs.passable,
                axis_name=self.axis_name,
            )

        program = _engine.compile_program(
            _per_device(self.fun, leaves, jtu.tree_structure(tree), self.out_axes),
            dyn,
            inputs.in_axes,
            want_of(self.out_axes, candidates),
            decide,
            mesh=mesh,
            axis_name=self.axis_name,
            axis_size=n,
            donate=inputs.donated,
            user_arrays={id(w.get()) for w in walk.weak if w.alive},
        )
        compiled = program.compiled
        put = not all(_engine.placed(x, s) for x, s in zip(dyn, compiled.in_shardings))
        paths = tuple(flat[i][0] for i in inputs.dyn_index)
        entry = Entry(
            compiled,
            inputs.dyn_index,
            inputs.donated,
            put,
            paths,
            self._check,
            self.axis_name,
            _memo.plan_of(compiled.treedef, mesh, _out_axes(compiled.plan, inputs)),
            structure,
        )
        return entry, program.cacheable


def _out_axes(plan, inputs) -> list:
    """Per flat output leaf of an output `plan` (`_engine.Compiled.plan`): its axis on
    the mesh (that of the input handed back, for one), or "static"."""
    return [
        inputs.in_axes[value]
        if kind == "pass"
        else "static"
        if kind == "static"
        else axis
        for kind, value, axis in plan
    ]


def _per_device(fun, leaves, treedef, out_axes) -> Callable[[list], Any]:
    """The function one device runs, of its list of array inputs: the call rebuilt
    with the static leaves in place (and the callable pytree, if `fun` is one); the
    Python numbers it returns that `out_axes` maps made arrays."""
    static = [x for x in leaves if not is_arraylike(x)]
    is_dyn = [is_arraylike(x) for x in leaves]

    def fn(local):
        it_dyn, it_static = iter(local), iter(static)
        full = [next(it_dyn) if d else next(it_static) for d in is_dyn]
        call_args, call_kwargs, *traced_fun = treedef.unflatten(full)
        out = (traced_fun[0] if traced_fun else fun)(*call_args, **call_kwargs)
        return numbers_as_arrays(out_axes, out)

    return fn


@overload
def pmap2(
    *,
    axis_name: str = "devices",
    in_axes: Any = DEFAULT,
    out_axes: Any = DEFAULT,
    donate: Literal["all", "all-except-first", "none"] = "none",
    check_replicated: bool | Literal["runtime"] = True,
    devices: Sequence[Any] | Mesh | None = None,
) -> Callable[[Callable], Pmap2]: ...


@overload
def pmap2(
    fun: Callable,
    *,
    axis_name: str = "devices",
    in_axes: Any = DEFAULT,
    out_axes: Any = DEFAULT,
    donate: Literal["all", "all-except-first", "none"] = "none",
    check_replicated: bool | Literal["runtime"] = True,
    devices: Sequence[Any] | Mesh | None = None,
) -> Pmap2: ...


def pmap2(
    fun: Callable | None = None,
    *,
    axis_name: str = "devices",
    in_axes: Any = DEFAULT,
    out_axes: Any = DEFAULT,
    donate: Literal["all", "all-except-first", "none"] = "none",
    check_replicated: bool | Literal["runtime"] = True,
    devices: Sequence[Any] | Mesh | None = None,
) -> Any:
    """Maps a function over the devices of a mesh axis, like `eqx.filter_pmap`, on
    global arrays, compiled as `jax.jit(jax.shard_map(...))` (or, with the same results,
    as `jax.jit(jax.vmap(...))` for a step without collectives, which XLA compiles
    faster, and without `shard_map` on a mesh of one device).

    Each device runs `fun` on its own slice of every mapped input (the device axis
    removed), and collectives over `axis_name` work inside. The semantics are
    `jax.pmap`'s: a replicated input acts as an identical copy on each device, so the
    data-parallel idiom `jax.lax.pmean(jax.grad(loss)(model, x, y), axis_name)` gives the
    mean gradient. `fun` is traced once per input signature (tree structure, shapes,
    dtypes, weak types, layouts and static values); the layouts of the outputs are
    decided from that one trace, and the program is compiled from it. Compiled programs
    are kept in the library's cache, so a new `pmap2(fun)` of the same function (or of
    an equal one: the same code, closure and globals) reuses them; `jax.clear_caches()`
    or [`eqx_pmapstate.clear_caches`][] drops them. The modules a call returns are not
    flattened again when they come back (the model and the optimizer state of a
    training loop): the library keeps their flat leaves until the module dies. This
    relies on Equinox modules being frozen; a module holding a list or a dict is
    flattened at every call, so that a change made to it in place is seen.

    Inside `jax.jit`, `jax.grad` or `jax.vmap`, the inputs are tracers whose layout cannot
    be read: give their axes with `in_axes` (None for a replicated parameter, 0 for data
    split over the devices); an input without one is an error, never a guess.

    **Arguments:**

    - `fun`: the function. Usable as `@pmap2`, `@pmap2(...)`, and on methods. A function
        that is a pytree holding arrays (a bound method of an `eqx.Module`, as in
        `pmap2(model.forward)`, or a module with `__call__`) has its arrays read as
        inputs: one laid out on the mesh keeps its layout (a per-device state gives
        each device its slice), any other is replicated (a constant seen whole on every
        device, as a closed-over array is and as `eqx.filter_pmap` takes it). An output
        with the structure of the instance takes its layout, as one returning `self`
        does with the method decorated in the class body. These arrays are never
        donated, and a new instance of the same structure reuses the program. Inside
        `jax.jit` or another transformation their layout cannot be read: pass the model
        as an argument instead, with its axes in `in_axes`.
    - `axis_name`: the mesh axis to map over.
    - `in_axes`: by default ([`eqx_pmapstate.DEFAULT`][]), an array already laid out on
        the mesh keeps its layout (mapped over its device axis, or broadcast if
        replicated), any other array is mapped over axis 0 (but an `eqx.Module`
        argument none of whose arrays is on the mesh, a restored model, is refused:
        give it `0` or `None`), and everything else is static. Override with a pytree prefix of the positional arguments whose leaves
        are `int`, `None`, `DEFAULT` (the rule above, for that part) or a callable of a
        leaf (as in `eqx.filter_pmap`): `in_axes=(ep.DEFAULT, None)` keeps the model's
        layout and replicates the second argument; with a dict by parameter name (as
        in `eqx.filter_pmap`): `in_axes={"w": None}`, the arguments it does not name
        following the default rule; or with a [`eqx_pmapstate.StateAxes`][] of
        filters. A tuple binds to the parameters as the call does: an argument passed
        by keyword takes the entry of its parameter's position (`f(a, x, b=b)` reads
        as `f(a, x, b)`); a single axis applies to keyword arguments too; a
        keyword-only argument follows the default rule.
    - `out_axes`: by default ([`eqx_pmapstate.DEFAULT`][]), (1) an output whose tree
        structure equals that of an argument takes that argument's layout leaf by leaf
        (tried on the whole output, then on each element of a returned tuple; a bare
        array argument counts only when left to the default rule and laid out on the
        mesh, and then only for an array of its per-device shape and dtype: an axis
        given by `in_axes` does not pass on, so that the output is the same inside
        `jax.jit`, where an input's layout cannot be read), the argument at the same
        position first; and (2) any
        other leaf comes back replicated when it is proved the same on every device
        (computed from replicated inputs only, or the result of `psum`, `pmean`, `pmax`,
        `pmin` or `all_gather` over the axis), and with a device axis at 0 otherwise (a
        gradient with respect to a replicated parameter, without `pmean`, is one value
        per device).
        Override as `in_axes` (a pytree prefix, or a `StateAxes`); a Python number
        given an axis comes back as an array with a device axis, as from `jax.pmap`
        (left to the default rule, it comes back as it is).
    - `donate`: `"all"`, `"all-except-first"` or `"none"`: which input buffers to donate
        (`"all-except-first"` keeps the first parameter's, passed by position or by
        name).
        A donated input is gone after the call: passing it again, passing the same
        array twice among donated inputs (tied weights), or passing one array both as a
        donated input and as one that is not (an EMA that starts as the parameters), is
        a `ValueError` before anything is donated.
    - `check_replicated`: replication is proved, never assumed. Every output that
        comes back replicated (by the rules above or because `out_axes` says so) must be
        proved the same on every device when the function is traced: a value computed
        only from replicated inputs, or reduced over the axis by `psum`, `pmean`, `pmax`,
        `pmin` or `all_gather`. An output that must be replicated but is not proved so
        (a parameter updated with a gradient that was not `pmean`'d) is an
        [`eqx_pmapstate.ReplicationError`][] (a `ValueError`) naming it, before anything
        runs, at no run-time cost (`True`, the default).
        `"runtime"` instead compares such outputs across devices after each call (two
        hashes per leaf and one `pmax`; the call waits for the check) and raises a
        `ReplicationError` naming the leaves that differ: for values
        that are equal for a reason the proof cannot see. `False` takes them as they are,
        as `jax.pmap` does (each device keeps its own value under a replicated label).
    - `devices`: devices or a `Mesh` to use when no input is laid out on a mesh yet.

    **Returns:**

    The mapped function, a [`eqx_pmapstate.Pmap2`][]. `.lower(*args, **kwargs)` lowers
    it ahead of time (`.as_text()`, `.compile()`), as `jax.jit(f).lower` does.
    """
    if fun is None:
        return functools.partial(
            pmap2,
            axis_name=axis_name,
            in_axes=in_axes,
            out_axes=out_axes,
            donate=donate,
            check_replicated=check_replicated,
            devices=devices,
        )
    return Pmap2(
        fun,
        axis_name=axis_name,
        in_axes=in_axes,
        out_axes=out_axes,
        donate=donate,
        check_replicated=check_replicated,
        devices=devices,
    )
