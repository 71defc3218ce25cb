"""The library's errors about replication, and the messages they carry.

Every failure to keep a replicated leaf the same on every device is one exception type,
`ReplicationError` (a `ValueError`), whoever finds it: `pmap2` or `Map` when a step is
traced (an output not proved the same) or after a call (`check_replicated="runtime"`),
and `pmap2_new_states`, `vmap2_new_states` and `eval_new_states` for the states they
make. Each message says which leaves, why, and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._tree import paths_str


class ReplicationError(ValueError):
    """A leaf that should be the same on every device is not, or is not proved so.

    Raised when a `pmap2` step (or a `Map` call) is traced and a replicated output is not
    proved the same on every device, after a call with `check_replicated="runtime"` when
    one differs, and by `pmap2_new_states`, `vmap2_new_states` and `eval_new_states` for a
    replicated state. A subclass of `ValueError`. `.names` lists the leaves, as the
    message writes them.
    """

    def __init__(self, message: str, names: Sequence[str] = ()):
        super().__init__(message)
        self.names = tuple(names)


def _fix_outputs(axis_name) -> str:
    return (
        f"Reduce it over the axis (for gradients: `jax.lax.pmean(grads, {axis_name!r})`), "
        "or return it with a device axis (`out_axes=0`)."
    )


def unproved_outputs(
    names: Sequence[str], axis_name, sources: Sequence[str] = ()
) -> ReplicationError:
    """Found when a step is traced: outputs to be replicated, not proved the same.
    `sources`: the replicated arguments whose layout the default rule gives outputs of
    their structure, for those among them."""
    why = ""
    if sources:
        why = (
            " It is to be replicated because it has the structure, per-device shapes and "
            f"dtypes of a replicated argument ({', '.join(sources)}), whose layout the "
            "default rule gives it; if it is not that argument's new value, give its "
            "axis with `out_axes`."
        )
    return ReplicationError(
        f"The output at {paths_str(names)} must come back replicated (the same on every "
        f"device of the axis {axis_name!r}), but it is computed from mapped inputs (or "
        "`jax.lax.axis_index`) without a collective such as `jax.lax.pmean`, `psum` or "
        "`all_gather` over the axis, so it may differ between devices."
        + why
        + " "
        + _fix_outputs(axis_name)
        + " If it is equal on every device for a reason this library cannot see, pass "
        "`check_replicated='runtime'` to have it compared at run time instead.",
        names,
    )


def differing_outputs(names: Sequence[str], axis_name) -> ReplicationError:
    """Found after a call (`check_replicated="runtime"`): outputs that differ."""
    return ReplicationError(
        f"The output at {paths_str(names)} must come back replicated (the same on every "
        f"device of the axis {axis_name!r}), but it differs between devices (compared "
        "after the call). " + _fix_outputs(axis_name),
        names,
    )


_FIX_STATES = (
    "create it from replicated inputs only, or give it a device axis in "
    "`state_out_axes` (and do not mark it `NonBatchState`)."
)


def differing_states(names: Sequence[str]) -> ReplicationError:
    """Found when states are made: replicated states whose values differ."""
    return ReplicationError(
        f"The state(s) at {paths_str(names)} are to be replicated (axis None), but their "
        "values differ between devices (or ensemble members, or processes). A "
        "replicated state must be the same everywhere: " + _FIX_STATES,
        names,
    )


def uncheckable_states(names: Sequence[str]) -> ReplicationError:
    """Inside another transformation, unproved replicated states cannot be compared."""
    return ReplicationError(
        f"The state(s) at {paths_str(names)} are to be replicated (axis None), but this "
        "library cannot prove them the same on every device, and inside `jax.jit` (or "
        "another transformation) it cannot compare them either. Call `pmap2_new_states` "
        "outside the transformation, or give these states a device axis in "
        "`state_out_axes`.",
        names,
    )


def unproved_abstract_states(names: Sequence[str]) -> ReplicationError:
    """`eval_new_states`: unproved replicated states, which it cannot compare (it runs
    nothing), where `pmap2_new_states` would compare them when made."""
    return ReplicationError(
        f"The state(s) at {paths_str(names)} are to be replicated (axis None), but they "
        "are computed from mapped inputs (or `jax.lax.axis_index`), so they may differ "
        "between devices, and `eval_new_states` runs nothing that could compare them "
        "(`pmap2_new_states` would, and refuse them if they differ). A replicated state "
        "must be the same everywhere: " + _FIX_STATES,
        names,
    )
