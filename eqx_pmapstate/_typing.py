"""Types: the device axis in jaxtyping annotations, and the filter language.

`PerDevice[Float[Array, "3 4"]]` is an array of `Float[Array, "devices 3 4"]` outside a
mapped function (the global view of a state laid out over the devices), and of
`Float[Array, "3 4"]` inside one (a `pmap2` step, an initialisation, a `Map` call: the
view of one device), so that one annotation on a module's field is right on both sides.
"devices" is a jaxtyping symbolic dimension: under `jaxtyping.jaxtyped`, arguments made
for different device counts do not type-check together.
"""

from __future__ import annotations

from typing import Any, no_type_check, TYPE_CHECKING, TypeAlias, TypeVar

import jax
import jaxtyping
import numpy as np

from ._trace import active_axis


_T = TypeVar("_T")

DEFAULT_NAME = "devices"


def _is_variadic(dim: str) -> bool:
    return dim == "..." or dim.lstrip("#_").startswith("*")


def _with_axis(dim_str: str, name: str, axis: int) -> str:
    dims = dim_str.split()
    pos = axis if axis >= 0 else len(dims) + 1 + axis
    if not 0 <= pos <= len(dims):
        raise TypeError(
            f"`PerDevice`: axis {axis} is out of range for the dimensions {dim_str!r}: "
            f"the device axis can go at positions {-(len(dims) + 1)} to {len(dims)}."
        )
    if any(_is_variadic(d) for d in dims) and pos not in (0, len(dims)):
        raise TypeError(
            f"`PerDevice`: the dimensions {dim_str!r} have a variadic part, so the device "
            "axis can only go first (axis 0) or last (axis -1)."
        )
    dims.insert(pos, name)
    return " ".join(dims)


def per_device(annotation: Any, name: str = DEFAULT_NAME, axis: int = 0) -> Any:
    """The global view of an array annotation: `annotation` with a device axis.

    **Arguments:**

    - `annotation`: a jaxtyping array annotation (`Float[Array, "3 4"]`), or an array type
        (`jax.Array`, `np.ndarray`: any dtype and shape).
    - `name`: the name of the device axis as a jaxtyping dimension (`"devices"`, or the
        `axis_name` you chose, such as `"members"` for an ensemble).
    - `axis`: where the device axis is, as in `state_out_axes` (0, 1, ..., or negative,
        counting from the end of the result).

    **Returns:**

    A type for annotations and `isinstance`: the array with the device axis outside a
    mapped function, the array as `annotation` says inside one. `PerDevice[annotation]`
    is `per_device(annotation)`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(
            f"`PerDevice`: the axis name must be an identifier, not {name!r}."
        )
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`PerDevice`: the axis must be an int, not {axis!r}.")
    inner = _as_jaxtyping(annotation)
    outer = inner.dtype[inner.array_type, _with_axis(inner.dim_str, name, int(axis))]
    label = f"PerDevice[{_name(inner)}" + (
        "]" if (name, axis) == (DEFAULT_NAME, 0) else f", {name!r}, {axis}]"
    )
    return _PerDeviceMeta(label, (), {"inner": inner, "outer": outer})


def _as_jaxtyping(annotation) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, jaxtyping.AbstractArray):
        if getattr(annotation, "dim_str", None) is None:
            raise TypeError(
                f"`PerDevice` needs an array annotation, not {annotation!r}."
            )
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, (jax.Array, np.ndarray)):
        return jaxtyping.Shaped[annotation, "..."]
    raise TypeError(
        "`PerDevice` takes a jaxtyping array annotation such as `Float[Array, '3 4']` "
        f"(or an array type), but got {annotation!r}."
    )


def _name(t) -> str:
    return f"{t.dtype.__name__}[{t.array_type.__name__}, {t.dim_str!r}]"


class _PerDeviceMeta(type):
    # The class made by `per_device`: `isinstance` asks the global or the per-device
    # annotation, depending on whether a mapped function is being traced. Its checks run
    # within the caller's jaxtyping bindings ("devices" must agree across arguments), so
    # its methods are kept out of jaxtyping's import hook (`no_type_check`), which would
    # give each its own bindings.

    @no_type_check
    def _current(cls):
        return cls.inner if active_axis() is not None else cls.outer

    @no_type_check
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, cls._current())

    @no_type_check
    def __instancecheck_str__(cls, obj) -> str:
        # Used by jaxtyping for its error messages.
        check = getattr(cls._current(), "__instancecheck_str__", None)
        if check is not None:
            return check(obj)
        return "" if isinstance(obj, cls._current()) else f"not a {cls.__name__}"


if TYPE_CHECKING:
    from typing import Annotated

    # To a static type checker, `PerDevice[X]` is `X`.
    PerDevice: TypeAlias = Annotated[_T, "per-device"]
else:

    class PerDevice:
        """An array annotation with a device axis: `PerDevice[Float[Array, "3 4"]]` is
        `Float[Array, "devices 3 4"]` outside a mapped function and `Float[Array, "3 4"]`
        inside one (a `pmap2` step, an initialisation, a `Map` call), so that one
        annotation of a module's field describes both views of it.

        `PerDevice[X, name]` names the axis otherwise (an `axis_name` you chose, such as
        `"members"`); `PerDevice[X, name, axis]` puts it at another position (`1`, `-1`, as
        in `state_out_axes`). See [`eqx_pmapstate.per_device`][] for the form static type
        checkers accept for those.
        """

        def __class_getitem__(cls, item):
            args = item if isinstance(item, tuple) else (item,)
            if not 1 <= len(args) <= 3:
                raise TypeError(
                    "`PerDevice[...]` takes an array annotation, then optionally the axis "
                    "name and its position: `PerDevice[Float[Array, '3'], 'devices', 0]`."
                )
            return per_device(*args)
