"""`pmap2`: a `filter_pmap`-style decorator over global arrays laid out on a mesh."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, overload

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding

from . import _engine
from ._assign import assign_axis, mapped_axis, normalize_out_axes
from ._cache import programs
from ._dataflow import varying_outputs
from ._errors import differing_outputs
from ._explain import CompileLog, leaf_names
from ._jax_compat import Tracer
from ._keys import Guard, KeyedWalk, WeakId
from ._layout import CheckMode, DEFAULT, OutLeaf, output_name, step_layout
from ._mesh import _UNKNOWN, axis_spec, mesh_str, read_axis, resolve_mesh
from ._stores import register_store
from ._trace import active_axis, is_output_array, per_device_avals, trace
from ._tree import broadcast_prefix, is_arraylike, iter_states
from ._typing import OutAxes


class StateAxes:
    """Axes given in the filter language, for `pmap2`'s `in_axes` and `out_axes` and for
    `Map`: a dict from axis (`int | None`) to filters, as `state_out_axes` of
    [`eqx_pmapstate.pmap2_new_states`][] takes it.

    Wrapping the dict in this class says that it is a rule for every state of the tree,
    not a pytree prefix (a plain dict would be read as one).

    **Arguments:**

    - `axes`: a dict from `int | None` to filters, or a single filter (`{0: filter}`).
    """

    __slots__ = ("spec",)

    def __init__(self, axes: OutAxes):
        self.spec = normalize_out_axes(axes)

    def __eq__(self, other):
        return isinstance(other, StateAxes) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)

    def __repr__(self):
        return f"StateAxes({dict(self.spec)!r})"

    def axes_of(self, tree) -> dict:
        """A dict from the path of each array leaf of `tree` to its axis, as written."""
        out = {}
        for ref in iter_states(tree):
            axis = assign_axis(self.spec, ref)
            out.update((p, axis) for p, _ in ref.leaves)
        return out


def _where(path) -> str:
    """A path from the root `(args, kwargs)` (or `(args, kwargs, fun)`, for a callable
    pytree) written as `args[0].weight`, `kwargs['x']` or `self.weight` (the instance of
    a bound method)."""
    if not path:
        return "the arguments"
    head, rest = path[0], path[1:]
    where = getattr(head, "idx", None)
    if where == 2:
        if rest and getattr(rest[0], "name", None) == "__self__":
            return "self" + jtu.keystr(rest[1:])
        return "fun" + jtu.keystr(rest)
    return ("args" if where == 0 else "kwargs") + jtu.keystr(rest)


# --------------------------------------------------------------------------- callable pytrees


def _is_callable_tree(fun) -> bool:
    """Whether `fun` is a pytree holding arrays (an `eqx.Module` with `__call__`, a bound
    method of one): its arrays are then inputs, like the arguments'."""
    return isinstance(fun, eqx.Module) and any(
        is_arraylike(x) for x in jtu.tree_leaves(fun)
    )


def _code_of(fun):
    """The plain function a callable pytree runs: what its cache key follows."""
    func = getattr(fun, "__func__", None)
    if func is not None and hasattr(fun, "__self__"):
        return func
    return type(fun).__call__


def _fun_axis(x, axis_name):
    """The axis of an array of a callable pytree: its layout on the mesh, else None (a
    constant seen whole on every device, as a closed-over array is). A tracer's layout
    cannot be read: `DEFAULT`, which refuses it."""
    if isinstance(x, Tracer):
        return DEFAULT
    axis = read_axis(x, axis_name) if isinstance(x, jax.Array) else _UNKNOWN
    return None if axis is _UNKNOWN else axis


_CONCRETE: set = set()  # the types of concrete `jax.Array`s seen (`ArrayImpl`)
register_store("array types", _CONCRETE.clear)


def _signature(leaves) -> tuple:
    """What a call's compiled program depends on, leaf by leaf: the abstract value
    (shape, dtype, weak type) and layout of the arrays, and the rest by equality (as
    `jax.jit` takes static arguments; the library's cache then compares them by value)."""
    concrete = _CONCRETE
    return tuple(
        [(x.aval, x.sharding) if type(x) in concrete else _leaf_sig(x) for x in leaves]
    )


