"""Tracing a per-device function, once, to a jaxpr and the structure of its output."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ._jax_compat import Literal, one_call, per_device_mesh, subjaxprs, unbound_axis


_active = threading.local()


class Traced(NamedTuple):
    """A per-device function, traced.

    - `jaxpr`: the `ClosedJaxpr` of the function from its dynamic inputs to its array
        outputs, with collectives over the axis (traced under `axis_env`).
    - `treedef`: the structure of the output.
    - `paths`: the key path of every flat output leaf.
    - `statics`: every flat output leaf that is not an array (`None` where it is one).
    - `arrays`: the flat indices of the array leaves, in the order of the jaxpr's outputs.
    - `input_of`: per jaxpr output, the index of the input it is unchanged, or None.
    - `wanted`: what the `want` callback returned, inside the trace.
    - `call`: the `jax.jit` equation the function was traced as, which computes `jaxpr`
        in one operation (`_jax_compat.one_call`); a program binds it instead of
        evaluating `jaxpr` again, equation by equation. None where the trace is not one
        such equation.
    """

    jaxpr: Any
    treedef: Any
    paths: tuple
    statics: tuple
    arrays: tuple
    input_of: tuple
    wanted: Any
    call: Any = None


def is_output_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def per_device_avals(dyn: Sequence, in_axes: Sequence[int | None]) -> list:
    """The abstract value of each input as one device sees it (mapped axis removed)."""
    out = []
    for x, axis in zip(dyn, in_axes):
        if isinstance(x, jax.Array):  # (and tracers): read, not computed
            shape, dtype = list(x.shape), x.dtype
        else:
            shape, dtype = list(np.shape(x)), jnp.result_type(x)
        weak = bool(getattr(x, "weak_type", False))  # (a key array has none)
        if axis is not None:
            del shape[axis]
        out.append(jax.ShapeDtypeStruct(tuple(shape), dtype, weak_type=weak))
    return out


@contextlib.contextmanager
def _tracing(axis_name):
    stack = getattr(_active, "stack", [])
    _active.stack = stack + [axis_name]
    try:
        yield
    finally:
        _active.stack = stack


def active_axis() -> str | None:
    """The axis of the per-device function this thread is tracing, if any."""
    stack = getattr(_active, "stack", [])
    return stack[-1] if stack else None


def trace(
    fn: Callable[[list], Any],
    avals: Sequence,
    axis_name,
    axis_size: int,
    want: Callable[[Any, list], Any] | None = None,
    mesh=None,
) -> Traced:
    """Traces `fn` (which takes the list of per-device inputs) once, with the collectives
    of `axis_name` bound to an axis of `axis_size`. `want(out, flat)` is called inside the
    trace with the output and its flattened `(path, leaf)` pairs, where array leaves are
    tracers (so that filters asking `eqx.is_array` see arrays).

    With a `mesh`, `fn` is traced as the body of a `shard_map` over it is, so that an
    array it closes over that is laid out on a mesh works under `jax.vmap`, `jax.grad`
    and the rest (see `_closed`)."""
    found: dict = {}

    def flat_fn(*xs):
        out = fn(list(xs))
        flat, treedef = jtu.tree_flatten_with_path(out)
        is_array = [is_output_array(leaf) for _, leaf in flat]
        found["treedef"] = treedef
        found["paths"] = tuple(p for p, _ in flat)
        found["statics"] = tuple(
            None if a else leaf for (_, leaf), a in zip(flat, is_array)
        )
        found["arrays"] = tuple(i for i, a in enumerate(is_array) if a)
        found["wanted"] = want(out, flat) if want is not None else None
        return [jnp.asarray(leaf) for (_, leaf), a in zip(flat, is_array) if a]

    with _tracing(axis_name):
        try:
            closed, call = _closed(flat_fn, avals, axis_name, axis_size, mesh)
        except NameError as e:
            name = unbound_axis(e)
            if name is None:
                raise
            raise NameError(_unbound_message(name, axis_name)) from None
    invars = {v: j for j, v in enumerate(closed.jaxpr.invars)}
    input_of = tuple(
        None if isinstance(v, Literal) else invars.get(v) for v in closed.jaxpr.outvars
    )
    return Traced(
        closed,
        found["treedef"],
        found["paths"],
        found["statics"],
        found["arrays"],
        input_of,
        found["wanted"],
        call,
    )


def _unbound_message(name: str, axis_name) -> str:
    mapped = (
        f"it is mapped over the axis {axis_name!r}"
        if axis_name is not None
        else "the axis it is mapped over has no name"
    )
    return (
        f"The function uses the axis name {name!r} in a collective (such as "
        f"`jax.lax.psum`, `pmean`, `all_gather` or `axis_index`), but {mapped}. Name "
        f"that axis in the collective, or map over {name!r} (`axis_name={name!r}`)."
    )


def _closed(flat_fn, avals, axis_name, axis_size: int, mesh):
    """The jaxpr of `flat_fn`, and the `jax.jit` equation it was traced as (see
    `_jaxpr_of`).

    A closed-over `jax.Array` laid out on a mesh carries that mesh in its type, and the
    operations it feeds (a broadcast under `jax.vmap`, a `reshard` under `jax.grad`) may
    name it; such a jaxpr fails inside the `shard_map` body that runs it. Only then is
    `flat_fn` traced again, in the body's context, where JAX moves such an array into the
    body first, as `jax.pmap` does. (Not always in that context: there, `eqx.nn.State`
    finds a new value's type differs from the old one's, as under `jax.pmap`.) Some uses
    JAX cannot trace there (`jnp.where` on such an array; indexing it, with JAX 0.10),
    nor can its own `jax.pmap`: a clear error.
    """
    closed, call = _jaxpr_of(flat_fn, avals, axis_name, axis_size)
    if mesh is None or not _runs_elsewhere(closed):
        return closed, call
    manual = per_device_mesh(mesh, axis_name)
    typed = [  # as the body of a `shard_map` sees its inputs
        jax.ShapeDtypeStruct(
            a.shape, a.dtype, weak_type=a.weak_type, sharding=NamedSharding(manual, P())
        )
        for a in avals
    ]
    try:
        with jax.sharding.use_abstract_mesh(manual):
            return _jaxpr_of(flat_fn, typed, axis_name, axis_size)
    except ValueError as e:
        if "mesh" not in str(e).lower():
            raise
        raise ValueError(_closed_message(closed)) from None


def _jaxpr_of(flat_fn, avals, axis_name, axis_size: int):
    """The `ClosedJaxpr` of `flat_fn` on `avals`, traced with the collectives of
    `axis_name` bound, and the `jax.jit` equation that computes it (None if there is
    none). It is traced as `jax.jit(flat_fn)`, the one equation a program's body can
    bind instead of evaluating the jaxpr again (`_jax_compat.one_call`); where that
    trace is not one such equation, traced again as is."""
    env = [(axis_name, axis_size)]
    outer = jax.make_jaxpr(jax.jit(flat_fn, keep_unused=True), axis_env=env)(*avals)
    closed, call = one_call(outer)
    if closed is None:  # pragma: no cover - JAX made more than one equation
        closed = jax.make_jaxpr(flat_fn, axis_env=env)(*avals)
    return closed, call


def _on_a_mesh(s) -> bool:
    return isinstance(s, NamedSharding) and not s.mesh.empty


def _names_a_mesh(jaxpr) -> bool:
    """Whether an operation of `jaxpr` (or of one inside it) carries a mesh."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        for value in eqn.params.values():
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(_on_a_mesh(v) for v in values):
                return True
        if any(_names_a_mesh(sub) for sub in subjaxprs(eqn.params)):
            return True
    return False


def _runs_elsewhere(closed) -> bool:
    """Whether a closed-over array on a mesh makes an operation name that mesh."""
    return bool(_consts_on_a_mesh(closed)) and _names_a_mesh(closed)


def _consts_on_a_mesh(closed) -> list:
    return [
        c for c in closed.consts if _on_a_mesh(getattr(jax.typeof(c), "sharding", None))
    ]


def _closed_message(closed) -> str:
    on_mesh = _consts_on_a_mesh(closed)
    shown = ", ".join(f"{c.dtype}{list(c.shape)}" for c in on_mesh[:3])
    return (
        f"The function closes over array(s) laid out on a mesh ({shown}) and, under a "
        "transformation such as `jax.vmap` or `jax.grad`, uses them in a way that JAX "
        f"{jax.__version__} cannot run on one device of a mesh (`jnp.where` on one, or "
        "indexing one with JAX 0.10; `jax.pmap` fails on it too). Pass such an array as "
        "an argument with an `in_axes` of None: it is then seen whole on every device."
    )
