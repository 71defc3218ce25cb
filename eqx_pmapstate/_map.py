"""`Map`: a module mapped over devices or ensemble members, functionally."""

from __future__ import annotations

import functools
from typing import Any, Literal

import equinox as eqx
import jax
import jax.tree_util as jtu

from ._jax_compat import Tracer
from ._mesh import check_axis_size, read_axis, UNKNOWN
from ._new_states import pmap2_new_states, vmap2_new_states
from ._pmap2 import Pmap2
from ._registry import leaf_axis
from ._stores import register_store


def _apply(module, *args, **kwargs):
    return module(*args, **kwargs)


@functools.lru_cache(maxsize=64)
def _mapped_apply(axis_name: str, in_axes: tuple, out_axes, module_axes=None):
    """The `pmap2` of a `Map` call. `module_axes`: the module's axes recorded when its
    states were made, `(treedef, axes)`; without them each array's axis is read from
    its layout, which a tracer has not (inside `jax.jit`): then it is refused."""
    if module_axes is not None:
        treedef, axes = module_axes
        module_in = treedef.unflatten(axes)
    else:
        module_in = functools.partial(_module_axis, axis_name=axis_name)
    # One for every `Map` with these settings, over modules of any shape: its recompiles
    # are not one function's, so they are not explained.
    return Pmap2(
        _apply,
        axis_name=axis_name,
        in_axes=(module_in,) + in_axes,
        out_axes=out_axes,
        donate="none",
        check_replicated=True,
        devices=None,
        explain=False,
    )


def _module_axis(x, axis_name: str):
    axis = read_axis(x, axis_name)
    if axis is UNKNOWN and isinstance(x, Tracer):
        raise ValueError(
            "The `Map`'s module holds a traced array (the `Map` is called inside "
            "`jax.jit`, `jax.grad` or another transformation) whose axis it does not "
            "know: its layout cannot be read there, and its structure differs from the "
            "one `init_all_states` made. Call the `Map` outside the transformation, or "
            "keep the module's structure as `init_all_states` returned it."
        )
    return None if axis is UNKNOWN else axis


register_store("Map's pmap2 functions", _mapped_apply.cache_clear)


def _check_members(args, in_axes, n: int) -> None:
    """Each array of an argument mapped over an int axis has `n` entries along it (else
    the error names it as the caller passed it, not as the inner `pmap2` or `jax.vmap`
    sees it, after the module). Paths are only made for the message."""
    for i, (arg, axis) in enumerate(zip(args, in_axes, strict=True)):
        if isinstance(axis, bool) or not isinstance(axis, int):
            continue
        if any(_other_length(leaf, axis, n) for leaf in jtu.tree_leaves(arg)):
            path, leaf = next(
                (p, x)
                for p, x in jtu.tree_flatten_with_path(arg)[0]
                if _other_length(x, axis, n)
            )
            raise ValueError(
                f"The input args[{i}]{jtu.keystr(path)} is to be mapped over its "
                f"axis {axis}, of length {leaf.shape[axis]}, but the `Map` maps "
                f"over {n} (its `init_map_size`). Give it {n} entries along that "
                "axis, or mark it the same everywhere with an `in_axes` of None."
            )


def _other_length(leaf, axis: int, n: int) -> bool:
    return (
        eqx.is_array(leaf) and -leaf.ndim <= axis < leaf.ndim and leaf.shape[axis] != n
    )


_RECORDED = "_recorded_axes"  # `Map.__recorded`, kept on the instance
_MISSING = object()


class _AxesDict(dict):
    """`init_state_axes` as given, a dict that JAX takes as one leaf (a dict's keys
    `0` and `None` cannot be sorted, as flattening it would)."""


def _plain(axes):
    return dict(axes) if isinstance(axes, dict) else axes


def _is_none(x) -> bool:
    return x is None


def _hashable(axes):
    return tuple(map(_hashable, axes)) if isinstance(axes, list) else axes


