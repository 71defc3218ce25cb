"""Checkpoints that restore straight into the layout: `save` and `load`.

With Orbax (`orbax-checkpoint`, the `checkpoint` extra) a checkpoint is a directory, and
every process writes and reads only its own shards: loading creates each array with its
final sharding. Without it, `equinox.tree_serialise_leaves` writes one file, and loading
reads each array on the host and puts it straight into its sharding (never whole on one
device). Orbax is required with several processes. Only arrays are stored, with the key
path of each (in Orbax's custom metadata, or after the arrays of Equinox's file);
everything else (static fields, functions, the tree's structure) comes from `like` when
loading, once `like` is checked to have its arrays at the same paths.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ._one_device import leaf_choices
from ._recount import (
    ALLOWED,
    classify,
    Recount,
    recount,
    refuse_abstract_meshes,
    refuse_unchosen_recounts,
)
from ._relayout import abstract
from ._tree import path_name


Backend = Literal["auto", "orbax", "equinox"]


def _orbax() -> Any:
    """The `orbax.checkpoint` module, or None when Orbax is not installed."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        return None
    return ocp


def _backend(path, backend: Backend, saving: bool) -> str:
    if backend not in ("auto", "orbax", "equinox"):
        raise ValueError(
            f"`backend` must be 'auto', 'orbax' or 'equinox', but got {backend!r}."
        )
    if backend == "auto":
        if saving:
            backend = "orbax" if _orbax() is not None else "equinox"
        else:
            backend = "orbax" if pathlib.Path(path).is_dir() else "equinox"
    if backend == "orbax" and _orbax() is None:
        raise ImportError(
            "Orbax is not installed: `pip install orbax-checkpoint` (or the "
            "`eqx_pmapstate[checkpoint]` extra), or pass `backend='equinox'`."
        )
    if backend == "equinox" and jax.process_count() > 1:
        raise ValueError(
            "With several processes, checkpoints need Orbax, which writes and reads each "
            "process's shards: install `orbax-checkpoint` and use `backend='orbax'` "
            "(the default when it is installed)."
        )
    return backend


def _is_key(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def _stored(x, kind: str):
    """An array as stored: PRNG keys as their raw data, and with Orbax, a dtype that
    TensorStore cannot write as an integer dtype of the same bits."""
    if _is_key(x):
        return jax.random.key_data(x)
    encoded = _encoded_dtype(x.dtype) if kind == "orbax" else None
    return x if encoded is None else _convert(x, encoded)


def _stored_like(x, kind: str):
    """What an array of `like` is read as (for keys: the shape of their raw data)."""
    if _is_key(x):
        data = jax.eval_shape(
            jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)
        )
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    encoded = _encoded_dtype(x.dtype) if kind == "orbax" else None
    if encoded is None:
        return x
    return jax.ShapeDtypeStruct(x.shape, encoded, sharding=x.sharding)


def _restored(value, like):
    if _is_key(like):
        return jax.random.wrap_key_data(value, impl=_key_impl(like))
    if value.dtype != like.dtype:  # stored as another dtype of the same bits
        return _convert(value, like.dtype)
    return value


def _encoded_dtype(dtype):
    """The dtype Orbax stores `dtype` as: None when TensorStore writes it as it is (every
    NumPy dtype, bfloat16, most float8 types); else an unsigned integer of the same width
    for a float (its bits), or an 8-bit integer for a sub-byte integer (its value)."""
    dtype = np.dtype(dtype)
    if _numpy_names(dtype):  # a NumPy dtype
        return None
    import tensorstore

    try:
        tensorstore.dtype(dtype)
    except (ValueError, TypeError):
        pass
    else:
        return None
    if jnp.issubdtype(dtype, jnp.integer):
        return np.dtype(
            jnp.int8 if jnp.issubdtype(dtype, jnp.signedinteger) else jnp.uint8
        )
    if jnp.finfo(dtype).bits in (8, 16):
        return np.dtype(np.uint8 if jnp.finfo(dtype).bits == 8 else np.uint16)
    return np.dtype(jnp.float32)  # a float of fewer bits: every value fits exactly


