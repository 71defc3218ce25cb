"""A Griffe extension for the API reference (mkdocs.yml loads it): class signatures.

Equinox generates a Module's `__init__` from its fields when the class is created, so
static analysis sees no `__init__`, and mkdocstrings would show `Map`, the markers and
the filters without a signature. This extension writes that `__init__` from the fields
as the source declares them (annotations and defaults as written: `eqx.field(default=...)`,
`default_factory`, `init=False` and `kw_only=True` are honoured), the way Griffe's
built-in extension does for `@dataclass`. A Module that defines or inherits an
`__init__` of its own keeps it.

It also gives an exception class without an `__init__` (whose base is a built-in
exception, which Griffe does not load) the signature of `BaseException`: `(*args)`.
"""

from __future__ import annotations

import builtins
from typing import Any

from griffe import (
    Attribute,
    Class,
    Expr,
    ExprCall,
    Extension,
    Function,
    Module,
    Parameter,
    ParameterKind,
    Parameters,
)


_MODULE = "equinox.Module"
_FIELD = "equinox.field"
_SYNTHESIZED = "equinox-init"  # a label on the `__init__`s written here
_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


def _path(expr) -> str | None:
    if isinstance(expr, Expr):
        # `Generic[T]`, `eqx.Module`: the canonical path of the subscripted name.
        return getattr(expr, "canonical_path", None)
    return None


def _builtin(expr) -> str | None:
    path = _path(expr) if isinstance(expr, Expr) else expr
    return path.removeprefix("builtins.") if isinstance(path, str) else None


def _parents(cls: Class) -> list[Class]:
    try:
        return list(cls.mro())
    except ValueError:  # an unresolvable base
        return []


def _is_module(cls: Class) -> bool:
    return any(_path(b) == _MODULE for c in [cls, *_parents(cls)] for b in c.bases)


def _field_arguments(attribute: Attribute) -> dict[str, Any]:
    value = attribute.value
    if isinstance(value, ExprCall) and value.function.canonical_path == _FIELD:
        arguments: dict[str, Any] = {}
        for argument in value.arguments:
            name = getattr(argument, "name", None)
            if name is not None:
                arguments[name] = argument.value
        return arguments
    return {}


def _fields(cls: Class) -> list[Parameter]:
    parameters = []
    for member in cls.members.values():
        if member.is_alias or not member.is_attribute or member.annotation is None:
            continue
        if "property" in member.labels or (
            "class-attribute" in member.labels
            and "instance-attribute" not in member.labels
        ):
            continue
        arguments = _field_arguments(member)  # type: ignore[arg-type]
        if str(arguments.get("init")) == "False":
            continue
        if "default_factory" in arguments:
            default = ExprCall(arguments["default_factory"], [])
        elif arguments:
            default = arguments.get("default")
        else:
            default = member.value
        kind = (
            ParameterKind.keyword_only
            if str(arguments.get("kw_only")) == "True"
            else ParameterKind.positional_or_keyword
        )
        parameters.append(
            Parameter(
                member.name,
                annotation=member.annotation,
                kind=kind,
                default=default,
                docstring=member.docstring,
            )
        )
    return parameters


def _init(cls: Class, parameters: list[Parameter]) -> Function:
    self = Parameter("self", kind=ParameterKind.positional_or_keyword)
    init = Function(
        "__init__",
        lineno=cls.lineno,
        endlineno=cls.lineno,
        parent=cls,
        parameters=Parameters(self, *parameters),
        returns="None",
    )
    init.labels.add(_SYNTHESIZED)
    return init


def _own_init(cls: Class) -> bool:
    init = cls.members.get("__init__")
    return init is not None and _SYNTHESIZED not in init.labels


def _set_init(cls: Class) -> None:
    if "__init__" in cls.members:
        return
    parents = _parents(cls)
    if _is_module(cls):
        if any(_own_init(p) for p in parents):
            return  # Equinox keeps an inherited hand-written `__init__`
        fields: dict[str, Parameter] = {}
        for c in [*reversed(parents), cls]:
            if _is_module(c):
                fields.update((p.name, p) for p in _fields(c))
        ordered = sorted(
            fields.values(), key=lambda p: p.kind is ParameterKind.keyword_only
        )
        cls.set_member("__init__", _init(cls, ordered))
    elif any(_builtin(b) in _EXCEPTIONS for b in cls.bases) and not any(
        "__init__" in p.members for p in parents
    ):
        args = Parameter("args", kind=ParameterKind.var_positional)
        cls.set_member("__init__", _init(cls, [args]))


def _walk(obj: Module | Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, Class):
        # Parents first, so that a subclass sees whether they were given an `__init__`.
        for parent in _parents(obj):
            _walk(parent, seen)
        _set_init(obj)
    for member in list(obj.members.values()):
        if not member.is_alias and (member.is_module or member.is_class):
            _walk(member, seen)  # type: ignore[arg-type]


class EquinoxInit(Extension):
    """Writes the `__init__` that Equinox generates for each Module of a package."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        _walk(pkg, set())
