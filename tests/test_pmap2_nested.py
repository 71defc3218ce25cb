"""`pmap2` inside other transformations: `jax.jit` and `jax.grad` around it."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eqx_pmapstate as ep


def _replicated(x):
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.device_put(x, NamedSharding(mesh, P()))


def test_inside_jit(leaks):
    double = ep.pmap2(lambda x: x * 2)
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    out = jax.jit(lambda x: double(x) + 1)(x)
    np.testing.assert_array_equal(np.asarray(out), 2 * x + 1)


def test_inside_jit_tracers_need_their_axes_given():
    # Inside `jax.jit` a tracer has no layout to read: like a host array, it is mapped
    # over axis 0 unless `in_axes` says otherwise.
    scale = ep.pmap2(in_axes=(None, 0))(lambda w, x: w * jax.lax.pmean(x.sum(), "devices"))
    w = _replicated(jnp.ones(3))
    x = np.ones((8, 2), np.float32)
    out = jax.jit(scale)(w, x)
    assert out.shape == (3,) and out.sharding.spec == P()
    np.testing.assert_allclose(np.asarray(out), np.full(3, 2.0))


def test_grad_through_pmap2():
    f = ep.pmap2(in_axes=(None, 0))(lambda w, x: jax.lax.psum(jnp.sum(w * x), "devices"))
    w = _replicated(jnp.ones(3))
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    g = jax.grad(f)(w, x)
    np.testing.assert_allclose(np.asarray(g), x.sum(0))
