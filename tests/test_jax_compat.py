"""What the library takes from JAX beyond its main public API (`_jax_compat.py`, and what
the engine relies on), pinned: a JAX upgrade that changes one of these fails here."""

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import N
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate import _cache, _jax_compat
from eqx_pmapstate._dataflow import varying_outputs


AX = "devices"


def _trace(f, *args):
    return jax.make_jaxpr(f, axis_env=[(AX, N)])(*args)


def _eqn(f, *args, name):
    """The one equation named `name` in `f`'s jaxpr (traced with the axis bound)."""
    found = [e for e in _trace(f, *args).jaxpr.eqns if e.primitive.name == name]
    assert len(found) == 1, [e.primitive.name for e in _trace(f, *args).jaxpr.eqns]
    return found[0]


x3 = jnp.arange(3, dtype=jnp.float32)


# --------------------------------------------------------------------------- jax.extend.core


def test_names_from_jax_extend_core():
    assert _jax_compat.ClosedJaxpr is jex_core.ClosedJaxpr
    assert _jax_compat.Jaxpr is jex_core.Jaxpr
    assert _jax_compat.Literal is jex_core.Literal
    assert _jax_compat.jaxpr_as_fun is jex_core.jaxpr_as_fun
    assert callable(jex_core.jaxprs_in_params)


def test_make_jaxpr_gives_closed_jaxpr():
    closed = _trace(lambda x: x * 2, x3)
    assert isinstance(closed, jex_core.ClosedJaxpr)
    assert isinstance(closed.jaxpr, jex_core.Jaxpr)
    assert _jax_compat.open_jaxpr(closed) == (closed.jaxpr, 0)


def test_jaxpr_as_fun_evaluates():
    closed = jax.make_jaxpr(lambda x, y: (x * y, x + 1))(x3, x3)
    a, b = jex_core.jaxpr_as_fun(closed)(x3, x3 + 1)
    np.testing.assert_array_equal(a, x3 * (x3 + 1))
    np.testing.assert_array_equal(b, x3 + 1)


def test_closed_jaxpr_with_other_consts():
    # The program passes the constants in as inputs: a jaxpr closed over new values
    # computes with them.
    c = np.arange(3, dtype=np.float32) * 10  # a numpy array stays a constant
    closed = jax.make_jaxpr(lambda x: x + c)(x3)
    assert len(closed.jaxpr.constvars) == 1
    other = jnp.full(3, 100, jnp.float32)
    (out,) = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(closed.jaxpr, [other]))(x3)
    np.testing.assert_array_equal(out, x3 + 100)
    assert _jax_compat.open_jaxpr(closed.jaxpr) == (closed.jaxpr, 1)


def test_literal_output_is_a_literal():
    # `_trace` reads `input_of` off the outvars, skipping literals.
    closed = _trace(lambda x: (x, 1.0), x3)
    out_x, out_one = closed.jaxpr.outvars
    assert not isinstance(out_x, jex_core.Literal)
    assert out_x is closed.jaxpr.invars[0]  # an unchanged input is its own var
    assert isinstance(out_one, jex_core.Literal)
    assert out_one.val == 1.0


def test_jaxprs_in_params_finds_sub_jaxprs():
    cond = _eqn(
        lambda p, x: lax.cond(p > 0, lambda y: y, lambda y: -y, x),
        jnp.float32(1),
        x3,
        name="cond",
    )
    assert len(_jax_compat.subjaxprs(cond.params)) == 2
    jit = _eqn(lambda x: jax.jit(lambda y: y * 2)(x), x3, name="jit")
    (sub,) = _jax_compat.subjaxprs(jit.params)
    assert len(_jax_compat.open_jaxpr(sub)[0].invars) == 1
    loop = _eqn(
        lambda x: lax.while_loop(lambda c: c[0] < 3, lambda c: c + 1, x),
        x3,
        name="while",
    )
    assert len(_jax_compat.subjaxprs(loop.params)) == 2
    add = _eqn(lambda x: x + x, x3, name="add")
    assert _jax_compat.subjaxprs(add.params) == []


# --------------------------------------------------------------------------- primitives


def test_psum_params():
    eqn = _eqn(lambda x: lax.psum(x, AX), x3, name="psum")
    assert tuple(eqn.params["axes"]) == (AX,)
    assert eqn.params["axis_index_groups"] is None


def test_pmean_is_psum():
    eqn = _eqn(lambda x: lax.pmean(x, AX), x3, name="psum")
    assert tuple(eqn.params["axes"]) == (AX,)


