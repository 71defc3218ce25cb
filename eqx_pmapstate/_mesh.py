"""Meshes, axis sizes and reading a leaf's layout off its sharding."""

import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._stores import register_store


_lock = threading.Lock()
_meshes: dict = {}  # (device ids, axis name) -> Mesh, the newest `_MESHES_KEPT`
_MESHES_KEPT = 64


def _clear_meshes() -> None:
    with _lock:
        _meshes.clear()


register_store("meshes", _clear_meshes)


def manual_axes() -> tuple:
    """The mesh axes a caller maps over by hand where this runs (inside `jax.shard_map`
    or `jax.pmap`): empty outside them."""
    return tuple(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def check_axis_size(axis_size, what: str = "axis_size") -> None:
    if isinstance(axis_size, bool) or not isinstance(axis_size, (int, np.integer)):
        raise TypeError(
            f"`{what}` must be a positive int, but got {axis_size!r} of type {type(axis_size).__name__}."
        )
    if axis_size <= 0:
        raise ValueError(f"`{what}` must be a positive int, but got {axis_size}.")


def resolve_mesh(axis_size, devices, axis_name: str) -> tuple[Mesh, int]:
    """The one-dimensional mesh named `axis_name` to lay states out on, and its size.

    By default it takes `axis_size` (default: all) of the local devices of every process:
    with one process, the local devices; with several (`jax.distributed`), the same number
    from each, in process order, so that the axis spans every process's devices and its
    length is the process count times `axis_size`.

    Meshes are cached by their devices and name, so that repeated calls give the very
    same `Mesh` object and `jax.jit`'s caches keyed on shardings keep hitting.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"`axis_name` must be a non-empty str, but got {axis_name!r}.")
    if axis_size is not None:
        check_axis_size(axis_size)
    if isinstance(devices, Mesh):
        return _given_mesh(devices, axis_size, axis_name)
    if devices is None:
        chosen = _default_devices(axis_size)
    else:
        chosen = _chosen_devices(devices, axis_size)
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
            if len(_meshes) > _MESHES_KEPT:  # the oldest goes
                _meshes.pop(next(iter(_meshes)))
    return mesh, len(chosen)


def _given_mesh(mesh: Mesh, axis_size, axis_name: str) -> tuple[Mesh, int]:
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"The mesh passed as `devices` has axes {mesh.axis_names}, but no axis named "
            f"{axis_name!r}. Pass `axis_name=` one of its axes, or build the mesh with that name."
        )
    n = mesh.shape[axis_name]
    if axis_size is not None and axis_size != n:
        raise ValueError(
            f"`axis_size={axis_size}` does not match the mesh, whose axis {axis_name!r} has "
            f"{n} devices. Leave `axis_size` out, or pass a mesh of that size."
        )
    return mesh, n


def _too_many(n: int, where: str, available: int) -> ValueError:
    return ValueError(
        f"`axis_size={n}` is larger than the number of {where}, which is {available}. "
        f"Use an axis_size of at most {available}, `vmap2_new_states` to stack more "
        "members than there are devices, or `eval_new_states` for the shapes and "
        "layouts of states made for more devices (to restore a checkpoint into them "
        "elsewhere), which creates nothing."
    )


def _default_devices(axis_size) -> tuple:
    local = jax.local_devices()
    n = len(local) if axis_size is None else int(axis_size)
    if n > len(local):
        raise _too_many(n, "local devices (jax.local_device_count())", len(local))
    if jax.process_count() == 1:
        return tuple(local[:n])
    by_process: dict = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return tuple(d for p in sorted(by_process) for d in by_process[p][:n])


def _chosen_devices(devices, axis_size) -> tuple:
    if not isinstance(devices, Sequence) or not all(
        isinstance(d, jax.Device) for d in devices
    ):
        raise TypeError(
            "`devices` must be a sequence of `jax.Device`s or a `jax.sharding.Mesh`."
        )
    pool = list(devices)
    if not pool:
        raise ValueError(
            "`devices` is empty. Pass the devices to map over (for example "
            "`jax.devices()[:4]`), or leave it out to use every local device."
        )
    if len({d.id for d in pool}) != len(pool):
        raise ValueError("`devices` names the same device more than once.")
    n = len(pool) if axis_size is None else int(axis_size)
    if n > len(pool):
        raise _too_many(n, "devices in `devices`", len(pool))
    return tuple(pool[:n])


def axis_spec(axis_name, axis: int | None, ndim: int | None = None) -> P:
    """The `PartitionSpec` that puts `axis_name` at position `axis` (`None`: replicated)."""
    if axis is None:
        return P()
    return P(*([None] * axis), axis_name)


def shardings(mesh: Mesh, axis_name, axes) -> list[NamedSharding]:
    """The sharding that lays an array out along each of `axes` (see `axis_spec`), one
    object per distinct axis."""
    made: dict = {}
    out = []
    for a in axes:
        s = made.get(a)
        if s is None:
            s = made[a] = NamedSharding(mesh, axis_spec(axis_name, a))
        out.append(s)
    return out


UNKNOWN = object()


def read_axis(x, axis_name: str | None = None, mesh: Mesh | None = None):
    """The position of the device axis in a global array, `None` if it is replicated over
    the axis, or `UNKNOWN` if the array is not laid out over such an axis (or over
    `mesh`, when given)."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return UNKNOWN
    if mesh is not None and sharding.mesh != mesh:
        return UNKNOWN
    names = sharding.mesh.axis_names
    if axis_name is None:
        if len(names) != 1:
            return UNKNOWN
        axis_name = names[0]
    elif axis_name not in names:
        return UNKNOWN
    for pos, entry in enumerate(sharding.spec):
        entries = entry if isinstance(entry, tuple) else (entry,)
        if axis_name in entries:
            return pos if entry == axis_name else UNKNOWN
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


def put_global(x, sharding, name: str | None = None):
    """`x` laid out as `sharding`. With several processes, an array local to this
    process (a host array, or one on this process's devices) becomes one global array
    from every process's copy, each process giving the parts its devices hold; when it is
    to be replicated, the copies must be equal (else each process would hold its own
    value under a replicated label), which is checked. `name` names `x` in messages."""
    local = not isinstance(x, jax.Array) or x.is_fully_addressable
    if jax.process_count() == 1 or not local:
        return jax.device_put(x, sharding)
    if sharding.is_fully_replicated:
        _check_same_everywhere(x, name)
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])


def _check_same_everywhere(x, name: str | None) -> None:
    from jax.experimental import multihost_utils

    is_key = isinstance(x, jax.Array) and jax.numpy.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )
    bits = np.asarray(jax.random.key_data(x) if is_key else x)
    try:
        multihost_utils.assert_equal(bits)
    except AssertionError:
        what = f"The input {name}" if name else "An input"
        raise ValueError(
            f"{what} is to be replicated, but differs between the processes. Pass the "
            "same value on every process (for example the same key), or lay it out "
            "yourself as a global array."
        ) from None
