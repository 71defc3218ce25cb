"""Why a `pmap2` function compiled again: the recompile warning.

A function compiled once per input signature is expected; one compiled again and again
costs a trace and a compile each time, and the results stay right, so nothing else would
tell the user. Each `pmap2` function keeps the key of its last compile. From its third
compile on, the new key is compared with that one, and a `RecompileWarning` names what
changed (a global, a closed-over value, a static argument's value, a shape or dtype, a
layout) and what to do: once per function and thing, in the spirit of JAX's
`jax_explain_cache_misses`.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax.tree_util as jtu

from ._keys import assigned_names


class RecompileWarning(UserWarning):
    """A `pmap2` function was traced and compiled again, and the message says why: from
    its third compile on when a value it reads changed (a global, a closed-over value, a
    static argument), from its tenth on when only shapes, dtypes, layouts, the tree
    structure or a non-array field inside an argument (a module's `inference` flag)
    did: a few of those, as training and evaluation, are meant. Once per function and
    cause. Each compile costs as much as a first call.

    Silence it with `warnings.filterwarnings("ignore", category=ep.RecompileWarning)`
    where recompiling is meant."""


_AFTER = 3  # a value changed: warn from the third compile of a function on
_AFTER_SHAPES = 10  # only shapes, dtypes, layouts or structures: from the tenth on


class CompileLog:
    """One `pmap2` function's compiles: how many, the key of the last one, and what was
    already warned of. Reset when the library's cache is cleared."""

    __slots__ = ("compiles", "last", "warned")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.compiles = 0
        self.last: Any = None
        self.warned: set[str] = set()

    def compiled(self, fun: Callable, key: tuple, where: Callable[[], list]):
        """Records a compile of `fun` under `key` (`("pmap2", fun_key, settings,
        treedef, leaf_keys)`), and warns when it is a recompile to explain. `where`
        gives each leaf of the arguments as `leaf_names` does, for messages."""
        self.compiles += 1
        last, self.last = self.last, key
        if self.compiles < _AFTER or last is None:
            return
        changes = [
            (subject, why)
            for subject, why, shape in _changes(last, key, where)
            if subject not in self.warned
            and self.compiles >= (_AFTER_SHAPES if shape else _AFTER)
        ]
        self.warned.update(subject for subject, _ in changes)
        if changes:
            warnings.warn(
                _message(fun, self.compiles, changes),
                RecompileWarning,
                stacklevel=_caller_level(sys._getframe()),
            )


# Frames of these modules are not the user's: this library, and the wrappers that
# jaxtyping's import hook (with beartype) puts around its functions.
_NOT_THE_CALLER = ("eqx_pmapstate", "jaxtyping", "beartype")


def _caller_level(frame) -> int:
    """The `stacklevel`, for a warning raised in `frame`, of the first frame outside
    this library and the type-checking wrappers around it: the user's call."""
    level = 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in _NOT_THE_CALLER:
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _name(fun) -> str:
    while isinstance(fun, (functools.partial, types.MethodType)):
        fun = fun.func if isinstance(fun, functools.partial) else fun.__func__
    return getattr(fun, "__qualname__", type(fun).__name__)


def _message(fun, count: int, changes: Sequence[tuple[str, str]]) -> str:
    said = "; ".join(why for _, why in changes)
    return (
        f"`{_name(fun)}` was traced and compiled again ({count} compiles so far), each "
        f"time at the cost of a first call: since the last compile, {said}."
    )


# --------------------------------------------------------------------------- what changed


def _changes(old, new, where) -> list[tuple[str, str, bool]]:
    """(subject, explanation, whether only a shape-like thing changed) for each
    difference between two keys of a function."""
    _, old_fun, old_settings, old_tree, old_leaves = old
    _, new_fun, new_settings, new_tree, new_leaves = new
    out = [(s, why, False) for s, why in _function_changes(old_fun, new_fun, "")]
    if old_settings != new_settings:
        out.append(
            ("settings", "its `in_axes`, `out_axes` or `devices` changed", False)
        )
    if old_tree != new_tree:
        why = (
            "the tree structure of the arguments changed (another argument, a field set "
            "to None, another container, a static field): each structure is a program"
        )
        out.append(("structure", why, True))
    elif old_leaves != new_leaves:
        for (name, nested), a, b in zip(where(), old_leaves, new_leaves):
            if a != b:
                out.append((name, *_leaf_change(name, nested, a, b)))
    return out


def _function_changes(old, new, owner: str) -> list[tuple[str, str]]:
    if old == new:
        return []
    of = f" (read by `{owner}`)" if owner else ""
    if not (_is_function_key(old) and _is_function_key(new)) or old[1] != new[1]:
        return [
            (
                "function",
                "the function itself is another one (a new object each call, or other "
                "code): make it once, outside the loop",
            )
        ]
    out = []
    _, code, old_cells, old_globals, old_defaults, old_kw = old
    _, _, new_cells, new_globals, new_defaults, new_kw = new
    for (name, a), (_, b) in zip(old_globals, new_globals):
        if a != b:
            out += _value_change(f"global `{name}`", name, a, b, of)
    if old_cells != new_cells:
        free = [n for n in code.co_freevars if n not in assigned_names(code)]
        for name, a, b in zip(free, old_cells, new_cells):
            if a != b:
                out += _value_change(f"closed-over `{name}`", name, a, b, of)
    if (old_defaults, old_kw) != (new_defaults, new_kw):
        out.append(("defaults", f"the default values of its parameters changed{of}"))
    return out


def _is_function_key(k) -> bool:
    return isinstance(k, tuple) and len(k) == 6 and k[0] == "function"


def _value_change(what: str, name: str, a, b, of: str) -> list[tuple[str, str]]:
    if _is_function_key(a) and _is_function_key(b) and a[1] == b[1]:
        return _function_changes(a, b, name)  # a helper whose own reads changed
    if _is_array_key(a) or _is_array_key(b):
        why = (
            f"the {what}{of} is another array (arrays that a function reads from "
            "outside are keyed by identity): pass it as an argument instead"
        )
    else:
        why = (
            f"the {what}{of} has another value: pass it as an argument (an array, to "
            "reuse the program), or keep it fixed"
        )
    return [(what, why)]


def _is_array_key(k) -> bool:
    return isinstance(k, tuple) and len(k) == 2 and k[0] == "array"


def _leaf_change(name: str, nested: bool, a, b) -> tuple[str, bool]:
    """Why one leaf's key changed, and whether it is shape-like: a shape, a dtype, a
    layout, or a non-array field inside an argument (a module's `inference` flag: a mode
    is a program, as a shape is)."""
    a_aval, b_aval = _aval(a), _aval(b)
    if a_aval is not None and b_aval is not None:
        if a_aval != b_aval:
            why = (
                f"the shape or dtype of {name} changed ({_show(a_aval)} -> "
                f"{_show(b_aval)}): each one is a program; pad or bucket to a few shapes"
            )
        else:
            why = (
                f"the layout of {name} changed (another sharding): lay it out the same "
                "way each call (`eqx_pmapstate.relayout`)"
            )
        return why, True
    if a_aval is None and b_aval is None and nested:
        why = (
            f"the value of {name}, a field that is not an array, changed: each value is a "
            "program, as in `eqx.filter_jit`"
        )
        return why, True
    if a_aval is None and b_aval is None:
        why = (
            f"the value of {name}, a static argument (not an array), changed: each value "
            "is a program, as in `eqx.filter_jit`; pass it as an array to reuse the "
            "program"
        )
        return why, False
    return f"{name} is an array in one call and a static value in the other", False


def _aval(k):
    if isinstance(k, tuple) and len(k) == 2 and hasattr(k[0], "shape"):
        return k[0]  # (aval, sharding) of a concrete array
    if hasattr(k, "shape") and hasattr(k, "dtype"):
        return k  # a tracer's type
    if isinstance(k, tuple) and len(k) == 3 and k[2] is None:
        return (k[0], k[1])  # a NumPy array: (shape, dtype, None)
    return None


def _show(aval) -> str:
    shape, dtype = aval if isinstance(aval, tuple) else (aval.shape, aval.dtype)
    return f"{dtype}{list(shape)}"


def leaf_names(inputs, where: Callable[[tuple], str]) -> list[tuple[str, bool]]:
    """The name of each leaf of a call's inputs (`(args, kwargs)`, or `(args, kwargs,
    fun)` for a callable pytree), as messages write it, and whether it is inside an
    argument (not an argument itself)."""
    flat = jtu.tree_flatten_with_path(inputs)[0]
    return [(where(p), len(p) > 2) for p, _ in flat]