def _convert(x, dtype):
    """`x` as `dtype`, bit for bit: a float and an integer of as many bits reinterpret
    the bits; otherwise the values are converted (exact for the pairs above)."""
    a, b = np.dtype(x.dtype), np.dtype(dtype)
    floating, other = (a, b) if jnp.issubdtype(a, jnp.floating) else (b, a)
    if jnp.issubdtype(floating, jnp.floating) and jnp.issubdtype(other, jnp.integer):
        if jnp.finfo(floating).bits == 8 * other.itemsize:
            return jax.lax.bitcast_convert_type(x, dtype)
    return x.astype(dtype)


def _key_impl(like):
    """The PRNG implementation of a key array, or of a struct of one (found by the dtype
    of a key made with each of JAX's implementations)."""
    if isinstance(like, jax.Array):
        return jax.random.key_impl(like)
    for name in ("threefry2x32", "rbg", "unsafe_rbg"):
        made = jax.eval_shape(lambda name=name: jax.random.key(0, impl=name))
        if made.dtype == like.dtype:
            return name
    raise TypeError(
        f"Cannot tell the PRNG implementation of keys of dtype {like.dtype}."
    )


def save(path: str | os.PathLike, tree: Any, *, backend: Backend = "auto") -> None:
    """Writes the arrays of `tree` to `path`.

    **Arguments:**

    - `path`: where to write: a directory with Orbax (which must not exist yet), a file
        with Equinox's serialisation (`.eqx` is added to a name without a suffix, as
        Equinox does).
    - `tree`: any pytree, typically a model made by `pmap2_new_states` or a training
        state. Its arrays are written with their values, and with the key path of each
        (`.linear.weight`), which `load` compares with `like`'s; the rest is not stored.
        The file written with Equinox's serialisation is still read by
        `eqx.tree_deserialise_leaves`.
    - `backend`: `"orbax"`, `"equinox"`, or `"auto"` (Orbax when it is installed).

    **Returns:**

    Nothing. With Orbax, the checkpoint is complete (committed) when `save` returns.
    """
    kind = _backend(path, backend, saving=True)
    arrays = jtu.tree_map(lambda x: _stored(x, kind), eqx.filter(tree, eqx.is_array))
    if kind == "orbax" and _is_single(arrays):
        arrays = {_SINGLE: arrays}  # Orbax writes no bare array
    record = _record(arrays)
    if kind == "orbax":
        arrays, record["empty"] = _placeholders(arrays)
        ocp = _orbax()
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(
            os.path.abspath(os.fspath(path)), arrays, custom_metadata={_RECORD: record}
        )
        checkpointer.wait_until_finished()
    else:
        with open(_eqx_file(path), "wb") as f:
            eqx.tree_serialise_leaves(f, arrays, filter_spec=_write)
            _write_record(f, record)


def _placeholders(arrays) -> tuple[Any, list]:
    """Orbax writes no zero-size array: each is written as one element of its dtype,
    and recorded (plain names, shape, dtype) to be made again when loading."""
    empty = []

    def placeholder(path, x):
        if x.size:
            return x
        empty.append([list(_names(path)), list(x.shape), jnp.dtype(x.dtype).name])
        return np.zeros((1,), x.dtype)

    return jtu.tree_map_with_path(placeholder, arrays), empty


class _Saved(NamedTuple):
    """The shape and dtype of a zero-size array written as a placeholder."""

    shape: tuple
    dtype: np.dtype


_RECORD = "eqx_pmapstate"  # our entry in Orbax's custom metadata
_END = b"EPSTREE1"  # the last bytes of an Equinox file that ends with the record


def _record(arrays) -> dict:
    """What `save` writes beside the arrays: the key path of each, in the order Equinox's
    file holds them, as shown in messages and as plain names (compared when loading)."""
    flat = jtu.tree_flatten_with_path(arrays)[0]
    return {"arrays": [[path_name(p, arrays), list(_names(p))] for p, _ in flat]}


