"""Seeing the layout of a distributed tree."""

from __future__ import annotations

import jax
import numpy as np

from ._mesh import _UNKNOWN, read_axis
from ._registry import lookup
from ._state import State
from ._tree import iter_states, keystr


def leaf_axis(x):
    """The axis an array was laid out along: an int, None for replicated, or `_UNKNOWN`
    for an array that is not laid out over a mapped axis."""
    known = lookup(x)
    if known is not None:
        return known[0]
    return read_axis(x)


def _per_device_shape(x) -> tuple:
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        return tuple(sharding.shard_shape(np.shape(x)))
    return tuple(np.shape(x))


def states_by_axis(tree) -> dict:
    """The layout of a tree made by this library, as brainstate's `pmap2_new_states`
    returns it: a dict from axis to the list of `(path, state)` laid out along it.

    **Arguments:**

    - `tree`: a pytree, typically the result of `pmap2_new_states`, `vmap2_new_states`
        or a `pmap2` step.

    **Returns:**

    A dict from axis (the position of the mapped axis in each array, an `int`, or `None`
    for replicated states) to a list of `(path, state)` pairs, where a state is a marker or
    a bare array leaf outside any marker. States whose arrays are not laid out over a
    mapped axis (leaves a module held before initialisation, for example) are not listed;
    [`eqx_pmapstate.describe`][] shows them.
    """
    out: dict = {}
    for ref in iter_states(tree):
        axes = [leaf_axis(x) for _, x in ref.leaves]
        axes = [a for a in axes if a is not _UNKNOWN]
        if not axes:
            continue
        out.setdefault(axes[0], []).append((ref.path, ref.state))
    return out


def describe(tree) -> str:
    """A table of the states of `tree`, one row per array: path, marker type, axis, global
    shape, per-device shape, dtype, and bytes per device.

    **Arguments:**

    - `tree`: any pytree.

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
    for ref in iter_states(tree):
        marker = type(ref.state).__name__ if isinstance(ref.state, State) else "-"
        for path, leaf in ref.leaves:
            axis = leaf_axis(leaf) if isinstance(leaf, jax.Array) else _UNKNOWN
            local = _per_device_shape(leaf)
            dtype = (
                np.dtype(leaf.dtype)
                if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                else leaf.dtype
            )
            itemsize = getattr(dtype, "itemsize", 0)
            nbytes = int(np.prod(local, dtype=np.int64)) * itemsize
            total += nbytes
            rows.append(
                (
                    keystr(path),
                    marker,
                    "-" if axis is _UNKNOWN else str(axis),
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
