"""JAX settings changed for a block (`with jax.numpy_dtype_promotion(...)`,
`jax.threefry_partitionable(...)`, `jax.default_matmul_precision(...)`) change what a
function traces to; `jax.jit` keys its programs by them, and so must this library, or a
program traced under one setting would silently run under another. Each test calls the
same function under two settings, in both orders, through the full and the quick path,
and compares with `jax.jit` under the same setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate._jax_compat import trace_context


MESH = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


def _x():
    return jax.device_put(jnp.zeros((8, 16)), NamedSharding(MESH, P("devices")))


def noisy(x):
    return x + jax.random.normal(jax.random.key(0), x.shape)


def _reference(partitionable: bool) -> np.ndarray:
    """One device's result, under `jax.jit` (every device draws the same bits)."""
    with jax.threefry_partitionable(partitionable):
        return np.asarray(jax.jit(noisy)(jnp.zeros(16)))


def test_the_trace_context_is_pinned():
    """`_jax_compat.trace_context` is JAX's own (`jax._src.config.trace_context`), and
    it tells settings apart."""
    from jax._src import config

    assert trace_context is config.trace_context
    before = trace_context()
    with jax.numpy_dtype_promotion("standard"):
        assert trace_context() != before
    with jax.threefry_partitionable(
        not getattr(jax.config, "jax_threefry_partitionable")
    ):
        assert trace_context() != before
    assert trace_context() == before
    hash(before)


@pytest.mark.parametrize("first", [True, False])
def test_random_bits_follow_threefry_partitionable(first):
    ep.clear_caches()
    x = _x()
    f = ep.pmap2(noisy)
    want = {flag: _reference(flag) for flag in (True, False)}
    assert not np.allclose(want[True], want[False])  # the setting matters here
    for flag in (first, not first, first, not first):  # twice each: the quick path
        for _ in range(2):
            with jax.threefry_partitionable(flag):
                got = np.asarray(f(x))
            for row in got:
                np.testing.assert_array_equal(row, want[flag])


def test_dtype_promotion_is_that_of_the_call():
    """Traced under standard promotion, a step mixing float32 and bfloat16 runs; at
    strict promotion it must be refused, as `jax.jit` refuses it."""
    ep.clear_caches()
    x = _x()
    y = jax.device_put(
        jnp.ones((8, 16), jnp.bfloat16), NamedSharding(MESH, P("devices"))
    )
    f = ep.pmap2(lambda x, y: x + y)
    with jax.numpy_dtype_promotion("standard"):
        out = f(x, y)
        assert out.dtype == jnp.float32
        f(x, y)
    with jax.numpy_dtype_promotion("strict"):
        with pytest.raises(Exception) as info:
            f(x, y)
        with pytest.raises(Exception) as floor:
            jax.jit(lambda x, y: x + y)(x, y)
    assert type(info.value) is type(floor.value)


def test_new_states_follow_the_setting():
    """`pmap2_new_states` keys its programs the same way: states drawn under another
    setting are drawn anew."""
    ep.clear_caches()

    def make():
        return noisy(jnp.zeros(16))

    for flag in (True, False, True, False):
        with jax.threefry_partitionable(flag):
            got = np.asarray(ep.pmap2_new_states(make))
        for row in got.reshape(-1, 16):
            np.testing.assert_array_equal(row, _reference(flag))
