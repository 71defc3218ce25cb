"""`pmap2_new_states` and `vmap2_new_states`: create a module's new states over an axis."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from . import _engine
from ._assign import assign_axis, mapped_axis, normalize_out_axes, warn_unmatched
from ._cache import programs
from ._errors import (
    differing_states,
    uncheckable_states,
    unproved_abstract_states,
)
from ._filters import OutAxes
from ._jax_compat import Tracer
from ._keys import KeyedWalk
from ._layout import new_states_layout
from ._mesh import axis_spec, check_axis_size, read_axis, resolve_mesh, UNKNOWN
from ._registry import leaf_axis, register
from ._state import State
from ._trace import active_axis, is_output_array, per_device_avals
from ._tree import (
    broadcast_prefix,
    is_arraylike,
    iter_states,
    path_name,
    prefix_mismatch,
)


def _has_init_state(x) -> bool:
    return isinstance(x, eqx.Module) and callable(getattr(type(x), "init_state", None))


def _is_bound_method(x) -> bool:
    # `M().build` is a bound method: an `eqx.Module` in Equinox (`BoundMethod`), but a
    # builder to call, not a module to initialise.
    return callable(x) and hasattr(x, "__func__") and hasattr(x, "__self__")


def _accepted_kwargs(method, kwargs: Mapping) -> dict:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _init_all(module, kwargs: Mapping):
    """Calls `init_state` on every module of the tree that defines it, innermost first,
    and returns the new tree. Raises if an argument of `kwargs` was taken by none."""
    used: set = set()

    def visit(node):
        children, treedef = jtu.tree_flatten(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0] is node:
            return node
        node = treedef.unflatten([visit(c) for c in children])
        if _has_init_state(node):
            accepted = _accepted_kwargs(node.init_state, kwargs)
            used.update(accepted)
            new = node.init_state(**accepted)
            if new is None:
                raise TypeError(
                    f"`{type(node).__name__}.init_state` returned None. Equinox modules are "
                    "immutable, so `init_state` must return the new module, for example "
                    "`return eqx.tree_at(lambda m: m.state, self, new_state, "
                    "is_leaf=lambda x: x is None)`."
                )
            node = new
        return node

    out = visit(module)
    unused = sorted(set(kwargs) - used)
    if unused:
        raise TypeError(
            f"No `init_state` method of the module accepts the argument(s) {unused} given "
            "in `init_kwargs`. Check their names against the `init_state` signatures."
        )
    return out


def _with_tag(marker: State, tag: str) -> State:
    new = object.__new__(type(marker))
    for k, v in vars(marker).items():
        object.__setattr__(new, k, v)
    object.__setattr__(new, "tag", tag)
    return new


def _tag_new_markers(out, held: Mapping, tag: str):
    """Tags the markers that hold a new array: one not at a path the module already held
    (the same test that decides which arrays are laid out)."""

    def retag(path, x):
        if isinstance(x, State) and x.tag is None:
            sub = jtu.tree_flatten_with_path(x)[0]
            if any(
                is_arraylike(leaf) and path + tuple(p) not in held for p, leaf in sub
            ):
                return _with_tag(x, tag)
        return x

    return jtu.tree_map_with_path(retag, out, is_leaf=lambda x: isinstance(x, State))


# --------------------------------------------------------------------------- arguments


def _is_init_form(module, what: str) -> bool:
    """Whether `module` is an `eqx.Module` to initialise (else a callable to call)."""
    if _is_bound_method(module):
        return False
    if isinstance(module, eqx.Module):
        if not any(
            _has_init_state(x) for x in jtu.tree_leaves(module, is_leaf=_has_init_state)
        ):
            raise TypeError(
                f"`{what}` got an instance of {type(module).__name__}, but no module in it "
                "defines `init_state`. Give a module with `init_state` methods (each "
                "returning the new module), or pass a callable that builds the whole tree, "
                "such as the class itself or `eqx.nn.make_with_state(Model)`."
            )
        return True
    if callable(module):
        return False
    raise TypeError(
        f"`{what}` needs an `eqx.Module` instance with `init_state` methods, or a callable "
        f"that builds the new tree, but got {module!r} of type {type(module).__name__}."
    )


def _checked_kwargs(init_kwargs, init_in_axes, state_tag) -> tuple[dict, dict]:
    if init_kwargs is None:
        init_kwargs = {}
    if not isinstance(init_kwargs, Mapping) or not all(
        isinstance(k, str) for k in init_kwargs
    ):
        raise TypeError("`init_kwargs` must be a dict from argument names to values.")
    if init_in_axes is None:
        init_in_axes = {}
    if not isinstance(init_in_axes, Mapping):
        raise TypeError(
            "`init_in_axes` must be a dict from argument names to axes (or pytree "
            "prefixes of axes)."
        )
    for name in init_in_axes:
        if name not in init_kwargs:
            raise ValueError(
                f"`init_in_axes` names the argument {name!r}, which is not in `init_kwargs`."
            )
    if state_tag is not None and not isinstance(state_tag, str):
        raise TypeError(f"`state_tag` must be a str or None, but got {state_tag!r}.")
    return dict(init_kwargs), dict(init_in_axes)


def _kwarg_axes(name: str, prefix, value, n: int) -> list:
    """`init_in_axes[name]`, a pytree prefix of `value`, as one checked axis per leaf."""
    try:
        axes = broadcast_prefix(prefix, value)
    except ValueError as e:
        raise ValueError(
            f"`init_in_axes[{name!r}]` is not a pytree prefix of the argument {name!r}: "
            f"{prefix_mismatch(prefix, value) or e}."
        ) from None
    flat = jtu.tree_flatten_with_path(value)[0]
    return [
        _check_in_axis(name, path, leaf, a, n, value)
        for (path, leaf), a in zip(flat, axes)
    ]


def _check_in_axis(name, path, leaf, axis, n, value) -> int | None:
    """`value`: the argument, which `path` is in."""
    if axis is None:
        return None
    where = f"The argument {name!r}" + (f" at {path_name(path, value)}" if path else "")
    if not is_arraylike(leaf):
        raise ValueError(
            f"`init_in_axes` maps {where[4:]} along axis {axis}, but it is "
            f"{type(leaf).__name__}, not an array. Only arrays can be mapped; give it axis None."
        )
    return mapped_axis(
        axis,
        leaf,
        n,
        where,
        "Give it one entry per device (or ensemble member), for example "
        f"`jax.random.split(key, {n})`.",
    )


class InitInputs(NamedTuple):
    """The dynamic inputs of an initialisation and how to rebuild its arguments."""

    dyn: list  # global arrays: the module's leaves, then the keyword arguments'
    in_axes: list  # per input: its mapped axis, or None (broadcast)
    held: dict  # the path of each array the module held -> its input number
    rebuild: Callable  # per-device inputs -> (module or None, kwargs)
    key: tuple  # the structure and the static values


_SLOT = object()  # where an array goes in a template


def _module_inputs(module, mesh, axis_name, walk: KeyedWalk):
    """The arrays a module holds before its initialisation, and the module's template."""
    flat, treedef = jtu.tree_flatten_with_path(module)
    dyn, in_axes, held, template, statics = [], [], {}, [], []
    for path, leaf in flat:
        if not is_arraylike(leaf):
            template.append(leaf)
            statics.append(walk.value(leaf))
            continue
        if isinstance(leaf, Tracer):
            raise ValueError(
                f"The module's leaf at {path_name(path, module)} is traced (the call is "
                "inside `jax.jit`, `jax.grad` or `jax.vmap`), so its layout cannot be "
                "read. Call `pmap2_new_states` outside the transformation."
            )
        axis = _held_axis(leaf, mesh, axis_name)
        held[path] = len(dyn)
        dyn.append(leaf)
        in_axes.append(axis)
        template.append(_SLOT)
    # `init_state` methods are part of what the init computes: key them with the globals
    # they read, like any builder.
    methods = tuple(
        walk.value(type(m).init_state)
        for m in jtu.tree_leaves(module, is_leaf=_has_init_state)
        if _has_init_state(m)
    )
    key = ("module", treedef, tuple(statics), methods)
    return dyn, in_axes, held, (treedef, template), key


