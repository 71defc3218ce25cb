"""Steps over many leaves, and the program a step without collectives compiles to.

A step that uses no collective over the axis runs as `jit(vmap(...))` over the global
arrays (cheaper for XLA to compile than a `shard_map` over thousands of operands); these
tests check from the user's side that it gives what `jax.pmap` gives, with the same
layouts, and that a step `jax.vmap` cannot map still runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate import _program
from eqx_pmapstate._trace import trace


def _mesh():
    return jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


def test_two_thousand_leaves_numbers_and_layouts():
    mesh = _mesh()
    per, rep = NamedSharding(mesh, P("devices")), NamedSharding(mesh, P())
    states = [
        jax.device_put(jnp.arange(8 * 3.0).reshape(8, 3) + i, per) for i in range(1000)
    ]
    params = [jax.device_put(jnp.full((2,), float(i)), rep) for i in range(1000)]

    @ep.pmap2
    def step(states, params):
        return [s * 2.0 for s in states], [p + 1.0 for p in params]

    new_states, new_params = step(states, params)
    assert len(new_states) == len(new_params) == 1000
    for i in (0, 1, 517, 999):
        expected = (np.arange(8 * 3.0).reshape(8, 3) + i) * 2.0
        np.testing.assert_array_equal(np.asarray(new_states[i]), expected)
        np.testing.assert_array_equal(np.asarray(new_params[i]), np.full((2,), i + 1.0))
    for s, p in zip(new_states, new_params):
        assert_laid_out(s, 0)
        assert_laid_out(p, None)
    again = step(new_states, new_params)  # the same program, from the cache
    np.testing.assert_array_equal(
        np.asarray(again[0][3]), np.asarray(new_states[3]) * 2
    )


def test_step_without_collectives_matches_pmap():
    mesh = _mesh()
    w = jax.device_put(jnp.arange(12.0).reshape(3, 4), NamedSharding(mesh, P()))
    x = jnp.arange(5 * 8 * 3.0).reshape(5, 8, 3)  # mapped over axis 1

    def f(w, x):
        h = jnp.tanh(x @ w)
        return h, jnp.sum(w), jax.lax.cond(h.sum() > 0, jnp.sin, jnp.cos, h)

    ours = ep.pmap2(f, in_axes=(None, 1), out_axes=(1, None, 0))(w, x)
    ref = jax.pmap(f, in_axes=(None, 1), out_axes=(1, None, 0))(np.asarray(w), x)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert_laid_out(ours[0], 1)
    assert_laid_out(ours[1], None)
    assert_laid_out(ours[2], 0)


def test_unchecked_replicated_output_keeps_each_device_value():
    # As `jax.pmap` does with `out_axes=None`: each device keeps its own value under a
    # replicated label (the step has no collective, and `jax.vmap` would refuse it).
    x = jnp.arange(8.0)
    out = ep.pmap2(lambda x: x * 2.0, out_axes=None, check_replicated=False)(x)
    shards = sorted(float(s.data) for s in out.addressable_shards)
    assert shards == [2.0 * i for i in range(8)]


def test_step_jax_vmap_cannot_map_still_runs():
    def f(x):  # `pure_callback` without a `vmap_method` has no batching rule
        return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    x = jnp.arange(8 * 2.0).reshape(8, 2)
    out = ep.pmap2(f)(x)
    np.testing.assert_allclose(np.asarray(out), np.sin(np.arange(16.0).reshape(8, 2)))
    assert_laid_out(out, 0)


def test_donated_inputs_without_collectives():
    per = NamedSharding(_mesh(), P("devices"))
    x = jax.device_put(jnp.ones((8, 4)), per)
    out = ep.pmap2(lambda x: x + 1.0, donate="all")(x)
    np.testing.assert_array_equal(np.asarray(out), np.full((8, 4), 2.0))
    assert x.is_deleted()


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_random_bits_are_those_of_pmap(impl):
    keys = jax.random.split(jax.random.key(0, impl=impl), 8)

    def f(k):
        new = jax.random.key_data(jax.random.split(k)[0])
        return jax.random.normal(k, (3,)), jax.random.bits(k, (2,)), new

    for a, b in zip(ep.pmap2(f)(keys), jax.pmap(f)(keys)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rng(x):
    bits = jax.lax.rng_bit_generator(jnp.zeros((4,), jnp.uint32), (3,))[1]
    return x + bits.astype(x.dtype)


def _jaxpr(f, *avals):
    return trace(lambda xs: f(*xs), avals, "devices", 8).jaxpr.jaxpr


@pytest.mark.parametrize(
    "f, local",
    [
        (lambda x: jnp.sin(x) * 2.0, True),
        (
            lambda x: jax.jit(lambda y: jax.lax.cond(y[0] > 0, jnp.sin, jnp.cos, y))(x),
            True,
        ),
        (lambda x: jax.lax.psum(x, "devices"), False),
        (
            lambda x: jax.jit(
                lambda y: y + jax.lax.axis_index("devices").astype(y.dtype)
            )(x),
            False,
        ),
        (
            lambda x: jax.lax.scan(
                lambda c, y: (c + jax.lax.pmean(y, "devices"), y), x, x
            ),
            False,
        ),
        (lambda x: (jax.debug.print("{}", x), x)[1], False),  # a side effect
        (_rng, False),  # XLA's own generator
    ],
)
def test_is_local(f, local):
    aval = jax.ShapeDtypeStruct((3,), jnp.float32)
    assert _program.is_local(_jaxpr(f, aval), "devices") is local
