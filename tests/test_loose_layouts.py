"""Outputs whose layout a program leaves to XLA's propagation (`_engine._loose`: naming
it costs compile time), checked after each run but the quick path's
(`Compiled.settle`). Every test compares the outputs' layouts and values with what the
user asked for, including when XLA chooses another layout than the plan's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate import _program


MESH = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(autouse=True)
def _fresh_programs():
    ep.clear_caches()  # each test makes its programs (some with `_named` replaced)
    yield
    ep.clear_caches()


def _inputs():
    x = jax.device_put(
        jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16),
        NamedSharding(MESH, P("devices")),
    )
    w = jax.device_put(jnp.linspace(0.0, 1.0, 16), NamedSharding(MESH, P()))
    return x, w


def step(x, w):
    # per device: a varying output, a replicated one given a device axis (a
    # broadcast, which XLA's propagation leaves replicated), a replicated one
    return x * w, w * 2.0, w + 1.0


def _expected(x, w):
    xs, ws = np.asarray(x), np.asarray(w)
    return xs * ws, np.broadcast_to(ws * 2.0, (8, 16)), ws + 1.0


def _check(outs, x, w):
    for got, want, axis in zip(outs, _expected(x, w), (0, 0, None)):
        assert_laid_out(got, axis)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def _compiled(f):
    (fast,) = f._fast.values()
    return fast.entry.compiled


def test_outputs_whose_layout_follows_are_left_to_xla():
    x, w = _inputs()
    f = ep.pmap2(step, out_axes=(0, 0, None))
    for _ in range(3):  # the full path, then the quick path
        _check(f(x, w), x, w)
    # the broadcast's layout is named; the other two are left to XLA
    assert [i for i, _ in _compiled(f)._loose] == [0, 2]


def _as_if_xla_chose_replicated(shardings, loose):
    """`_program._named` as if XLA's propagation chose to replicate every output left
    to it."""
    rep = NamedSharding(MESH, P())
    return [rep if i in loose else s for i, s in enumerate(shardings)]


def test_a_layout_xla_chose_otherwise_is_moved_and_then_named(monkeypatch):
    monkeypatch.setattr(_program, "_named", _as_if_xla_chose_replicated)
    x, w = _inputs()
    f = ep.pmap2(step, out_axes=(0, 0, None))
    _check(f(x, w), x, w)  # the varying output moved to its layout
    compiled = _compiled(f)
    assert compiled._loose == ()
    run = compiled.run
    for _ in range(3):  # the program that names every layout; then the quick path
        _check(f(x, w), x, w)
    assert compiled.run is run


def test_ahead_of_time_names_every_layout(monkeypatch):
    monkeypatch.setattr(_program, "_named", _as_if_xla_chose_replicated)
    x, w = _inputs()
    f = ep.pmap2(step, out_axes=(0, 0, None))
    run = f.lower(x, w).compile()
    for _ in range(2):
        _check(run(x, w), x, w)


@pytest.mark.parametrize("collective", [False, True])
def test_a_training_step_keeps_its_layouts(collective):
    """Both programs (`jit(vmap)` without a collective, `jit(shard_map)` with one)."""
    x, w = _inputs()

    def train(x, w):
        g = jnp.mean(x, axis=0) * w
        if collective:
            g = jax.lax.pmean(g, "devices")
        return w - 0.1 * g, x + 1.0

    # without the `pmean`, each device's `w` differs: laid out along the device axis
    f = ep.pmap2(train, donate="none", out_axes=(None if collective else 0, 0))
    results = [f(x, w) for _ in range(3)]  # the full path, then the quick path
    for w2, x2 in results:
        assert_laid_out(w2, None if collective else 0)
        assert_laid_out(x2, 0)
    w2, x2 = results[-1]
    xs, ws = np.asarray(x), np.asarray(w)
    g = xs.mean(axis=1, keepdims=True) * ws  # each device's
    if collective:
        g = g.mean(axis=0)
    np.testing.assert_allclose(np.asarray(w2), ws - 0.1 * g, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(x2), xs + 1.0)


# (The program made to lay its outputs out otherwise cannot reuse the donated buffers.)
@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_key_arrays_and_donated_inputs_are_moved_too(monkeypatch):
    """The repair on typed PRNG keys (one per device) and with the inputs donated."""
    monkeypatch.setattr(_program, "_named", _as_if_xla_chose_replicated)
    keys = jax.device_put(
        jax.random.split(jax.random.key(1), 8), NamedSharding(MESH, P("devices"))
    )
    want = [np.asarray(jax.random.key_data(jax.random.split(k)[0])) for k in keys]

    def advance(key, x):
        return jax.random.split(key)[0], x + 1.0

    f = ep.pmap2(advance, donate="all")
    x = _inputs()[0]
    for _ in range(3):  # the repair, the rebuilt program, the quick path
        new, x2 = f(keys, x)
        assert_laid_out(new, 0)
        assert_laid_out(x2, 0)
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(new)), want)
        keys = jax.device_put(
            jax.random.split(jax.random.key(1), 8), NamedSharding(MESH, P("devices"))
        )
        x = x2
    assert _compiled(f)._loose == ()
