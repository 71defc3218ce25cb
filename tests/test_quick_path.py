"""The steady-state call (`_pmap2._dispatch.Quick`): what the full path found for a tree
structure, reused after identity checks, with shapes and layouts left to `jax.jit`'s
C++ dispatch. Every test makes the quick path see a call it must not serve as before,
and checks that the result is the full path's (a fresh `pmap2` of the same function,
or `jax.pmap`)."""

import threading
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate._pmap2._dispatch import STALE_LIMIT


MESH = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


def _put(x, spec):
    return jax.device_put(x, NamedSharding(MESH, spec))


def _traced_counter():
    traces = []

    def body(x, w):
        traces.append(1)
        return x * w + jnp.sum(w)

    return body, traces


def _warm(step, *args):
    """Calls twice, so that the second call leaves a `Quick` record."""
    step(*args)
    return step(*args)


def test_the_steady_state_does_not_trace_again_and_is_served_quickly():
    body, traces = _traced_counter()
    step = ep.pmap2(body)
    x, w = _put(jnp.ones((8, 3)), P("devices")), _put(jnp.full(3, 2.0), P())
    _warm(step, x, w)
    assert len(step._quick) == 1
    out = [step(x, w) for _ in range(5)][-1]
    assert len(traces) == 1
    np.testing.assert_allclose(out, np.full((8, 3), 8.0))
    assert_laid_out(out, 0)


def test_another_shape_of_the_same_structure_is_compiled_for_not_reused():
    body, traces = _traced_counter()
    step = ep.pmap2(body)
    w = _put(jnp.full(3, 2.0), P())
    _warm(step, _put(jnp.ones((8, 3)), P("devices")), w)
    wider = _put(jnp.ones((8, 5)), P("devices"))
    w5 = _put(jnp.full(5, 2.0), P())
    out = step(wider, w5)
    assert out.shape == (8, 5) and len(traces) == 2
    np.testing.assert_allclose(out, np.full((8, 5), 12.0))


def test_a_replicated_input_passed_per_device_after_is_read_anew():
    # Same global shape, same dtype: only the layout differs, which changes what each
    # device sees (the whole (8, 8) array, or its own row).
    def f(x):
        return x.sum(axis=-1)

    step = ep.pmap2(f, out_axes=0, check_replicated=False)
    value = np.arange(64.0, dtype=np.float32).reshape(8, 8)
    replicated, split = _put(value, P()), _put(value, P("devices"))
    _warm(step, replicated)
    got_split = step(split)
    got_replicated = step(replicated)
    np.testing.assert_allclose(got_split, value.sum(axis=1))
    np.testing.assert_allclose(
        got_replicated, np.broadcast_to(value.sum(axis=1), (8, 8))
    )
    np.testing.assert_allclose(ep.pmap2(f, out_axes=0)(split), got_split)


def test_a_python_scalar_where_an_array_was_is_a_new_signature():
    def f(x, s):
        return x * s

    step = ep.pmap2(f, in_axes=(0, None))
    x = _put(jnp.ones((8, 2)), P("devices"))
    _warm(step, x, jnp.asarray(3.0))
    out = step(x, 2.0)  # weakly typed: another program, same numbers
    np.testing.assert_allclose(out, np.full((8, 2), 2.0))
    assert out.dtype == jnp.float32


def test_a_new_static_leaf_is_a_new_program():
    class Scaled(eqx.Module):
        w: jax.Array
        act: Callable

        def __call__(self, x):
            return self.act(self.w * x)

    step = ep.pmap2(lambda m, x: m(x))
    w = _put(jnp.full(3, -1.0), P())
    x = _put(jnp.ones((8, 3)), P("devices"))
    _warm(step, Scaled(w, jax.nn.relu), x)
    np.testing.assert_allclose(step(Scaled(w, jnp.abs), x), np.ones((8, 3)))
    np.testing.assert_allclose(step(Scaled(w, jax.nn.relu), x), np.zeros((8, 3)))


SCALE = 2.0


def scaled(x):
    return x * SCALE


def test_a_rebound_global_is_seen_by_the_quick_path():
    global SCALE
    step = ep.pmap2(scaled)
    x = _put(jnp.ones((8, 2)), P("devices"))
    SCALE = 2.0
    _warm(step, x)
    SCALE = 5.0
    np.testing.assert_allclose(step(x), np.full((8, 2), 5.0))


