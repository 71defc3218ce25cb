"""Reading a call's inputs: the mesh, each array's axis (from its layout or from
`in_axes`), the checks of arguments left to the default rule, what is donated, and the
signature a compiled program depends on."""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding

from .. import _engine
from .._assign import mapped_axis
from .._jax_compat import Tracer
from .._keys import plain_key, WeakId
from .._layout import DEFAULT
from .._mesh import mesh_str, read_axis, resolve_mesh, shardings, UNKNOWN
from .._stores import register_store
from .._tree import is_arraylike, path_name
from ._axes import bound_axes, first_parameter, prefix_axes, StateAxes


def where(path, tree=None) -> str:
    """A path from the root `(args, kwargs)` (or `(args, kwargs, fun)`, for a callable
    pytree) written as `args[0].weight`, `kwargs['x']` or `self.weight` (the instance of
    a bound method). `tree`: that root (or its structure), to name the entries of an
    `eqx.nn.State` by their layer (`_tree.path_name`)."""
    if not path:
        return "the arguments"
    head, rest = path[0], path[1:]
    shown = path_name(path, tree)[len(str(head)) :]  # the keys below the root
    where = getattr(head, "idx", None)
    if where == 2:
        if rest and getattr(rest[0], "name", None) == "__self__":
            return "self" + shown[len(str(rest[0])) :]
        return "fun" + shown
    return ("args" if where == 0 else "kwargs") + shown


def is_callable_tree(fun) -> bool:
    """Whether `fun` is a pytree holding arrays (an `eqx.Module` with `__call__`, a bound
    method of one): its arrays are then inputs, like the arguments'."""
    return isinstance(fun, eqx.Module) and any(
        is_arraylike(x) for x in jtu.tree_leaves(fun)
    )


def code_of(fun):
    """The plain function a callable pytree runs: what its cache key follows."""
    func = getattr(fun, "__func__", None)
    if func is not None and hasattr(fun, "__self__"):
        return func
    return type(fun).__call__


def fun_axis(x, axis_name):
    """The axis of an array of a callable pytree: its layout on the mesh, else None (a
    constant seen whole on every device, as a closed-over array is). A tracer's layout
    cannot be read: `DEFAULT`, which refuses it."""
    if isinstance(x, Tracer):
        return DEFAULT
    axis = read_axis(x, axis_name) if isinstance(x, jax.Array) else UNKNOWN
    return None if axis is UNKNOWN else axis


CONCRETE: set = set()  # the types of concrete `jax.Array`s seen (`ArrayImpl`)


register_store("array types", CONCRETE.clear)


def signature(leaves) -> tuple:
    """What a call's compiled program depends on, leaf by leaf: the abstract value
    (shape, dtype, weak type) and layout of the arrays, and the rest by equality (as
    `jax.jit` takes static arguments; the library's cache then compares them by value)."""
    concrete = CONCRETE
    return tuple(
        [(x.aval, x.sharding) if type(x) in concrete else _leaf_sig(x) for x in leaves]
    )