def _held_axis(leaf, mesh, axis_name) -> int | None:
    if mesh is None:
        return None
    axis = read_axis(leaf, axis_name, mesh)
    if axis is UNKNOWN or axis is None:
        axis = leaf_axis(leaf)  # remembered for an array whose sharding says less
    return axis if isinstance(axis, int) else None


def _collect_inputs(module, init_form, kwargs, in_axes_of, n, mesh, axis_name, walk):
    if init_form:
        dyn, in_axes, held, (mod_def, mod_template), mod_key = _module_inputs(
            module, mesh, axis_name, walk
        )
    else:
        dyn, in_axes, held, mod_def, mod_template = [], [], {}, None, None
        mod_key = ("callable", walk.value(module))
    names = sorted(kwargs)
    kw_flat, kw_def = jtu.tree_flatten([kwargs[k] for k in names])
    kw_axes = [
        a for k in names for a in _kwarg_axes(k, in_axes_of.get(k), kwargs[k], n)
    ]
    kw_template, statics = [], []
    for leaf, axis in zip(kw_flat, kw_axes):
        if is_arraylike(leaf):
            dyn.append(leaf)
            in_axes.append(axis)
            kw_template.append(_SLOT)
        else:
            kw_template.append(leaf)
            statics.append(walk.value(leaf))

    def rebuild(local):
        it = iter(local)
        mod = None
        if mod_def is not None and mod_template is not None:
            mod = mod_def.unflatten(
                [next(it) if x is _SLOT else x for x in mod_template]
            )
        leaves = [next(it) if x is _SLOT else x for x in kw_template]
        return mod, dict(zip(names, kw_def.unflatten(leaves)))

    key = (
        mod_key,
        tuple(names),
        kw_def,
        tuple(statics),
        tuple(x is _SLOT for x in kw_template),
    )
    return InitInputs(dyn, in_axes, held, rebuild, key)


