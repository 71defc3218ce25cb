"""Cache keys: a compiled program is reused only when it would give the same result.

A key is made of values that compare by value where they are immutable, and by identity
where they are not. A plain function is keyed on its code, defaults, the values its
closure holds and the values of the globals its code names (followed into the functions
found there, a few levels deep), so that a closure made anew (`eqx.nn.make_with_state(Model)`,
an inline `lambda`) hits the cache while a rebound global or a new closed-over array
does not. Arrays are keyed by identity through weak references: a key keeps no array
alive, and a key whose array has died never matches again (`KeyedWalk.weak` lists them,
so that the cache can drop its entry).

Not part of a key: a variable the function itself assigns (`nonlocal n; n += 1`, a
trace counter, is its own state, not an input). Keyed by identity, so not followed when
changed in place: mutable containers (a list, a dict) and other mutable objects. Not
followed at all: attributes of objects (`config.lr`) and functions reached only through
objects. (`jax.jit` keys on the function alone.)
"""

from __future__ import annotations

import dis
import functools
import math
import types
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._stores import register_store


_MISSING = object()
_DEPTH = 4  # how many functions deep the globals and closures are followed


class WeakId:
    """The identity of an object, held by weak reference where the object allows it."""

    __slots__ = ("_ref", "_id", "__weakref__")

    def __init__(self, obj):
        self._id = id(obj)
        try:
            self._ref = weakref.ref(obj)
        except TypeError:
            self._ref = lambda obj=obj: obj  # held: its id cannot be reused meanwhile

    def get(self):
        return self._ref()

    @property
    def alive(self) -> bool:
        return self._ref() is not None

    def __hash__(self):
        return self._id

    def __eq__(self, other):
        if not isinstance(other, WeakId) or other._id != self._id:
            return False
        obj = self._ref()
        return obj is not None and obj is other._ref()

    def __repr__(self):
        return f"WeakId({self._id:#x}, alive={self.alive})"


_SCALARS = (int, float, complex, str, bytes, bool, type(None))


def _is_plain(value) -> bool:
    """An immutable scalar, or a tuple of them: safe to hold, compared by identity."""
    if isinstance(value, tuple):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def plain_key(x) -> tuple:
    """`(type(x), x)`, the key of a hashable value (2, 2.0 and True are equal in Python,
    not as static values), with the signs of a float's or a complex's zeros: 0.0 and
    -0.0 are equal in Python too, not in what a function computes from them (`1 / x`)."""
    kind = type(x)
    if kind is float:
        return (kind, x, math.copysign(1.0, x))
    if kind is complex:
        return (kind, x, math.copysign(1.0, x.real), math.copysign(1.0, x.imag))
    return (kind, x)


class Guard:
    """That a closure cell or a global name still holds the object seen when a key was
    made. Checked by identity on every call of a `pmap2` function: far cheaper than the
    key itself. The object is held weakly where it can be (the key then dies with it),
    else strongly, as the key holds it."""

    __slots__ = ("container", "name", "seen", "weak")

    def __init__(self, container, name, value):
        self.container = container  # a globals dict, or a cell
        self.name = name
        self.seen, self.weak = value, None
        if not _is_plain(value):
            try:
                self.seen, self.weak = None, weakref.ref(value)
            except TypeError:
                pass

    def holds(self) -> bool:
        if self.name is None:
            try:
                now = self.container.cell_contents
            except ValueError:
                return False
        else:
            now = self.container.get(self.name, _MISSING)
        if self.weak is None:
            return now is self.seen
        seen = self.weak()
        return seen is not None and now is seen


@functools.lru_cache(maxsize=4096)
def assigned_names(code: types.CodeType) -> frozenset[str]:
    """The global and closure variables a function's own code assigns to."""
    stores = {"STORE_GLOBAL", "DELETE_GLOBAL", "STORE_DEREF", "DELETE_DEREF"}
    return frozenset(i.argval for i in dis.get_instructions(code) if i.opname in stores)


