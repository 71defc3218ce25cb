"""Cache keys: values that compare by value where they can, by identity where they cannot."""

import types
from typing import Any


class _ById:
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj  # held, so that its id is not reused while the key lives

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _ById) and other.obj is self.obj


def value_key(x: Any, _depth: int = 0):
    """A hashable stand-in for `x` that is equal for equal values."""
    if isinstance(x, types.FunctionType):
        return fn_key(x, _depth + 1)
    try:
        hash(x)
    except TypeError:
        return _ById(x)
    return (type(x), x)  # 2, 2.0 and True are equal in Python, but not as static values


def fn_key(f, _depth: int = 0) -> Any:
    """A key for a callable. A plain function is keyed on its code, closure and defaults,
    so a closure made anew on each call (`eqx.nn.make_with_state(Model)`) still hits."""
    if isinstance(f, types.FunctionType) and _depth < 8:
        cells = ()
        if f.__closure__:
            try:
                cells = tuple(value_key(c.cell_contents, _depth) for c in f.__closure__)
            except ValueError:  # an empty cell
                return _ById(f)
        defaults = tuple(value_key(d, _depth) for d in (f.__defaults__ or ()))
        kwdefaults = tuple(
            sorted(
                (k, value_key(v, _depth)) for k, v in (f.__kwdefaults__ or {}).items()
            )
        )
        return ("function", f.__code__, cells, defaults, kwdefaults)
    return value_key(f)