def _leaf_sig(x):
    if isinstance(x, Tracer):  # `pmap2` called inside another transformation
        return jax.typeof(x)
    if isinstance(x, jax.Array):
        _CONCRETE.add(type(x))
        return (x.aval, x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
        return (np.shape(x), x.dtype, None)
    try:
        hash(x)
    except TypeError:
        return WeakId(x)
    return (type(x), x)


# --------------------------------------------------------------------------- axes specs


def _check_axes_spec(spec, what: str) -> None:
    """`in_axes`/`out_axes` as given: `DEFAULT`, a `StateAxes`, or a pytree prefix whose
    leaves are ints, None, `DEFAULT` (the default rule for that part) or callables."""
    if spec is DEFAULT or isinstance(spec, StateAxes):
        return
    for leaf in jtu.tree_leaves(spec, is_leaf=lambda x: x is None):
        ok = leaf is None or leaf is DEFAULT or isinstance(leaf, StateAxes)
        ok = ok or callable(leaf)
        ok = ok or (isinstance(leaf, (int, np.integer)) and not isinstance(leaf, bool))
        if not ok:
            raise TypeError(
                f"`{what}` must be a `eqx_pmapstate.StateAxes`, or a pytree prefix of the "
                "arguments whose leaves are ints (an axis), None (replicated), "
                "`eqx_pmapstate.DEFAULT` (the default rule), `StateAxes` (for the part "
                f"they cover) or callables of a leaf, but it holds {leaf!r} of type "
                f"{type(leaf).__name__}."
            )


def _prefix_axes(prefix, tree, what: str) -> list:
    """Per leaf of `tree`, its entry of the prefix; a `StateAxes` among the prefix's
    leaves gives the axes of the subtree it covers by its filters."""
    try:
        given = broadcast_prefix(prefix, tree)
        if not any(isinstance(g, StateAxes) for g in given):
            return given
        is_leaf = lambda x: x is None or isinstance(x, StateAxes)  # noqa: E731
        structure = jtu.tree_structure(prefix, is_leaf=is_leaf)
        out = []
        for axes, sub in zip(
            jtu.tree_leaves(prefix, is_leaf=is_leaf), structure.flatten_up_to(tree)
        ):
            if isinstance(axes, StateAxes):
                by_path = axes.axes_of(sub)
                flat = jtu.tree_flatten_with_path(sub)[0]
                out.extend(by_path.get(p, DEFAULT) for p, _ in flat)
            else:
                out.extend([axes] * len(jtu.tree_leaves(sub)))
        return out
    except ValueError as e:
        # JAX's message goes on with the whole tree's repr: keep its first clause.
        reason = str(e).split(";")[0][:160]
        raise ValueError(
            f"`{what}` is not a pytree prefix of the tree it applies to: {reason}."
        ) from None


def _positional_names(fun) -> list | None:
    """The names of `fun`'s parameters that a call can pass by position, in order (None
    if its signature cannot be read)."""
    try:
        params = inspect.signature(fun).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def _bound_axes(in_axes, args, kwargs, fun) -> tuple[Any, dict]:
    """`in_axes` as the call binds it: the prefix for the positional arguments, and the
    axis of each keyword argument that the parameter at its position gives (as
    `inspect.signature(fun).bind` binds the call); other keyword arguments: `DEFAULT`."""
    if not isinstance(in_axes, tuple):
        return in_axes, dict.fromkeys(kwargs, in_axes)
    if len(in_axes) < len(args):
        raise ValueError(
            f"`in_axes` has {len(in_axes)} entries, but the call passes {len(args)} "
            "positional arguments. Give one entry per positional argument "
            "(`eqx_pmapstate.DEFAULT` for the default rule)."
        )
    if len(in_axes) == len(args):
        return in_axes, {}
    names = _positional_names(fun) or []
    by_name = {}
    for i in range(len(args), len(in_axes)):
        name = names[i] if i < len(names) else None
        if name in kwargs:
            by_name[name] = in_axes[i]
        elif name is None:
            unbound = [k for k in kwargs if k not in names] or ["none"]
            raise ValueError(
                f"`in_axes` has {len(in_axes)} entries, but the call passes {len(args)} "
                f"positional argument(s), and its keyword argument(s) "
                f"{', '.join(map(str, unbound))} take no position. Such an argument "
                "follows the default rule: lay it out on the mesh to choose its layout, "
                "or give every axis with `eqx_pmapstate.StateAxes`."
            )
        # else: a parameter left to its default value, which is no input
    return in_axes[: len(args)], by_name


def _given_axes(in_axes, args, kwargs, flat, fun=None, axis_name="devices") -> list:
    """Per leaf of `(args, kwargs)`: the axis `in_axes` gives it, or `DEFAULT`; per leaf
    of a callable pytree after them, `_fun_axis`."""
    n = len(jtu.tree_leaves((args, kwargs)))
    if in_axes is DEFAULT:
        given = [DEFAULT] * n
    elif isinstance(in_axes, StateAxes):
        by_path = in_axes.axes_of((args, kwargs))
        given = [by_path.get(p, DEFAULT) for p, _ in flat[:n]]
    else:
        positional, by_name = _bound_axes(in_axes, args, kwargs, fun)
        given = _prefix_axes(positional, args, "in_axes")
        for name in sorted(kwargs):  # in the order `(args, kwargs)` flattens
            axis = by_name.get(name, DEFAULT)
            given += _prefix_axes(axis, kwargs[name], f"in_axes for {name!r}")
    fun_axis = functools.partial(_fun_axis, axis_name=axis_name)
    return given + [fun_axis] * (len(flat) - n)


# --------------------------------------------------------------------------- inputs


class _Inputs(NamedTuple):
    """How the arguments of one call signature enter the program."""

    mesh: Mesh
    dyn_index: tuple  # the flat indices of the array leaves
    in_axes: tuple  # per array leaf: its mapped axis, or None
    layout_of_leaf: tuple  # per flat leaf: its axis, or DEFAULT for a static leaf
    donated: tuple  # indices into the array leaves
    passable: frozenset  # array leaves an unchanged output may be handed back as
    explicit: frozenset = frozenset()  # flat leaves whose axis `in_axes` gives


def _on_mesh(x, axis_name) -> bool:
    if not isinstance(x, jax.Array) or isinstance(x, Tracer):
        return False
    s = x.sharding
    return isinstance(s, NamedSharding) and axis_name in s.mesh.axis_names


def _find_mesh(leaves, axis_name, devices) -> Mesh:
    found = None
    for x in leaves:
        if not _on_mesh(x, axis_name):
            continue
        mesh = x.sharding.mesh
        if found is None:
            found = mesh
        elif mesh != found:
            raise ValueError(
                f"The inputs are laid out on two different meshes with an axis "
                f"{axis_name!r}: {mesh_str(found)}, and {mesh_str(mesh)}. Put them on one "
                "mesh (for example with `jax.device_put(x, NamedSharding(mesh, spec))`)."
            )
    if found is not None:
        if isinstance(devices, Mesh) and devices != found:
            raise ValueError(
                f"The inputs are laid out on {mesh_str(found)}, not on the mesh given as "
                f"`devices` ({mesh_str(devices)})."
            )
        return found
    return resolve_mesh(None, devices, axis_name)[0]


def _argument_of(path) -> tuple:
    """The top-level argument a leaf belongs to: `(0, position)` or `(1, name)`."""
    head, arg = path[0], path[1]
    return (head.idx, getattr(arg, "idx", getattr(arg, "key", None)))


def _check_argument_layouts(args, kwargs, flat, given, axis_name) -> None:
    """An argument left to the default layout must be laid out on the mesh entirely or
    not at all; an `eqx.Module` not on the mesh is refused (whatever the other inputs
    are: whether a restored model is split must not depend on them)."""
    on, off = {}, {}
    for (path, x), g in zip(flat, given):
        if g is not DEFAULT or not is_arraylike(x) or isinstance(x, Tracer):
            continue
        (on if _on_mesh(x, axis_name) else off).setdefault(_argument_of(path), path)
    for arg, path in off.items():
        value = args[arg[1]] if arg[0] == 0 else kwargs[arg[1]]
        name = _where(path[:2])
        if arg in on:
            raise ValueError(
                f"The argument {name} is partly laid out on the mesh and partly not (for "
                f"example {_where(on[arg])} is, {_where(path)} is not): its layout cannot "
                "be read. Lay it all out with `eqx_pmapstate.relayout(tree, like)` or "
                "`jax.device_put`, or give its axes with `in_axes`."
            )
        if isinstance(value, eqx.Module):
            raise ValueError(
                f"The argument {name} is an `eqx.Module` none of whose arrays is laid out "
                f"on the mesh (for example {_where(path)}). By default it would be split "
                "over the devices along its first axis, which is almost never meant for "
                "a model (a restored or freshly built one). Lay it out like the model it "
                "replaces with `eqx_pmapstate.relayout(tree, like)`, or say how to map it "
                "with `in_axes`: None to replicate it, 0 to split a stacked model over "
                "the devices."
            )


def _input_axis(path, x, g, mesh, n, axis_name) -> int | None:
    if callable(g) and g is not DEFAULT:
        g = g(x)
    if g is DEFAULT:
        if isinstance(x, Tracer) and getattr(path[0], "idx", None) == 2:
            raise ValueError(
                f"The function's array {_where(path)} is traced (`pmap2` is called "
                "inside `jax.jit`, `jax.grad`, `jax.vmap` or another transformation), "
                "so its layout cannot be read. Pass the model as an argument instead, "
                "with its axes in `in_axes`: `pmap2(lambda m, x: m(x), in_axes=(None, "
                "0))(model, x)` for a replicated model."
            )
        if isinstance(x, Tracer):
            raise ValueError(
                f"The input {_where(path)} is traced (`pmap2` is called inside `jax.jit`, "
                "`jax.grad`, `jax.vmap` or another transformation), so its layout cannot "
                "be read. Give its axis with `in_axes`: None for a replicated input (a "
                f"parameter), 0 for one split over the devices (as `jax.pmap` does)."
            )
        here = read_axis(x, axis_name, mesh) if isinstance(x, jax.Array) else _UNKNOWN
        g = 0 if here is _UNKNOWN else here
    if g is None:
        return None
    return mapped_axis(
        g,
        x,
        n,
        f"The input {_where(path)}",
        f"Give it an axis of length {n} (for a batch: reshape to ({n}, batch // {n}, "
        "...)), or mark it replicated with an `in_axes` of None.",
    )


def _donated(donate, args, kwargs, dyn_index) -> tuple:
    """The array inputs to donate: among the arguments only (a callable pytree's own
    arrays, like closed-over ones, are never donated)."""
    if donate == "none":
        return ()
    first_end = 0 if donate == "all" else len(jtu.tree_leaves(args[:1]))
    end = len(jtu.tree_leaves((args, kwargs)))
    return tuple(d for d, i in enumerate(dyn_index) if first_end <= i < end)


def _read_inputs(self, args, kwargs, leaves) -> _Inputs:
    flat = jtu.tree_flatten_with_path(self._tree(args, kwargs))[0]
    mesh = _find_mesh(leaves, self.axis_name, self.devices)
    n = mesh.shape[self.axis_name]
    given = _given_axes(self.in_axes, args, kwargs, flat, self.fun, self.axis_name)
    _check_argument_layouts(args, kwargs, flat, given, self.axis_name)
    dyn_index, in_axes, layout = [], [], []
    for i, ((path, x), g) in enumerate(zip(flat, given)):
        if not is_arraylike(x):
            layout.append(DEFAULT)
            continue
        axis = _input_axis(path, x, g, mesh, n, self.axis_name)
        layout.append(axis)
        in_axes.append(axis)
        dyn_index.append(i)
    donated = _donated(self.donate, args, kwargs, dyn_index)
    target = [NamedSharding(mesh, axis_spec(self.axis_name, a)) for a in in_axes]
    passable = frozenset(
        j
        for j, (i, s) in enumerate(zip(dyn_index, target))
        if j not in donated and _engine._placed(leaves[i], s)
    )
    explicit = frozenset(i for i, g in enumerate(given) if g is not DEFAULT)
    return _Inputs(
        mesh,
        tuple(dyn_index),
        tuple(in_axes),
        tuple(layout),
        donated,
        passable,
        explicit,
    )


# --------------------------------------------------------------------------- outputs


def _rule1_candidates(args, inputs: _Inputs, axis_name, fun=None) -> list:
    """The positional arguments whose layout an output of the same structure takes: all
    but bare arrays, which count only when left to the default rule and laid out on the
    mesh; a bare array only passes its layout to an array of its per-device shape and
    dtype. Then a callable pytree `fun`, and the
    instance of a bound method (tried at position 0, as `self` is in the class body).
    Each candidate: `(structure, position, bare, layouts, per-device shapes)`."""
    out = []
    if fun is not None:
        n = len(jtu.tree_leaves(fun))
        layouts = inputs.layout_of_leaf[len(inputs.layout_of_leaf) - n :]
        shapes = _local_shapes(fun, layouts)
        instance = getattr(fun, "__self__", None)
        if instance is not None and len(jtu.tree_leaves(instance)) == n:
            out.append((jtu.tree_structure(instance), 0, None, layouts, shapes))
        out.append((jtu.tree_structure(fun), 0, None, layouts, shapes))
    return out + _arg_candidates(args, inputs, axis_name)


def _local_shapes(tree, layouts) -> tuple:
    """The per-device shape of each array leaf of `tree` (None for other leaves)."""
    out = []
    for leaf, axis in zip(jtu.tree_leaves(tree), layouts):
        if not is_arraylike(leaf) or axis is DEFAULT:
            out.append(None)
            continue
        shape = list(np.shape(leaf))
        if axis is not None:
            del shape[axis]
        out.append(tuple(shape))
    return tuple(out)


def _arg_candidates(args, inputs: _Inputs, axis_name) -> list:
    starts = np.cumsum([0] + [len(jtu.tree_leaves(a)) for a in args]).tolist()
    out = []
    for a_idx, arg in enumerate(args):
        bare = None
        if is_arraylike(arg):
            # Only a layout read off the mesh passes on: one given by `in_axes` does
            # not, whether or not the array is on the mesh, as inside `jax.jit`
            # (where that is unknown), so that `jax.jit` does not change the output.
            explicit = starts[a_idx] in inputs.explicit
            if explicit or not _on_mesh(arg, axis_name):
                continue
            axis = inputs.layout_of_leaf[starts[a_idx]]
            local = list(np.shape(arg))
            if axis is not None:
                del local[axis]
            bare = (tuple(local), jax.numpy.result_type(arg))
        layouts = inputs.layout_of_leaf[starts[a_idx] : starts[a_idx + 1]]
        shapes = _local_shapes(arg, layouts)
        out.append((jtu.tree_structure(arg), a_idx, bare, layouts, shapes))
    return out


def _inherited(candidates, sub, prefer=None) -> list | None:
    # The argument at the same position is tried first, then the others in order, so
    # that `return model, state` after `step(model, state, ...)` pairs them up even when
    # the two have the same structure.
    # An output of the argument's structure but other per-device shapes (a norm per
    # leaf) does not take its layout: the next rule decides.
    structure = jtu.tree_structure(sub)
    for struct, a_idx, bare, layouts, shapes in sorted(
        candidates, key=lambda c: c[1] != prefer
    ):
        if bare is not None and (
            not is_arraylike(sub) or (np.shape(sub), jax.numpy.result_type(sub)) != bare
        ):
            continue
        if struct == structure and _same_shapes(sub, shapes):
            return list(layouts)
    return None


def _same_shapes(sub, shapes) -> bool:
    for leaf, shape in zip(jtu.tree_leaves(sub), shapes):
        if shape is not None and is_output_array(leaf) and np.shape(leaf) != shape:
            return False
    return True


def _wanted_by_default(candidates, out) -> list:
    wanted = _inherited(candidates, out)
    if wanted is not None:
        return wanted
    if isinstance(out, tuple):
        wanted = []
        for position, element in enumerate(out):
            got = _inherited(candidates, element, prefer=position)
            wanted += (
                got if got is not None else [DEFAULT] * len(jtu.tree_leaves(element))
            )
        return wanted
    return [DEFAULT] * len(jtu.tree_leaves(out))


def _want(out_axes, candidates):
    """The `want` callback of the trace: per array output, the axis asked for."""

    def want(out, flat):
        if isinstance(out_axes, StateAxes):
            by_path = out_axes.axes_of(out)
            wanted = [by_path.get(p, DEFAULT) for p, _ in flat]
        elif out_axes is not DEFAULT:
            wanted = _prefix_axes(out_axes, out, "out_axes")
        else:
            wanted = _wanted_by_default(candidates, out)
        result = []
        for (_, leaf), w in zip(flat, wanted, strict=True):
            if is_output_array(leaf):
                result.append(w(leaf) if callable(w) and w is not DEFAULT else w)
        return result

    return want


# --------------------------------------------------------------------------- one signature


class _Entry(NamedTuple):
    """Everything a call of one signature needs."""

    compiled: _engine.Compiled
    dyn_index: tuple
    donated: tuple  # indices into the dynamic inputs
    put: bool  # whether some input must be moved to its layout first
    paths: tuple  # the key path of each dynamic input, for messages


class _Fast(NamedTuple):
    """A `pmap2` function's own shortcut to an entry, valid while its guards hold."""

    entry: _Entry
    guards: tuple[Guard, ...]

    def valid(self) -> bool:
        for g in self.guards:
            if not g.holds():
                return False
        return True


def _check_donation(dyn, donated, paths) -> None:
    seen: dict = {}
    donated_set = set(donated)
    kept = {id(x): paths[j] for j, x in enumerate(dyn) if j not in donated_set}
    for d in donated:
        x = dyn[d]
        if isinstance(x, jax.Array) and not isinstance(x, Tracer):
            if x.is_deleted():
                raise ValueError(
                    f"The input {_where(paths[d])} was donated by an earlier call and "
                    "its buffer is gone. Pass the outputs of that call instead, or use "
                    "`donate='none'`."
                )
        if id(x) in seen:
            raise ValueError(
                f"The same array is passed twice, at {_where(seen[id(x)])} and "
                f"{_where(paths[d])}, and would be donated twice (tied weights?). "
                "Pass distinct arrays, or use `donate='none'`."
            )
        if id(x) in kept:
            raise ValueError(
                f"The same array is passed at {_where(paths[d])}, which is donated, and "
                f"at {_where(kept[id(x)])}, which is not: its buffer cannot be both "
                "given up and kept (a target network or an EMA that starts as the "
                "parameters?). Pass a copy for one of them (`jnp.copy`), or use "
                "`donate='none'`."
            )
        seen[id(x)] = paths[d]


class Lowered:
    """A `pmap2` function lowered for one call signature, from `Pmap2.lower`."""

    def __init__(
        self, lowered, entry: _Entry, treedef, signature, check, axis_name, tree
    ):
        self.lowered = lowered  # the `jax.stages.Lowered` of the program
        self._entry, self._treedef, self._signature = entry, treedef, signature
        self._check, self._axis_name = check, axis_name
        self._tree = tree  # `Pmap2._tree`: the tree of a call's inputs

    def as_text(self, *args, **kwargs) -> str:
        """The program's text (StableHLO by default), as `jax.stages.Lowered.as_text`."""
        return self.lowered.as_text(*args, **kwargs)

    def compile(self) -> CompiledCall:
        """Compiles it: a callable taking the same arguments as the `pmap2` function."""
        return CompiledCall(self.lowered.compile(), self)


class CompiledCall:
    def __init__(self, executable, lowered: Lowered):
        self.executable = executable  # the `jax.stages.Compiled`
        self._lowered = lowered

    def as_text(self) -> str:
        return self.executable.as_text()

    def __call__(self, *args, **kwargs):
        low = self._lowered
        leaves, treedef = jtu.tree_flatten(low._tree(args, kwargs))
        if treedef != low._treedef or _signature(leaves) != low._signature:
            raise TypeError(
                "The arguments do not match those this program was lowered for (tree "
                "structure, shapes, dtypes and layouts). Lower it again for them."
            )
        return _run(low._entry, leaves, self.executable, low._check, low._axis_name)


def _run(entry: _Entry, leaves, run, check, axis_name):
    """One call of a compiled entry, whichever way it was reached (a call, its fast
    path, or `lower().compile()`): the donation checks, the program, the run-time
    replication check, and the outputs in their structure."""
    if entry.donated:
        _check_donation(
            [leaves[i] for i in entry.dyn_index], entry.donated, entry.paths
        )
    compiled = entry.compiled
    dyn = [leaves[i] for i in entry.dyn_index]
    if entry.put:
        dyn = compiled.place(dyn)
    outs = run(*compiled.const_values(), *dyn)
    if compiled.extra_out:
        *outs, flags = outs
        if check == "runtime":
            bad = [output_name(p) for p in compiled.mismatched(flags)]  # waits
            if bad:
                raise differing_outputs(bad, axis_name)
    return compiled.assemble(dyn, outs)


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
        _check_axes_spec(in_axes, "in_axes")
        _check_axes_spec(out_axes, "out_axes")
        if devices is not None:
            resolve_mesh(None, devices, axis_name)  # refuses bad `devices` at once
        functools.update_wrapper(self, fun)
        # As a function has: `jaxtyping.jaxtyped` reads the wrapped function's globals.
        self.__globals__ = getattr(fun, "__globals__", {})
        self.fun = fun
        # A callable pytree's arrays are inputs after the arguments, and its program is
        # keyed on the code it runs, so that a new instance reuses it.
        self._fun_tree = _is_callable_tree(fun)
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
        self._fast: dict = {}
        self._compiles = CompileLog() if explain else None
        programs.listen(self)

    def clear_fast_path(self) -> None:
        self._fast.clear()
        if self._compiles is not None:
            self._compiles.clear()

    def forget(self, values) -> None:
        """Drops the shortcuts to entries the library's cache no longer holds."""
        gone = {id(v) for v in values}
        for sig, fast in list(self._fast.items()):
            if id(fast.entry) in gone:
                self._fast.pop(sig, None)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return functools.partial(self, instance)

    def _tree(self, args, kwargs) -> tuple:
        """What a call's inputs are: `(args, kwargs)`, and the function if it is a
        callable pytree."""
        return (args, kwargs, self.fun) if self._fun_tree else (args, kwargs)

    def __call__(self, *args, **kwargs):
        leaves, treedef = jtu.tree_flatten(self._tree(args, kwargs))
        sig = (treedef, _signature(leaves))
        fast = self._fast.get(sig)
        if fast is None or not fast.valid():
            fast = self._entry(args, kwargs, leaves, sig)
        entry = fast.entry
        return _run(entry, leaves, entry.compiled.run, self._check, self.axis_name)

    def lower(self, *args, **kwargs) -> Lowered:
        """Lowers the program for these arguments, as `jax.jit(f).lower(...)` does.

        **Returns:**

        An object with `.as_text()` and `.compile()`; the compiled program is called with
        the same arguments as this function.
        """
        leaves, treedef = jtu.tree_flatten(self._tree(args, kwargs))
        sig = (treedef, _signature(leaves))
        entry = self._entry(args, kwargs, leaves, sig).entry
        compiled = entry.compiled
        dyn = compiled.place([leaves[i] for i in entry.dyn_index])
        lowered = compiled.run.lower(*compiled.const_values(), *dyn)
        return Lowered(
            lowered, entry, treedef, sig[1], self._check, self.axis_name, self._tree
        )

    # -- once per signature

    def _key(self, walk: KeyedWalk, leaves, sig) -> tuple:
        treedef, per_leaf = sig
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
        fun = _code_of(self.fun) if self._fun_tree else self.fun
        return ("pmap2", walk.value(fun), settings, treedef, leaf_keys)

    def _entry(self, args, kwargs, leaves, sig) -> _Fast:
        if active_axis() is not None:
            raise ValueError(
                "A `pmap2` function was called inside a function that `eqx_pmapstate` is "
                "mapping over devices (another `pmap2` step, a `Map` call or an "
                "initialisation). Inside it you are already on one device: call the "
                "function it wraps directly, and use collectives over the axis."
            )
        walk = KeyedWalk()
        key = self._key(walk, leaves, sig)
        missed = []

        def compile_on_miss():
            missed.append(key)
            return self._compile(args, kwargs, leaves, walk)

        entry = _engine.cached(programs, key, walk.weak, compile_on_miss)
        if missed and self._compiles is not None:
            names = lambda: leaf_names(self._tree(args, kwargs), _where)  # noqa: E731
            self._compiles.compiled(self.fun, key, names)
        # One guard per global name or cell (a name read by two functions of one
        # module is checked once).
        unique = {(id(g.container), g.name): g for g in walk.guards}
        fast = _Fast(entry, tuple(unique.values()))
        if not any(isinstance(c(), Tracer) for c in entry.compiled.consts):
            self._fast[sig] = fast
        return fast

    def _compile(self, args, kwargs, leaves, walk: KeyedWalk):
        inputs = _read_inputs(self, args, kwargs, leaves)
        mesh, n = inputs.mesh, inputs.mesh.shape[self.axis_name]
        dyn = [leaves[i] for i in inputs.dyn_index]
        static = [x for x in leaves if not is_arraylike(x)]
        is_dyn = [is_arraylike(x) for x in leaves]
        treedef = jtu.tree_structure(self._tree(args, kwargs))
        fun = self.fun

        def fn(local):
            it_dyn, it_static = iter(local), iter(static)
            full = [next(it_dyn) if d else next(it_static) for d in is_dyn]
            call_args, call_kwargs, *traced_fun = treedef.unflatten(full)
            return (traced_fun[0] if traced_fun else fun)(*call_args, **call_kwargs)

        tree_fun = self.fun if self._fun_tree else None
        candidates = _rule1_candidates(args, inputs, self.axis_name, tree_fun)
        avals = per_device_avals(dyn, inputs.in_axes)
        want = _want(self.out_axes, candidates)
        traced = trace(fn, avals, self.axis_name, n, want, mesh=mesh)
        mapped = [a is not None for a in inputs.in_axes]
        varying = varying_outputs(traced.jaxpr, mapped, self.axis_name)
        out_leaves = [
            OutLeaf(traced.paths[i], aval.ndim, v, j)
            for i, aval, v, j in zip(
                traced.arrays, traced.jaxpr.out_avals, varying, traced.input_of
            )
        ]
        layout = step_layout(
            out_leaves,
            traced.wanted,
            check=self._check,
            in_axes=inputs.in_axes,
            passable=inputs.passable,
            axis_name=self.axis_name,
        )
        user = {id(w.get()) for w in walk.weak if w.alive}
        compiled, cacheable = _engine.build(
            traced,
            layout,
            in_axes=inputs.in_axes,
            mesh=mesh,
            axis_name=self.axis_name,
            axis_size=n,
            donate=inputs.donated,
            user_arrays=user,
        )
        if any(isinstance(x, Tracer) for x in dyn):
            # Inside a transformation: an outer `jax.jit` that names no layout, so that
            # the transposed program (a VJP) takes a cotangent laid out otherwise than
            # the output, as `jax.pmap`'s does; the inner one lays it out.
            compiled.run = jax.jit(compiled.run)
        put = not all(_engine._placed(x, s) for x, s in zip(dyn, compiled.in_shardings))
        flat = jtu.tree_flatten_with_path(self._tree(args, kwargs))[0]
        paths = tuple(flat[i][0] for i in inputs.dyn_index)
        entry = _Entry(compiled, inputs.dyn_index, inputs.donated, put, paths)
        return entry, cacheable


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
    `jax.jit(jax.shard_map(...))` and global arrays.

    Each device runs `fun` on its own slice of every mapped input (the device axis
    removed), and collectives over `axis_name` work inside. The semantics are
    `jax.pmap`'s: a replicated input acts as an identical copy on each device, so the
    data-parallel idiom `jax.lax.pmean(jax.grad(loss)(model, x, y), axis_name)` gives the
    mean gradient. `fun` is traced once per input signature (tree structure, shapes,
    dtypes, weak types, layouts and static values); the layouts of the outputs are
    decided from that one trace, and the program is compiled from it. Compiled programs
    are kept in the library's cache, so a new `pmap2(fun)` of the same function (or of
    an equal one: the same code, closure and globals) reuses them; `jax.clear_caches()`
    or [`eqx_pmapstate.clear_caches`][] drops them.

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
        layout and replicates the second argument; or with a
        [`eqx_pmapstate.StateAxes`][] of filters. A tuple binds to the parameters as
        the call does: an argument passed by keyword takes the entry of its
        parameter's position (`f(a, x, b=b)` reads as `f(a, x, b)`); a single axis
        applies to keyword arguments too; a keyword-only argument follows the default
        rule.
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
        Override in the same two forms as `in_axes`.
    - `donate`: `"all"`, `"all-except-first"` or `"none"`: which input buffers to donate.
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