# --------------------------------------------------------------------------- the engine's parts


def _per_device_fn(inputs: InitInputs, init_form: bool, module, state_tag):
    def fn(local):
        mod, kwargs = inputs.rebuild(local)
        out = _init_all(mod, kwargs) if init_form else module(**kwargs)
        if state_tag is not None:
            out = _tag_new_markers(out, inputs.held, state_tag)
        return out

    return fn


def _wanted_axes(spec, held: Mapping):
    """The `want` callback of the trace: the axis its filters give each new array leaf
    (as written), and which filters matched some state."""

    def want(out, flat):
        matched = [False] * len(spec)
        by_path = {}
        for ref in iter_states(out):
            new = [p for p, _ in ref.leaves if p not in held]
            if new:
                axis = assign_axis(spec, ref, matched)
                by_path.update((p, axis) for p in new)
        wanted = [by_path.get(p, 0) for p, leaf in flat if is_output_array(leaf)]
        return wanted, matched

    return want


def _compile(fn, inputs: InitInputs, spec, *, n, mesh, axis_name, user_arrays):
    several = mesh is not None and jax.process_count() > 1

    def decide(leaves, wanted_and_matched):
        return new_states_layout(leaves, wanted_and_matched[0], inputs.held, several)

    program = _engine.compile_program(
        fn,
        inputs.dyn,
        inputs.in_axes,
        _wanted_axes(spec, inputs.held),
        decide,
        mesh=mesh,
        axis_name=axis_name,
        axis_size=n,
        user_arrays=user_arrays,
    )
    unproved = tuple(
        path_name(leaf.path, leaf.structure)
        for leaf, axis in zip(program.leaves, program.layout.axes)
        if axis is None and leaf.varying
    )
    matched = tuple(program.traced.wanted[1])
    return (program.compiled, matched, unproved), program.cacheable


