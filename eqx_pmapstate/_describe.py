"""Seeing the layout of a distributed tree."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._mesh import UNKNOWN
from ._registry import leaf_axis
from ._state import State
from ._tree import broadcast_prefix, iter_states, keystr, state_entry


# What has a layout to read: arrays, and the abstract ones of `abstract`/`eval_new_states`.
_LAID_OUT = (jax.Array, jax.ShapeDtypeStruct)


def axes_of(tree):
    """The axis of every array of `tree`, as a tree of the same structure.

    Useful as `in_axes` of `eqx.filter_vmap` or `jax.vmap` over an ensemble made by
    [`eqx_pmapstate.vmap2_new_states`][] (its member axes are not written in the arrays,
    which live on one device), and as `axes=` of [`eqx_pmapstate.describe`][] and
    [`eqx_pmapstate.states_by_axis`][] once a step has replaced the arrays: take it from
    the ensemble before training.

    **Arguments:**

    - `tree`: a pytree, typically made by `pmap2_new_states` or `vmap2_new_states`.

    **Returns:**

    `tree` with each array replaced by its axis (an `int`), and `None` for replicated
    arrays, arrays not laid out over a mapped axis, and non-array leaves.
    """

    def axis(x):
        if not isinstance(x, _LAID_OUT):
            return None
        found = leaf_axis(x)
        return None if found is UNKNOWN else found

    return jtu.tree_map(axis, tree)


def _axis_lookup(tree, axes):
    """A function from an array leaf's path to its axis: from `axes` (a pytree prefix of
    `tree`) when given, else from the array itself."""
    if axes is None:
        return lambda path, x: leaf_axis(x) if isinstance(x, _LAID_OUT) else UNKNOWN
    flat = jtu.tree_flatten_with_path(tree)[0]
    given = dict(zip((p for p, _ in flat), broadcast_prefix(axes, tree)))
    return lambda path, x: given.get(path, UNKNOWN)


def _shown_paths(tree) -> dict:
    """A readable name for the path of every leaf: the entries of an `eqx.nn.State`
    (keyed by JAX as `<flat index k>`) are named by their layer, as
    `eqx.nn.make_with_state` records it (`[Net.norm.ema_state_index]`). In one walk of
    the tree; a message names a path as this does with `_tree.path_name`."""
    names: dict = {}

    def walk(node, path, shown):
        if isinstance(node, eqx.nn.State):
            values, markers = node.tree_flatten()
            for i, (value, marker) in enumerate(zip(values, markers)):
                label = state_entry(marker, i)
                walk(value, path + (jtu.FlattenedIndexKey(i),), shown + label)
            return
        children, _ = jtu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0][1] is node:
            names[path] = shown or "<root>"
            return
        for key, child in children:
            walk(child, path + tuple(key), shown + jtu.keystr(tuple(key)))

    walk(tree, (), "")
    return names


def _per_device_shape(x) -> tuple:
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        return tuple(sharding.shard_shape(np.shape(x)))
    return tuple(np.shape(x))


def states_by_axis(tree, axes=None) -> dict:
    """The layout of a tree made by this library, as brainstate's `pmap2_new_states`
    returns it: a dict from axis to the list of `(path, state)` laid out along it.

    **Arguments:**

    - `tree`: a pytree, typically the result of `pmap2_new_states`, `vmap2_new_states`
        or a `pmap2` step.
    - `axes`: the axes, as [`eqx_pmapstate.axes_of`][] gives them (or a pytree prefix of
        `tree`); by default they are read off each array's layout (or, for an ensemble
        made by `vmap2_new_states`, remembered for the arrays it made).

    **Returns:**

    A dict from axis (the position of the mapped axis in each array, an `int`, or `None`
    for replicated states) to a list of `(path, state)` pairs, where a state is a marker or
    a bare array leaf outside any marker. States whose arrays are not laid out over a
    mapped axis (leaves a module held before initialisation, for example) are not listed;
    [`eqx_pmapstate.describe`][] shows them.
    """
    axis_of = _axis_lookup(tree, axes)
    out: dict = {}
    for ref in iter_states(tree):
        found = [axis_of(p, x) for p, x in ref.leaves]
        found = [a for a in found if a is not UNKNOWN]
        if found:
            out.setdefault(found[0], []).append((ref.path, ref.state))
    return out


def describe(tree, axes=None) -> str:
    """A table of the states of `tree`, one row per array: path, marker type, axis, global
    shape, per-device shape, dtype, and bytes per device.

    **Arguments:**

    - `tree`: any pytree.
    - `axes`: as for [`eqx_pmapstate.states_by_axis`][].

    **Returns:**

    The table, as a string ready to print. The axis column shows the position of the mapped
    axis, `None` for replicated arrays, and `-` for arrays not laid out over a mapped axis.
    """
    rows = [
        (
            "path",
            "marker",
            "axis",
            "global shape",
            "per-device shape",
            "dtype",
            "bytes/device",
        )
    ]
    total = 0
    axis_of = _axis_lookup(tree, axes)
    shown = _shown_paths(tree)
    for ref in iter_states(tree):
        marker = type(ref.state).__name__ if isinstance(ref.state, State) else "-"
        for path, leaf in ref.leaves:
            axis = axis_of(path, leaf)
            local = _per_device_shape(leaf)
            dtype = (
                np.dtype(leaf.dtype)
                if not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                else leaf.dtype
            )
            itemsize = getattr(dtype, "itemsize", 0)
            nbytes = int(np.prod(local, dtype=np.int64)) * itemsize
            total += nbytes
            rows.append(
                (
                    shown.get(path, keystr(path)),
                    marker,
                    "-" if axis is UNKNOWN else str(axis),
                    str(tuple(np.shape(leaf))),
                    str(local),
                    str(dtype),
                    f"{nbytes:,}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 6}
    lines = []
    for k, r in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"{len(rows) - 1} array(s), {total:,} bytes per device")
    return "\n".join(lines)