def _eqx_file(path) -> pathlib.Path:
    """The file Equinox's serialisation uses for `path`: `.eqx` added to a name without
    a suffix."""
    path = pathlib.Path(path)
    return path.with_suffix(".eqx") if path.suffix == "" else path


def _write_record(f, record: dict) -> None:
    """Appends `record` to an Equinox file, after its arrays: Equinox reads the arrays as
    before and ignores it."""
    data = json.dumps(record).encode()
    f.write(data + struct.pack("<Q", len(data)) + _END)


def _read_record(f) -> tuple[dict | None, int]:
    """The record at the end of an Equinox file (None if it has none: it was written by
    `eqx.tree_serialise_leaves`, or by `save` before it wrote one), and where the arrays
    end."""
    end = f.seek(0, os.SEEK_END)
    tail = 8 + len(_END)
    if end >= tail:
        f.seek(end - tail)
        last = f.read(tail)
        (size,) = struct.unpack("<Q", last[:8])
        if last[8:] == _END and size <= end - tail:
            f.seek(end - tail - size)
            return json.loads(f.read(size)), end - tail - size
    return None, end


def _shown_paths(record: dict) -> dict[tuple, str]:
    """The record's array paths: their plain names to their paths as shown."""
    return {tuple(names): shown for shown, names in record["arrays"]}


def load(
    path: str | os.PathLike,
    like: Any,
    *,
    per_device: Any = None,
    backend: Backend = "auto",
) -> Any:
    """Reads a checkpoint written by [`eqx_pmapstate.save`][] into the layout of `like`.

    Every array is created directly with the sharding of its counterpart in `like`: with
    Orbax, each process reads only its own shards; without it, each array is read on the
    host and put straight into its sharding. The result can go into a `pmap2` step as
    `like` would.

    Before any value is read, the checkpoint's arrays are checked to be at the key paths
    of `like`'s arrays: a leaf saved as an array that is `None` (or missing, or not an
    array) in `like`, or an array of `like` that the checkpoint does not have, is an
    error naming it, never a value read into another leaf or silently dropped. Arrays are
    matched by their paths (their names: a model's field `.w` matches a dict's `['w']`),
    not by their order. A file written by `eqx.tree_serialise_leaves`, or by `save`
    before it recorded the paths, is checked by its number of arrays, then by each
    array's shape and dtype in order.

    A checkpoint made for another number of devices loads into a `like` made for the
    devices you have: replicated leaves are read as they are, and each per-device leaf
    (saved with `n` entries along its device axis, `m` in `like`) becomes what
    `per_device` says.

    **Arguments:**

    - `path`: the checkpoint.
    - `like`: a tree laid out as wanted: the model as `pmap2_new_states` made it, or
        [`eqx_pmapstate.abstract`][] of it, or
        [`eqx_pmapstate.eval_new_states`][] (nothing is computed to get it). Static
        fields and the tree's structure come from it; it must have arrays at the paths
        where the checkpoint has them, and nowhere else (build it as the saved tree was
        built). It is not changed.
    - `per_device`: only for a checkpoint made for another number of devices, what each
        per-device leaf becomes: `"first"` (the first saved device's entry, on every
        device), an index (that saved device's entry, on every device), `"mean"` (the
        mean of the saved entries, on every device; floating point only), `"leading"`
        (the first `m` saved entries; needs `m <= n`), `"regroup"` (for the state of
        [`eqx_pmapstate.zero`][]: the saved slices, flattened in device order, split
        again into `m` slices), or a callable from the saved
        array, device axis first, `(n, ...)`, to the new `(m, ...)` (for keys, for
        example `lambda keys: jax.random.split(keys[0], m)`). One choice for every leaf,
        or a pytree prefix of `like`, each subtree with its own. By default such leaves
        are refused, naming them.
    - `backend`: `"orbax"`, `"equinox"`, or `"auto"` (from what `path` is).

    **Returns:**

    `like` with its arrays read from `path`.

    **Raises:**

    `ValueError` naming the leaves that are arrays in the checkpoint but not in `like`
    or the other way round, the leaves whose shape or dtype on disk differs from
    `like`'s (other than in the number of devices), the per-device leaves of a checkpoint
    made for another number of devices when `per_device` is not given, and a `like` laid
    out for devices that are not here.
    """
    kind = _backend(path, backend, saving=False)
    like_arrays = eqx.filter(like, _is_array_or_struct)
    spec = abstract(like_arrays)
    refuse_abstract_meshes(jtu.tree_flatten_with_path(spec)[0], spec)
    choices = leaf_choices(per_device, spec, ALLOWED, "load")
    target = jtu.tree_map(lambda x: _stored_like(x, kind), spec)
    if kind == "orbax":
        arrays, recounts = _load_orbax(path, target, choices, like)
    else:
        arrays, recounts = _load_equinox(path, target, choices, like)
    arrays = jtu.tree_map(_restored, arrays, like_arrays)
    flat, treedef = jtu.tree_flatten(arrays)
    flat = [
        x if r is None else recount(x, r, s)
        for x, r, s in zip(flat, recounts, jtu.tree_leaves(spec), strict=True)
    ]
    arrays = treedef.unflatten(flat)
    return eqx.combine(arrays, eqx.filter(like, _is_array_or_struct, inverse=True))