def _raise_if_differ(compiled, flags) -> None:
    if isinstance(flags, Tracer):
        raise uncheckable_states(
            [path_name(p, compiled.treedef) for p in compiled.checked_paths]
        )
    bad = [path_name(p, compiled.treedef) for p in compiled.mismatched(flags)]
    if bad:
        raise differing_states(bad)


def _refuse_nesting(what: str) -> None:
    if active_axis() is not None:
        raise ValueError(
            f"`{what}` was called inside a function that `eqx_pmapstate` is mapping (a "
            "`pmap2` step, a `Map` call or another initialisation). Create states outside "
            "it, and pass them in."
        )


def _new_states(
    module,
    init_kwargs,
    state_tag,
    state_out_axes,
    init_in_axes,
    *,
    n: int,
    mesh: Mesh | None,
    axis_name,
    what: str,
    run: bool | None = True,
) -> Any:
    _refuse_nesting(what)
    init_form = _is_init_form(module, what)
    kwargs, in_axes_of = _checked_kwargs(init_kwargs, init_in_axes, state_tag)
    spec = normalize_out_axes(state_out_axes)
    walk = KeyedWalk()
    inputs = _collect_inputs(
        module, init_form, kwargs, in_axes_of, n, mesh, axis_name, walk
    )
    avals = per_device_avals(inputs.dyn, inputs.in_axes)
    key = (what, init_form, inputs.key, spec, state_tag, mesh, axis_name, n)
    key += (tuple(inputs.in_axes), tuple(avals))
    user = {id(w.get()) for w in walk.weak if w.alive}
    fn = _per_device_fn(inputs, init_form, module, state_tag)
    compiled, matched, unproved = _engine.cached(
        programs,
        key,
        walk.weak,
        lambda: _compile(
            fn, inputs, spec, n=n, mesh=mesh, axis_name=axis_name, user_arrays=user
        ),
    )
    warn_unmatched(spec, list(matched))
    if run is not True and unproved:  # nothing runs that could compare them
        raise unproved_abstract_states(unproved)
    if run is None:  # the program itself, for a layout over an abstract mesh
        return compiled, inputs.dyn
    if not run:
        return compiled.abstract(inputs.dyn)
    out, flags = compiled(inputs.dyn)
    if flags is not None:
        _raise_if_differ(compiled, flags)
    if mesh is None:
        register(compiled, out, axis_name)
    return out


def _over_devices(
    what: str,
    run: bool,
    module,
    init_kwargs,
    state_tag,
    axis_size,
    state_out_axes,
    axis_name,
    devices,
    init_in_axes,
):
    make = functools.partial(
        _new_states,
        module,
        init_kwargs,
        state_tag,
        state_out_axes,
        init_in_axes,
        axis_name=axis_name,
        what=what,
    )
    if not run and _beyond_local_devices(axis_size, devices):
        n = int(axis_size) * jax.process_count()
        compiled, dyn = make(n=n, mesh=None, run=None)
        return _on_abstract_mesh(compiled, dyn, n, axis_name)
    mesh, n = resolve_mesh(axis_size, devices, axis_name)
    return make(n=n, mesh=mesh, run=run)


def _beyond_local_devices(axis_size, devices) -> bool:
    """Whether `eval_new_states` is asked for more devices than this process has: its
    layout is then over an abstract mesh (to describe a checkpoint made elsewhere)."""
    if devices is not None or axis_size is None:
        return False
    check_axis_size(axis_size)
    return int(axis_size) > jax.local_device_count()


