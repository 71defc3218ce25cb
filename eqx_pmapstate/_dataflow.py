"""Which values of a per-device program differ between devices.

A dataflow pass over the program's jaxpr, traced once with `jax.pmap`'s semantics (a
replicated input is an identical copy on every device). A value *varies* over the axis
when it may differ between devices: it depends on a mapped input, or on
`jax.lax.axis_index` (or another collective whose result differs per device, such as
`ppermute`), of that axis. A value is *invariant* when it is computed only from
invariant values by deterministic operations, or when it is the result of a reducing
collective over the axis (`psum`, `pmean`, `pmax`, `pmin`, `all_gather`, `pbroadcast`).

The pass follows sub-jaxprs: calls (`jit`, `custom_jvp`/`custom_vjp`, `checkpoint`),
`cond`, `while` and `scan` (to a fixed point). Any other operation with sub-jaxprs (a
`reduce` with its own computation, a nested `shard_map`, or a `scan` whose split into
constants, carry and scanned inputs cannot be read) varies as soon as one of its inputs
varies or one of its sub-jaxprs could make a value vary. So "invariant" is a proof;
"varying" may be conservative (`x - x` varies when `x` does).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ._jax_compat import Literal, open_jaxpr, subjaxprs


# The primitive names below are those JAX emits. Seen (`tests/test_dataflow.py` traces
# the constructs users write and fails on a name the pass does not know) with JAX 0.10.2
# and 0.12.1 under pmap2's trace (`jax.make_jaxpr` with the axis bound: `jax.pmap`'s
# semantics): `psum` (also for `pmean`), `pmax`, `pmin`, `all_gather` (also for
# `to="invarying"`, 0.12), `pbroadcast`, `reduce_scatter` (`psum_scatter`),
# `axis_index`; `jit`, `remat2`, `custom_jvp_call`, `custom_vjp_call`, `cond`, `while`,
# `scan`. The other names are those of older JAX or of a body traced with varying-axis
# typing (`shard_map(check_vma=True)`: `psum_invariant`, `all_gather_invariant`,
# `pvary`, `pcast`); a name the pass does not know only makes its proof conservative.

# Collectives whose result is the same on every device of the axes they reduce over.
_REDUCING = frozenset(
    {
        "psum",  # psum, pmean: 0.10.2-0.12.1
        "psum2",  # older JAX, varying-axis typing
        "psum_invariant",  # varying-axis typing
        "pmax",  # 0.10.2-0.12.1
        "pmin",  # 0.10.2-0.12.1
        "all_gather",  # all_gather (any `to`): 0.10.2-0.12.1
        "all_gather_invariant",  # varying-axis typing
        "pbroadcast",  # 0.10.2-0.12.1
    }
)
# Operations that change how a value is typed, not the value (varying-axis typing).
_VALUE_PRESERVING = frozenset({"pvary", "pcast"})
# Operations whose result may differ between devices whatever their inputs.
_IMPURE = frozenset({"io_callback", "rng_uniform"})
# Operations that call their one sub-jaxpr once on their operands.
_CALLS = frozenset(
    {
        "pjit",  # jax.jit before JAX 0.7
        "jit",  # jax.jit: 0.10.2-0.12.1
        "closed_call",  # jax.extend's jaxpr_as_fun inside a trace (older JAX)
        "core_call",
        "remat",  # older JAX
        "remat2",  # jax.checkpoint: 0.10.2-0.12.1
        "checkpoint",
        "custom_jvp_call",  # 0.10.2-0.12.1
        "custom_vjp_call",  # 0.10.2-0.12.1
        "custom_vjp_call_jaxpr",  # older JAX
    }
)


def varying_outputs(
    closed, in_varying: Sequence[bool], axis_name: Hashable | None
) -> tuple[bool, ...]:
    """For each output of `closed` (a `ClosedJaxpr`), whether it may differ between
    devices of `axis_name`, given which inputs do. Constants are invariant."""
    jaxpr, n_consts = open_jaxpr(closed)
    return _run(jaxpr, [False] * n_consts + list(in_varying), axis_name)


def reached_unreduced(
    closed,
    consts: Sequence[bool],
    inputs: Sequence[bool],
    axis_name: Hashable | None,
) -> tuple[bool, ...]:
    """For each output of `closed`, whether a value flagged among its constants
    (`consts`) and inputs (`inputs`) reaches it without a reduction over `axis_name`:
    the question `varying_outputs` answers for a program, asked by `_zero` about the
    values of the step an optimizer closes over."""
    jaxpr, _ = open_jaxpr(closed)
    return _run(jaxpr, list(consts) + list(inputs), axis_name)


def _run(jaxpr, in_flags: Sequence[bool], axis: Hashable | None) -> tuple[bool, ...]:
    # `in_flags` covers the jaxpr's constvars, then its invars.
    env: dict = {}
    for var, flag in zip(
        list(jaxpr.constvars) + list(jaxpr.invars), in_flags, strict=True
    ):
        env[var] = bool(flag)

    def read(atom) -> bool:
        return False if isinstance(atom, Literal) else env.get(atom, False)

    for eqn in jaxpr.eqns:
        flags = _rule(eqn, [read(a) for a in eqn.invars], axis)
        for var, flag in zip(eqn.outvars, flags):
            env[var] = flag
    return tuple(read(a) for a in jaxpr.outvars)


def _sub(
    closed_or_open, in_flags: Sequence[bool], axis: Hashable | None
) -> tuple[bool, ...]:
    jaxpr, n_consts = open_jaxpr(closed_or_open)
    return _run(jaxpr, [False] * n_consts + list(in_flags), axis)


def _axis_names(params) -> tuple:
    """The axis names an equation's parameters name (`axes` or `axis_name`)."""
    names: list = []
    for key in ("axes", "axis_name"):
        value = params.get(key)
        if isinstance(value, (tuple, list)):
            names.extend(value)
        elif value is not None:
            names.append(value)
    return tuple(names)


