"""The per-device function is traced once, as one `jax.jit` equation, and a `shard_map`
program's body binds that equation instead of evaluating the jaxpr again equation by
equation (`_trace._jaxpr_of`, `_jax_compat.one_call`, `_program.sharded`). The numbers
are `jax.pmap`'s; the program's body holds one call, whatever the size of the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate._program import tracing_allowed


MESH = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
# Operations a `shard_map` body makes around the call: the device axis removed from
# the inputs and given back to the outputs.
_AROUND = {"squeeze", "broadcast_in_dim", "expand_dims", "reshape"}


@pytest.fixture(autouse=True)
def _fresh_programs():
    ep.clear_caches()
    yield
    ep.clear_caches()


def _body_ops(f, *args) -> list[str]:
    """The operations of the `shard_map` body of `f`'s program (called once before)."""
    (fast,) = f._fast.values()
    run = fast.entry.compiled.run
    consts = fast.entry.compiled.const_values()
    with tracing_allowed():
        outer = run.trace(*consts, *jax.tree.leaves(args)).jaxpr
    (mapped,) = [e for e in outer.eqns if e.primitive.name == "shard_map"]
    return [e.primitive.name for e in mapped.params["jaxpr"].eqns]


def _step(ws, x):
    def loss(ws):
        return sum(jnp.mean((x * w) ** 2) for w in ws)

    grads = jax.lax.pmean(jax.grad(loss)(ws), "devices")
    return [w - 0.1 * g for w, g in zip(ws, grads)], x + 1.0


def _inputs(n):
    rep = NamedSharding(MESH, P())
    ws = [jax.device_put(jnp.full((4,), 0.1 * (i + 1)), rep) for i in range(n)]
    x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4) / 50
    return ws, jax.device_put(x, NamedSharding(MESH, P("devices")))


@pytest.mark.parametrize("n", [1, 40])
def test_a_step_with_collectives_binds_one_call(n):
    ws, x = _inputs(n)
    f = ep.pmap2(_step)
    new_ws, y = f(ws, x)
    ref_ws, ref_y = jax.pmap(_step, "devices", in_axes=(None, 0))(ws, x)
    for got, want in zip(new_ws, ref_ws):
        assert_laid_out(got, None)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want)[0], rtol=1e-6)
    assert_laid_out(y, 0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-6)
    ops = _body_ops(f, ws, x)
    # one call, not the step's hundreds of operations (40 gradients, 40 `psum`s, ...)
    assert [o for o in ops if o not in _AROUND] in (["jit"], ["pjit"]), ops


def test_a_closure_over_an_array_is_evaluated_and_right():
    # The jaxpr then has a constant, which the program takes as an input: its body
    # evaluates the jaxpr (no call holds the array).
    scale = jnp.array([1.0, 2.0, 3.0, 4.0])
    ws, x = _inputs(3)

    def step(ws, x):
        new, y = _step(ws, x)
        return [w * scale for w in new], y * jax.lax.axis_index("devices").astype(
            y.dtype
        )

    f = ep.pmap2(step)
    new_ws, y = f(ws, x)
    ref_ws, ref_y = jax.pmap(step, "devices", in_axes=(None, 0))(ws, x)
    for got, want in zip(new_ws, ref_ws):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want)[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-6)
    assert "jit" not in _body_ops(f, ws, x)


def test_an_unchanged_input_is_still_recognised():
    # Traced as a call, an output that is an input unchanged is still known as one
    # (`Traced.input_of`), so it keeps the input's layout by default.
    ws, x = _inputs(2)
    f = ep.pmap2(lambda ws, x: (ws, jax.lax.psum(x, "devices")))
    out_ws, total = f(ws, x)
    assert all(a is b or np.array_equal(a, b) for a, b in zip(out_ws, ws))
    for w in out_ws:
        assert_laid_out(w, None)
    assert_laid_out(total, 0)  # a new output: along the device axis, as `jax.pmap`'s
    want = np.broadcast_to(np.asarray(x).sum(0), (8, 4))
    np.testing.assert_allclose(np.asarray(total), want, rtol=1e-6)


def test_gradient_through_a_step_that_binds_the_call():
    f = ep.pmap2(in_axes=(None, 0))(
        lambda w, x: jax.lax.psum(jnp.sum(jnp.sin(w) * x), "devices")
    )
    w = jax.device_put(jnp.linspace(0.0, 1.0, 3), NamedSharding(MESH, P()))
    x = np.arange(24, dtype=np.float32).reshape(8, 3) / 10
    g = jax.grad(f)(w, x)
    np.testing.assert_allclose(
        np.asarray(g), np.cos(np.asarray(w)) * x.sum(0), rtol=1e-5
    )