_LOADS = {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"}


@functools.lru_cache(maxsize=4096)
def _names_read(code: types.CodeType) -> tuple[str, ...]:
    """The names a code object (and the code nested in it) reads as globals: those of
    its global loads, not `co_names`, which also holds every attribute name (`ts.params`
    does not read a global `params`)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in _LOADS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_names_read(const))
    return tuple(sorted(names))


register_store(
    "what code objects read and assign",
    lambda: (assigned_names.cache_clear(), _names_read.cache_clear()),
)


class KeyedWalk:
    """Makes keys, and records what they depend on: the arrays held weakly (`weak`) and
    the cells and globals read (`guards`)."""

    def __init__(self):
        self.weak: list[WeakId] = []
        self.guards: list[Guard] = []
        self._functions: set[int] = set()

    def weak_id(self, x) -> WeakId:
        w = WeakId(x)
        self.weak.append(w)
        return w

    def value(self, x, depth: int = _DEPTH) -> Any:
        """A hashable stand-in for `x` that is equal for equal values."""
        if isinstance(x, (jax.Array, np.ndarray)):
            return ("array", self.weak_id(x))
        if isinstance(x, types.FunctionType):
            return self.function(x, depth)
        if isinstance(x, functools.partial):
            args = tuple(self.value(a, depth) for a in x.args)
            kws = tuple(
                sorted((k, self.value(v, depth)) for k, v in x.keywords.items())
            )
            return ("partial", self.value(x.func, depth), args, kws)
        if isinstance(x, types.MethodType):
            return (
                "method",
                self.value(x.__func__, depth),
                self.value(x.__self__, depth),
            )
        if isinstance(x, (types.ModuleType, type)):
            return ("object", x)
        if isinstance(x, (eqx.Module, tuple)):
            return self._tree(x, depth)
        try:
            hash(x)
        except TypeError:
            return ("object", self.weak_id(x))
        return plain_key(x)

    def spec(self, x) -> Any:
        """A key for a setting given by the user (`in_axes`, `devices`): lists and dicts
        in it are part of a specification, not state, so they are keyed by value."""
        leaves, treedef = jtu.tree_flatten(x, is_leaf=lambda v: v is None)
        return ("spec", treedef, tuple(self.value(leaf) for leaf in leaves))

    def _tree(self, x, depth: int):
        leaves, treedef = jtu.tree_flatten(x)
        if len(leaves) == 1 and leaves[0] is x:  # not a container after all
            try:
                hash(x)
                return plain_key(x)
            except TypeError:
                return ("object", self.weak_id(x))
        return ("tree", treedef, tuple(self.value(leaf, depth) for leaf in leaves))

    def function(self, f: types.FunctionType, depth: int = _DEPTH) -> Any:
        """A plain function: its code, closure, defaults and the globals it names."""
        if depth <= 0 or id(f) in self._functions:
            return ("function", self.weak_id(f))
        self._functions.add(id(f))
        assigned = assigned_names(f.__code__)
        cells = tuple(
            self._cell(c, depth - 1)
            for name, c in zip(f.__code__.co_freevars, f.__closure__ or ())
            if name not in assigned
        )
        glob = f.__globals__
        names = []
        for name in _names_read(f.__code__):
            value = glob.get(name, _MISSING)
            if value is _MISSING or name in assigned:
                continue  # a builtin, or the function's own state
            self.guards.append(Guard(glob, name, value))
            names.append((name, self.value(value, depth - 1)))
        defaults = tuple(self.value(d, depth - 1) for d in (f.__defaults__ or ()))
        kwdefaults = tuple(
            sorted(
                (k, self.value(v, depth - 1))
                for k, v in (f.__kwdefaults__ or {}).items()
            )
        )
        return ("function", f.__code__, cells, tuple(names), defaults, kwdefaults)

    def _cell(self, cell, depth: int):
        try:
            contents = cell.cell_contents
        except ValueError:  # not yet assigned
            return ("empty cell", WeakId(cell))
        self.guards.append(Guard(cell, None, contents))
        return self.value(contents, depth)

    def callable(self, f: Callable) -> Any:
        """The key of a function given to `pmap2` or as a builder."""
        return self.value(f)