@pytest.mark.parametrize("name, f", [("pmax", lax.pmax), ("pmin", lax.pmin)])
def test_pmax_pmin_params(name, f):
    eqn = _eqn(lambda x: f(x, AX), x3, name=name)
    assert tuple(eqn.params["axes"]) == (AX,)


def test_grouped_psum_params():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    eqn = _eqn(lambda x: lax.psum(x, AX, axis_index_groups=groups), x3, name="psum")
    assert eqn.params["axis_index_groups"] is not None


def test_axis_index_params():
    eqn = _eqn(lambda: lax.axis_index(AX), name="axis_index")
    assert eqn.params["axis_name"] == AX


@pytest.mark.parametrize("tiled", [False, True])
def test_all_gather_params(tiled):
    eqn = _eqn(lambda x: lax.all_gather(x, AX, tiled=tiled), x3, name="all_gather")
    assert AX in tuple(eqn.params["axis_name"])
    assert eqn.params["axis_index_groups"] is None


def test_pbroadcast_params():
    eqn = _eqn(lambda x: lax.pbroadcast(x, (AX,), 0), x3, name="pbroadcast")
    assert AX in tuple(eqn.params["axis_name"])


@pytest.mark.parametrize(
    "name, f",
    [
        ("ppermute", lambda x: lax.ppermute(x, AX, [(0, 1), (1, 0)])),
        ("all_to_all", lambda x: lax.all_to_all(x, AX, 0, 0)),
        ("reduce_scatter", lambda x: lax.psum_scatter(x, AX)),
    ],
)
def test_varying_collectives_name_the_axis(name, f):
    # The pass treats any collective naming the axis, but not known to reduce, as
    # varying: it must see the axis in `axis_name`.
    eqn = _eqn(f, jnp.ones((N, 2), jnp.float32), name=name)
    names = eqn.params["axis_name"]
    assert AX in (tuple(names) if isinstance(names, (tuple, list)) else (names,))


def test_cond_params():
    eqn = _eqn(
        lambda p, x: lax.cond(p > 0, lambda y: y + 1, lambda y: y * 2, x),
        jnp.float32(1),
        x3,
        name="cond",
    )
    branches = eqn.params["branches"]
    assert len(branches) == 2
    # The first input is the branch index; the branches take the rest.
    for b in branches:
        assert len(_jax_compat.open_jaxpr(b)[0].invars) == len(eqn.invars) - 1


def test_while_params():
    def f(limit, a, b):
        body = lambda c: (c[0] + 1, c[1] * a, c[2])
        return lax.while_loop(lambda c: c[0] < limit, body, (0, b, b))

    eqn = _eqn(f, jnp.int32(3), x3, x3, name="while")
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    assert cn == 1 and bn >= 1  # `limit`; `a` (JAX may move an unchanged carry here)
    cond, body = eqn.params["cond_jaxpr"], eqn.params["body_jaxpr"]
    n_carry = len(eqn.invars) - cn - bn
    assert len(_jax_compat.open_jaxpr(cond)[0].invars) == cn + n_carry
    assert len(_jax_compat.open_jaxpr(body)[0].invars) == bn + n_carry
    assert len(eqn.outvars) == n_carry


def test_scan_params_when_present():
    # `_dataflow._scan` reads `num_consts` and `num_carry` when scan has them (JAX 0.10)
    # and leaves scan to the generic rule otherwise (newer JAX).
    xs = jnp.ones((4, 3), jnp.float32)

    def f(k, c, xs):
        return lax.scan(lambda c, x: (c + x * k, c), c, xs)

    eqn = _eqn(f, x3, x3, xs, name="scan")
    body = _jax_compat.open_jaxpr(eqn.params["jaxpr"])[0]
    assert len(body.invars) == len(eqn.invars)
    if "num_consts" in eqn.params or "num_carry" in eqn.params:
        assert (eqn.params["num_consts"], eqn.params["num_carry"]) == (1, 1)


def test_scan_flags_sound_without_later_iterations():
    # Whatever scan's parameters: ys from varying xs vary, a carry fed by varying xs
    # varies, and invariant inputs stay invariant.
    xs = jnp.ones((4, 3), jnp.float32)
    f = lambda c, xs: lax.scan(lambda c, x: (c + x, x * 2), c, xs)
    closed = _trace(f, x3, xs)
    assert varying_outputs(closed, [False, True], AX) == (True, True)
    assert varying_outputs(closed, [True, False], AX) == (True, False)
    assert varying_outputs(closed, [False, False], AX) == (False, False)


# --------------------------------------------------------------------------- backends


