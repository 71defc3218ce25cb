"""`pmap2`: a `filter_pmap`-style decorator over global arrays laid out on a mesh."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding

from . import _engine
from ._assign import assign_axis, mapped_axis, normalize_axis, normalize_out_axes
from ._engine import replication_message, ReplicationError
from ._keys import value_key
from ._mesh import _UNKNOWN, axis_spec, read_axis, resolve_mesh
from ._state import State
from ._tree import broadcast_prefix, is_arraylike, iter_states, paths_str


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

    def __init__(self, axes):
        self.spec = normalize_out_axes(axes)

    def __eq__(self, other):
        return isinstance(other, StateAxes) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)

    def __repr__(self):
        return f"StateAxes({dict(self.spec)!r})"

    def axes_of(self, tree, root: tuple = ()) -> dict:
        """A dict from the path of each array leaf of `tree` to its axis, as written."""
        out = {}
        for ref in iter_states(tree):
            axis = assign_axis(self.spec, root + ref.path, ref.state, ref.ancestors)
            sub = (
                jtu.tree_flatten_with_path(ref.state)[0]
                if isinstance(ref.state, State)
                else [((), ref.state)]
            )
            for p, leaf in sub:
                if is_arraylike(leaf):
                    out[ref.path + tuple(p)] = axis
        return out


class _Default:
    def __repr__(self):
        return "<default>"


_DEFAULT = _Default()  # "not given": the layout rules of the docstring apply


def _where(path) -> str:
    """A path from the root `(args, kwargs)` written as `args[0].weight` or `kwargs['x']`."""
    if not path:
        return "the arguments"
    head, rest = path[0], path[1:]
    root = "args" if getattr(head, "idx", None) == 0 else "kwargs"
    return root + jtu.keystr(rest)


def _out_where(path) -> str:
    return "output" + (jtu.keystr(path) if path else "")


def _signature(leaves) -> tuple:
    """What a call's compiled program depends on, leaf by leaf: shape, dtype and layout of
    the arrays, and the values of everything else (weak types are left to `jax.jit`)."""
    try:  # the common case, every leaf a concrete jax.Array: one quick pass
        return tuple([(x.shape, x.dtype, x.sharding) for x in leaves])
    except AttributeError:
        return tuple(map(_leaf_sig, leaves))


def _leaf_sig(x):
    if isinstance(x, jax.Array):
        try:
            sharding = x.sharding
        except AttributeError:  # a tracer: `pmap2` called inside another transformation
            return jax.typeof(x)
        return (x.shape, x.dtype, sharding)
    if isinstance(x, (np.ndarray, np.generic)):
        return (np.shape(x), x.dtype, None)
    return value_key(x)


def _prefix_axes(prefix, tree) -> list:
    """A pytree prefix of axes (ints, None, or callables of a leaf) as one entry per leaf."""
    try:
        return broadcast_prefix(prefix, tree)
    except ValueError as e:
        raise ValueError(
            f"The axes given are not a pytree prefix of the tree they apply to: {e}"
        ) from None


class _Entry:
    __slots__ = ("compiled", "dyn_index", "put")

    def __init__(self, compiled, dyn_index, put):
        self.compiled = compiled
        self.dyn_index = dyn_index
        self.put = put  # whether some input must be moved to its layout first


class Pmap2:
    """A function mapped over the devices of a mesh axis; made by [`eqx_pmapstate.pmap2`][]."""

    def __init__(
        self, fun, *, axis_name, in_axes, out_axes, donate, check_replicated, devices
    ):
        if not callable(fun):
            raise TypeError(f"`pmap2` needs a callable, but got {fun!r}.")
        if check_replicated not in (True, False, "sync"):
            raise ValueError(
                f"`check_replicated` must be True, False or 'sync', but got {check_replicated!r}."
            )
        if donate not in ("all", "all-except-first", "none"):
            raise ValueError(
                f"`donate` must be 'all', 'all-except-first' or 'none', but got {donate!r}."
            )
        if not isinstance(axis_name, str) or not axis_name:
            raise TypeError(
                f"`axis_name` must be a non-empty str, but got {axis_name!r}."
            )
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.axis_name = axis_name
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.donate = donate
        self.check_replicated = check_replicated
        self.devices = devices
        self._cache: dict = {}

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return functools.partial(self, instance)

    def __call__(self, *args, **kwargs):
        leaves, treedef = jtu.tree_flatten((args, kwargs))
        key = (treedef, _signature(leaves))
        entry = self._cache.get(key)
        if entry is None:
            entry = self._build(args, kwargs, leaves, treedef, key)
            self._cache[key] = entry
        compiled = entry.compiled
        dyn = [leaves[i] for i in entry.dyn_index]
        if entry.put:
            dyn = compiled.place(dyn)
        outs = compiled.run(*dyn)
        if compiled.extra_out:
            *outs, extra = outs
            if self.check_replicated == "sync":
                bad = compiled.mismatched(extra)  # waits for this call
                if bad:
                    raise ReplicationError(replication_message(bad, self.axis_name))
        return compiled.assemble(dyn, outs)

    # -- building, once per signature

    def _mesh(self, leaves) -> Mesh:
        found = None
        for x in leaves:
            s = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
            if isinstance(s, NamedSharding) and self.axis_name in s.mesh.axis_names:
                if found is None:
                    found = s.mesh
                elif s.mesh != found:
                    raise ValueError(
                        f"The inputs are laid out on two different meshes with an axis "
                        f"{self.axis_name!r}: {found} and {s.mesh}. Put them on one mesh."
                    )
        if found is not None:
            if isinstance(self.devices, Mesh) and self.devices != found:
                raise ValueError(
                    "The inputs are laid out on another mesh than the one given as `devices`."
                )
            return found
        return resolve_mesh(None, self.devices, self.axis_name)[0]

    def _build(self, args, kwargs, leaves, treedef, key) -> _Entry:
        mesh = self._mesh(leaves)
        n = mesh.shape[self.axis_name]
        flat = jtu.tree_flatten_with_path((args, kwargs))[0]
        n_args = len(jtu.tree_leaves(args))

        # The axis of every input leaf: given, or read off its layout, or 0.
        given: list = [_DEFAULT] * len(leaves)
        if isinstance(self.in_axes, StateAxes):
            by_path = self.in_axes.axes_of((args, kwargs))
            given = [by_path.get(p, _DEFAULT) for p, _ in flat]
        elif self.in_axes is not _DEFAULT:
            given = _prefix_axes(self.in_axes, args) + [_DEFAULT] * (
                len(leaves) - n_args
            )
        in_axes, dyn_index, layout_of_leaf = [], [], [None] * len(leaves)
        for i, ((path, x), g) in enumerate(zip(flat, given)):
            if not is_arraylike(x):
                continue
            if callable(g):
                g = g(x)
            here = (
                read_axis(x, self.axis_name, mesh)
                if isinstance(x, jax.Array)
                else _UNKNOWN
            )
            if g is _DEFAULT:
                g = 0 if here is _UNKNOWN else here
            axis = (
                None
                if g is None
                else mapped_axis(
                    g,
                    x,
                    n,
                    f"The input {_where(path)}",
                    f"Give it an axis of length {n} (for a batch: reshape to ({n}, batch // {n}, ...)), "
                    "or mark it replicated with an `in_axes` of None.",
                )
            )
            layout_of_leaf[i] = axis
            in_axes.append(axis)
            dyn_index.append(i)

        # Rule 1: the arguments whose layout an output of the same structure takes.
        arg_start = (
            list(np.cumsum([0] + [len(jtu.tree_leaves(a)) for a in args[:-1]]))
            if args
            else []
        )
        candidates = []
        for a_idx, arg in enumerate(args):
            on_mesh = (
                isinstance(arg, jax.Array)
                and read_axis(arg, self.axis_name, mesh) is not _UNKNOWN
            )
            if is_arraylike(arg) and not on_mesh:
                continue
            bare = None
            if is_arraylike(arg):  # compared with the per-device view of the output
                local = list(np.shape(arg))
                if layout_of_leaf[arg_start[a_idx]] is not None:
                    del local[layout_of_leaf[arg_start[a_idx]]]
                bare = (tuple(local), jax.numpy.result_type(arg))
            candidates.append((jtu.tree_structure(arg), a_idx, bare))
        dyn_pos = {leaf_i: d for d, leaf_i in enumerate(dyn_index)}
        donated = set(self._donated(args, dyn_index, arg_start))

        def inherited(sub, prefer=None) -> list | None:
            # The argument at the same position is tried first, then the others in order, so
            # that `return model, state` after `step(model, state, ...)` pairs them up even
            # when the two have the same structure.
            structure = jtu.tree_structure(sub)
            ordered = sorted(candidates, key=lambda c: c[1] != prefer)
            for struct, a_idx, bare in ordered:
                if bare is not None and (
                    not is_arraylike(sub)
                    or (np.shape(sub), jax.numpy.result_type(sub)) != bare
                ):
                    continue  # a bare array passes its layout only to an array like it
                if struct == structure:
                    start = arg_start[a_idx]
                    return [
                        layout_of_leaf[start + j]
                        if (start + j) in dyn_pos
                        else _DEFAULT
                        for j in range(structure.num_leaves)
                    ]
            return None

        out_axes = self.out_axes

        def decide(out, infos):
            n_out = len(infos)
            if isinstance(out_axes, StateAxes):
                by_path = out_axes.axes_of(out)
                wanted = [by_path.get(info.path, _DEFAULT) for info in infos]
            elif out_axes is not _DEFAULT:
                wanted = _prefix_axes(out_axes, out)
            else:
                wanted = inherited(out)
                if wanted is None and isinstance(out, tuple):
                    wanted = []
                    for position, element in enumerate(out):
                        got = inherited(element, prefer=position)
                        wanted += (
                            got
                            if got is not None
                            else [_DEFAULT] * len(jtu.tree_leaves(element))
                        )
                elif wanted is None:
                    wanted = [_DEFAULT] * n_out
            decisions, check, surely = [None] * n_out, set(), []
            for i, (info, w) in enumerate(zip(infos, wanted)):
                if not is_arraylike(info.leaf):
                    continue
                if callable(w) and w is not _DEFAULT:
                    w = w(info.leaf)
                if w is _DEFAULT:
                    # Rule 2: replicated when the trace shows it the same everywhere; also when
                    # only the replicated inputs make it vary (checked at run time).
                    # (`varying_alone` is None when JAX could not type the trace: then a
                    # device axis, as `jax.pmap` gives.)
                    axis = None if info.varying_alone is False else 0
                else:
                    axis = normalize_axis(w, np.ndim(info.leaf), info.path)
                    if axis is None and info.varying_alone:
                        surely.append(_out_where(info.path))
                j = info.input_index
                if (
                    j is not None
                    and in_axes[j] == axis
                    and j not in donated
                    and not self._needs_put(leaves[dyn_index[j]], mesh, axis)
                ):
                    decisions[i] = _engine.Pass(j)
                    continue
                decisions[i] = axis
                if axis is None and info.varying:
                    check.add(i)
            if surely:
                raise ValueError(
                    f"The output at {paths_str(surely)} must come back replicated (the same on "
                    f"every device of the axis {self.axis_name!r}), but the trace shows it varying over the "
                    "axis: it is computed from mapped inputs (or `jax.lax.axis_index`) without a "
                    "collective such as `jax.lax.pmean`, `psum` or `all_gather`. Reduce it over "
                    "the axis, or return it with a device axis (`out_axes=0`)."
                )
            return _engine.Decided(decisions, frozenset(check))

        static = [x for x in leaves if not is_arraylike(x)]
        is_dyn = [is_arraylike(x) for x in leaves]
        fun = self.fun

        def fn(local):
            it_dyn, it_static = iter(local), iter(static)
            full = [next(it_dyn) if d else next(it_static) for d in is_dyn]
            call_args, call_kwargs = treedef.unflatten(full)
            return fun(*call_args, **call_kwargs)

        compiled = _engine.compiled(
            None,  # cached in `self._cache`, which dies with this function
            fn,
            [leaves[i] for i in dyn_index],
            in_axes,
            decide,
            mesh=mesh,
            axis_name=self.axis_name,
            pvary_inputs=True,
            donate=sorted(donated),
            check={True: "raise", False: "off", "sync": "flags"}[self.check_replicated],
        )
        put = any(
            self._needs_put(leaves[i], mesh, a) for i, a in zip(dyn_index, in_axes)
        )
        return _Entry(compiled, tuple(dyn_index), put)

    def _needs_put(self, x, mesh, axis) -> bool:
        return getattr(x, "sharding", None) != NamedSharding(
            mesh, axis_spec(self.axis_name, axis)
        )

    def _donated(self, args, dyn_index, arg_start) -> list[int]:
        if self.donate == "none":
            return []
        if self.donate == "all":
            return list(range(len(dyn_index)))
        first_end = (
            arg_start[1]
            if len(arg_start) > 1
            else (len(jtu.tree_leaves(args)) if args else 0)
        )
        return [d for d, i in enumerate(dyn_index) if i >= first_end]


@overload
def pmap2(
    *,
    axis_name: str = "devices",
    in_axes: Any = ...,
    out_axes: Any = ...,
    donate: Literal["all", "all-except-first", "none"] = "none",
    check_replicated: bool | Literal["sync"] = True,
    devices: Sequence[jax.Device] | Mesh | None = None,
) -> Callable[[Callable], Pmap2]: ...


@overload
def pmap2(
    fun: Callable,
    *,
    axis_name: str = "devices",
    in_axes: Any = ...,
    out_axes: Any = ...,
    donate: Literal["all", "all-except-first", "none"] = "none",
    check_replicated: bool | Literal["sync"] = True,
    devices: Sequence[jax.Device] | Mesh | None = None,
) -> Pmap2: ...


def pmap2(
    fun=None,
    *,
    axis_name="devices",
    in_axes=_DEFAULT,
    out_axes=_DEFAULT,
    donate="none",
    check_replicated=True,
    devices=None,
):
    """Maps a function over the devices of a mesh axis, like `eqx.filter_pmap`, on
    `jax.jit(jax.shard_map(...))` and global arrays.

    Each device runs `fun` on its own slice of every mapped input (the device axis
    removed), and collectives over `axis_name` work inside. The semantics are
    `jax.pmap`'s: a replicated input acts as an identical copy on each device, so the
    data-parallel idiom `jax.lax.pmean(jax.grad(loss)(model, x, y), axis_name)` gives the
    mean gradient. Compiled once per input signature (tree structure, shapes, dtypes,
    layouts and static values).

    **Arguments:**

    - `fun`: the function. Usable as `@pmap2`, `@pmap2(...)`, and on methods.
    - `axis_name`: the mesh axis to map over.
    - `in_axes`: by default, an array already laid out on the mesh keeps its layout
        (mapped over its device axis, or broadcast if replicated), any other array is
        mapped over axis 0, and everything else is static. Override with a pytree prefix
        of the positional arguments whose leaves are `int`, `None` or a callable of a leaf
        (as in `eqx.filter_pmap`), or with a [`eqx_pmapstate.StateAxes`][] of filters.
    - `out_axes`: by default, (1) an output whose tree structure equals that of an
        argument takes that argument's layout leaf by leaf (tried on the whole output,
        then on each element of a returned tuple; an argument counts unless it is a bare
        array not already laid out on the mesh, and a bare array only to an array of its
        per-device shape and dtype), the argument at the same position first; and (2) any
        other leaf comes back replicated when the trace shows it the same on every device
        (the result of `psum`, `pmean`, `all_gather`, a constant) or when only the
        replicated inputs make it vary (then it is checked at run time, see below: a
        gradient with respect to a replicated parameter, returned without `pmean`, fails
        that check; return it with `out_axes=0`), and with a device axis at 0 otherwise.
        Override in the same two forms as `in_axes`.
    - `donate`: `"all"`, `"all-except-first"` or `"none"`: which input buffers to donate.
    - `check_replicated`: replication is never assumed. An output that must come back
        replicated but that the trace shows varying is a `ValueError` at trace time; one
        that the trace cannot settle (a parameter updated with a `pmean`'d gradient) is
        compared across devices at run time by two hashes per leaf and one `pmax`, and a
        mismatch fails the call, no later than when its results are waited on, with an
        error naming the leaf. The error reaches you as a
        `jax.errors.JaxRuntimeError` whose message holds the `ReplicationError`'s text.
        `"sync"` instead waits for each call's check and raises
        [`eqx_pmapstate.ReplicationError`][] itself, at the cost of the asynchronous
        dispatch; `False` turns the run-time check off.
    - `devices`: devices or a `Mesh` to use when no input is laid out on a mesh yet.

    **Returns:**

    The mapped function.
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