def test_a_rebound_closure_cell_is_seen_by_the_quick_path():
    factor = 2.0

    def f(x):
        return x * factor

    step = ep.pmap2(f)
    x = _put(jnp.ones((8, 2)), P("devices"))
    _warm(step, x)
    factor = 7.0
    np.testing.assert_allclose(step(x), np.full((8, 2), 7.0))


def test_inside_jit_an_input_without_in_axes_is_still_refused():
    step = ep.pmap2(lambda x: x * 2)
    x = _put(jnp.ones((8, 2)), P("devices"))
    _warm(step, x)
    with pytest.raises(ValueError, match="is traced"):
        jax.jit(step)(x)


def test_inside_jit_with_in_axes_matches_the_eager_call():
    step = ep.pmap2(lambda x: x * 2, in_axes=0)
    x = _put(jnp.arange(16.0).reshape(8, 2), P("devices"))
    eager = _warm(step, x)
    np.testing.assert_allclose(jax.jit(step)(x), eager)


def test_a_donated_input_passed_again_is_named_on_the_quick_path():
    step = ep.pmap2(lambda x: x + 1, donate="all")
    x = _put(jnp.ones((8, 2)), P("devices"))
    y = step(step(x + 0))  # a quick record for this structure
    step(y)
    with pytest.raises(ValueError, match=r"args\[0\] was donated by an earlier call"):
        step(y)


def test_the_runtime_check_runs_on_the_quick_path():
    def f(x, w):
        return w + x.sum()  # differs per device, asked to be replicated

    step = ep.pmap2(f, out_axes=None, check_replicated="runtime")
    w = _put(jnp.zeros(()), P())
    same = _put(jnp.ones((8, 2)), P("devices"))
    _warm(step, same, w)
    differs = _put(jnp.arange(16.0).reshape(8, 2), P("devices"))
    with pytest.raises(ep.ReplicationError, match="differ"):
        step(differs, w)


def test_alternating_shapes_stay_right_and_stop_using_the_quick_path():
    body, traces = _traced_counter()
    step = ep.pmap2(body)
    a = (_put(jnp.ones((8, 3)), P("devices")), _put(jnp.full(3, 2.0), P()))
    b = (_put(jnp.ones((8, 4)), P("devices")), _put(jnp.full(4, 2.0), P()))
    for _ in range(2 * STALE_LIMIT + 2):
        np.testing.assert_allclose(step(*a), np.full((8, 3), 8.0))
        np.testing.assert_allclose(step(*b), np.full((8, 4), 10.0))
    assert len(traces) == 2
    assert step._quick == {}  # each quick call would only have traced in vain


def test_after_clear_caches_the_quick_path_compiles_again():
    body, traces = _traced_counter()
    step = ep.pmap2(body)
    args = (_put(jnp.ones((8, 3)), P("devices")), _put(jnp.full(3, 2.0), P()))
    _warm(step, *args)
    jax.clear_caches()
    np.testing.assert_allclose(step(*args), np.full((8, 3), 8.0))
    ep.clear_caches()
    np.testing.assert_allclose(step(*args), np.full((8, 3), 8.0))
    assert len(traces) == 3


def test_threads_share_a_pmap2_function():
    step = ep.pmap2(lambda x, w: x * w)
    w = _put(jnp.full(2, 3.0), P())
    xs = [_put(jnp.full((8, 2), float(i)), P("devices")) for i in range(8)]
    results: dict = {}

    # Each thread waits for its result: with several programs over the 8 CPU devices
    # in flight from different threads, XLA's CPU runtime can hang (plain `jax.jit` too,
    # JAX 0.10.2 and 0.12.1; not with one in flight per thread).
    def work(i):
        for _ in range(20):
            results[i] = jax.block_until_ready(step(xs[i], w))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_allclose(results[i], np.full((8, 2), 3.0 * i))