def _is_array_or_struct(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


_SINGLE = "array"  # a bare array is written to Orbax under this name


def _is_single(tree) -> bool:
    return tree is not None and jtu.treedef_is_leaf(jtu.tree_structure(tree))


def _load_orbax(path, target, choices, like):
    if _is_single(target):
        arrays, recounts = _load_orbax(
            path, {_SINGLE: target}, choices, {_SINGLE: like}
        )
        return arrays[_SINGLE], recounts
    checkpointer = _orbax().StandardCheckpointer()
    path = os.path.abspath(os.fspath(path))
    stored = _orbax_metadata(checkpointer, path)
    if stored is None:  # another layout of the metadata: Orbax checks
        return checkpointer.restore(path, target), [None] * len(jtu.tree_leaves(target))
    tree, saved, empty = stored
    _check_structure(saved, like)
    flat, treedef = jtu.tree_flatten_with_path(target)
    on_disk = {_names(p): m for p, m in jtu.tree_flatten_with_path(tree)[0]}
    on_disk.update(empty)
    found = [
        _fit(p, on_disk[_names(p)], x, choice, target)
        for (p, x), choice in zip(flat, choices, strict=True)
    ]
    recounts = _checked(found)
    wanted = {_names(p): _read_as(x, r) for (p, x), r in zip(flat, recounts)}
    wanted.update((n, _placeholder_struct(wanted[n], m)) for n, m in empty.items())
    # Read into the saved tree itself (its Nones and containers as Orbax wrote them).
    item = jtu.tree_map_with_path(lambda p, _: wanted[_names(p)], tree)
    read = jtu.tree_flatten_with_path(checkpointer.restore(path, item))[0]
    by_names = {_names(p): value for p, value in read}
    values = [
        _zeros_as(x) if _names(p) in empty else by_names[_names(p)] for p, x in flat
    ]
    return treedef.unflatten(values), recounts


def _placeholder_struct(x, saved: _Saved):
    """How the placeholder of a zero-size array is read: one element, replicated."""
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, P())
    return jax.ShapeDtypeStruct((1,), saved.dtype, sharding=sharding)


def _zeros_as(x):
    """A zero-size array of `x`'s (a struct's) shape, dtype and sharding."""
    return jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)


def _orbax_metadata(checkpointer, path) -> tuple[Any, dict, dict] | None:
    """The checkpoint's tree of array metadata (dicts and lists, None where no array was
    saved), its arrays' plain names to their paths as shown, and the zero-size arrays
    written as placeholders (plain names to `_Saved`); None when Orbax lays out its
    metadata otherwise."""
    try:
        metadata = checkpointer.metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        flat = jtu.tree_flatten_with_path(tree)[0]
    except Exception:  # noqa: BLE001  (another layout of the metadata)
        return None
    record = (getattr(metadata, "custom_metadata", None) or {}).get(_RECORD)
    shown = _shown_paths(record) if record else {}  # none before `save` wrote it
    empty = {
        tuple(names): _Saved(tuple(shape), jnp.dtype(dtype))
        for names, shape, dtype in (record or {}).get("empty", [])
    }
    return (
        tree,
        {_names(p): shown.get(_names(p), _orbax_shown(p)) for p, _ in flat},
        empty,
    )


