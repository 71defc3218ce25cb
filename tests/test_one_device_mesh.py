"""`pmap2` on a mesh of one device (one GPU): the program runs without `shard_map`, whose
collectives XLA keeps as all-reduces with one participant. Every test compares with
`jax.pmap` on one device, or with the same step on the 8-device mesh's semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_laid_out
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep


ONE = jax.make_mesh(
    (1,),
    ("devices",),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[:1],
)


def _put(x, spec, mesh=ONE):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _pmap1(f, **kw):
    return jax.pmap(f, axis_name="devices", devices=jax.devices()[:1], **kw)


def collectives(w, x):
    total = jax.lax.psum(x.sum(), "devices")
    mean = jax.lax.pmean(x, "devices")
    top = jax.lax.pmax(x.max(), "devices")
    gathered = jax.lax.all_gather(x, "devices")
    tiled = jax.lax.all_gather(x, "devices", tiled=True)
    scattered = jax.lax.psum_scatter(x, "devices", tiled=True)
    index = jax.lax.axis_index("devices")
    shifted = jax.lax.ppermute(x, "devices", [(0, 0)])
    return w * total + top, mean, gathered, tiled, scattered, index, shifted


def test_collectives_match_jax_pmap_on_one_device():
    w = jnp.float32(2.0)
    x = np.arange(12.0, dtype=np.float32).reshape(1, 3, 4)
    ours = ep.pmap2(collectives)(_put(w, P()), _put(x, P("devices")))
    ref = _pmap1(collectives, in_axes=(None, 0))(w, x)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a if a.ndim == b.ndim else a[None], b)
    assert_laid_out(ours[0], None, n=1)


def test_the_program_has_no_collective_left():
    def step(w, x):
        g = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)
        return w - 0.1 * jax.lax.pmean(g, "devices")

    w, x = _put(jnp.ones(3), P()), _put(jnp.ones((1, 4, 3)), P("devices"))
    text = ep.pmap2(step).lower(w, x).compile().as_text()
    assert "all-reduce" not in text
    eight = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    w8, x8 = (
        _put(jnp.ones(3), P(), eight),
        _put(jnp.ones((8, 4, 3)), P("devices"), eight),
    )
    assert "all-reduce" in ep.pmap2(step).lower(w8, x8).compile().as_text()


def test_a_training_step_with_optax_matches_jax_pmap():
    opt = optax.adam(1e-2)

    def step(w, state, x, y):
        loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
        g = jax.lax.pmean(g, "devices")
        updates, state = opt.update(g, state, w)
        return optax.apply_updates(w, updates), state, jax.lax.pmean(loss, "devices")

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((1, 8, 3)).astype(np.float32)
    ys = rng.standard_normal((1, 8)).astype(np.float32)
    w0 = jnp.ones(3)
    ours_w, ours_s = (
        _put(w0, P()),
        jax.device_put(opt.init(w0), NamedSharding(ONE, P())),
    )
    ref = _pmap1(step, in_axes=(None, None, 0, 0), out_axes=None)
    ref_w, ref_s = w0, opt.init(w0)
    x, y = _put(xs, P("devices")), _put(ys, P("devices"))
    mapped = ep.pmap2(step)
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction
        for _ in range(5):
            ours_w, ours_s, loss = mapped(ours_w, ours_s, x, y)
            ref_w, ref_s, ref_loss = ref(ref_w, ref_s, xs, ys)
            losses.append((loss, ref_loss))
    np.testing.assert_allclose(ours_w, ref_w, rtol=1e-6)
    np.testing.assert_allclose(*losses[-1], rtol=1e-6)
    assert_laid_out(ours_w, None, n=1)


def test_per_device_outputs_keep_their_axis():
    def f(x):
        return x * 2, jax.lax.axis_index("devices")

    x = _put(jnp.ones((1, 5)), P("devices"))
    out, index = ep.pmap2(f)(x)
    assert out.shape == (1, 5) and index.shape == (1,)  # varying: a device axis
    assert_laid_out(out, 0, n=1)
    out, index = ep.pmap2(f, out_axes=(1, 0))(x)
    assert out.shape == (5, 1) and index.shape == (1,)
    assert_laid_out(out, 1, n=1)


def test_the_runtime_check_and_donation_work_on_one_device():
    def f(w, x):
        return w + x.sum()  # per device, asked to be replicated: one device, equal

    w, x = _put(jnp.zeros(()), P()), _put(jnp.ones((1, 2)), P("devices"))
    out = ep.pmap2(f, out_axes=None, check_replicated="runtime")(w, x)
    np.testing.assert_allclose(out, 2.0)
    step = ep.pmap2(lambda x: x + 1, donate="all")
    y = step(_put(jnp.ones((1, 2)), P("devices")))
    step(y)
    with pytest.raises(ValueError, match="was donated by an earlier call"):
        step(y)


def test_a_program_that_does_not_trace_is_not_used():
    from eqx_pmapstate import _program  # noqa: PLC0415

    def refuses(*xs):
        raise NotImplementedError("no batching rule")

    run = jax.jit(_program._gated(refuses))
    jaxpr = jax.make_jaxpr(lambda x: x)(jnp.ones(2)).jaxpr
    assert _program.traced_or_none(run, jaxpr, (0,), ONE, "devices") is None
    accepts = jax.jit(_program._gated(lambda x: x))
    assert _program.traced_or_none(accepts, jaxpr, (0,), ONE, "devices") is accepts


def test_a_program_vmap_cannot_trace_falls_back_to_shard_map(monkeypatch):
    # A collective without a rule for `jax.vmap` (none of those tested has one
    # missing today): the program of `shard_map` is used, with the same result.
    from eqx_pmapstate import _program  # noqa: PLC0415

    monkeypatch.setattr(_program, "_one_device", lambda *args: None)
    ep.clear_caches()

    def step(w, x):
        return w * jax.lax.pmean(x, "devices").sum()

    w, x = _put(jnp.full((), 2.0), P()), _put(jnp.ones((1, 4)), P("devices"))
    out = ep.pmap2(step)(w, x)
    np.testing.assert_allclose(out, 8.0)
    assert "all-reduce" in ep.pmap2(step).lower(w, x).compile().as_text()
    ep.clear_caches()


def test_new_states_on_one_device():
    keys = jax.random.split(jax.random.key(0), 1)
    made = ep.pmap2_new_states(
        lambda key: ep.ParamState(jax.random.normal(key, (3,))),
        {"key": keys},
        state_out_axes={0: ...},
        devices=jax.devices()[:1],
        init_in_axes={"key": 0},
    )
    leaf = jax.tree.leaves(made)[0]
    assert leaf.shape == (1, 3)
    np.testing.assert_array_equal(leaf[0], jax.random.normal(keys[0], (3,)))
    assert_laid_out(leaf, 0, n=1)


def test_per_device_random_numbers_match_jax_pmap():
    def draw(key, x):
        key = jax.random.fold_in(key, jax.lax.axis_index("devices"))
        noise = jax.random.normal(key, x.shape)
        return jax.lax.cond(noise.sum() > 0, lambda: x + noise, lambda: x - noise)

    key, xs = jax.random.key(3), np.ones((1, 4), np.float32)
    ours = ep.pmap2(draw)(_put(key, P()), _put(xs, P("devices")))
    ref = _pmap1(draw, in_axes=(None, 0))(key, xs)
    np.testing.assert_array_equal(ours, ref)
