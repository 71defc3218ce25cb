"""Walking a pytree state by state, with paths and enclosing objects."""

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.tree_util as jtu
import numpy as np

from ._state import State


class StateRef(NamedTuple):
    path: tuple
    state: Any  # a marker, or a bare array leaf
    ancestors: tuple  # enclosing objects, outermost first


def is_arraylike(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def iter_states(tree) -> Iterator[StateRef]:
    """Yields every state of `tree`: each outermost marker, and each array leaf outside any
    marker, in the order of `jax.tree_util.tree_flatten`."""

    def walk(node, path, ancestors):
        if isinstance(node, State) or is_arraylike(node):
            yield StateRef(path, node, ancestors)
            return
        children, _ = jtu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0][1] is node:
            return  # a non-array leaf
        inner = ancestors + (node,)
        for key, child in children:
            yield from walk(child, path + tuple(key), inner)

    if tree is None:
        return
    yield from walk(tree, (), ())


def keystr(path: tuple) -> str:
    """A path as it would be written after the tree's name: `.layers[0].weight`."""
    return jtu.keystr(path) if path else "<root>"


def paths_str(paths, limit: int = 6) -> str:
    """A list of paths for an error message, cut after `limit`."""
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def broadcast_prefix(prefix, tree) -> list:
    """A pytree prefix of `tree` (whose leaves are axes: ints, None, or anything that is a
    pytree leaf) as one entry per leaf of `tree`. Raises ValueError if it is no prefix."""
    if prefix is None or isinstance(prefix, int) or callable(prefix):
        return [prefix] * len(jtu.tree_leaves(tree))
    full = jtu.tree_map(
        lambda a, sub: jtu.tree_map(lambda _: a, sub),
        prefix,
        tree,
        is_leaf=lambda x: x is None,
    )
    return jtu.tree_leaves(full, is_leaf=lambda x: x is None)