def _on_abstract_mesh(compiled, dyn, n: int, axis_name):
    """The abstract output of `compiled` (traced without a mesh), each new array laid
    out over an `AbstractMesh` of `n` devices, as it would be on `n` devices."""
    mesh = AbstractMesh((n,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))
    leaves = compiled.treedef.flatten_up_to(compiled.abstract(dyn))
    for k, (kind, _, axis) in enumerate(compiled.plan):
        if kind in ("array", "empty"):
            s = leaves[k]
            sharding = NamedSharding(mesh, axis_spec(axis_name, axis))
            leaves[k] = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
    return compiled.treedef.unflatten(leaves)


def pmap2_new_states(
    module: eqx.Module | Callable[..., Any],
    init_kwargs: dict[str, Any] | None = None,
    state_tag: str | None = None,
    axis_size: int | None = None,
    state_out_axes: OutAxes = None,
    *,
    axis_name: str = "devices",
    devices: Sequence[Any] | Mesh | None = None,
    init_in_axes: dict[str, Any] | None = None,
):
    """Creates a module's new states on several devices at once, each laid out along the
    axis that the filters of `state_out_axes` choose for it.

    The initialisation runs once per device inside one `jax.jit` (a `shard_map`, or a
    `vmap` with the same results when it uses no collective): every
    state is made directly on its devices, `jax.lax.axis_index(axis_name)` works inside it,
    and nothing is built whole on one device first. The result is a new pytree whose new
    leaves are global `jax.Array`s on a one-dimensional mesh named `axis_name`; nothing
    that was passed in is changed. Calling again with the same structure, shapes, dtypes
    and static values reuses the compiled program.

    **Arguments:**

    - `module`: either an `eqx.Module` instance, whose states are made by the
        `init_state(**init_kwargs)` methods of it and of every submodule that defines one
        (each returns the new module; each receives the arguments its signature names),
        or any other callable (an `eqx.Module` class, a factory,
        `eqx.nn.make_with_state(Model)`), called as `module(**init_kwargs)`, whose whole
        result is new. An `eqx.Module` instance is never called.
    - `init_kwargs`: keyword arguments of the initialisation. Arrays among them are
        broadcast to every device (or mapped, see `init_in_axes`); other values are
        static.
    - `state_tag`: written into the `tag` of every new marker that has none.
    - `axis_size`: the number of devices of each process; defaults to
        `jax.local_device_count()`, or to the number of `devices`. With several
        processes (`jax.distributed`), the device axis spans every process's devices:
        its length is the process count times `axis_size`, each process holds only its
        own shards, and replicated states are checked to be the same on every process.
    - `state_out_axes`: which states go to which axis: `None` (every state on axis 0), a
        single filter (`{0: filter}`), or a dict from `int | None` to filters, in the
        language of [`eqx_pmapstate.filters.to_predicate`][]. A `NonBatchState` is always
        replicated. Otherwise a state goes to the one axis whose filter matches it (`...`
        counts only for states no other filter matched), to axis 0 if none does, and is an
        error if filters of two different axes match it. Axis `k >= 0` puts the device
        axis at position `k` of the state, a negative `k` counts from the end of the
        result as `jnp.expand_dims` does, and `None` replicates it: the same value on every
        device, which is checked.
    - `axis_name`: the name of the mesh axis, usable in collectives inside the init.
    - `devices`: a sequence of devices, or a `jax.sharding.Mesh` that has `axis_name`
        (by default, `axis_size` local devices of every process).
    - `init_in_axes`: a dict from argument name to an axis (`int | None`) or a pytree
        prefix of the argument, like `eqx.filter_vmap`'s `in_axes`; the arguments it names
        are split along that axis, which must have length `axis_size` (for per-device keys,
        pass `jax.random.split(key, axis_size)` with axis 0). Others are broadcast.

    **Returns:**

    The new pytree. With the `init_state` form, the leaves the module already held come
    back unchanged and undistributed.

    **Raises:**

    [`eqx_pmapstate.ReplicationError`][] (a `ValueError`) naming the replicated states
    whose values differ between devices: a replicated state that is not proved the same
    on every device (made from a mapped input or `jax.lax.axis_index`) is compared when
    it is made.

    !!! example

        ```python
        model = eqx_pmapstate.pmap2_new_states(
            ParallelModel(), {"layer_size": 128}, state_out_axes={0: eqx_pmapstate.ParamState}
        )
        model.weight.value.shape  # (jax.local_device_count(), 128)
        ```
    """
    return _over_devices(
        "pmap2_new_states",
        True,
        module,
        init_kwargs,
        state_tag,
        axis_size,
        state_out_axes,
        axis_name,
        devices,
        init_in_axes,
    )