def test_backends_are_initialized_is_read_from_jax():
    # The tests have run computations by now, so JAX's answer is True; a JAX without
    # the function would make the library's answer False, and this test fail.
    from jax._src import xla_bridge

    jnp.zeros(1).block_until_ready()
    assert xla_bridge.backends_are_initialized() is True
    assert _jax_compat.backends_are_initialized() is True


# --------------------------------------------------------------------------- caches


def test_register_cache_hook_is_called_by_clear_caches():
    from jax._src import util

    class Cache:
        cleared = 0

        def cache_clear(self):
            Cache.cleared += 1

        def cache_info(self):
            return None

        def cache_keys(self):
            return []

    cache = Cache()  # JAX may hold it weakly: the library's cache is module-level
    util.register_cache(cache, "test_jax_compat")
    jax.clear_caches()
    assert Cache.cleared >= 1


def test_clear_caches_empties_program_cache():
    @ep.pmap2
    def f(x):
        return x * 2

    jax.clear_caches()
    assert _cache.programs.cache_info().currsize == 0
    np.testing.assert_array_equal(f(jnp.ones((N, 3))), 2 * np.ones((N, 3)))
    assert _cache.programs.cache_info().currsize >= 1
    jax.clear_caches()
    assert _cache.programs.cache_info().currsize == 0
    np.testing.assert_array_equal(f(jnp.ones((N, 3))), 2 * np.ones((N, 3)))


# --------------------------------------------------------------------------- shardings


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), (AX,))


def _sharded_program(body, mesh):
    # As `_program.sharded` builds it: jit(shard_map(check_vma=False)) with the output
    # shardings given.
    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=(), out_specs=P(AX), check_vma=False
    )
    return jax.jit(mapped, out_shardings=NamedSharding(mesh, P(AX)))()


def test_out_shardings_keep_device_axis_on_one_device_mesh():
    y = _sharded_program(lambda: jnp.ones((1, 3)), _mesh(1))
    assert y.shape == (1, 3)
    assert y.sharding.spec == P(AX)


def test_out_shardings_keep_device_axis_on_zero_size_array():
    y = _sharded_program(lambda: jnp.ones((0, 3)), _mesh(N))
    assert y.shape == (0, 3)
    assert y.sharding.spec == P(AX)


def test_jit_out_shardings_keep_device_axis():
    y = jax.jit(
        lambda: jnp.ones((1, 3)), out_shardings=NamedSharding(_mesh(1), P(AX))
    )()
    assert y.sharding.spec == P(AX)
    y = jax.jit(
        lambda: jnp.ones((0, 2)), out_shardings=NamedSharding(_mesh(N), P(AX))
    )()
    assert y.sharding.spec == P(AX)


# --------------------------------------------------------------------------- evaluation


def _w_loss(w, x):
    return jnp.sum((w * x) ** 2)


_PROGRAMS = {
    "psum": (lambda w, x: lax.psum(x, AX), (3,)),
    "pmean_grads": (lambda w, x: lax.pmean(jax.grad(_w_loss)(w, x), AX), (3,)),
    "local_grads": (lambda w, x: jax.grad(_w_loss)(w, x), (3,)),
    "axis_index": (lambda w, x: x * lax.axis_index(AX).astype(jnp.float32), (3,)),
    "all_gather": (lambda w, x: lax.all_gather(x, AX), (N, 3)),
    "all_gather_tiled": (lambda w, x: lax.all_gather(x, AX, tiled=True), (N * 3,)),
}


@pytest.mark.parametrize("name", list(_PROGRAMS))
def test_jaxpr_in_shard_map_matches_pmap(name):
    # The engine traces under `axis_env` once, then evaluates that jaxpr in
    # `shard_map(check_vma=False)`: the numbers must be jax.pmap's.
    f, local_shape = _PROGRAMS[name]
    w = jnp.arange(3, dtype=jnp.float32) + 1
    x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) / 5
    closed = _trace(f, w, x[0])
    assert closed.out_avals[0].shape == local_shape

    def body(w, x):
        (out,) = jex_core.jaxpr_as_fun(closed)(w, jnp.squeeze(x, 0))
        return jnp.expand_dims(out, 0)

    mesh = _mesh(N)
    run = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P(AX)), out_specs=P(AX), check_vma=False
        )
    )
    expected = jax.pmap(f, AX, in_axes=(None, 0))(w, x)
    np.testing.assert_allclose(run(w, x), expected, rtol=1e-6)


