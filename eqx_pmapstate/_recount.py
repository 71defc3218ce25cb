"""Loading a checkpoint made for another number of devices: a per-device leaf saved with
`n` entries along its device axis becomes the `m` entries of `like` as the user chooses
(`load(..., per_device=...)`); replicated leaves are read as they are."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from ._mesh import read_axis
from ._one_device import check_index, check_mean, refuse_unchosen
from ._tree import path_name, paths_str


ALLOWED = ("first", "index", "mean", "leading", "regroup", "callable")


class Recount(NamedTuple):
    """A per-device leaf of `like` saved for another number of devices."""

    path: tuple
    axis: int  # its device axis
    saved: int  # its entries on disk
    wanted: int  # its entries in `like`
    choice: Any
    sharding: NamedSharding  # `like`'s
    saved_shape: tuple  # the whole shape on disk
    tree: Any = None  # the tree `path` is in, to name it in messages

    def read_sharding(self) -> NamedSharding:
        """Where the saved entries are read to: replicated over `like`'s mesh."""
        return NamedSharding(self.sharding.mesh, P())


def classify(path, shape, dtype, x, choice, tree) -> Recount | str | None:
    """How leaf `x` of `like` (as stored) takes the array of `shape` and `dtype` on
    disk: `None` as it is, a `Recount` if it is a per-device leaf saved for another number
    of devices, or the description of a mismatch. `tree`: the tree `path` is in."""
    shape = tuple(shape)
    same_dtype = dtype is None or np.dtype(dtype) == x.dtype
    if shape == tuple(x.shape) and same_dtype:
        return None
    if same_dtype and 0 in shape and 0 in tuple(x.shape) and len(shape) == x.ndim:
        return None  # no element either way: made again in `like`'s shape

    axis = read_axis(x)
    if same_dtype and isinstance(axis, int) and len(shape) == len(x.shape):
        others = [k for k in range(len(shape)) if shape[k] != x.shape[k]]
        regroup = choice == "regroup" and axis == 0  # `zero`'s slices: (n, k)
        if others == [axis] or (regroup and 0 in others):
            r = Recount(
                path, axis, shape[axis], x.shape[axis], choice, x.sharding, shape, tree
            )
            return r
    on_disk = f"{np.dtype(dtype) if dtype is not None else '?'}{list(shape)}"
    return (
        f"{path_name(path, tree)} ({on_disk} on disk, {x.dtype}{list(x.shape)} in "
        "`like`)"
    )


def refuse_unchosen_recounts(recounts) -> None:
    unchosen = [r for r in recounts if r is not None and r.choice is None]
    if unchosen:
        r = unchosen[0]
        refuse_unchosen(
            [r.path for r in unchosen],
            ALLOWED,
            "load",
            f"the checkpoint was made for another number of devices: it has {r.saved} "
            f"entries along their device axis, and `like` {r.wanted}",
            r.tree,
        )


def refuse_abstract_meshes(flat, tree) -> None:
    """A `like` laid out over a mesh without devices (`eval_new_states` for more devices
    than this process has) cannot receive arrays. `flat`: `tree` flattened with paths."""
    bad = [
        (path_name(p, tree), x.sharding.mesh.size)
        for p, x in flat
        if isinstance(getattr(x, "sharding", None), NamedSharding)
        and isinstance(x.sharding.mesh, AbstractMesh)
    ]
    if bad:
        raise ValueError(
            f"The leaves at {paths_str(p for p, _ in bad)} of `like` are laid out over "
            f"{bad[0][1]} devices that are not here (`eval_new_states` with an "
            f"`axis_size` larger than the {jax.local_device_count()} local devices): "
            "such a layout describes a checkpoint, but cannot receive its arrays. Load "
            "into a `like` made for the devices you have (`eval_new_states` without "
            "`axis_size`), with `per_device=` saying what the per-device leaves become."
        )


def _regrouped(value, shape: tuple):
    """The saved entries in device order, flattened, then cut or padded with zeros and
    split into `shape`: the slices of `zero`'s optimizer state (each parameter's
    elements, flattened, padded to a multiple of the device count, split over the
    devices) for another device count. The elements past the parameter's size are
    padding, which `zero` never reads."""
    flat = jnp.reshape(value, (-1,))
    size = int(np.prod(shape))
    if flat.shape[0] >= size:
        flat = flat[:size]
    else:
        flat = jnp.pad(flat, (0, size - flat.shape[0]))
    return jnp.reshape(flat, shape)


def recount(value, r: Recount, like):
    """The saved per-device leaf `value` (its `r.saved` entries along `r.axis`) as the
    entries of `like`, laid out as `like`."""
    m = r.wanted
    if r.choice == "regroup":
        out = _regrouped(value, like.shape)
    elif r.choice == "leading":
        if m > r.saved:
            raise ValueError(
                f"`per_device='leading'` keeps the first {m} of the entries of the leaf "
                f"at {path_name(r.path, r.tree)}, but the checkpoint has only "
                f"{r.saved}. Choose 'first', 'mean', an index or a callable for it."
            )
        out = jax.lax.slice_in_dim(value, 0, m, axis=r.axis)
    elif callable(r.choice) and not isinstance(r.choice, str):
        made = r.choice(jnp.moveaxis(value, r.axis, 0))
        out = jnp.moveaxis(jnp.asarray(made), 0, r.axis)
        if out.shape != like.shape or out.dtype != like.dtype:
            raise ValueError(
                f"The `per_device` callable made {out.dtype}{list(out.shape)} (device "
                f"axis at {r.axis}) for the leaf at {path_name(r.path, r.tree)}, but "
                "`like` has "
                f"{like.dtype}{list(like.shape)}: from the saved entries, device axis "
                f"first ({r.saved}, ...), it must return the new ({m}, ...)."
            )
    else:
        if r.choice == "mean":
            check_mean(r.path, like.dtype, r.tree)
            one = jnp.mean(value, axis=r.axis, keepdims=True).astype(like.dtype)
        else:
            choice = 0 if r.choice == "first" else int(r.choice)
            index = check_index(r.path, choice, r.saved, r.tree)
            one = jax.lax.index_in_dim(value, index, axis=r.axis, keepdims=True)
        out = jnp.repeat(one, m, axis=r.axis)
    return jax.device_put(out, r.sharding)
