"""The filter language: which states go to which axis."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any as _AnyType, TYPE_CHECKING, TypeAlias

import equinox as eqx
import jax
import jax.tree_util as jtu

from ._keys import KeyedWalk
from ._state import State


def _key_value(entry) -> Hashable:
    """The plain Python value of one entry of a JAX key path."""
    if isinstance(entry, jtu.GetAttrKey):
        return entry.name
    if isinstance(entry, jtu.DictKey):
        return entry.key
    if isinstance(entry, jtu.SequenceKey):
        return entry.idx
    if isinstance(entry, jtu.FlattenedIndexKey):
        return entry.key
    return entry


class Filter(eqx.Module):
    """Base class of the filters: a question asked about one state.

    A filter is called as `filter(path, state, ancestors=())`, where `path` is the state's
    JAX key path from the root of the returned tree, `state` is a marker instance (a
    [`eqx_pmapstate.State`][]) or a bare array leaf outside any marker, and `ancestors`
    is the tuple of objects that enclose it, outermost first. Filters compare and hash
    by value, so two `OfType(ParamState)` are the same filter, and compilation caches
    keyed on them hit.

    Filters combine with `|`, `&` and `~`.
    """

    def __call__(self, path: tuple, state: _AnyType, ancestors: tuple = ()) -> bool:
        raise NotImplementedError

    def __or__(self, other):
        return Any(self, other)

    def __and__(self, other):
        return All(self, other)

    def __ror__(self, other):
        return Any(other, self)

    def __rand__(self, other):
        return All(other, self)

    def __invert__(self):
        return Not(self)


class OfType(Filter):
    """Matches a state that is an instance of `type`, or that lies inside one.

    So `OfType(ParamState)` picks parameter markers, `OfType(eqx.nn.BatchNorm)` picks the
    arrays of every BatchNorm layer, and `OfType(eqx.nn.State)` everything held in an
    `eqx.nn.State`.

    **Arguments:**

    - `type`: a class, or a tuple of classes as for `isinstance`.
    """

    type: type | tuple[type, ...] = eqx.field(static=True)

    def __call__(self, path, state, ancestors=()):
        return isinstance(state, self.type) or any(
            isinstance(a, self.type) for a in ancestors
        )


class WithTag(Filter):
    """Matches a marker whose `tag` equals `tag`.

    **Arguments:**

    - `tag`: the tag, a string.
    """

    tag: str = eqx.field(static=True)

    def __call__(self, path, state, ancestors=()):
        return isinstance(state, State) and state.tag == self.tag


class PathContains(Filter):
    """Matches a state whose path passes through `key`.

    `key` is compared with each entry of the path: an attribute name, a dictionary key,
    or a sequence index (an `int`). So `PathContains("encoder")` matches every state under
    `model.encoder`, and `PathContains(0)` every state under the first element of a list.

    **Arguments:**

    - `key`: an attribute name, dictionary key or index, or a JAX key-path entry.
    """

    key: Hashable = eqx.field(static=True)

    def __call__(self, path, state, ancestors=()):
        return any(entry == self.key or _key_value(entry) == self.key for entry in path)


class Any(Filter):
    """Matches when at least one of `filters` matches.

    **Arguments:**

    - `*filters`: anything [`eqx_pmapstate.filters.to_predicate`][] accepts.
    """

    filters: tuple[Filter, ...] = eqx.field(static=True)

    def __init__(self, *filters):
        self.filters = tuple(to_predicate(f) for f in filters)

    def __call__(self, path, state, ancestors=()):
        return any(f(path, state, ancestors) for f in self.filters)


class All(Filter):
    """Matches when every one of `filters` matches.

    **Arguments:**

    - `*filters`: anything [`eqx_pmapstate.filters.to_predicate`][] accepts.
    """

    filters: tuple[Filter, ...] = eqx.field(static=True)

    def __init__(self, *filters):
        self.filters = tuple(to_predicate(f) for f in filters)

    def __call__(self, path, state, ancestors=()):
        return all(f(path, state, ancestors) for f in self.filters)


class Not(Filter):
    """Matches when `filter` does not.

    **Arguments:**

    - `filter`: anything [`eqx_pmapstate.filters.to_predicate`][] accepts.
    """

    filter: Filter = eqx.field(static=True)

    def __init__(self, filter):
        self.filter = to_predicate(filter)

    def __call__(self, path, state, ancestors=()):
        return not self.filter(path, state, ancestors)


class Everything(Filter):
    """Matches every state. In `state_out_axes` it is a catch-all: it counts only for the
    states that no other filter matched."""

    def __call__(self, path, state, ancestors=()):
        return True


class Nothing(Filter):
    """Matches no state."""

    def __call__(self, path, state, ancestors=()):
        return False


class _FunctionFilter(Filter):
    # Compares by what the function computes from: its code, closure, defaults and the
    # globals it names (see `_keys`), so that a lambda written inline in a function
    # called again is the same filter and compilation caches keep hitting, while a
    # filter reading a global that was rebound is a different one.
    fn: Callable = eqx.field(static=True)

    def _key(self):
        return KeyedWalk().value(self.fn)

    def __eq__(self, other):
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self):
        return hash((type(self), self._key()))


class _LeafPredicate(_FunctionFilter):
    # An Equinox-style leaf filter such as `eqx.is_inexact_array`, asked about the
    # state's value (every array of it, for a marker holding a pytree).

    def __call__(self, path, state, ancestors=()):
        value = state.value if isinstance(state, State) else state
        leaves = jax.tree_util.tree_leaves(value)
        if len(leaves) == 1 and leaves[0] is value:
            return bool(self.fn(value))
        return len(leaves) > 0 and all(bool(self.fn(leaf)) for leaf in leaves)


class _PathPredicate(_FunctionFilter):
    # A user function `(path, state) -> bool`.

    def __call__(self, path, state, ancestors=()):
        return bool(self.fn(path, state))


def _positional_arity(fn) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    required = [p for p in params if p.default is inspect.Parameter.empty]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        return len(required) if required else None
    return len(required) if required else (len(params) or None)


if TYPE_CHECKING:
    from types import EllipsisType

    FilterLike: TypeAlias = (
        Filter
        | type
        | str
        | bool
        | EllipsisType
        | None
        | Sequence["FilterLike"]
        | Callable[..., bool]
    )
    # (Keys `int | None`; `Any`, as `Mapping` is invariant in them: `{0: ...}` is fine.)
    OutAxes: TypeAlias = Mapping[_AnyType, FilterLike] | FilterLike
else:  # at run time (beartype under jaxtyping's hook), anything: the library checks
    FilterLike = _AnyType
    OutAxes = _AnyType
"""`FilterLike`: the filter language, what [`eqx_pmapstate.filters.to_predicate`][]
accepts. `OutAxes`: `state_out_axes`, a dict from axis to filters, or one filter."""


def to_predicate(filter: FilterLike) -> Filter:
    """Turns a filter written in any accepted shorthand into a [`eqx_pmapstate.filters.Filter`][].

    **Arguments:**

    - `filter`: one of
        - a `Filter` instance: returned as it is;
        - a type: [`eqx_pmapstate.filters.OfType`][];
        - a `str`: [`eqx_pmapstate.filters.WithTag`][];
        - `True` or `...`: [`eqx_pmapstate.filters.Everything`][];
        - `False` or `None`: [`eqx_pmapstate.filters.Nothing`][];
        - a list or tuple of filters: [`eqx_pmapstate.filters.Any`][] of them;
        - a callable of one argument: an Equinox leaf filter such as `eqx.is_inexact_array`,
          asked about the state's value (about each of its arrays, for a marker holding a
          pytree; all must match);
        - a callable of two arguments, `(path, state) -> bool`.

    **Returns:**

    A `Filter`.

    **Raises:**

    `TypeError` for anything else.
    """
    if isinstance(filter, Filter):
        return filter
    if filter is True or filter is Ellipsis:
        return Everything()
    if filter is False or filter is None:
        return Nothing()
    if isinstance(filter, str):
        return WithTag(filter)
    if isinstance(filter, type):
        return OfType(filter)
    if isinstance(filter, (list, tuple)):
        return Any(*filter)
    if callable(filter):
        arity = _positional_arity(filter)
        if arity == 1:
            return _LeafPredicate(filter)
        if arity == 2:
            return _PathPredicate(filter)
        raise TypeError(
            f"Cannot use {filter!r} as a filter: a callable filter must take one argument "
            "(a leaf filter such as `eqx.is_inexact_array`, asked about the state's value) "
            "or two arguments `(path, state)`, but its signature could not be read as "
            "either. Wrap it in a `def` with one of those signatures."
        )
    raise TypeError(
        f"Cannot use {filter!r} of type {type(filter).__name__} as a filter. A filter is a "
        "type, a str (a tag), True/... (everything), False/None (nothing), a list or tuple "
        "of filters, a callable of one argument (the state's value) or of two arguments "
        "(path, state), or an instance of `eqx_pmapstate.filters.Filter`."
    )


__all__: Sequence[str] = (
    "Filter",
    "OfType",
    "WithTag",
    "PathContains",
    "Any",
    "All",
    "Not",
    "Everything",
    "Nothing",
    "to_predicate",
)