@pytest.mark.parametrize("name", list(_PROGRAMS))
def test_a_jit_trace_is_one_call_that_binds_in_shard_map(name):
    # `_trace` traces `jax.jit(f)` and keeps the one `jit` equation; a `shard_map` body
    # binds it (`bind_call`): the jaxpr inside is `make_jaxpr(f)`'s, the numbers
    # `jax.pmap`'s.
    f, _ = _PROGRAMS[name]
    w = jnp.arange(3, dtype=jnp.float32) + 1
    x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) / 5
    outer = _trace(jax.jit(f, keep_unused=True), w, x[0])
    inner, call = _jax_compat.one_call(outer)
    assert inner is not None and call is not None and not inner.consts
    plain = _trace(f, w, x[0])
    assert [e.primitive for e in inner.jaxpr.eqns] == [
        e.primitive for e in plain.jaxpr.eqns
    ]
    assert len(inner.jaxpr.invars) == 2  # an unused input is kept

    def body(w, x):
        (out,) = _jax_compat.bind_call(call, w, jnp.squeeze(x, 0))
        return jnp.expand_dims(out, 0)

    run = jax.jit(
        jax.shard_map(
            body, mesh=_mesh(N), in_specs=(P(), P(AX)), out_specs=P(AX), check_vma=False
        )
    )
    expected = jax.pmap(f, AX, in_axes=(None, 0))(w, x)
    np.testing.assert_allclose(run(w, x), expected, rtol=1e-6)


def test_one_call_keeps_outputs_that_are_inputs_and_constants():
    c = jnp.full((3,), 2.0)
    outer = _trace(jax.jit(lambda a, b: (a, b * c, a + 1.0), keep_unused=True), x3, x3)
    inner, call = _jax_compat.one_call(outer)
    # a constant: the program takes it as an input, so there is no call to bind
    assert inner is not None and call is None
    assert len(inner.consts) == 1
    assert inner.jaxpr.outvars[0] is inner.jaxpr.invars[0]
    assert _jax_compat.one_call(_trace(lambda a: a * 2.0, x3)) == (None, None)


def test_hoisted_jaxpr_holds_no_constant_and_evaluates():
    # JAX 0.12's `Jaxpr` keeps its constants' values attached; a cached program built on
    # it would keep the user's closed-over arrays alive. `hoist_consts` makes them inputs.
    import gc
    import weakref

    from eqx_pmapstate._jax_compat import evaluate, hoist_consts

    a = jnp.full((3,), 2.0)
    alive = weakref.ref(a)
    closed = jax.make_jaxpr(lambda x: x * a + 1.0)(jnp.arange(3.0))
    consts = list(closed.consts)
    jaxpr = hoist_consts(closed)
    assert len(jaxpr.constvars) == 0
    assert len(jaxpr.invars) == len(consts) + 1
    (out,) = evaluate(jaxpr, *consts, jnp.arange(3.0))
    np.testing.assert_array_equal(np.asarray(out), np.array([1.0, 3.0, 5.0]))
    a = closed = consts = None  # drop every reference of ours
    gc.collect()
    assert alive() is None


def test_per_device_mesh_context_moves_closed_over_arrays_into_the_body():
    # `_trace` relies on this: traced in the context of a `shard_map` body, an array
    # laid out on a mesh of Auto axes enters the jaxpr through a `reshard`, and the
    # broadcast `jax.vmap` makes of it names the Manual mesh, on which the body runs.
    mesh = jax.make_mesh((N,), (AX,), axis_types=(jax.sharding.AxisType.Auto,))
    b = jax.device_put(x3, NamedSharding(mesh, P()))
    with jax.sharding.use_abstract_mesh(_jax_compat.per_device_mesh(mesh, AX)):
        closed = _trace(jax.vmap(lambda r: r + b), jnp.ones((4, 3)))
    names = [e.primitive.name for e in closed.jaxpr.eqns]
    assert names[0] == "reshard"
    meshes = [
        v.mesh
        for e in closed.jaxpr.eqns
        for v in e.params.values()
        if isinstance(v, NamedSharding)
    ]
    assert meshes and all(
        m.axis_types == (jax.sharding.AxisType.Manual,) for m in meshes
    )


def test_unbound_axis_reads_jaxs_error():
    # `_trace` turns JAX's error for a collective over an axis name nobody binds into
    # one naming both axes; it reads the name from JAX's message.
    with pytest.raises(NameError) as caught:
        jax.make_jaxpr(lambda x: lax.psum(x, "batch"), axis_env=[(AX, N)])(1.0)
    assert _jax_compat.unbound_axis(caught.value) == "batch"
    assert _jax_compat.unbound_axis(NameError("name 'x' is not defined")) is None
