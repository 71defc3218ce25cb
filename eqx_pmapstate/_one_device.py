"""Taking a tree out of the layout: `to_one_device`, and the choices of what a per-device
leaf becomes (shared with `load` into another number of devices)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._mesh import read_axis, UNKNOWN
from ._tree import broadcast_prefix, path_name, paths_str


_NAMES = {
    "first": "'first' (the first device's entry)",
    "mean": "'mean' (the mean over the devices; floating point only)",
    "index": "an index (that device's entry)",
    "whole": "'whole' (the array with its device axis, on one device)",
    "leading": "'leading' (the first entries, as many as there are devices now)",
    "regroup": "'regroup' (`zero`'s optimizer state: its slices split again)",
    "callable": "a callable of the array with its device axis first",
}


def choices_text(allowed: Sequence[str]) -> str:
    """The choices of `per_device`, for an error message."""
    return ", ".join(_NAMES[a] for a in allowed)


def _valid(choice, allowed: Sequence[str]) -> bool:
    if choice is None or (callable(choice) and not isinstance(choice, str)):
        return True
    if isinstance(choice, str):
        return choice in allowed
    return isinstance(choice, (int, np.integer)) and not isinstance(choice, bool)


def leaf_choices(per_device, tree, allowed: Sequence[str], what: str) -> list:
    """One choice per leaf of `tree`, from `per_device`: one choice, or a pytree prefix
    of `tree` of choices (`None`: none made)."""
    try:
        choices = broadcast_prefix(per_device, tree)
    except ValueError:
        raise ValueError(
            f"`per_device` of `{what}` must be one choice or a pytree prefix of the tree "
            f"with one choice per subtree, but its structure does not match the tree's: "
            f"{jtu.tree_structure(per_device)}."
        ) from None
    for choice in choices:
        if not _valid(choice, allowed):
            raise TypeError(
                f"`per_device` of `{what}` takes {choices_text(allowed)}, but got "
                f"{choice!r}."
            )
    return choices


def refuse_unchosen(
    paths, allowed: Sequence[str], what: str, why: str, tree: Any = None
) -> None:
    """The error for per-device leaves for which no choice was made. `tree`: the tree
    the paths are in (see `_tree.path_name`)."""
    if paths:
        raise ValueError(
            f"The leaves at {paths_str(path_name(p, tree) for p in paths)} are per "
            f"device (one entry per device along their device axis), and {why}. Say "
            f"what each becomes with `{what}(..., per_device=...)`: "
            f"{choices_text(allowed)}; or a pytree prefix of the tree giving each part "
            "its own choice."
        )


def check_mean(path, dtype, tree: Any = None) -> None:
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"`per_device='mean'` averages floating-point leaves only, but the leaf at "
            f"{path_name(path, tree)} is {dtype}. Choose 'first' or an index for it (a pytree "
            "prefix as `per_device` gives each part of the tree its own choice)."
        )


def check_index(path, index: int, n: int, tree: Any = None) -> int:
    if not -n <= index < n:
        raise ValueError(
            f"`per_device={index}` is out of range for the leaf at "
            f"{path_name(path, tree)}, which has {n} entries along its device axis."
        )
    return int(index) % n


def to_one_device(
    tree: Any,
    per_device: Any = None,
    *,
    device: Any = None,
) -> Any:
    """Takes a laid-out tree out of the layout: an ordinary tree whose arrays are all on
    one device, to evaluate, export or serialise without the mesh.

    Each replicated array is copied from a shard this process holds (no communication).
    Each per-device array (one entry per device along its device axis, wherever that
    axis is) becomes what `per_device` says. Arrays not laid out over a one-dimensional
    mesh are copied whole. Other leaves (NumPy arrays too) are kept as they are.

    **Arguments:**

    - `tree`: a pytree, typically made by `pmap2_new_states` or returned by a `pmap2`
        step.
    - `per_device`: what a per-device array becomes: `"first"` (the first device's
        entry, taken from its shard), an index (that device's entry), `"mean"` (the mean
        over the devices; floating-point arrays only), `"whole"` (the array with its
        device axis, now on one device), or a callable, given the array with its device
        axis first, whose result is the leaf. One choice for every leaf, or a pytree
        prefix of `tree` (as `in_axes`), each subtree with its own. By default (`None`)
        a tree with per-device arrays is refused, naming them: only you know whether a
        BatchNorm statistic should be averaged or a counter taken from one device.
    - `device`: where the arrays go: a device of this process (by default, the first
        local device).

    **Returns:**

    `tree` with every `jax.Array` on `device` alone (no mesh): usable by
    `eqx.filter_jit`, `eqx.tree_serialise_leaves`, and [`eqx_pmapstate.relayout`][]
    back into the layout (with `per_device="whole"`, or when nothing is per device).
    With several processes, every process gets the same tree (per-device arrays whose
    entries live on other processes are gathered: every process must call it).

    **Raises:**

    `ValueError` naming the per-device leaves when no choice is made for them, a leaf
    `"mean"` cannot average, or an index out of range; `TypeError` for a choice it does
    not know.
    """
    what = "to_one_device"
    device = _check_device(device)
    allowed = ("first", "index", "mean", "whole", "callable")
    flat, treedef = jtu.tree_flatten_with_path(tree)
    choices = leaf_choices(per_device, tree, allowed, what)
    axes = [read_axis(x) if isinstance(x, jax.Array) else UNKNOWN for _, x in flat]
    unchosen = [
        p
        for (p, _), a, c in zip(flat, axes, choices)
        if isinstance(a, int) and c is None
    ]
    refuse_unchosen(
        unchosen, allowed, what, "one device can hold only one value for each", tree
    )
    out = [
        _one(path, x, axis, choice, device, tree)
        for (path, x), axis, choice in zip(flat, axes, choices)
    ]
    return treedef.unflatten(out)


def _check_device(device):
    if device is None:
        return jax.local_devices()[0]
    if not isinstance(device, jax.Device):
        raise TypeError(
            f"`device` must be a `jax.Device` (for example `jax.local_devices()[0]`), "
            f"but got {device!r}."
        )
    if device.process_index != jax.process_index():
        raise ValueError(
            f"`device` must be a device of this process, but {device} belongs to "
            f"process {device.process_index}: pass one of `jax.local_devices()`."
        )
    return device


def _one(path, x, axis, choice, device, tree):
    if not isinstance(x, jax.Array):
        return x
    if axis is None:
        return _local_copy(x, device)
    if axis is UNKNOWN or choice == "whole":
        return _whole(x, device)
    if choice == "mean":
        check_mean(path, x.dtype, tree)
        return jnp.mean(_whole(x, device), axis=axis).astype(x.dtype)
    if callable(choice):
        return jax.device_put(choice(jnp.moveaxis(_whole(x, device), axis, 0)), device)
    index = check_index(path, 0 if choice == "first" else choice, x.shape[axis], tree)
    return _entry(x, axis, index, device)


def _local_copy(x, device):
    """A replicated array from one of this process's shards (on `device` if it holds
    one), with no communication."""
    shards = x.addressable_shards
    shard = next((s for s in shards if s.device == device), shards[0])
    return jax.device_put(shard.data, device)


def _entry(x, axis: int, index: int, device):
    """Entry `index` along `axis`, from the shard that holds it when this process has it
    (else gathered: every process takes the same path)."""
    if x.is_fully_addressable:
        for shard in x.addressable_shards:
            start, stop, _ = shard.index[axis].indices(x.shape[axis])
            if start <= index < stop:
                data = jax.device_put(shard.data, device)
                return jnp.take(data, index - start, axis=axis)
    return jnp.take(_whole(x, device), index, axis=axis)


def _whole(x, device):
    """The whole array on `device`: moved there from this process's shards, or, when
    other processes hold some, gathered from every process first."""
    if x.is_fully_addressable:
        return jax.device_put(x, device)
    from jax.experimental import multihost_utils

    key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(x) if key else x
    value = jax.device_put(multihost_utils.process_allgather(data, tiled=True), device)
    return (
        jax.random.wrap_key_data(value, impl=jax.random.key_impl(x)) if key else value
    )
