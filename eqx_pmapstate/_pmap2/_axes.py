"""`in_axes` and `out_axes` as given: `StateAxes`, the check of a spec, and a pytree
prefix (maybe holding `StateAxes`) read leaf by leaf, bound to a call's arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax.tree_util as jtu
import numpy as np

from .._assign import assign_axis, normalize_out_axes
from .._filters import OutAxes
from .._layout import DEFAULT
from .._tree import broadcast_prefix, iter_states, prefix_mismatch


class StateAxes:
    """Axes given in the filter language, for `pmap2`'s `in_axes` and `out_axes` and for
    `Map`: a dict from axis (`int | None`) to filters, as `state_out_axes` of
    [`eqx_pmapstate.pmap2_new_states`][] takes it.

    Wrapping the dict in this class says that it is a rule for every state of the tree,
    not a pytree prefix (a plain dict would be read as one).

    **Arguments:**

    - `axes`: a dict from `int | None` to filters, or a single filter (`{0: filter}`).
    """

    __slots__ = ("spec",)

    def __init__(self, axes: OutAxes):
        self.spec = normalize_out_axes(axes, "a `StateAxes`")

    def __eq__(self, other):
        return isinstance(other, StateAxes) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)

    def __repr__(self):
        return f"StateAxes({dict(self.spec)!r})"

    def axes_of(self, tree, show: Callable[[tuple], str] | None = None) -> dict:
        """A dict from the path of each array leaf of `tree` to its axis, as written.
        `show` writes a path in messages (by default, as `_tree.path_name`)."""
        out = {}
        for ref in iter_states(tree):
            axis = assign_axis(self.spec, ref, None, "the `StateAxes`", show)
            out.update((p, axis) for p, _ in ref.leaves)
        return out


def check_axes_spec(spec, what: str) -> None:
    """`in_axes`/`out_axes` as given: `DEFAULT`, a `StateAxes`, or a pytree prefix whose
    leaves are ints, None, `DEFAULT` (the default rule for that part) or callables."""
    if spec is DEFAULT or isinstance(spec, StateAxes):
        return
    for leaf in jtu.tree_leaves(spec, is_leaf=lambda x: x is None):
        ok = leaf is None or leaf is DEFAULT or isinstance(leaf, StateAxes)
        ok = ok or callable(leaf)
        ok = ok or (isinstance(leaf, (int, np.integer)) and not isinstance(leaf, bool))
        if not ok:
            raise TypeError(
                f"`{what}` must be a `eqx_pmapstate.StateAxes`, or a pytree prefix of the "
                "arguments whose leaves are ints (an axis), None (replicated), "
                "`eqx_pmapstate.DEFAULT` (the default rule), `StateAxes` (for the part "
                f"they cover) or callables of a leaf, but it holds {leaf!r} of type "
                f"{type(leaf).__name__}."
            )


def prefix_axes(prefix, tree, what: str) -> list:
    """Per leaf of `tree`, its entry of the prefix; a `StateAxes` among the prefix's
    leaves gives the axes of the subtree it covers by its filters."""
    try:
        given = broadcast_prefix(prefix, tree)
        if not any(isinstance(g, StateAxes) for g in given):
            return given
        is_leaf = lambda x: x is None or isinstance(x, StateAxes)  # noqa: E731
        structure = jtu.tree_structure(prefix, is_leaf=is_leaf)
        out = []
        for axes, sub in zip(
            jtu.tree_leaves(prefix, is_leaf=is_leaf), structure.flatten_up_to(tree)
        ):
            if isinstance(axes, StateAxes):
                by_path = axes.axes_of(sub)
                flat = jtu.tree_flatten_with_path(sub)[0]
                out.extend(by_path.get(p, DEFAULT) for p, _ in flat)
            else:
                out.extend([axes] * len(jtu.tree_leaves(sub)))
        return out
    except ValueError as e:
        # JAX's message goes on with the whole tree's repr: say where, or keep its
        # first clause.
        reason = prefix_mismatch(prefix, tree) or str(e).split(";")[0][:160]
        raise ValueError(
            f"`{what}` is not a pytree prefix of the tree it applies to: {reason}."
        ) from None


def _positional_names(fun) -> list | None:
    """The names of `fun`'s parameters that a call can pass by position, in order (None
    if its signature cannot be read)."""
    try:
        params = inspect.signature(fun).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def first_parameter(fun) -> str | None:
    """The name of `fun`'s first positional parameter (None if it has none, or if its
    signature cannot be read)."""
    names = _positional_names(fun)
    return names[0] if names else None


def bound_axes(in_axes, args, kwargs, fun) -> tuple[Any, dict]:
    """`in_axes` as the call binds it: the prefix for the positional arguments, and the
    axis of each keyword argument that the parameter at its position gives (as
    `inspect.signature(fun).bind` binds the call); other keyword arguments: `DEFAULT`.
    A dict gives the axes by parameter name (as in `eqx.filter_pmap`)."""
    if isinstance(in_axes, dict):
        return _by_name(in_axes, args, kwargs, fun)
    if not isinstance(in_axes, tuple):
        return in_axes, dict.fromkeys(kwargs, in_axes)
    if len(in_axes) < len(args):
        raise ValueError(
            f"`in_axes` has {len(in_axes)} entries, but the call passes {len(args)} "
            "positional arguments. Give one entry per positional argument "
            "(`eqx_pmapstate.DEFAULT` for the default rule)."
        )
    if len(in_axes) == len(args):
        return in_axes, {}
    names = _positional_names(fun) or []
    by_name = {}
    for i in range(len(args), len(in_axes)):
        name = names[i] if i < len(names) else None
        if name in kwargs:
            by_name[name] = in_axes[i]
        elif name is None:
            unbound = [k for k in kwargs if k not in names]
            if not unbound:
                raise ValueError(_too_many_message(in_axes, args, names))
            raise ValueError(
                f"`in_axes` has {len(in_axes)} entries, but the call passes {len(args)} "
                f"positional argument(s), and its keyword argument(s) "
                f"{', '.join(map(str, unbound))} take no position. Such an argument "
                "follows the default rule: lay it out on the mesh to choose its layout, "
                "or give every axis with `eqx_pmapstate.StateAxes`."
            )
        # else: a parameter left to its default value, which is no input
    return in_axes[: len(args)], by_name


def _by_name(in_axes: dict, args, kwargs, fun) -> tuple[tuple, dict]:
    """`in_axes` given as `{parameter name: axis}`; the arguments it does not name
    follow the default rule."""
    try:
        params = inspect.signature(fun).parameters
    except (TypeError, ValueError):
        raise ValueError(
            f"`in_axes` names parameters ({', '.join(map(str, in_axes))}), but the "
            f"signature of {fun!r} cannot be read. Give `in_axes` as a tuple, one entry "
            "per positional argument."
        ) from None
    unknown = [k for k in in_axes if k not in params and k not in kwargs]
    if unknown:
        raise ValueError(
            f"`in_axes` names {', '.join(map(repr, unknown))}, which is not a parameter "
            f"of the function (its parameters: {', '.join(params) or 'none'}). Name "
            "the parameters as the function's signature does."
        )
    names = _positional_names(fun) or []
    positional = tuple(
        in_axes.get(names[i], DEFAULT) if i < len(names) else DEFAULT
        for i in range(len(args))
    )
    return positional, {k: in_axes.get(k, DEFAULT) for k in kwargs}


def _too_many_message(in_axes, args, names) -> str:
    takes = (
        f"takes {len(names)} positional parameter(s) ({', '.join(names)})"
        if names
        else "takes no positional parameter"
    )
    return (
        f"`in_axes` has {len(in_axes)} entries, but the function {takes} and the call "
        f"passes {len(args)} positional argument(s). Give one entry per parameter "
        "(`eqx_pmapstate.DEFAULT` for the default rule)."
    )
