"""Walking a pytree state by state, with paths and enclosing objects."""

from collections.abc import Iterator
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._state import NonBatchState, State


class StateRef(NamedTuple):
    """One state of a tree.

    - `path`: its key path from the root.
    - `state`: a marker, or a bare array leaf outside any marker.
    - `ancestors`: the objects that enclose it, outermost first.
    - `leaves`: `(path, array)` for each array that belongs to it: every array in the
        marker, except those inside a `NonBatchState` nested in it (a state of its own).
    """

    path: tuple
    state: Any
    ancestors: tuple
    leaves: tuple


def is_arraylike(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _children(node) -> list | None:
    """One level of `node`'s pytree children, as `(key, child)`; None for a leaf."""
    children, _ = jtu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0][1] is node:
        return None
    return children


def _marker_refs(marker, path, ancestors) -> Iterator[StateRef]:
    own, nested = [], []

    def collect(node, p, anc):
        if isinstance(node, NonBatchState) and node is not marker:
            nested.append((node, p, anc))  # a state of its own
        elif is_arraylike(node):
            own.append((p, node))
        else:
            for key, child in _children(node) or ():
                collect(child, p + tuple(key), anc + (node,))

    collect(marker, path, ancestors)
    yield StateRef(path, marker, ancestors, tuple(own))
    for node, p, anc in nested:
        yield from _marker_refs(node, p, anc)


def iter_states(tree) -> Iterator[StateRef]:
    """Yields every state of `tree`: each outermost marker (and each `NonBatchState`
    nested inside a marker), and each array leaf outside any marker, in the order of
    `jax.tree_util.tree_flatten`."""

    def walk(node, path, ancestors):
        if isinstance(node, State):
            yield from _marker_refs(node, path, ancestors)
            return
        if is_arraylike(node):
            yield StateRef(path, node, ancestors, ((path, node),))
            return
        inner = ancestors + (node,)
        for key, child in _children(node) or ():  # none: a non-array leaf
            yield from walk(child, path + tuple(key), inner)

    if tree is None:
        return
    yield from walk(tree, (), ())


def keystr(path: tuple) -> str:
    """A path as it would be written after the tree's name: `.layers[0].weight`."""
    return jtu.keystr(path) if path else "<root>"


def state_entry(marker, index: int) -> str:
    """How entry `index` of an `eqx.nn.State` is written in a path (JAX keys it
    `[<flat index k>]`): by the layer `eqx.nn.make_with_state` recorded as its marker,
    `[Net.bn.batch_counter]`; by its position where the marker is no name."""
    return f"[{marker}]" if isinstance(marker, str) else f"[{index}]"


_MISSING = object()
_LEAF = object()


def _child(node, key):
    for k, child in _children(node) or ():
        if k == (key,):
            return child
    return _MISSING


def path_name(path: tuple, tree: Any = None) -> str:
    """A path for a message, as `keystr` writes it, except that the entries of an
    `eqx.nn.State` are named as `describe` names them (`state_entry`):
    `[Net.bn.batch_state_index][0]`, not `[<flat index 1>][0]`.

    `tree` is the tree the path is in, or its structure (a `PyTreeDef`); the names are
    read off the `eqx.nn.State`s along the path, so only a path with a flat-index key is
    walked, and only when a message is written. Without `tree`, or for a path not in it,
    as `keystr`."""
    if tree is None or not any(isinstance(k, jtu.FlattenedIndexKey) for k in path):
        return keystr(path)
    if isinstance(tree, jtu.PyTreeDef):
        # Any leaves will do (as when `jax.vmap` reads `in_axes`): only nodes are read.
        tree = tree.unflatten([_LEAF] * tree.num_leaves)
    parts, node = [], tree
    for key in path:
        if isinstance(node, eqx.nn.State) and isinstance(key, jtu.FlattenedIndexKey):
            values, markers = node.tree_flatten()
            if not 0 <= key.key < len(values):
                return keystr(path)
            parts.append(state_entry(markers[key.key], key.key))
            node = values[key.key]
            continue
        node = _child(node, key)
        if node is _MISSING:
            return keystr(path)
        parts.append(str(key))
    return "".join(parts)


def paths_str(paths, limit: int = 6) -> str:
    """A list of paths for an error message, cut after `limit`."""
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _is_none(x) -> bool:
    return x is None


def prefix_mismatch(prefix, tree) -> str | None:
    """Where `prefix` (as `broadcast_prefix` reads it) stops being a prefix of `tree`,
    in words: "at [0][1], a tuple of 2 entries where the tree has a tuple of 3"; None
    if it is one."""
    found = _mismatch(prefix, tree, ())
    if found is None:
        return None
    path, mine, theirs = found
    where = jtu.keystr(path) if path else "the top"
    return f"at {where}, {mine} where the tree has {theirs}"


def _mismatch(prefix, tree, path: tuple):
    if jtu.treedef_is_leaf(jtu.tree_structure(prefix, is_leaf=_is_none)):
        return None  # an axis: it covers whatever is below
    mine, theirs = _children(prefix) or [], _children(tree) or []
    if _shape(prefix) != _shape(tree):
        return path, _kind(prefix, mine), _kind(tree, theirs)
    for (keys, p), (_, t) in zip(mine, theirs, strict=True):
        found = _mismatch(p, t, (*path, *keys))
        if found is not None:
            return found
    return None


def _shape(x):
    """`x`'s node, one level down (its type, keys or length)."""
    return jtu.tree_structure(
        jtu.tree_map(lambda _: 0, x, is_leaf=lambda y: y is not x)
    )


def _kind(x, children: list) -> str:
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(str, x))}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(children)} entries"
    if x is None:
        return "None (no leaves)"
    if is_arraylike(x):
        return "an array"
    return f"a {type(x).__name__}"


def broadcast_prefix(prefix, tree) -> list:
    """A pytree prefix of `tree` whose leaves are axes (ints, None, or callables of a
    leaf) as one entry per leaf of `tree`. A `None` in the prefix is an axis; a `None` in
    `tree` (an empty field) has no leaves, so it takes no entry. Raises ValueError if
    `prefix` is no prefix of `tree`."""
    if jtu.treedef_is_leaf(jtu.tree_structure(prefix, is_leaf=_is_none)):
        return [prefix] * len(jtu.tree_leaves(tree))
    structure = jtu.tree_structure(prefix, is_leaf=_is_none)
    subtrees = structure.flatten_up_to(tree)
    axes = jtu.tree_leaves(prefix, is_leaf=_is_none)
    out: list = []
    for axis, sub in zip(axes, subtrees, strict=True):
        out.extend([axis] * len(jtu.tree_leaves(sub)))
    return out
