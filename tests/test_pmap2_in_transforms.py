"""`pmap2` inside other transformations (`jax.jit`, `jax.grad`), and inputs that differ only
in their weak type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ours
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep


def _replicated(x):
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.device_put(x, NamedSharding(mesh, P()))


def test_inside_jit(leaks):
    double = ep.pmap2(lambda x: x * 2, in_axes=0)
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    out = jax.jit(lambda x: double(x) + 1)(x)
    assert out.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(out), 2 * x + 1)


def test_inside_jit_a_tracer_without_in_axes_is_an_error():
    # Inside `jax.jit` a replicated parameter is a tracer whose layout cannot be read:
    # mapping it over axis 0 would be silently wrong, so `in_axes` must say.
    f = ep.pmap2(lambda w, x: w * jax.lax.psum(x, "devices"))
    w = _replicated(jnp.ones(8))
    x = np.ones((8, 1), np.float32)
    with pytest.raises(ValueError, match=r"args\[0\] is traced.*in_axes"):
        jax.jit(f)(w, x)


def test_inside_jit_tracers_are_mapped_by_in_axes():
    scale = ep.pmap2(in_axes=(None, 0))(
        lambda w, x: w * jax.lax.pmean(x.sum(), "devices")
    )
    w = _replicated(jnp.ones(3))
    x = np.ones((8, 2), np.float32)
    out = jax.jit(scale)(w, x)
    assert out.shape == (3,) and out.sharding.spec == P()
    np.testing.assert_allclose(np.asarray(out), np.full(3, 2.0))
    # the eager call gives the same
    eager = scale(w, x)
    assert eager.shape == (3,) and eager.sharding.spec == P()
    np.testing.assert_allclose(np.asarray(eager), np.full(3, 2.0))


def test_grad_through_pmap2():
    f = ep.pmap2(in_axes=(None, 0))(
        lambda w, x: jax.lax.psum(jnp.sum(w * x), "devices")
    )
    w = _replicated(jnp.ones(3))
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    g = jax.grad(f)(w, x)
    assert g.shape == (3,)
    np.testing.assert_allclose(np.asarray(g), x.sum(0))


def test_weak_and_strong_inputs_share_the_layout_decisions():
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    per = NamedSharding(mesh, P("devices"))
    add = ep.pmap2(lambda x, y: x + y)
    strong = jax.device_put(jnp.ones((8, 3), jnp.bfloat16), per)
    weak = jax.device_put(
        jnp.broadcast_to(jnp.asarray(2.0), (8, 3)), per
    )  # weak float32
    assert weak.weak_type and not strong.weak_type
    with jax.numpy_dtype_promotion("standard"):
        a = add(strong, jax.device_put(jnp.ones((8, 3), jnp.float32), per))
        b = add(
            strong, weak
        )  # same shapes, dtypes and layouts: only the weak type differs
    assert (
        a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
    )  # jax.jit's promotion, per call
    np.testing.assert_array_equal(np.asarray(a), np.full((8, 3), 2.0))
    np.testing.assert_array_equal(np.asarray(b, np.float32), np.full((8, 3), 3.0))
    assert a.sharding == per
    assert b.sharding == per


def test_runtime_check_raises_replication_error_itself():
    w = _replicated(jnp.zeros(3))
    x = np.arange(8, dtype=np.float32).reshape(8, 1)

    def drift(w, x):  # a gradient step without pmean: the copies of w drift apart
        return w - jax.grad(lambda w: jnp.sum(w * x.sum()))(w)

    with pytest.raises(
        ep.ReplicationError,
        match=r"output at output \(the whole return value\) must come back replicated "
        r".*differs between devices \(compared after the call\).*pmean",
    ):
        ep.pmap2(drift, check_replicated="runtime")(w, x)

    def fine(w, x):
        return w - jax.lax.pmean(jax.grad(lambda w: jnp.sum(w * x.sum()))(w), "devices")

    out = ep.pmap2(fine, check_replicated="runtime")(w, x)
    assert out.shape == (3,) and out.sharding.spec == P()
    np.testing.assert_allclose(np.asarray(out), np.full(3, -3.5))
    with pytest.raises((ValueError, TypeError)) as e:
        ep.pmap2(fine, check_replicated="yes")  # pyright: ignore[reportArgumentType]  # deliberately invalid
    assert "check_replicated" in str(e.value) and "'yes'" in str(e.value)
    if ours(e.value):  # (under jaxtyping's import hook, beartype refuses it first)
        assert isinstance(e.value, ValueError)
        assert "`check_replicated` must be True, False or 'runtime'" in str(e.value)


@pytest.mark.parametrize("out_axes", [0, ep.DEFAULT])
def test_closing_over_a_tracer_of_an_enclosing_transformation(out_axes):
    # The function closes over `s`, a tracer of the `jax.grad`/`jax.vmap`/`jax.jit`
    # around the call; the arguments themselves are concrete. The outputs are then
    # tracers too, whose layout cannot be read after the run: the program names them.
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(
        np.arange(8.0, dtype=np.float32), NamedSharding(mesh, P("devices"))
    )

    def ours_of(s):
        return ep.pmap2(lambda v: v * s, out_axes=out_axes)(x).sum()

    def pmap_of(s):
        return jax.pmap(lambda v: v * s)(np.arange(8.0, dtype=np.float32)).sum()

    assert float(jax.grad(ours_of)(2.0)) == float(jax.grad(pmap_of)(2.0)) == 28.0
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(ours_of)(jnp.arange(3.0))),
        np.asarray(jax.vmap(pmap_of)(jnp.arange(3.0))),
    )
    assert float(jax.jit(ours_of)(2.0)) == 56.0


def test_a_call_inside_shard_map_or_jax_pmap_is_refused_with_a_sentence():
    # There each device runs the body alone: `pmap2` cannot map over the devices again
    # (JAX said "Primitive mul requires varying manual axes to match").
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("k",))
    double = ep.pmap2(lambda u: u * 2, in_axes=0)
    inside = jax.shard_map(
        lambda v: double(v), mesh=mesh, in_specs=P("k"), out_specs=P("k")
    )
    with pytest.raises(
        ValueError, match=r"inside `jax.shard_map` or `jax.pmap`.*\['k'\]"
    ):
        jax.jit(inside)(np.ones((64, 2), np.float32))
    with pytest.raises(ValueError, match=r"collectives over 'p'"):
        jax.pmap(lambda v: double(v), axis_name="p")(np.ones((8, 8, 2), np.float32))
    out = double(np.ones((8, 2), np.float32))  # outside: as before
    np.testing.assert_array_equal(np.asarray(out), np.full((8, 2), 2.0))
