"""`pmap2_new_states` and `vmap2_new_states`: create a module's new states over an axis."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh

from . import _engine
from ._assign import assign_axis, mapped_axis, normalize_axis, normalize_out_axes
from ._keys import fn_key, value_key
from ._mesh import _UNKNOWN, check_axis_size, read_axis, resolve_mesh
from ._registry import register
from ._state import State
from ._tree import broadcast_prefix, is_arraylike, iter_states, keystr, paths_str


def _has_init_state(x) -> bool:
    return isinstance(x, eqx.Module) and callable(getattr(type(x), "init_state", None))


def _accepted_kwargs(method, kwargs: Mapping) -> dict:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _init_all(module, kwargs: Mapping, used: set):
    """Calls `init_state` on every module of the tree that defines it, innermost first,
    and returns the new tree."""

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
                    "`return eqx.tree_at(lambda m: m.state, self, new_state, is_leaf=lambda x: x is None)`."
                )
            node = new
        return node

    return visit(module)


def _broadcast_axes(name: str, prefix, value) -> list:
    """`init_in_axes[name]`, a pytree prefix of `value`, as one axis per leaf of `value`."""
    try:
        return broadcast_prefix(prefix, value)
    except ValueError as e:
        raise ValueError(
            f"`init_in_axes[{name!r}]` is not a pytree prefix of the argument {name!r}: {e}"
        ) from None


def _check_in_axis(name, path, leaf, axis, n) -> int | None:
    if axis is None:
        return None
    where = f"The argument {name!r}" + (f" at {keystr(path)}" if path else "")
    if not is_arraylike(leaf):
        raise ValueError(
            f"`init_in_axes` maps {where[4:]} along axis {axis}, but it is {type(leaf).__name__}, "
            "not an array. Only arrays can be mapped; give it axis None."
        )
    return mapped_axis(
        axis,
        leaf,
        n,
        where,
        f"Give it one entry per device (or ensemble member), for example `jax.random.split(key, {n})`.",
    )


def _with_tag(marker: State, tag: str) -> State:
    new = object.__new__(type(marker))
    for k, v in vars(marker).items():
        object.__setattr__(new, k, v)
    object.__setattr__(new, "tag", tag)
    return new


def _tag_new_markers(out, held: set, tag: str):
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
):
    # --- the two forms of `module`
    if isinstance(module, eqx.Module):
        if not any(
            _has_init_state(x) for x in jtu.tree_leaves(module, is_leaf=_has_init_state)
        ):
            raise TypeError(
                f"`{what}` got an instance of {type(module).__name__}, but no module in it defines "
                "`init_state`. Give a module with `init_state` methods (each returning the new "
                "module), or pass a callable that builds the whole tree, such as the class itself "
                "or `eqx.nn.make_with_state(Model)`."
            )
        init_form = True
    elif callable(module):
        init_form = False
    else:
        raise TypeError(
            f"`{what}` needs an `eqx.Module` instance with `init_state` methods, or a callable "
            f"that builds the new tree, but got {module!r} of type {type(module).__name__}."
        )
    if init_kwargs is None:
        init_kwargs = {}
    if not isinstance(init_kwargs, Mapping) or not all(
        isinstance(k, str) for k in init_kwargs
    ):
        raise TypeError("`init_kwargs` must be a dict from argument names to values.")
    init_kwargs = dict(init_kwargs)
    if init_in_axes is None:
        init_in_axes = {}
    if not isinstance(init_in_axes, Mapping):
        raise TypeError(
            "`init_in_axes` must be a dict from argument names to axes (or pytree prefixes of axes)."
        )
    for name in init_in_axes:
        if name not in init_kwargs:
            raise ValueError(
                f"`init_in_axes` names the argument {name!r}, which is not in `init_kwargs`."
            )
    if state_tag is not None and not isinstance(state_tag, str):
        raise TypeError(f"`state_tag` must be a str or None, but got {state_tag!r}.")
    spec = normalize_out_axes(state_out_axes)

    # --- inputs: the module's leaves (init form), then the keyword arguments
    dyn, in_axes, statics = [], [], []
    module_paths = []
    if init_form:
        mod_flat, mod_def = jtu.tree_flatten_with_path(module)
        for path, leaf in mod_flat:
            if is_arraylike(leaf):
                axis = (
                    read_axis(leaf, axis_name, mesh) if mesh is not None else _UNKNOWN
                )
                module_paths.append((path, len(dyn)))
                dyn.append(leaf)
                in_axes.append(None if axis is _UNKNOWN else axis)
            else:
                statics.append(value_key(leaf))
        module_key = (mod_def, tuple(is_arraylike(x) for _, x in mod_flat))
    else:
        mod_flat, mod_def = [], None
        module_key = fn_key(module)
    held_paths = {path for path, _ in module_paths}
    kw_names = sorted(init_kwargs)
    kw_flat, kw_def = jtu.tree_flatten_with_path([init_kwargs[k] for k in kw_names])
    kw_axes = []
    for name in kw_names:
        value = init_kwargs[name]
        axes = _broadcast_axes(name, init_in_axes.get(name), value)
        for (path, leaf), axis in zip(jtu.tree_flatten_with_path(value)[0], axes):
            kw_axes.append(_check_in_axis(name, path, leaf, axis, n))
    for (_, leaf), axis in zip(kw_flat, kw_axes):
        if is_arraylike(leaf):
            dyn.append(leaf)
            in_axes.append(axis)
        else:
            statics.append(value_key(leaf))
    kw_is_array = tuple(is_arraylike(x) for _, x in kw_flat)
    key = (
        what,
        init_form,
        module_key,
        kw_def,
        kw_is_array,
        tuple(statics),
        spec,
        state_tag,
    )

    # --- the per-device function. It keeps no array of this call (the compiled program
    # outlives it in the cache): arrays are slots, filled from the per-device inputs.
    _SLOT = object()
    mod_template = [_SLOT if is_arraylike(x) else x for _, x in mod_flat]
    kw_template = [_SLOT if is_arraylike(x) else x for _, x in kw_flat]
    del mod_flat, kw_flat
    build = None if init_form else module  # an init-form module's arrays are not kept

    def rebuild(local):
        it = iter(local)
        mod = None
        if init_form:
            mod = mod_def.unflatten(
                [next(it) if x is _SLOT else x for x in mod_template]
            )
        kw_leaves = [next(it) if x is _SLOT else x for x in kw_template]
        kwargs = dict(zip(kw_names, kw_def.unflatten(kw_leaves)))
        return mod, kwargs

    def fn(local):
        mod, kwargs = rebuild(local)
        if init_form:
            used: set = set()
            out = _init_all(mod, kwargs, used)
            unused = sorted(set(kwargs) - used)
            if unused:
                raise TypeError(
                    f"No `init_state` method of the module accepts the argument(s) {unused} given "
                    "in `init_kwargs`. Check their names against the `init_state` signatures."
                )
        else:
            out = build(**kwargs)
        if state_tag is not None:
            out = _tag_new_markers(out, held_paths, state_tag)
        return out

    def decide(out, infos: list[_engine.LeafInfo]) -> _engine.Decided:
        index_of = {info.path: i for i, info in enumerate(infos)}
        decisions: list = [None] * len(infos)
        for path, j in module_paths:
            i = index_of.get(path)
            if i is None or infos[i].input_index != j:
                raise ValueError(
                    f"`init_state` changed the leaf at {keystr(path)}, which the module already "
                    "held. Leaves that exist before initialisation come back unchanged; create "
                    "new states in `init_state`, or build the whole tree with a callable instead."
                )
            decisions[i] = _engine.Pass(j)
        check = set()
        for ref in iter_states(out):
            sub = (
                jtu.tree_flatten_with_path(ref.state)[0]
                if isinstance(ref.state, State)
                else [((), ref.state)]
            )
            idx = [
                index_of[ref.path + tuple(p)] for p, leaf in sub if is_arraylike(leaf)
            ]
            new = [i for i in idx if not isinstance(decisions[i], _engine.Pass)]
            if not new:
                continue
            axis = assign_axis(spec, ref.path, ref.state, ref.ancestors)
            for i in new:
                decisions[i] = normalize_axis(
                    axis, np.ndim(infos[i].leaf), infos[i].path
                )
                if decisions[i] is None and infos[i].varying:
                    check.add(i)
        return _engine.Decided(decisions, frozenset(check))

    compiled = _engine.compiled(
        key,
        fn,
        dyn,
        in_axes,
        decide,
        mesh=mesh,
        axis_name=axis_name,
        axis_size=None if mesh else n,
    )
    out, flags = compiled(dyn)
    if flags is not None:
        bad = compiled.mismatched(flags)
        if bad:
            raise ValueError(
                f"The state(s) at {paths_str(bad)} are to be replicated (axis None), but their "
                "values differ between devices (or ensemble members). A replicated state must be the same "
                "everywhere: "
                "create it from replicated inputs only, or give it a device axis in "
                "`state_out_axes` (and do not mark it `NonBatchState`)."
            )
    register(compiled, out, axis_name)
    return out


def pmap2_new_states(
    module: eqx.Module | Callable[..., Any],
    init_kwargs: dict[str, Any] | None = None,
    state_tag: str | None = None,
    axis_size: int | None = None,
    state_out_axes: Any = None,
    *,
    axis_name: str = "devices",
    devices: Sequence[jax.Device] | Mesh | None = None,
    init_in_axes: dict[str, Any] | None = None,
):
    """Creates a module's new states on several devices at once, each laid out along the
    axis that the filters of `state_out_axes` choose for it.

    The initialisation runs once per device inside `jax.jit(jax.shard_map(...))`: every
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
    - `axis_size`: the number of devices; defaults to `jax.local_device_count()`, or to
        the number of `devices`.
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
    - `devices`: a sequence of devices, or a `jax.sharding.Mesh` that has `axis_name`.
    - `init_in_axes`: a dict from argument name to an axis (`int | None`) or a pytree
        prefix of the argument, like `eqx.filter_vmap`'s `in_axes`; the arguments it names
        are split along that axis, which must have length `axis_size` (for per-device keys,
        pass `jax.random.split(key, axis_size)` with axis 0). Others are broadcast.

    **Returns:**

    The new pytree. With the `init_state` form, the leaves the module already held come
    back unchanged and undistributed.

    !!! example

        ```python
        model = eqx_pmapstate.pmap2_new_states(
            ParallelModel(), {"layer_size": 128}, state_out_axes={0: eqx_pmapstate.ParamState}
        )
        model.weight.value.shape  # (jax.local_device_count(), 128)
        ```
    """
    mesh, n = resolve_mesh(axis_size, devices, axis_name)
    return _new_states(
        module,
        init_kwargs,
        state_tag,
        state_out_axes,
        init_in_axes,
        n=n,
        mesh=mesh,
        axis_name=axis_name,
        what="pmap2_new_states",
    )


def vmap2_new_states(
    module: eqx.Module | Callable[..., Any],
    init_kwargs: dict[str, Any] | None = None,
    state_tag: str | None = None,
    axis_size: int = ...,  # type: ignore[assignment]
    state_out_axes: Any = None,
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
    if axis_size is ...:
        raise TypeError(
            "`vmap2_new_states` needs `axis_size`, the number of ensemble members."
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
