"""Everything this library takes from JAX beyond its main public API, in one place.

The jaxpr types come from `jax.extend.core`, JAX's API for libraries that read and
evaluate jaxprs; `Tracer` from `jax.core`. A function traced as `jax.jit(f)` is one
`jit` equation, whose parameters (JAX's own) are bound again unchanged (`one_call`).
Two private functions are used: `jax._src.util.register_cache`, so that
`jax.clear_caches()` also clears this library's cache, and
`jax._src.xla_bridge.backends_are_initialized`, so that `initialize_distributed` can
say it is called too late instead of failing inside JAX. And the text of JAX's
`NameError` for a collective over an axis name nobody binds (`unbound_axis`), so that a
step naming another axis than the one it is mapped over is told so.
`tests/test_jax_compat.py` pins each of these; if JAX changes one, that test fails.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.extend.core as jex_core
from jax.core import Tracer as Tracer


ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
Literal = jex_core.Literal
jaxpr_as_fun = jex_core.jaxpr_as_fun


_UNBOUND = re.compile(r"unbound axis name: ([^\s.]+)")


def unbound_axis(error: NameError) -> str | None:
    """The axis name in JAX's error for a collective over an unbound axis, or None if
    `error` is not that error."""
    found = _UNBOUND.search(str(error))
    return found.group(1) if found else None


def open_jaxpr(j) -> tuple[Any, int]:
    """A `Jaxpr` and its number of constvars, from a `ClosedJaxpr` or a `Jaxpr`."""
    if isinstance(j, ClosedJaxpr):
        return j.jaxpr, len(j.jaxpr.constvars)
    return j, len(j.constvars)


def subjaxprs(params) -> list:
    """The jaxprs (closed or open) among an equation's parameters."""
    return list(jex_core.jaxprs_in_params(params))


def hoist_consts(closed):
    """The `Jaxpr` of `closed` with its constants made its first inputs: it holds no
    value (JAX 0.12's `Jaxpr` keeps the constants' values attached, which would keep the
    user's closed-over arrays alive in a cached program)."""
    jaxpr = closed.jaxpr
    return jaxpr.replace(constvars=[], invars=[*jaxpr.constvars, *jaxpr.invars])


def evaluate(jaxpr, *args) -> list:
    """Evaluates a `Jaxpr` that has no constants on `args`."""
    return jaxpr_as_fun(ClosedJaxpr(jaxpr, []))(*args)


def one_call(outer):
    """`(inner, call)` for `outer`, the `ClosedJaxpr` of `jax.jit(f)` (with
    `keep_unused=True`): where it is one `jit` equation from its inputs to its outputs,
    `inner` is that equation's jaxpr (what `jax.make_jaxpr(f)` gives) and `call` the
    equation's `(primitive, params)`, which `bind_call` binds again; `call` is None
    where `inner` holds constants (a program takes them as inputs instead). `(None,
    None)` where `outer` is not one such equation. Binding the equation is one
    operation for the trace that binds it, where evaluating `inner` is one per
    equation. The parameters are JAX's own, passed back unchanged."""
    jaxpr = outer.jaxpr
    if outer.consts or len(jaxpr.eqns) != 1:
        return None, None
    eqn = jaxpr.eqns[0]
    inner = eqn.params.get("jaxpr")
    if not isinstance(inner, ClosedJaxpr):
        return None, None
    same = list(eqn.invars) == list(jaxpr.invars)
    if not same or list(eqn.outvars) != list(jaxpr.outvars):
        return None, None
    return inner, None if inner.consts else (eqn.primitive, dict(eqn.params))


def bind_call(call, *args) -> list:
    """The outputs of the equation `call` (from `one_call`) on `args`."""
    primitive, params = call
    return list(primitive.bind(*args, **params))


def per_device_mesh(mesh, axis_name):
    """The abstract mesh `jax.shard_map` traces its body in: `mesh`'s, with `axis_name`
    made `Manual`. In its context (`jax.sharding.use_abstract_mesh`), JAX moves a
    closed-over array laid out on a mesh of `Auto` axes into the body with a `reshard`
    when an operation takes it (in `Primitive.bind`), so that the jaxpr names no mesh
    the body cannot run on."""
    return mesh.abstract_mesh.update_axis_types(
        {axis_name: jax.sharding.AxisType.Manual}
    )


# Settings that change what a traced function computes. Read one by one (public) only
# where JAX offers no `trace_context` (the test pins that it does).
_TRACE_SETTINGS = (
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
    "jax_default_matmul_precision",
    "jax_enable_x64",
    "jax_threefry_partitionable",
    "jax_default_prng_impl",
    "jax_softmax_custom_jvp",
    "jax_debug_nans",
    "jax_debug_infs",
)


def _read_settings() -> tuple:
    return tuple(getattr(jax.config, name, None) for name in _TRACE_SETTINGS)


def _trace_context_function():
    try:
        from jax._src import config
    except ImportError:  # pragma: no cover - a JAX without it
        return _read_settings
    return getattr(config, "trace_context", _read_settings)


trace_context = _trace_context_function()
"""`trace_context()`: the current values (this thread's, with the context managers in
force) of the JAX settings that change what a traced function computes (dtype
promotion, matmul precision, the PRNG's implementation, ...), as a hashable tuple:
`jax.jit` keys its own caches by it, and so does this library's program cache."""


def backends_are_initialized() -> bool:
    """Whether JAX's backends exist already (a computation ran, or devices were asked
    for), after which `jax.distributed.initialize` is too late. False where JAX does not
    say (the test pins that it does)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without it
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return False if check is None else bool(check())


def register_with_jax_clear_caches(cache, what: str) -> bool:
    """Registers `cache` (with `cache_clear`, `cache_info`, `cache_keys`) so that
    `jax.clear_caches()` clears it. Returns whether JAX offered the hook."""
    try:
        from jax._src import util
    except ImportError:  # pragma: no cover - a JAX without it
        return False
    register = getattr(util, "register_cache", None)
    if register is None:  # pragma: no cover
        return False
    register(cache, what)
    return True
