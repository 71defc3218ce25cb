"""`state_out_axes`: from filters to one axis per state."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import numpy as np

from ._filters import Everything, Filter, to_predicate
from ._state import NonBatchState, State
from ._tree import path_name


def normalize_out_axes(
    state_out_axes, where: str = "`state_out_axes`"
) -> tuple[tuple[int | None, Filter], ...]:
    """`state_out_axes` as a tuple of `(axis, filter)` pairs, in the order given.

    `None` means no filter (every state goes to axis 0, a `NonBatchState` to None); a
    single filter means `{0: filter}`; a dict maps `int | None` to filters. `where`
    names the argument in messages.
    """
    if state_out_axes is None:
        return ()
    if not isinstance(state_out_axes, dict):
        state_out_axes = {0: state_out_axes}
    out = []
    for axis, filt in state_out_axes.items():
        if axis is not None and (
            isinstance(axis, bool) or not isinstance(axis, (int, np.integer))
        ):
            raise TypeError(
                f"The keys of {where} must be ints (an axis) or None (replicated), but "
                f"got the key {axis!r} of type {type(axis).__name__}. The dict maps "
                "each axis to its filters (`{0: filter, None: ...}`), not filters to "
                "axes."
            )
        out.append((None if axis is None else int(axis), to_predicate(filt)))
    return tuple(out)


def state_kind(state) -> str:
    """How a state is named in messages: its marker type, or "array"."""
    return type(state).__name__ if isinstance(state, State) else "array"


def _asked(f, ref, axis, where: str, show: Callable[[tuple], str]) -> bool:
    try:
        return bool(f(ref.path, ref.state, ref.ancestors))
    except (jax.errors.TracerBoolConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"The filter {f!r} for axis {axis} in {where} reads the value of the state "
            f"at {show(ref.path)}, which is not known when filters are asked (while the "
            "function is traced, before anything runs). Filter by marker type, tag or "
            "path instead."
        ) from None


def assign_axis(
    spec,
    ref,
    matched: list | None = None,
    where: str = "`state_out_axes`",
    show: Callable[[tuple], str] | None = None,
) -> int | None:
    """The axis (as written by the user, maybe negative) of one state (a
    `_tree.StateRef`). `matched`, if given, has one flag per filter of `spec`, set for
    each filter that matches this state. `where` names the argument and `show` writes
    a path, in messages (by default as `path_name` does)."""
    if show is None:
        root = ref.ancestors[0] if ref.ancestors else None
        show = functools.partial(path_name, tree=root)
    hits, catch_all = [], []
    for i, (axis, f) in enumerate(spec):
        if not _asked(f, ref, axis, where, show):
            continue
        if matched is not None:
            matched[i] = True
        (catch_all if isinstance(f, Everything) else hits).append(axis)
    if isinstance(ref.state, NonBatchState):
        return None
    axes = list(dict.fromkeys(hits or catch_all))
    if len(axes) > 1:
        shown = ", ".join("None" if a is None else str(a) for a in axes)
        raise ValueError(
            f"The state at {show(ref.path)} ({state_kind(ref.state)}) is matched by "
            f"the filters of several axes in {where}: {shown}. Each state must "
            "go to one axis; make the filters exclusive (for example with `filters.Not`), "
            "or use `...` for a catch-all, which only counts for states no other filter "
            "matched."
        )
    return axes[0] if axes else 0


def warn_unmatched(spec, matched: list, where: str = "state_out_axes") -> None:
    """A `UserWarning` for each filter of `spec` (other than a catch-all) that matched no
    state: almost always a typo in a tag, or a marker type the model does not use."""
    for (axis, f), hit in zip(spec, matched):
        if hit or isinstance(f, Everything):
            continue
        warnings.warn(
            f"The filter {f!r} for axis {axis} in `{where}` matched no state of the tree, "
            "so it had no effect (the states it was meant for went to axis 0, or to the "
            "catch-all). Check the type or tag it names against the model's markers, "
            "for example with `eqx_pmapstate.describe`.",
            UserWarning,
            stacklevel=4,
        )


def mapped_axis(axis, leaf, n: int, where: str, fix: str | Callable[[int], str]) -> int:
    """Where input axis `axis` (maybe negative) is in `leaf`, checked: an int, in range,
    of length `n`. `where` names the input in messages; `fix` says what to do instead
    (or, a callable, says it for an axis of the length it is given)."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(
            f"{where} is given the axis {axis!r}, which is not an int or None. Give an "
            "int (the axis to map over) or None (the same on every device)."
        )
    ndim = np.ndim(leaf)
    pos = int(axis) + ndim if axis < 0 else int(axis)
    if not 0 <= pos < ndim:
        what = (
            "it is a scalar (0-d)" if ndim == 0 else f"it has only {ndim} dimension(s)"
        )
        raise ValueError(
            f"{where} is to be mapped over its axis {axis}, but {what}. "
            f"{fix(n) if callable(fix) else fix}"
        )
    length = np.shape(leaf)[pos]
    if length != n:
        raise ValueError(
            f"{where} is to be mapped over its axis {axis}, of length {length}, but "
            f"the mapped axis has size {n}. {fix(length) if callable(fix) else fix}"
        )
    return pos
