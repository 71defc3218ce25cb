"""Which batch axis each array made by this library carries.

A sharded array's device axis can be read off its `NamedSharding`; a stacked ensemble
made by `vmap2_new_states` lives on one device, so its axis is remembered here, by
weak reference, for `describe` and `states_by_axis`.
"""

import threading
import weakref

import jax

from ._jax_compat import Tracer
from ._mesh import read_axis


_lock = threading.Lock()
_axes: dict[int, tuple] = {}  # id(array) -> (weakref, axis, axis_name)


def _forget(key):
    with _lock:
        _axes.pop(key, None)


def register(compiled, out, axis_name) -> None:
    """Remembers the axis of every array `compiled` made in `out` (one device, no
    sharding to read it from)."""
    leaves = jax.tree_util.tree_leaves(out)
    for (kind, _, axis), leaf in zip(compiled.plan, leaves, strict=True):
        if kind not in ("array", "empty") or not isinstance(leaf, jax.Array):
            continue
        remember(leaf, axis, axis_name)


def remember(x, axis, axis_name=None) -> None:
    """Remembers the axis of one array (made on one device, like an ensemble's)."""
    if isinstance(x, Tracer):
        return
    key = id(x)
    try:
        ref = weakref.ref(x, lambda _, key=key: _forget(key))
    except TypeError:
        return
    with _lock:
        _axes[key] = (ref, axis, axis_name)


def lookup(x):
    """`(axis, axis_name)` for an array this library made, else None."""
    with _lock:
        entry = _axes.get(id(x))
    if entry is None or entry[0]() is not x:
        return None
    return entry[1], entry[2]


def leaf_axis(x):
    """The axis an array was laid out along: an int, None for replicated, or `UNKNOWN`
    for an array that is not laid out over a mapped axis."""
    known = lookup(x)
    if known is not None:
        return known[0]
    return read_axis(x)