def _rule(eqn, ins: list[bool], axis: Hashable | None) -> list[bool]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if axis in _axis_names(eqn.params):
        grouped = eqn.params.get("axis_index_groups") is not None
        if name in _REDUCING and not grouped:
            return [False] * n_out
        if name in _VALUE_PRESERVING:
            return [any(ins)] * n_out
        return [True] * n_out  # axis_index, ppermute, all_to_all, psum_scatter, ...
    if name in _IMPURE:
        return [True] * n_out
    special = _HIGHER_ORDER.get(name)
    if special is not None:
        found = special(eqn, ins, axis)
        if found is not None:
            return list(found)
    subs = subjaxprs(eqn.params)
    if not subs:
        return [any(ins)] * n_out
    if name in _CALLS and len(subs) == 1:
        jaxpr, _ = open_jaxpr(subs[0])
        if len(jaxpr.invars) == len(ins) and len(jaxpr.outvars) == n_out:
            return list(_sub(subs[0], ins, axis))
    # Unknown: varies if any input does, or if its body can make a value vary.
    return [any(ins) or any(_introduces_variation(s, axis) for s in subs)] * n_out


def _introduces_variation(closed_or_open, axis: Hashable | None) -> bool:
    """Whether a jaxpr can produce a varying value from invariant inputs."""
    jaxpr, n_consts = open_jaxpr(closed_or_open)
    flags = _run(jaxpr, [False] * (n_consts + len(jaxpr.invars)), axis)
    return any(flags)


def _cond(eqn, ins, axis):
    if ins[0]:  # the branch taken differs between devices
        return [True] * len(eqn.outvars)
    outs = [False] * len(eqn.outvars)
    for branch in eqn.params["branches"]:
        outs = [a or b for a, b in zip(outs, _sub(branch, ins[1:], axis))]
    return outs


def _while(eqn, ins, axis):
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    cond_consts, body_consts, carry = ins[:cn], ins[cn : cn + bn], list(ins[cn + bn :])
    carry = _fixed_point(
        lambda c: _sub(eqn.params["body_jaxpr"], body_consts + c, axis), carry
    )
    if _sub(eqn.params["cond_jaxpr"], cond_consts + carry, axis)[0]:
        return [True] * len(eqn.outvars)  # the trip count differs between devices
    return carry


def _scan(eqn, ins, axis):
    counts = _scan_counts(eqn)
    if counts is None:
        return None  # the generic rule applies
    nc, nk = counts
    consts, carry, xs = ins[:nc], list(ins[nc : nc + nk]), ins[nc + nk :]
    body = eqn.params["jaxpr"]
    carry = _fixed_point(lambda c: _sub(body, consts + c + xs, axis)[:nk], carry)
    return list(_sub(body, consts + carry + xs, axis))


def _scan_counts(eqn) -> tuple[int, int] | None:
    """How many of a `scan`'s operands are constants and how many the carry: from its
    parameters (`num_consts`, `num_carry`) where it has them, else from the shapes, when
    only one split fits (newer JAX describes the split in a private structure)."""
    if "num_consts" in eqn.params and "num_carry" in eqn.params:
        return eqn.params["num_consts"], eqn.params["num_carry"]
    body, _ = open_jaxpr(eqn.params["jaxpr"])
    length = eqn.params.get("length")
    if length is None or len(body.invars) != len(eqn.invars):
        return None
    fits = [
        (nc, nk)
        for nk in range(len(body.outvars) + 1)
        for nc in range(len(body.invars) - nk + 1)
        if _scan_split_fits(eqn, body, nc, nk, length)
    ]
    return fits[0] if len(fits) == 1 else None


def _scan_split_fits(eqn, body, nc: int, nk: int, length: int) -> bool:
    def shape(v):
        return tuple(getattr(v.aval, "shape", ()))

    ins, outs = eqn.invars, eqn.outvars
    stacked_in = all(
        shape(a) == (length,) + shape(b)
        for a, b in zip(ins[nc + nk :], body.invars[nc + nk :])
    )
    stacked_out = all(
        shape(a) == (length,) + shape(b) for a, b in zip(outs[nk:], body.outvars[nk:])
    )
    carried = all(
        shape(a) == shape(b) == shape(c) == shape(d)
        for a, b, c, d in zip(
            ins[nc : nc + nk], body.invars[nc : nc + nk], body.outvars[:nk], outs[:nk]
        )
    )
    unmapped = all(shape(a) == shape(b) for a, b in zip(ins[:nc], body.invars[:nc]))
    return stacked_in and stacked_out and carried and unmapped


def _fixed_point(step, flags: list[bool]) -> list[bool]:
    while True:
        new = [a or b for a, b in zip(flags, step(flags))]
        if new == flags:
            return flags
        flags = new


_HIGHER_ORDER = {"cond": _cond, "while": _while, "scan": _scan}