def _per_argument(in_axes, n_args: int) -> tuple:
    """`in_axes` of a `Map` call, one entry per positional argument: a tuple or list
    gives one per argument; anything else applies to every argument."""
    if isinstance(in_axes, (tuple, list)):
        if len(in_axes) != n_args:
            raise ValueError(
                f"`in_axes` gives {len(in_axes)} axes, but the call has {n_args} "
                "positional argument(s). Give one entry per argument, or a single axis "
                "for all of them."
            )
        return tuple(_hashable(a) for a in in_axes)
    return (_hashable(in_axes),) * n_args


@eqx.filter_jit
def _vmapped_apply(
    module, module_axes, args, kwargs, in_axes, out_axes, axis_name, axis_size
):
    fn = eqx.filter_vmap(
        lambda m, a, k: m(*a, **k),
        in_axes=(module_axes, in_axes, eqx.if_array(0)),
        out_axes=out_axes,
        axis_name=axis_name,
        axis_size=axis_size,
    )
    return fn(module, args, kwargs)


class Map(eqx.Module):
    """A module mapped over an axis: several devices (`behavior="pmap"`) or an ensemble on
    one device (`behavior="vmap"`).

    The functional form of brainstate's `Map`: `init_all_states` returns a new `Map` whose
    module's states were made by [`eqx_pmapstate.pmap2_new_states`][] or
    [`eqx_pmapstate.vmap2_new_states`][], and calling the `Map` maps the module's `__call__`
    over the axis.

    **Arguments:**

    - `module`: an `eqx.Module` with `init_state` methods, or a callable building the
        module (as `pmap2_new_states` takes it).
    - `init_map_size`: the size of the axis: devices, or ensemble members.
    - `init_state_axes`: `state_out_axes` for the initialisation.
    - `state_tag`: tag for the new markers.
    - `in_axes`: the axis of every positional argument of a call (`int`, `None`, or a
        pytree prefix per argument; for `"pmap"` also a [`eqx_pmapstate.StateAxes`][]).
    - `out_axes`: the axis of the outputs.
    - `axis_name`: the axis name (`"devices"` for `"pmap"` when not given).
    - `behavior`: `"vmap"` or `"pmap"`.
    - `module_axes`: the axis of each of the module's arrays, which `init_all_states`
        records (leave it out). A call maps the module by them when its arrays are
        tracers (inside `jax.jit` or `jax.grad`), whose layout cannot be read.

    !!! example

        ```python
        mapper = Map(ParallelModel(), init_map_size=8, behavior="pmap", axis_name="devices")
        mapper = mapper.init_all_states(layer_size=128)
        outputs = mapper(inputs)  # inputs: (8, batch_per_device, 128)
        ```
    """

    module: Any
    init_map_size: int = eqx.field(static=True)
    init_state_axes: Any = eqx.field(static=True, default=None)
    state_tag: str | None = eqx.field(static=True, default=None)
    in_axes: Any = eqx.field(static=True, default=0)
    out_axes: Any = eqx.field(static=True, default=0)
    axis_name: str | None = eqx.field(static=True, default=None)
    behavior: Literal["vmap", "pmap"] = eqx.field(static=True, default="vmap")
    module_axes: Any = eqx.field(static=True, default=None)  # per-leaf axes

    def __init__(
        self,
        module: Any,
        init_map_size: int,
        init_state_axes: Any = None,
        state_tag: str | None = None,
        in_axes: Any = 0,
        out_axes: Any = 0,
        axis_name: str | None = None,
        behavior: Literal["vmap", "pmap"] = "vmap",
        module_axes: Any = None,
    ):
        # Written out (not the dataclass's) so that Equinox does not flatten the
        # arguments: `init_state_axes={0: ..., None: ...}` has keys JAX cannot sort.
        self.module = module
        self.init_map_size = init_map_size
        self.init_state_axes = (
            _AxesDict(init_state_axes)
            if type(init_state_axes) is dict
            else init_state_axes
        )
        self.state_tag = state_tag
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.behavior = behavior
        self.module_axes = module_axes

    def __check_init__(self):
        check_axis_size(self.init_map_size, "init_map_size")
        if self.behavior not in ("vmap", "pmap"):
            raise ValueError(
                f"`behavior` must be 'vmap' or 'pmap', but got {self.behavior!r}."
            )

    @property
    def _name(self):
        if self.behavior == "pmap" and self.axis_name is None:
            return "devices"
        return self.axis_name

    def init_all_states(self, *, init_in_axes=None, **init_kwargs) -> Map:
        """Creates the module's states over the axis.

        **Arguments:**

        - `init_in_axes`: which arguments are split over the axis, as for
            [`eqx_pmapstate.pmap2_new_states`][] (for per-member keys:
            `init_in_axes={"key": 0}` with `key=jax.random.split(key, n)`).
        - `**init_kwargs`: the arguments of the initialisation.

        **Returns:**

        A new `Map` holding the initialised module.
        """
        if self.behavior == "pmap":
            module = pmap2_new_states(
                self.module,
                init_kwargs,
                self.state_tag,
                self.init_map_size,
                _plain(self.init_state_axes),
                axis_name=self._name or "devices",
                init_in_axes=init_in_axes,
            )
            name = self._name or "devices"
            axes = jtu.tree_map(
                lambda x: _module_axis(x, name) if isinstance(x, jax.Array) else None,
                module,
            )
        else:
            module = vmap2_new_states(
                self.module,
                init_kwargs,
                self.state_tag,
                self.init_map_size,
                _plain(self.init_state_axes),
                axis_name=self._name,
                init_in_axes=init_in_axes,
            )
            axes = jtu.tree_map(
                lambda x: (
                    (lambda a: None if a is UNKNOWN else a)(leaf_axis(x))
                    if isinstance(x, jax.Array)
                    else None
                ),
                module,
            )
        return eqx.tree_at(lambda m: m.module, self, module).__with_axes(axes)

    def __recorded(self) -> tuple | None:
        """The module's axes recorded by `init_all_states`, `(treedef, axes)`, if its
        structure is still the one they were recorded for; kept on this (immutable)
        instance, so that calling it again does not flatten the module again."""
        found = self.__dict__.get(_RECORDED, _MISSING)
        if found is _MISSING:
            found = self.__find_recorded()
            object.__setattr__(self, _RECORDED, found)
        return found

    def __find_recorded(self) -> tuple | None:
        if self.module_axes is None:
            return None
        axes, treedef = jtu.tree_flatten(self.module_axes, is_leaf=_is_none)
        if jtu.tree_structure(self.module) != jtu.tree_structure(
            treedef.unflatten([0] * len(axes))
        ):
            return None
        return treedef, tuple(axes)

    def __with_axes(self, axes) -> Map:
        new = object.__new__(type(self))
        for k, v in vars(self).items():
            if k != _RECORDED:  # (found for the module this one replaces)
                object.__setattr__(new, k, v)
        object.__setattr__(new, "module_axes", axes)
        return new

    def __call__(self, *args, **kwargs):
        """Calls the module on every device or member, mapping the positional arguments
        by `in_axes`; of the keyword arguments, arrays are mapped along axis 0 (for
        `"pmap"`, one laid out on the mesh keeps its layout) and anything else is
        static."""
        if self.module_axes is None and not any(
            map(eqx.is_array, jtu.tree_leaves(self.module))
        ):
            raise ValueError(
                "Call `init_all_states` first: this `Map` has no states yet."
            )
        if self.behavior == "pmap":
            in_axes = _per_argument(self.in_axes, len(args))
            _check_members(args, in_axes, self.init_map_size)
            fn = _mapped_apply(
                self._name, in_axes, _hashable(self.out_axes), self.__recorded()
            )
            return fn(self.module, *args, **kwargs)
        if self.module_axes is None:
            raise ValueError(
                "Call `init_all_states` first: this `Map` has no states yet."
            )
        in_axes = _per_argument(self.in_axes, len(args))
        _check_members(args, in_axes, self.init_map_size)
        return _vmapped_apply(
            self.module,
            self.module_axes,
            args,
            kwargs,
            in_axes,
            self.out_axes,
            self._name,
            self.init_map_size,
        )
