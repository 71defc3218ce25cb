"""Checkpoints that restore straight into the layout: `save` and `load`.

With Orbax (`orbax-checkpoint`, the `checkpoint` extra) a checkpoint is a directory, and
every process writes and reads only its own shards: loading creates each array with its
final sharding. Without it, `equinox.tree_serialise_leaves` writes one file, and loading
reads each array on the host and puts it straight into its sharding (never whole on one
device). Orbax is required with several processes. Only arrays are stored; everything
else (static fields, functions, the tree's structure) comes from `like` when loading.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

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
        with Equinox's serialisation.
    - `tree`: any pytree, typically a model made by `pmap2_new_states` or a training
        state. Its arrays are written with their values; the rest is not stored.
    - `backend`: `"orbax"`, `"equinox"`, or `"auto"` (Orbax when it is installed).

    **Returns:**

    Nothing. With Orbax, the checkpoint is complete (committed) when `save` returns.
    """
    kind = _backend(path, backend, saving=True)
    arrays = jtu.tree_map(lambda x: _stored(x, kind), eqx.filter(tree, eqx.is_array))
    if kind == "orbax":
        ocp = _orbax()
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.abspath(os.fspath(path)), arrays)
        checkpointer.wait_until_finished()
    else:
        eqx.tree_serialise_leaves(pathlib.Path(path), arrays, filter_spec=_write)


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

    A checkpoint made for another number of devices loads into a `like` made for the
    devices you have: replicated leaves are read as they are, and each per-device leaf
    (saved with `n` entries along its device axis, `m` in `like`) becomes what
    `per_device` says.

    **Arguments:**

    - `path`: the checkpoint.
    - `like`: a tree laid out as wanted: the model as `pmap2_new_states` made it, or
        [`eqx_pmapstate.abstract`][] of it, or
        [`eqx_pmapstate.eval_new_states`][] (nothing is computed to get it). Static
        fields and the tree's structure come from it.
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

    `ValueError` naming the leaves whose shape or dtype on disk differs from `like`'s
    (other than in the number of devices), the per-device leaves of a checkpoint made for
    another number of devices when `per_device` is not given, and a `like` laid out for
    devices that are not here.
    """
    kind = _backend(path, backend, saving=False)
    like_arrays = eqx.filter(like, _is_array_or_struct)
    spec = abstract(like_arrays)
    refuse_abstract_meshes(jtu.tree_flatten_with_path(spec)[0], spec)
    choices = leaf_choices(per_device, spec, ALLOWED, "load")
    target = jtu.tree_map(lambda x: _stored_like(x, kind), spec)
    if kind == "orbax":
        arrays, recounts = _load_orbax(path, target, choices)
    else:
        arrays, recounts = _load_equinox(path, target, choices)
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


def _load_orbax(path, target, choices):
    ocp = _orbax()
    checkpointer = ocp.StandardCheckpointer()
    path = os.path.abspath(os.fspath(path))
    recounts = _check_orbax_shapes(checkpointer, path, target, choices)
    flat, treedef = jtu.tree_flatten(target)
    flat = [
        x
        if r is None
        else jax.ShapeDtypeStruct(
            _saved_shape(x, r), x.dtype, sharding=r.read_sharding()
        )
        for x, r in zip(flat, recounts)
    ]
    return checkpointer.restore(path, treedef.unflatten(flat)), recounts


def _saved_shape(x, r) -> tuple:
    return r.saved_shape


def _names(path) -> tuple:
    """A key path as plain names, the way Orbax's metadata spells it."""
    out = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def _check_orbax_shapes(checkpointer, path, target, choices) -> list:
    """Per leaf of `target`, `None` (read as it is) or a `Recount` (a per-device leaf
    saved for another number of devices); names the leaves whose stored shape or dtype
    differs otherwise (Orbax's own error gives the shapes only). Leaves it cannot pair
    up are left to Orbax."""
    flat = jtu.tree_flatten_with_path(target)[0]
    try:
        stored = checkpointer.metadata(path)
        stored = getattr(stored, "item_metadata", stored)
        stored = getattr(stored, "tree", stored)
        on_disk = {_names(p): m for p, m in jtu.tree_flatten_with_path(stored)[0]}
    except Exception:  # noqa: BLE001  (another layout of the metadata: Orbax checks)
        return [None] * len(flat)
    found = []
    for (p, x), choice in zip(flat, choices, strict=True):
        m = on_disk.get(_names(p))
        if m is None or not hasattr(m, "shape"):
            found.append(None)
        else:
            found.append(
                classify(p, m.shape, getattr(m, "dtype", None), x, choice, target)
            )
    return _checked(found)


def _checked(found: list) -> list:
    """The recounts among `found` (else None), once every mismatch has been raised."""
    _raise_mismatches([f for f in found if isinstance(f, str)])
    recounts = [f if isinstance(f, Recount) else None for f in found]
    refuse_unchosen_recounts(recounts)
    return recounts


def _load_equinox(path, target, choices):
    flat = jtu.tree_flatten_with_path(target)[0]
    at = iter(zip(flat, choices, strict=True))
    found: list = []

    def read(f, x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return eqx.default_deserialise_filter_spec(f, x)
        (p, _), choice = next(at)
        value = _as_dtype_of(np.load(f), x)
        found.append(classify(p, value.shape, value.dtype, x, choice, target))
        if found[-1] is None:
            return jax.device_put(value, x.sharding)
        if isinstance(found[-1], Recount):
            # Equinox wants an array of `like`'s shape here: the value is kept aside
            recounted[len(found) - 1] = jax.device_put(value, found[-1].read_sharding())
            return jnp.zeros(x.shape, x.dtype)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)  # reported below

    recounted: dict[int, jax.Array] = {}
    try:
        out = eqx.tree_deserialise_leaves(pathlib.Path(path), target, filter_spec=read)
    except RuntimeError:
        _raise_mismatches([f for f in found if isinstance(f, str)])
        raise
    recounts = _checked(found)
    leaves, treedef = jtu.tree_flatten(out)
    leaves = [recounted.get(k, x) for k, x in enumerate(leaves)]
    return treedef.unflatten(leaves), recounts


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


def _raise_mismatches(bad: list[str]) -> None:
    if bad:
        shown = "; ".join(bad[:6]) + (
            f"; and {len(bad) - 6} more" if len(bad) > 6 else ""
        )
        raise ValueError(
            f"The checkpoint does not fit `like`: {shown}. Load it with a `like` of the "
            "tree it was saved from (the same model and states; a per-device leaf may "
            "have another number of devices, see `per_device`)."
        )