def _leaf_sig(x):
    if isinstance(x, Tracer):  # `pmap2` called inside another transformation
        return jax.typeof(x)
    if isinstance(x, jax.Array):
        CONCRETE.add(type(x))
        return (x.aval, x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
        return (np.shape(x), x.dtype, None)
    try:
        hash(x)
    except TypeError:
        return WeakId(x)
    return plain_key(x)


def given_axes(in_axes, args, kwargs, flat, fun=None, axis_name="devices") -> list:
    """Per leaf of `(args, kwargs)`: the axis `in_axes` gives it, or `DEFAULT`; per leaf
    of a callable pytree after them, `fun_axis`."""
    n = len(jtu.tree_leaves((args, kwargs)))
    if in_axes is DEFAULT:
        given = [DEFAULT] * n
    elif isinstance(in_axes, StateAxes):
        root = (args, kwargs)
        by_path = in_axes.axes_of(root, show=functools.partial(where, tree=root))
        given = [by_path.get(p, DEFAULT) for p, _ in flat[:n]]
    else:
        positional, by_name = bound_axes(in_axes, args, kwargs, fun)
        given = prefix_axes(positional, args, "in_axes")
        for name in sorted(kwargs):  # in the order `(args, kwargs)` flattens
            axis = by_name.get(name, DEFAULT)
            given += prefix_axes(axis, kwargs[name], f"in_axes for {name!r}")
    axis_of = functools.partial(fun_axis, axis_name=axis_name)
    return given + [axis_of] * (len(flat) - n)


class CallInputs(NamedTuple):
    """How the arguments of one call signature enter the program."""

    mesh: Mesh
    dyn_index: tuple  # the flat indices of the array leaves
    in_axes: tuple  # per array leaf: its mapped axis, or None
    layout_of_leaf: tuple  # per flat leaf: its axis, or DEFAULT for a static leaf
    donated: tuple  # indices into the array leaves
    passable: frozenset  # array leaves an unchanged output may be handed back as
    explicit: frozenset = frozenset()  # flat leaves whose axis `in_axes` gives


def on_mesh(x, axis_name) -> bool:
    if not isinstance(x, jax.Array) or isinstance(x, Tracer):
        return False
    s = x.sharding
    return isinstance(s, NamedSharding) and axis_name in s.mesh.axis_names


def _find_mesh(leaves, axis_name, devices) -> Mesh:
    found = None
    for x in leaves:
        if not on_mesh(x, axis_name):
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
        (on if on_mesh(x, axis_name) else off).setdefault(_argument_of(path), path)
    for arg, path in off.items():
        value = args[arg[1]] if arg[0] == 0 else kwargs[arg[1]]
        name = where(path[:2])
        tree = (args, kwargs)
        if arg in on:
            raise ValueError(
                f"The argument {name} is partly laid out on the mesh and partly not (for "
                f"example {where(on[arg], tree)} is, {where(path, tree)} is not): its "
                "layout cannot be read. Lay it all out with "
                "`eqx_pmapstate.relayout(tree, like)` or `jax.device_put`, or give its "
                "axes with `in_axes`."
            )
        if isinstance(value, eqx.Module):
            raise ValueError(
                f"The argument {name} is an `eqx.Module` none of whose arrays is laid out "
                f"on the mesh (for example {where(path, tree)}). By default it would be "
                "split over the devices along its first axis, which is almost never "
                "meant for a model (a restored or freshly built one). Lay it out like the "
                "model it replaces with `eqx_pmapstate.relayout(tree, like)`, or say how "
                "to map it with `in_axes`: None to replicate it, 0 to split a stacked "
                "model over the devices."
            )


def _input_axis(path, x, g, mesh, n, axis_name, tree, fewer=False) -> int | None:
    """`tree`: the call's inputs, which `path` is in (for messages); `fewer`: whether
    the mesh is every device by default (no input on a mesh, no `devices`), so that a
    shorter axis can be mapped over fewer devices, as `jax.pmap` does."""
    if callable(g) and g is not DEFAULT:
        g = g(x)
    if g is DEFAULT:
        if isinstance(x, Tracer) and getattr(path[0], "idx", None) == 2:
            raise ValueError(
                f"The function's array {where(path, tree)} is traced (`pmap2` is called "
                "inside `jax.jit`, `jax.grad`, `jax.vmap` or another transformation), "
                "so its layout cannot be read. Pass the model as an argument instead, "
                "with its axes in `in_axes`: `pmap2(lambda m, x: m(x), in_axes=(None, "
                "0))(model, x)` for a replicated model."
            )
        if isinstance(x, Tracer):
            raise ValueError(
                f"The input {where(path, tree)} is traced (`pmap2` is called inside "
                "`jax.jit`, `jax.grad`, `jax.vmap` or another transformation), so its "
                "layout cannot be read. Give its axis with `in_axes`: None for a "
                "replicated input (a parameter), 0 for one split over the devices (as "
                "`jax.pmap` does)."
            )
        here = read_axis(x, axis_name, mesh) if isinstance(x, jax.Array) else UNKNOWN
        g = 0 if here is UNKNOWN else here
    if g is None:
        return None
    return mapped_axis(
        g, x, n, f"The input {where(path, tree)}", functools.partial(_fix, n, fewer)
    )


def _fix(n: int, fewer: bool, length: int) -> str:
    """What to do about an input to be mapped over an axis of `length`, not `n`."""
    fix = (
        f"Give it an axis of length {n} (for a batch: reshape to ({n}, batch // {n}, "
        "...)), or mark it replicated with an `in_axes` of None."
    )
    if fewer and 0 < length < n:
        fix += (
            f" To map over {length} devices, as `jax.pmap` does with the first "
            f"{length}, pass them: `pmap2(..., devices=jax.devices()[:{length}])`."
        )
    return fix + _several_processes()


def _several_processes() -> str:
    if jax.process_count() == 1:
        return ""
    return (
        " With several processes, an array that is not laid out is the global value: "
        "pass the whole batch on every process, or make a global array of each "
        "process's rows with `jax.make_array_from_process_local_data`."
    )


def _donated(donate, args, kwargs, dyn_index, fun) -> tuple:
    """The array inputs to donate: among the arguments only (a callable pytree's own
    arrays, like closed-over ones, are never donated). `"all-except-first"` keeps the
    first parameter's, whether the call passes it by position or by name."""
    if donate == "none":
        return ()
    kept = range(0) if donate == "all" else _first_argument(args, kwargs, fun)
    end = len(jtu.tree_leaves((args, kwargs)))
    return tuple(d for d, i in enumerate(dyn_index) if i < end and i not in kept)


def _first_argument(args, kwargs, fun) -> range:
    """The flat indices, among the leaves of `(args, kwargs)`, of the argument bound to
    `fun`'s first parameter."""
    if args:
        return range(len(jtu.tree_leaves(args[0])))
    name = first_parameter(fun)
    if name not in kwargs:
        return range(0)
    start = sum(len(jtu.tree_leaves(kwargs[k])) for k in sorted(kwargs) if k < name)
    return range(start, start + len(jtu.tree_leaves(kwargs[name])))


def read_inputs(
    args, kwargs, flat, leaves, *, fun, axis_name, in_axes, donate, devices
) -> CallInputs:
    """How the arguments of one call signature enter the program.

    **Arguments:**

    - `args`, `kwargs`: the call's arguments.
    - `flat`: the `(path, leaf)` pairs of the call's inputs, `(args, kwargs)` or `(args,
        kwargs, fun)` for a callable pytree `fun`; `leaves`: the leaves alone.
    - `fun`, `axis_name`, `in_axes`, `donate`, `devices`: the `pmap2` settings.

    **Returns:**

    A `CallInputs`.
    """
    mesh = _find_mesh(leaves, axis_name, devices)
    n = mesh.shape[axis_name]
    fewer = devices is None and not any(on_mesh(x, axis_name) for x in leaves)
    given = given_axes(in_axes, args, kwargs, flat, fun, axis_name)
    _check_argument_layouts(args, kwargs, flat, given, axis_name)
    dyn_index, dyn_axes, layout = [], [], []
    tree = (args, kwargs, fun)  # the paths are in it (`fun`: a callable pytree)
    for i, ((path, x), g) in enumerate(zip(flat, given)):
        if not is_arraylike(x):
            layout.append(DEFAULT)
            continue
        axis = _input_axis(path, x, g, mesh, n, axis_name, tree, fewer)
        # Past an input of length n, a shorter one is a mismatch, not fewer devices.
        fewer = fewer and axis is None
        layout.append(axis)
        dyn_axes.append(axis)
        dyn_index.append(i)
    donated = _donated(donate, args, kwargs, dyn_index, fun)
    target = shardings(mesh, axis_name, dyn_axes)
    passable = frozenset(
        j
        for j, (i, s) in enumerate(zip(dyn_index, target))
        if j not in donated and _engine.placed(leaves[i], s)
    )
    explicit = frozenset(i for i, g in enumerate(given) if g is not DEFAULT)
    return CallInputs(
        mesh,
        tuple(dyn_index),
        tuple(dyn_axes),
        tuple(layout),
        donated,
        passable,
        explicit,
    )
