"""The flat leaves of the modules a `pmap2` function returned, for the next call.

In a training loop, `model, opt_state, loss = step(model, opt_state, x, y)`, the model
a call receives is the very object the previous call returned, and so are the modules
inside the optimizer state (Adam's moments have the model's structure). Equinox
flattens each module in Python, and flattening them again is most of the cost of a
small step's call: jitted by hand, the same step pays it in `jax.jit`'s dispatch.

When a call returns, `remember` records, for each module in its outputs whose subtree
cannot change (every node in it a module, a tuple, a named tuple or None: no list, no
dict, no other container), its tree structure and its flat leaves, keyed by the
module's `id`, with their layout (the mesh and each leaf's axis, as the program that
returned them laid them out). `flatten` flattens a call's inputs but stops at a
remembered module: it is one item, and `expand` puts its leaves back if they are laid
out as the caller expects. Equinox modules are frozen, so the
leaves recorded are the leaves the module has for as long as it lives. Each record is
dropped by a weak reference's callback when its module dies, before its `id` can be
given to another object; `expand` also checks that the object at that `id` is the one
recorded.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax.tree_util as jtu

from .._stores import register_store


TreeDef = Any  # `jax.tree_util.PyTreeDef`, which is not a type to the checkers


class Record(NamedTuple):
    ref: weakref.ref  # the module
    treedef: TreeDef  # its tree structure
    leaves: Sequence  # its flat leaves
    layout: Any  # how they are laid out: one object per output of a program (`Plan`)


_MEMO: dict[int, Record] = {}


def _drop(key: int, ref: weakref.ref) -> None:
    record = _MEMO.get(key)
    if record is not None and record.ref is ref:
        del _MEMO[key]


register_store("the leaves of returned modules", _MEMO.clear)


def _known(x) -> bool:
    return id(x) in _MEMO


def flatten(tree) -> tuple[list, TreeDef]:
    """`jax.tree_util.tree_flatten(tree)`, except that each remembered module is one
    item: the items and the structure down to them."""
    if not _MEMO:
        return jtu.tree_flatten(tree)
    return jtu.tree_flatten(tree, is_leaf=_known)


def known_at(items: Sequence) -> tuple[tuple[int, TreeDef, Any], ...]:
    """The positions of the remembered modules among `items`, their structures and
    layouts, last first (the order `expand` splices them in)."""
    found = []
    for i, x in enumerate(items):
        record = _MEMO.get(id(x))
        if record is not None:
            found.append((i, record.treedef, record.layout))
    return tuple(reversed(found))


def expand(items: Sequence, known: Sequence[tuple[int, TreeDef, Any]]) -> list | None:
    """A copy of `items` with the leaves of the remembered module at each of the
    `known` positions (`known_at`) spliced in: the flat leaves of the inputs. None when
    an item there is not a remembered module of that structure and layout."""
    leaves = list(items)
    for i, treedef, layout in known:
        x = items[i]
        record = _MEMO.get(id(x))
        if record is None or record.ref() is not x:
            return None
        if record.treedef is not treedef and record.treedef != treedef:
            return None
        if record.layout is not layout and record.layout != layout:
            return None  # (from a program on another mesh, or of other axes)
        leaves[i : i + 1] = record.leaves
    return leaves


class Plan(NamedTuple):
    """Where the modules to remember are in one output structure."""

    stop: Callable[[object], bool]  # `is_leaf` reaching them (and some others)
    at: tuple  # per module to remember: (item index, treedef, first leaf, end)
    layouts: tuple = ()  # per module to remember: its `Record.layout`


def _frozen(treedef: TreeDef) -> bool:
    """Whether every node of `treedef` is a module, a tuple, a named tuple or None."""
    data = treedef.node_data()
    if data is None:
        return True  # a leaf
    kind = data[0]
    ok = (
        kind is tuple
        or kind is type(None)
        or issubclass(kind, eqx.Module)
        or (issubclass(kind, tuple) and hasattr(kind, "_fields"))
    )
    return ok and all(_frozen(c) for c in treedef.children())


def _rememberable(kind: type) -> bool:
    return issubclass(kind, eqx.Module) and kind.__weakrefoffset__ != 0


def plan_of(treedef: TreeDef, mesh=None, axes: Sequence | None = None) -> Plan | None:
    """The `Plan` of outputs of structure `treedef`; None when there is no module in
    them to remember. `mesh` and `axes` (per flat output leaf, its axis on the mesh):
    how the program lays the outputs out, recorded with each module (`Record.layout`)
    so that a call expecting other layouts does not take its leaves as its own (on a
    mesh of the same devices in another order, or of one device, where `jax.jit`
    takes arrays of another layout without a word)."""
    kinds: set[type] = set()
    at: list = []
    try:
        _collect(treedef, kinds)
        if kinds:
            _walk(treedef, kinds, at, [0, 0])
    except RecursionError:  # a structure nested deeper than Python recurses
        return None
    if not at:
        return None
    stop = functools.partial(_is_kind, frozenset(kinds))
    layouts = tuple(
        None if axes is None else (mesh, tuple(axes[start:end]))
        for _, _, start, end in at
    )
    return Plan(stop, tuple(at), layouts)


def _is_kind(kinds: frozenset, x) -> bool:
    return type(x) in kinds


def _collect(treedef: TreeDef, kinds: set) -> None:
    data = treedef.node_data()
    if data is None:
        return
    if _rememberable(data[0]):
        kinds.add(data[0])
    for c in treedef.children():
        _collect(c, kinds)


def _walk(treedef: TreeDef, kinds: set, at: list, count: list) -> None:
    """As `tree_flatten(is_leaf=stop)` goes: `count` is [items, leaves] so far."""
    data = treedef.node_data()
    if data is not None and data[0] in kinds:
        n = treedef.num_leaves
        if _frozen(treedef):
            at.append((count[0], treedef, count[1], count[1] + n))
        count[0] += 1
        count[1] += n
    elif data is None:
        count[0] += 1
        count[1] += 1
    else:
        for c in treedef.children():
            _walk(c, kinds, at, count)


def remember(plan: Plan | None, tree, leaves: Sequence) -> None:
    """Records the modules in `tree`, the outputs just built from `leaves`."""
    if plan is None:
        return
    items = jtu.tree_leaves(tree, is_leaf=plan.stop)
    for (i, treedef, start, end), layout in zip(plan.at, plan.layouts):
        module = items[i]
        key = id(module)
        ref = weakref.ref(module, functools.partial(_drop, key))
        _MEMO[key] = Record(ref, treedef, leaves[start:end], layout)
