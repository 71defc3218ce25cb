"""Arrays a step closes over (issue 14, item 1): a closed-over array is a constant seen
whole on every device, as with `jax.pmap`, inside every transformation of the step,
whether it is laid out on the mesh (replicated or per device) or not."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out, N

import eqx_pmapstate as ep


NEW_JAX = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 12)

bias = ep.pmap2_new_states(lambda: jnp.arange(3.0), state_out_axes={None: ...})
per_device = ep.pmap2_new_states(
    lambda: jnp.arange(3.0) + jax.lax.axis_index("devices").astype(jnp.float32)
)
on_host = np.arange(3.0, dtype=np.float32) + 10
on_one_device = jnp.arange(3.0) - 5
CLOSED = {
    "replicated": lambda: bias,
    "per_device": lambda: per_device.sum(0),  # seen whole: (8, 3), summed
    "numpy": lambda: on_host,
    "one_device": lambda: on_one_device,
}
WRAPS = {
    "plain": lambda g: g,
    "vmap": jax.vmap,
    "scan": lambda g: lambda xs: jax.lax.scan(lambda c, r: (c, g(r)), 0.0, xs)[1],
    "cond": lambda g: lambda xs: jax.lax.cond(xs.sum() > 0, g, lambda v: -v, xs),
    "grad": lambda g: jax.grad(lambda xs: (g(xs) ** 2).sum()),
    "jit": jax.jit,
}


def _x():
    return jnp.arange(N * 4 * 3, dtype=jnp.float32).reshape(N, 4, 3) / 10


def test_bias_is_laid_out_as_the_test_assumes():
    assert_laid_out(bias, None)
    assert_laid_out(per_device, 0)


@pytest.mark.parametrize("closed", sorted(CLOSED))
@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_closed_over_array_in_every_transformation_matches_jax_pmap(closed, wrap):
    get = CLOSED[closed]

    def row(r):
        return jnp.tanh(
            r * jnp.broadcast_to(get(), r.shape) + jax.lax.pmean(r, "devices")
        )

    step = WRAPS[wrap](row)
    x = _x()
    expected = jax.pmap(step, axis_name="devices")(x)
    got = ep.pmap2(step)(x)
    assert_laid_out(got, 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)


def test_the_issue_example_serving_with_vmap():
    b = ep.pmap2_new_states(lambda: jnp.arange(3.0), state_out_axes={None: ...})
    x = jnp.ones((N, 4, 3))
    out = ep.pmap2(lambda xx: jax.vmap(lambda r: r + b)(xx))(x)
    np.testing.assert_array_equal(np.asarray(out), np.ones((N, 4, 3)) + np.arange(3.0))


def test_a_model_made_by_pmap2_new_states_closed_over_under_vmap():
    model = ep.pmap2_new_states(
        lambda: eqx.nn.Linear(3, 2, key=jax.random.key(0)), state_out_axes={None: ...}
    )
    plain = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    x = _x()
    got = ep.pmap2(lambda xx: jax.vmap(model)(xx))(x)
    expected = jax.vmap(jax.vmap(plain))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)


def test_closed_over_arrays_in_a_map_call():
    class Shift(eqx.Module):
        scale: jax.Array

        def __call__(self, x):
            return jax.vmap(lambda r: r * self.scale + bias)(x)

    m = ep.Map(
        lambda: Shift(jnp.float32(2.0)),
        init_map_size=N,
        init_state_axes={None: ...},
        behavior="pmap",
    )
    m = m.init_all_states()
    x = _x()
    got = m(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x) * 2 + np.arange(3.0))


def test_closed_over_arrays_in_a_pmap2_new_states_builder():
    def build():
        rows = jnp.ones((4, 3))
        return jax.vmap(lambda r: r * per_device.sum(0) + bias)(rows)

    made = ep.pmap2_new_states(build, state_out_axes={None: ...})
    assert_laid_out(made, None)
    expected = np.ones((4, 3)) * np.asarray(per_device).sum(0) + np.arange(3.0)
    np.testing.assert_allclose(np.asarray(made), expected)


mask = ep.pmap2_new_states(
    lambda: jnp.array([True, False, True]), state_out_axes={None: ...}
)
USES = {  # what JAX cannot run on one device of a mesh, nor can `jax.pmap`
    "index": (lambda r, w, m: r * w[2], lambda x: x * np.asarray(per_device)[2]),
    "where": (lambda r, w, m: jnp.where(m, r, 0.0), lambda x: x * [1.0, 0.0, 1.0]),
}


@pytest.mark.parametrize("use", sorted(USES))
def test_a_closed_over_laid_out_array_that_jax_cannot_take(use):
    row, numpy_row = USES[use]
    runs = NEW_JAX and use == "index"  # JAX 0.12 indexes it

    def step(xs):
        return jax.vmap(lambda r: row(r, per_device, mask))(xs)

    x = _x()
    expected = numpy_row(np.asarray(x))
    if runs:
        np.testing.assert_allclose(np.asarray(ep.pmap2(step)(x)), expected)
    else:
        with pytest.raises(ValueError, match=r"closes over array\(s\) laid out on a"):
            ep.pmap2(step)(x)
    # Passed as a replicated argument it works everywhere.
    f = ep.pmap2(
        lambda w, m, xs: jax.vmap(lambda r: row(r, w, m))(xs), in_axes=(None, None, 0)
    )
    np.testing.assert_allclose(np.asarray(f(per_device, mask, x)), expected)


def test_indexing_a_closed_over_laid_out_array_without_a_transformation():
    x = _x()
    got = ep.pmap2(lambda xs: xs * per_device[2:3] + bias[1])(x)
    expected = np.asarray(x) * np.asarray(per_device)[2] + 1.0
    np.testing.assert_allclose(np.asarray(got), expected)