def test_matches_jax_pmap_over_a_training_loop():
    def step(w, x):
        g = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)
        return w - 0.1 * jax.lax.pmean(g, "devices")

    ours = ep.pmap2(step)
    ref = jax.pmap(step, axis_name="devices", in_axes=(None, 0), out_axes=None)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((8, 4, 3)).astype(np.float32)
    w_ours = _put(jnp.ones(3), P())
    w_ref = jnp.ones(3)
    x = _put(xs, P("devices"))
    for _ in range(6):
        w_ours, w_ref = ours(w_ours, x), ref(w_ref, xs)
    np.testing.assert_allclose(w_ours, w_ref, rtol=1e-6)
    assert_laid_out(w_ours, None)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: jnp.asarray(v),  # not committed to a layout
        lambda v: np.asarray(v),  # a host array
        lambda v: jax.device_put(v, jax.devices()[3]),  # committed to one device
        lambda v: _put(v, P("devices")),  # committed to another layout
    ],
    ids=["uncommitted", "numpy", "one-device", "other-layout"],
)
def test_what_the_quick_path_does_not_read_takes_the_full_path(make):
    # The quick record was made for a replicated (8, 8) input; an input of the same
    # shape and dtype that is not laid out so must be read as the full path reads it
    # (split over the devices, the default rule for an array off the mesh).
    def f(x):
        return x.sum(axis=-1)

    step = ep.pmap2(f, out_axes=0, check_replicated=False)
    value = np.arange(64.0, dtype=np.float32).reshape(8, 8)
    _warm(step, _put(value, P()))
    got = step(make(value))
    want = ep.pmap2(f, out_axes=0, check_replicated=False)(make(value))
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(got, value.sum(axis=1))


# `jax.jit` with its input layouts fixed does not refuse every array of another layout:
# one on a mesh of the same devices in another order it moves (and on its next call
# with that layout passes it to the program unmoved, which crashes), and on a mesh of
# one device it takes a split array for a replicated one. The quick path reads the
# layouts of what it cannot vouch for itself.

REVERSED = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ("devices",))


def test_an_array_on_the_same_devices_in_another_order_is_read_anew():
    def f(x):
        return x * 2.0

    step = ep.pmap2(f)
    _warm(step, _put(jnp.ones((8, 2)), P("devices")))
    x = jax.device_put(jnp.ones((8, 2)), NamedSharding(REVERSED, P("devices")))
    for _ in range(3):  # (the third call crashed)
        out = step(x)
        assert out.sharding.mesh == REVERSED  # where the input is, as a fresh call
        np.testing.assert_allclose(out, np.full((8, 2), 2.0))


class _Param(eqx.Module):
    w: jax.Array


def _bump(m):
    return _Param(m.w + 1.0)


def test_a_module_returned_on_the_same_devices_in_another_order_is_read_anew():
    step = ep.pmap2(_bump)
    m = _Param(_put(jnp.zeros(2), P()))
    for _ in range(3):
        m = step(m)  # the quick record takes a returned module of MESH
    other = ep.pmap2(_bump)
    rev = other(_Param(jax.device_put(jnp.zeros(2), NamedSharding(REVERSED, P()))))
    for i in range(3):
        rev = step(rev)
        assert rev.w.sharding.mesh == REVERSED
        np.testing.assert_allclose(rev.w, np.full(2, 2.0 + i))


def test_on_a_one_device_mesh_a_split_input_is_not_taken_for_a_replicated_one():
    one = jax.make_mesh(
        (1,),
        ("devices",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:1],
    )
    value = np.arange(4.0, dtype=np.float32).reshape(1, 4)

    def f(x):
        return x[0] * 1.0

    step = ep.pmap2(f, out_axes=0, check_replicated=False, devices=one)
    _warm(step, jax.device_put(value, NamedSharding(one, P())))  # each device: (1, 4)
    split = jax.device_put(value, NamedSharding(one, P("devices")))  # each: (4,)
    got = step(split)
    np.testing.assert_array_equal(got, value[:, 0])
    assert got.shape == (1,)


def test_a_static_negative_zero_is_not_taken_for_a_zero():
    # 0.0 == -0.0 in Python, but not in what the function computes from it.
    def f(x, s):
        return x * np.copysign(1.0, s).astype(np.float32)

    step = ep.pmap2(f)
    x = _put(jnp.ones((8, 2)), P("devices"))
    _warm(step, x, 0.0)
    np.testing.assert_allclose(step(x, -0.0), np.full((8, 2), -1.0))
    np.testing.assert_allclose(step(x, 0.0), np.full((8, 2), 1.0))


ZERO = 0.0


def over_zero(x):
    return x / ZERO


def test_a_global_rebound_to_negative_zero_is_a_new_program():
    global ZERO
    step = ep.pmap2(over_zero)
    x = _put(jnp.ones((8, 2)), P("devices"))
    try:
        ZERO = 0.0
        _warm(step, x)
        ZERO = -0.0
        np.testing.assert_array_equal(step(x), np.full((8, 2), -np.inf))
    finally:
        ZERO = 0.0
