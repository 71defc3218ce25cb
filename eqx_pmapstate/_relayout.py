"""The layout as a value: abstract trees, and putting arrays into a given layout."""

from __future__ import annotations

import jax
import jax.tree_util as jtu
import numpy as np

from ._mesh import put_global
from ._registry import lookup, remember
from ._tree import path_name, paths_str


def abstract(tree):
    """The layout of `tree` as a value: each array replaced by a `jax.ShapeDtypeStruct`
    with its shape, dtype and sharding.

    This is what Orbax restores into (`StandardCheckpointer.restore(path, abstract(tree))`),
    and what [`eqx_pmapstate.relayout`][] takes as `like`.

    **Arguments:**

    - `tree`: a pytree, typically made by `pmap2_new_states` or a `pmap2` step.

    **Returns:**

    `tree` with every array replaced by a `jax.ShapeDtypeStruct` (`sharding` set); other
    leaves unchanged.
    """

    def to_struct(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jtu.tree_map(to_struct, tree)


def _shape_dtype(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not jax.numpy.issubdtype(dtype, jax.dtypes.extended):
        dtype = np.dtype(dtype)  # (a PRNG key's dtype is no NumPy dtype)
    return tuple(np.shape(x)), dtype


def relayout(tree, like):
    """Puts the arrays of `tree` into the layout of `like`, leaf by leaf.

    For a model restored from a file (`eqx.tree_deserialise_leaves` gives arrays on one
    device), moved from another mesh, or given as host arrays: each array goes to the
    sharding of the matching leaf of `like` (an array or a `jax.ShapeDtypeStruct` with a
    sharding), so that `pmap2` sees the layout it was made with. The arrays themselves are
    not changed.

    **Arguments:**

    - `tree`: the arrays to lay out; the same tree structure as `like`.
    - `like`: a tree laid out as wanted: the model as `pmap2_new_states` made it, or
        [`eqx_pmapstate.abstract`][] of it.

    **Returns:**

    `tree` with each array laid out like its counterpart in `like`.

    **Raises:**

    `ValueError` naming the leaves whose shape or dtype differs from `like`'s, or when the
    tree structures differ.
    """
    flat, treedef = jtu.tree_flatten_with_path(tree)
    like_flat, like_def = jtu.tree_flatten_with_path(like)
    if treedef != like_def:
        raise ValueError(
            "`relayout` needs `tree` and `like` of the same structure, but they differ: "
            f"{treedef} against {like_def}."
        )
    bad = [
        f"{path_name(p, tree)} ({_describe_leaf(x)} against {_describe_leaf(y)})"
        for (p, x), (_, y) in zip(flat, like_flat)
        if _is_array(x) and _is_array(y) and _shape_dtype(x) != _shape_dtype(y)
    ]
    if bad:
        raise ValueError(
            f"The leaves at {paths_str(bad)} do not fit the layout they are to take: "
            "each array must have the shape and dtype of the leaf of `like`. (A checkpoint "
            "made for another number of devices has another device axis length.)"
        )
    leaves = [
        _put(x, y) if _is_array(x) and _is_array(y) else x
        for (_, x), (_, y) in zip(flat, like_flat)
    ]
    return treedef.unflatten(leaves)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _describe_leaf(x) -> str:
    shape, dtype = _shape_dtype(x)
    return f"{dtype}{list(shape)}"


def _put(x, like):
    sharding = getattr(like, "sharding", None)
    out = put_global(x, sharding) if sharding is not None else jax.numpy.asarray(x)
    known = lookup(like) if isinstance(like, jax.Array) else None
    if known is not None:  # an ensemble's member axis, not written in its sharding
        remember(out, *known)
    return out