def _orbax_shown(path) -> str:
    """A path of Orbax's metadata, shown as a model's would be: `.layers[0].weight`."""
    names = _names(path)
    parts = [
        f"[{n}]" if isinstance(k, jtu.SequenceKey) else f".{n}"
        for k, n in zip(path, names, strict=True)
    ]
    return "".join(parts) or "<root>"


def _fit(path, m, x, choice, tree) -> Recount | str | None:
    """How leaf `x` of `like` (as stored) takes the array of metadata `m` (see
    `classify`; `tree`: the tree `path` is in); metadata without a shape is left to
    Orbax."""
    if not hasattr(m, "shape"):
        return None
    if isinstance(m, _Saved) and math.prod(x.shape) == 0:
        return None  # zero-size both: made again, whatever the number of devices
    return classify(path, m.shape, getattr(m, "dtype", None), x, choice, tree)


def _read_as(x, r: Recount | None):
    """What Orbax reads for leaf `x`: itself, or for a recount, the saved array whole,
    replicated over `like`'s mesh."""
    if r is None:
        return x
    return jax.ShapeDtypeStruct(r.saved_shape, x.dtype, sharding=r.read_sharding())


def _names(path) -> tuple:
    """A key path as plain names, the way Orbax's metadata spells it."""
    out = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def _check_structure(saved: dict[tuple, str], like) -> None:
    """Raises unless the checkpoint's arrays (`saved`: their plain names to their paths
    as shown) are at the paths of `like`'s arrays, naming those that are not."""
    leaves = jtu.tree_flatten_with_path(like, is_leaf=_is_none)[0]
    in_like = {_names(p): (p, x) for p, x in leaves}
    bad = []
    for names, shown in saved.items():
        if names not in in_like:
            bad.append(f"{shown} is an array in the checkpoint but not in `like`")
        elif not _is_array_or_struct(x := in_like[names][1]):
            what = "None" if x is None else f"of type `{type(x).__name__}`"
            shown = path_name(in_like[names][0], like)
            bad.append(f"{shown} is an array in the checkpoint but {what} in `like`")
    bad += [
        f"{path_name(p, like)} is an array in `like` but not in the checkpoint"
        for names, (p, x) in in_like.items()
        if _is_array_or_struct(x) and names not in saved
    ]
    if bad:
        raise ValueError(
            "The checkpoint was saved from a tree of another structure than `like`: "
            f"{_listed(bad)}. {_REBUILD}"
        )


_REBUILD = (
    "Build `like` with the structure of the tree that was saved (for a model, the same "
    "constructor arguments, so that the same fields hold arrays and the same are None); "
    "to keep only some of the saved arrays, load into such a `like` and take them from "
    "the result."
)


def _is_none(x) -> bool:
    return x is None


def _checked(found: list) -> list:
    """The recounts among `found` (else None), once every mismatch has been raised."""
    _raise_mismatches([f for f in found if isinstance(f, str)])
    recounts = [f if isinstance(f, Recount) else None for f in found]
    refuse_unchosen_recounts(recounts)
    return recounts


def _load_equinox(path, target, choices, like):
    flat, treedef = jtu.tree_flatten_with_path(target)
    values: list = [None] * len(flat)
    found: list = [None] * len(flat)
    with open(_eqx_file(path), "rb") as f:
        for k in _file_order(f, flat, like):
            values[k], found[k] = _read(f, flat[k], choices[k], target)
    recounts = _checked(found)
    return treedef.unflatten(values), recounts


