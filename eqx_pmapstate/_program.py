"""The program that runs a traced per-device jaxpr over an axis.

Over a mesh axis it is `jax.jit(jax.shard_map(..., check_vma=False))`, the semantics of
`jax.pmap` (a replicated input is an identical copy on each device), with the output
shardings given explicitly so that a device axis survives on a one-device mesh and on
zero-size arrays; on several devices, those XLA's propagation gives anyway are left to
it (`loose`, which costs less compile time; `_engine.Compiled.settle` checks them). A jaxpr that uses no collective over the axis, has no side effect and
draws no random bits but threefry's computes each device's outputs from that device's
inputs alone, as `jax.vmap` computes them; it is run as
`jax.jit(jax.vmap(...))` over the global arrays instead, with the same output shardings,
which XLA partitions over the mesh as it does the user's own `jax.jit`. The results are
the same; the compile is cheaper (XLA's Shardy partitioner takes time quadratic in the
number of operands of one `shard_map`: minutes at 10,000 arrays). Over an ensemble on one
device it is `jax.jit(jax.vmap(...))`. The user's function is not traced again: the
`jax.vmap` programs evaluate the jaxpr traced before, and the `shard_map` body binds
the one `jax.jit` equation it was traced as (`_trace.Traced.call`), which costs one
operation where evaluating costs about as much as the first trace (1 s at 1,000
gradients and their `pmean`s).

The jaxpr's constants are inputs of the program (replicated), so that the program holds
no array of its own; the caller passes them on each call.

A program is traced by `jax.jit` only inside `tracing_allowed()`. The steady-state call
(`_pmap2`'s quick path) calls it outside, trusting `jax.jit`'s C++ dispatch to check
the arguments. With `fix_inputs`, the program's input layouts are fixed
(`in_shardings`); then (measured on JAX 0.10.2 and 0.12.1, pinned by
`tests/test_quick_path.py`) an argument of the same shape, dtype, weak type and layout
runs; one committed to another layout raises `ValueError` (but one on a mesh of the
same devices in another order is moved, and one of an equivalent layout, as on a mesh
of one device, is taken: the caller checks layouts for them); any other (another shape,
dtype or weak type; an array not committed to a layout, a host array) makes `jax.jit`
trace again, which raises `Stale`; both before anything runs, and the caller takes the
full path, which checks everything itself.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Sequence, Set

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._checks import differ_across, differ_between_members
from ._jax_compat import bind_call, evaluate, subjaxprs
from ._mesh import axis_spec, shardings


class Stale(Exception):
    """A compiled program was called with arguments it was not compiled for, outside
    `tracing_allowed()`: nothing ran; take the full path."""


_allowed = threading.local()


@contextlib.contextmanager
def tracing_allowed():
    """Lets `jax.jit` trace the programs called inside (on this thread)."""
    before = getattr(_allowed, "on", False)
    _allowed.on = True
    try:
        yield
    finally:
        _allowed.on = before


def _gated(fun):
    """`fun`, raising `Stale` when traced outside `tracing_allowed()`."""

    @functools.wraps(fun)
    def gated(*xs):
        if not getattr(_allowed, "on", False):
            raise Stale
        return fun(*xs)

    return gated


def _evaluate(jaxpr, consts, local) -> list:
    outs = evaluate(jaxpr, *consts, *local)
    # A literal output comes back as a Python scalar: give it its traced dtype.
    return [
        o if isinstance(o, jax.Array) else jnp.asarray(o, dtype=v.aval.dtype)
        for o, v in zip(outs, jaxpr.outvars)
    ]


def _expand(x, axis):
    return x if axis is None else jnp.expand_dims(x, axis)


def _squeeze(xs, in_axes):
    return [x if a is None else jnp.squeeze(x, a) for x, a in zip(xs, in_axes)]


def sharded(
    jaxpr,
    n_consts: int,
    in_axes: Sequence[int | None],
    outputs: Sequence[tuple[int, int | None]],
    checked: Sequence[int],
    mesh: Mesh,
    axis_name: str,
    donate: Sequence[int] = (),
    fix_inputs: bool = False,
    loose: Set[int] = frozenset(),
    call=None,
):
    """`jit(shard_map(...))` of `jaxpr` (an open `Jaxpr`, whose constants are inputs): takes `(*consts, *inputs)` as global arrays and
    returns, for each `(k, axis)` of `outputs`, the jaxpr's output `k` laid out along
    `axis`; then, if `checked` (output numbers) is not empty, a bool per checked output:
    True where it differs between devices.

    `loose`: the positions in `outputs` whose layout is left to XLA's propagation
    instead of named as an output sharding (see `Compiled.settle`); only on a mesh of
    several devices with `fix_inputs`.

    `call`: the `jax.jit` equation `jaxpr` was traced as (`_trace.Traced.call`), if any;
    the `shard_map` body binds it, one operation, instead of evaluating `jaxpr`
    equation by equation (which takes about as long as tracing the user's function)."""
    in_axes, outputs, checked = tuple(in_axes), tuple(outputs), tuple(checked)
    run = None
    if mesh.size == 1 and fix_inputs:
        run = _one_device(
            jaxpr, n_consts, in_axes, outputs, checked, mesh, axis_name, donate
        )
    elif not checked and is_local(jaxpr, axis_name):
        run = _batched(
            jaxpr,
            n_consts,
            in_axes,
            outputs,
            mesh,
            axis_name,
            donate,
            fix_inputs,
            loose,
        )
    if run is not None:
        return run
    out_axes = [a for _, a in outputs]

    def body(*xs):
        consts, local = xs[:n_consts], _squeeze(xs[n_consts:], in_axes)
        if call is not None and not n_consts:
            outs = bind_call(call, *local)
        else:
            outs = _evaluate(jaxpr, consts, local)
        res = [_expand(outs[k], a) for k, a in outputs]
        if checked:
            res.append(differ_across([outs[k] for k in checked], axis_name))
        return res

    in_specs = (P(),) * n_consts + tuple(axis_spec(axis_name, a) for a in in_axes)
    out_specs = [axis_spec(axis_name, a) for a in out_axes] + ([P()] if checked else [])
    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    out_shardings = _named(
        [NamedSharding(mesh, s) for s in out_specs],
        loose if fix_inputs else frozenset(),
    )
    return jax.jit(
        _gated(mapped),
        in_shardings=_inputs(mesh, axis_name, n_consts, in_axes)
        if fix_inputs
        else None,
        out_shardings=out_shardings,
        donate_argnums=tuple(n_consts + i for i in donate),
    )


def _one_device(
    jaxpr, n_consts, in_axes, outputs, checked, mesh: Mesh, axis_name, donate
):
    """`sharded`'s program on a mesh of one device, with the same calling convention
    and layouts, without `shard_map`: XLA keeps a collective of a `shard_map` body as
    an all-reduce (all-gather, ...) with one participant, which costs more than the
    rest of a small step. Here the body runs on the inputs with their device axis
    removed, under `jax.vmap` over an axis of size one named `axis_name` to which no
    input is mapped: a collective over it is the identity (a sum over one device), and
    nothing else is batched. Nothing can differ between devices: a checked output's
    flag is False. None if it does not trace (a collective without a rule for
    `jax.vmap`): then the `shard_map` program runs it."""

    def body(xs):
        consts, local = xs[:n_consts], _squeeze(xs[n_consts:], in_axes)
        outs = _evaluate(jaxpr, consts, local)
        return [outs[k] for k, _ in outputs]

    one = jax.vmap(body, in_axes=None, axis_size=1, axis_name=axis_name)

    def program(*xs):
        res = [_expand(o[0], a) for o, (_, a) in zip(one(list(xs)), outputs)]
        if checked:
            res.append(jnp.zeros(len(checked), dtype=bool))
        return res

    out_axes = [a for _, a in outputs]
    run = jax.jit(
        _gated(program),
        in_shardings=_inputs(mesh, axis_name, n_consts, in_axes),
        out_shardings=shardings(mesh, axis_name, out_axes)
        + ([NamedSharding(mesh, P())] if checked else []),
        donate_argnums=tuple(n_consts + i for i in donate),
    )
    return traced_or_none(run, jaxpr, (None,) * n_consts + in_axes, mesh, axis_name)


# Operations whose meaning depends on the mesh, whatever axes their parameters name.
_ON_A_MESH = frozenset({"shard_map", "xla_pmap"})
# XLA's own random generators: `jax.vmap` draws other bits than each device would.
_XLA_RNG = frozenset({"rng_bit_generator", "rng_uniform"})


def _other_keys(eqn) -> bool:
    """Whether `eqn` takes or makes a PRNG key of another implementation than threefry
    (`rbg`, `unsafe_rbg`), whose bits `jax.vmap` draws otherwise than each device would
    (threefry's are the same)."""
    for v in (*eqn.invars, *eqn.outvars):
        dtype = getattr(getattr(v, "aval", None), "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key):
            continue
        if str(dtype) != "key<fry>":
            return True
    return False


def _names_axis(params, axis_name) -> bool:
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(v == axis_name for v in values if isinstance(v, str)):
            return True
    return False


def is_local(jaxpr, axis_name) -> bool:
    """Whether `jaxpr` computes each device's outputs from that device's inputs alone,
    as `jax.vmap` computes them: it has no side effect, and none of its operations (nor
    of the jaxprs inside them) is a collective over `axis_name` (`psum`, `axis_index`,
    ...), a map over a mesh, or draws random bits otherwise than threefry."""
    if jaxpr.effects:
        return False
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _ON_A_MESH or name in _XLA_RNG or _other_keys(eqn):
            return False
        if _names_axis(eqn.params, axis_name):
            return False
        for sub in subjaxprs(eqn.params):
            if not is_local(getattr(sub, "jaxpr", sub), axis_name):
                return False
    return True


def _named(named: list, loose: Set[int]) -> list:
    """`jax.jit`'s `out_shardings`: each of `named`, or None (XLA's propagation
    chooses) at the positions in `loose`. Naming an output's layout costs XLA's
    compile time (about 15% more for 2,000 outputs on CPU), even when its propagation
    would have chosen the same."""
    return [None if i in loose else s for i, s in enumerate(named)]


def _inputs(mesh: Mesh, axis_name, n_consts: int, in_axes) -> tuple:
    """`in_shardings` that fix the layout of each constant (replicated) and input."""
    return tuple(shardings(mesh, axis_name, (None,) * n_consts + tuple(in_axes)))


def _global_struct(aval, axis, n: int, sharding) -> jax.ShapeDtypeStruct:
    shape = list(aval.shape)
    if axis is not None:
        shape.insert(axis, n)
    return jax.ShapeDtypeStruct(
        tuple(shape), aval.dtype, weak_type=aval.weak_type, sharding=sharding
    )


def _batched(
    jaxpr,
    n_consts,
    in_axes,
    outputs,
    mesh: Mesh,
    axis_name,
    donate,
    fix_inputs,
    loose: Set[int] = frozenset(),
):
    """`sharded`'s program for a `jaxpr` that `is_local`: `jit(vmap(...))` over the
    global arrays, laid out by its output shardings. None if `jax.vmap` cannot map it
    (an operation without a batching rule, or an output asked to be replicated that
    the batching finds mapped): then the `shard_map` program runs it."""
    keep = [k for k, _ in outputs]
    all_axes = (None,) * n_consts + in_axes

    def body(*xs):
        outs = _evaluate(jaxpr, xs[:n_consts], xs[n_consts:])
        return [outs[k] for k in keep]

    mapped = jax.vmap(
        body,
        in_axes=all_axes,
        out_axes=[a for _, a in outputs],
        axis_size=mesh.shape[axis_name],
    )
    run = jax.jit(
        _gated(mapped),
        in_shardings=_inputs(mesh, axis_name, n_consts, in_axes)
        if fix_inputs
        else None,
        out_shardings=_named(
            shardings(mesh, axis_name, [a for _, a in outputs]),
            loose if fix_inputs else frozenset(),
        ),
        donate_argnums=tuple(n_consts + i for i in donate),
    )
    return traced_or_none(run, jaxpr, all_axes, mesh, axis_name)


def traced_or_none(run, jaxpr, all_axes, mesh: Mesh, axis_name):
    """`run` once it has traced on the global inputs of `jaxpr` (constants, then inputs,
    laid out along `all_axes`), a trace JAX keeps for the first call; None if the trace
    fails, for any reason: the caller's general program runs it instead."""
    n = mesh.shape[axis_name]
    structs = [
        _global_struct(v.aval, a, n, s)
        for v, a, s in zip(
            jaxpr.invars, all_axes, shardings(mesh, axis_name, all_axes), strict=True
        )
    ]
    try:
        with tracing_allowed():
            run.trace(*structs)
    except Exception:  # noqa: BLE001 - the general program is the fallback
        return None
    return run


def vmapped(
    jaxpr,
    n_consts: int,
    in_axes: Sequence[int | None],
    outputs: Sequence[tuple[int, int | None]],
    checked: Sequence[int],
    axis_size: int,
    axis_name,
    donate: Sequence[int] = (),
):
    """`jit(vmap(...))` of the jaxpr over an ensemble axis of `axis_size` members, with
    the same calling convention as `sharded`. A checked output is made with the member
    axis, compared member by member, and its first member returned."""
    keep = [k for k, _ in outputs]
    checked = tuple(keep.index(k) for k in checked)
    run_axes = tuple(0 if i in checked else a for i, (_, a) in enumerate(outputs))

    def body(consts, local):
        outs = _evaluate(jaxpr, consts, local)
        return [outs[k] for k in keep]

    mapped = jax.vmap(
        body,
        in_axes=(None, list(in_axes)),
        out_axes=list(run_axes),
        axis_name=axis_name,
        axis_size=axis_size,
    )

    def program(*xs):
        outs = list(mapped(list(xs[:n_consts]), list(xs[n_consts:])))
        if not checked:
            return outs
        flags = jnp.stack([differ_between_members(outs[i]) for i in checked])
        for i in checked:
            outs[i] = outs[i][0]
        return outs + [flags]

    return jax.jit(_gated(program), donate_argnums=tuple(n_consts + i for i in donate))
