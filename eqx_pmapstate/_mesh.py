"""Meshes, axis sizes and reading a leaf's layout off its sharding."""

import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


_lock = threading.Lock()
_meshes: dict = {}


def check_axis_size(axis_size, what: str = "axis_size") -> None:
    if isinstance(axis_size, bool) or not isinstance(axis_size, (int, np.integer)):
        raise TypeError(
            f"`{what}` must be a positive int, but got {axis_size!r} of type {type(axis_size).__name__}."
        )
    if axis_size <= 0:
        raise ValueError(f"`{what}` must be a positive int, but got {axis_size}.")


def resolve_mesh(axis_size, devices, axis_name: str) -> tuple[Mesh, int]:
    """The one-dimensional mesh named `axis_name` to lay states out on, and its size.

    Meshes are cached by their devices and name, so that repeated calls give the very
    same `Mesh` object and `jax.jit`'s caches keyed on shardings keep hitting.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"`axis_name` must be a non-empty str, but got {axis_name!r}.")
    if axis_size is not None:
        check_axis_size(axis_size)
    if isinstance(devices, Mesh):
        if axis_name not in devices.axis_names:
            raise ValueError(
                f"The mesh passed as `devices` has axes {devices.axis_names}, but no axis named "
                f"{axis_name!r}. Pass `axis_name=` one of its axes, or build the mesh with that name."
            )
        n = devices.shape[axis_name]
        if axis_size is not None and axis_size != n:
            raise ValueError(
                f"`axis_size={axis_size}` does not match the mesh, whose axis {axis_name!r} has "
                f"{n} devices. Leave `axis_size` out, or pass a mesh of that size."
            )
        return devices, n
    if devices is None:
        pool = jax.local_devices()
        where = "local devices (jax.local_device_count())"
    else:
        if not isinstance(devices, Sequence) or not all(
            isinstance(d, jax.Device) for d in devices
        ):
            raise TypeError(
                "`devices` must be a sequence of `jax.Device`s or a `jax.sharding.Mesh`."
            )
        pool = list(devices)
        where = "devices in `devices`"
        if len({d.id for d in pool}) != len(pool):
            raise ValueError("`devices` names the same device more than once.")
    n = len(pool) if axis_size is None else int(axis_size)
    if n > len(pool):
        raise ValueError(
            f"`axis_size={n}` is larger than the number of {where}, which is {len(pool)}. "
            f"Use an axis_size of at most {len(pool)}, or `vmap2_new_states` to stack more "
            "members than there are devices."
        )
    chosen = tuple(pool[:n])
    key = (tuple(d.id for d in chosen), axis_name)
    with _lock:
        mesh = _meshes.get(key)
        if mesh is None:
            mesh = Mesh(
                np.array(chosen, dtype=object),
                (axis_name,),
                axis_types=(jax.sharding.AxisType.Auto,),
            )
            _meshes[key] = mesh
    return mesh, n


def axis_spec(axis_name, axis: int | None, ndim: int | None = None) -> P:
    """The `PartitionSpec` that puts `axis_name` at position `axis` (`None`: replicated)."""
    if axis is None:
        return P()
    return P(*([None] * axis), axis_name)


_UNKNOWN = object()


def read_axis(x, axis_name: str | None = None, mesh: Mesh | None = None):
    """The position of the device axis in a global array, `None` if it is replicated over
    the axis, or `_UNKNOWN` if the array is not laid out over such an axis (or over
    `mesh`, when given)."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return _UNKNOWN
    if mesh is not None and sharding.mesh != mesh:
        return _UNKNOWN
    names = sharding.mesh.axis_names
    if axis_name is None:
        if len(names) != 1:
            return _UNKNOWN
        axis_name = names[0]
    elif axis_name not in names:
        return _UNKNOWN
    for pos, entry in enumerate(sharding.spec):
        entries = entry if isinstance(entry, tuple) else (entry,)
        if axis_name in entries:
            return pos if entry == axis_name else _UNKNOWN
    return None


def mesh_str(mesh: Mesh) -> str:
    """A mesh for an error message, with what tells two meshes apart: the devices (by
    id, in order), the axis names and sizes, and the axis types."""
    axes = ", ".join(f"{n!r}: {s}" for n, s in mesh.shape.items())
    ids = [d.id for d in mesh.devices.flat]
    types = getattr(mesh, "axis_types", None)
    kinds = (
        f", axis types {tuple(getattr(t, 'name', t) for t in types)}" if types else ""
    )
    return f"a mesh of axes {{{axes}}}{kinds} over devices {ids}"