def _file_order(f, flat, like) -> list[int]:
    """The indices of `flat` (`like`'s arrays, as stored) in the order the file holds
    them, once the file is checked to hold `like`'s arrays; leaves `f` at its start."""
    record, end = _read_record(f)
    f.seek(0)
    if record is None:  # a file without paths: only their number can be checked
        _check_count(_count_arrays(f, end), len(flat))
        f.seek(0)
        return list(range(len(flat)))
    _check_structure(_shown_paths(record), like)
    index = {_names(p): k for k, (p, _) in enumerate(flat)}
    return [index[tuple(names)] for _, names in record["arrays"]]


def _count_arrays(f, end: int) -> int:
    """The number of arrays NumPy wrote in `f` before `end`, counted by their headers."""
    count = 0
    while f.tell() < end:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        f.seek(math.prod(shape) * dtype.itemsize, os.SEEK_CUR)
        count += 1
    return count


def _check_count(saved: int, wanted: int) -> None:
    if saved != wanted:
        raise ValueError(
            f"The checkpoint holds {saved} array{'s' * (saved != 1)} and `like` "
            f"{wanted}, so it was saved from a tree of another structure than `like`. "
            "Its file does not record the paths of its arrays (it was written by "
            "`eqx.tree_serialise_leaves`, or by an older `eqx_pmapstate.save`), so they "
            f"cannot be named. {_REBUILD}"
        )


def _read(f, leaf, choice, tree) -> tuple[jax.Array | None, Recount | str | None]:
    """The next array of `f`, put where leaf `x` of `like` (as stored) wants it, and how
    it fits (see `classify`; `tree`: the tree of `leaf`'s path); a mismatch is read but
    not kept."""
    path, x = leaf
    value = _as_dtype_of(np.load(f), x)
    fit = classify(path, value.shape, value.dtype, x, choice, tree)
    if isinstance(fit, str):
        return None, fit
    if fit is None and value.size == 0:
        value = np.zeros(x.shape, value.dtype)  # (saved for another number of devices)
    sharding = x.sharding if fit is None else fit.read_sharding()
    return jax.device_put(value, sharding), fit


def _numpy_names(dtype) -> bool:
    """Whether NumPy's file format names `dtype` so that it reads it back (not so for
    ml_dtypes' dtypes: bfloat16 is written as raw bytes, float8_e5m2 as `<f1`)."""
    dtype = np.dtype(dtype)
    try:
        descr = np.lib.format.dtype_to_descr(dtype)
        return np.lib.format.descr_to_dtype(descr) == dtype
    except (TypeError, ValueError):
        return False


def _write(f, x) -> None:
    """Writes one leaf with NumPy. A dtype NumPy cannot name in a file (ml_dtypes':
    bfloat16, float8, int4; it would write raw bytes, `|V2`, or a name it cannot read
    back) is written as its bits, an unsigned integer of as many bytes."""
    if isinstance(x, jax.Array) and not _numpy_names(x.dtype):
        itemsize = np.dtype(x.dtype).itemsize
        np.save(f, np.asarray(x).view(np.dtype(f"u{itemsize}")))
    else:
        eqx.default_serialise_filter_spec(f, x)


def _as_dtype_of(value: np.ndarray, x):
    """A value read for leaf `x` of `like`, whose dtype NumPy cannot name: its bits (an
    unsigned integer, as `_write` writes them, or raw bytes, as older files hold them)
    read as that dtype."""
    wanted = np.dtype(x.dtype)
    if not _numpy_names(wanted) and value.dtype.kind in "uV":
        if value.dtype.itemsize == wanted.itemsize:
            return value.view(wanted)
    return value


def _listed(bad: list[str]) -> str:
    """Descriptions of leaves for an error message, cut after six."""
    return "; ".join(bad[:6]) + (f"; and {len(bad) - 6} more" if len(bad) > 6 else "")


def _raise_mismatches(bad: list[str]) -> None:
    if bad:
        raise ValueError(
            f"The checkpoint does not fit `like`: {_listed(bad)}. Load it with a "
            "`like` of the tree it was saved from (the same model and states; a "
            "per-device leaf may have another number of devices, see `per_device`)."
        )