def eval_new_states(
    module: eqx.Module | Callable[..., Any],
    init_kwargs: dict[str, Any] | None = None,
    state_tag: str | None = None,
    axis_size: int | None = None,
    state_out_axes: OutAxes = None,
    *,
    axis_name: str = "devices",
    devices: Sequence[Any] | Mesh | None = None,
    init_in_axes: dict[str, Any] | None = None,
):
    """The layout [`eqx_pmapstate.pmap2_new_states`][] would make, without making it: the
    same arguments, and the initialisation is traced but nothing is compiled or run.

    Useful as `like` for [`eqx_pmapstate.load`][] and Orbax when resuming training: the
    states are read straight into their layout, and no state is ever made only to be
    replaced.

    **Arguments:**

    As for `pmap2_new_states`. `axis_size` may be larger than the number of local
    devices: the layout is then the one `pmap2_new_states` would make on that many
    devices, over a `jax.sharding.AbstractMesh` (no devices), to describe a checkpoint
    made elsewhere (with [`eqx_pmapstate.describe`][]). It cannot receive arrays: to
    load such a checkpoint here, use the layout for the devices you have and `load`'s
    `per_device`.

    **Returns:**

    The new tree with every new array replaced by a `jax.ShapeDtypeStruct` with its global
    shape, dtype and sharding (the leaves a module held come back as structs of
    themselves), and everything else as `pmap2_new_states` would return it.

    **Raises:**

    [`eqx_pmapstate.ReplicationError`][] naming the replicated states that are not
    proved the same on every device (made from a mapped input or
    `jax.lax.axis_index`): `pmap2_new_states` would compare them when made, and
    `eval_new_states` runs nothing that could. Give them a device axis, or make them
    from replicated inputs.
    """
    return _over_devices(
        "eval_new_states",
        False,
        module,
        init_kwargs,
        state_tag,
        axis_size,
        state_out_axes,
        axis_name,
        devices,
        init_in_axes,
    )


def vmap2_new_states(
    module: eqx.Module | Callable[..., Any],
    init_kwargs: dict[str, Any] | None = None,
    state_tag: str | None = None,
    axis_size: int | None = None,
    state_out_axes: OutAxes = None,
    *,
    axis_name: str | None = None,
    init_in_axes: dict[str, Any] | None = None,
):
    """Creates a module's new states for an ensemble on one device: the same language as
    [`eqx_pmapstate.pmap2_new_states`][], with a batch axis of `axis_size` members (made
    by `jax.vmap`) instead of a device axis.

    **Arguments:**

    - `module`, `init_kwargs`, `state_tag`, `state_out_axes`, `init_in_axes`: as for
        `pmap2_new_states`.
    - `axis_size`: the number of members; required.
    - `axis_name`: an optional name for the batch axis, for `jax.lax.axis_index` and
        collectives inside the init.

    **Returns:**

    The new pytree; each new leaf has the batch axis at the position its axis says
    (replicated leaves have none, and must not differ between members: that is checked
    when the init is traced).
    """
    if axis_size is None:
        raise TypeError(
            "`vmap2_new_states` needs `axis_size`, the number of ensemble members (a "
            "positive int), but got None of type NoneType."
        )
    check_axis_size(axis_size)
    return _new_states(
        module,
        init_kwargs,
        state_tag,
        state_out_axes,
        init_in_axes,
        n=int(axis_size),
        mesh=None,
        axis_name=axis_name,
        what="vmap2_new_states",
    )
