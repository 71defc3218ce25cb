"""A function that is a pytree holding arrays (issue 14, items 2 and 9): a bound method of
an `eqx.Module`, or a module with `__call__`. Its arrays are inputs read like the
arguments' (laid out on the mesh: that layout; otherwise a constant seen whole on every
device, as `eqx.filter_pmap` takes a function's arrays), and a new instance of the same
structure reuses the program."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out, N

import eqx_pmapstate as ep


TRACES = []
GAIN = 1.0


class Model(eqx.Module):
    w: ep.NonBatchState  # replicated
    s: ep.ShortTermState  # per device

    def forward(self, x):
        TRACES.append(None)
        return x * self.w.value + self.s.value * GAIN

    @ep.pmap2
    def forward_in_class(self, x):
        return x * self.w.value + self.s.value * GAIN

    def __call__(self, x):
        TRACES.append(None)
        return jnp.tanh(x * self.w.value) + self.s.value

    def bump(self, x):
        return eqx.tree_at(lambda m: m.s.value, self, self.s.value + x.sum())

    def bump_and_loss(self, x):
        loss = jax.lax.pmean(jnp.sum(x * self.w.value), "devices")
        return self.bump(x), loss


def _model():
    i = jax.lax.axis_index("devices").astype(jnp.float32)
    return Model(
        ep.NonBatchState(jnp.array([1.0, 2.0, 3.0])),
        ep.ShortTermState(jnp.zeros(3) + i),
    )


def _x():
    return jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) / 7


def _np(m):
    return np.asarray(m.w.value), np.asarray(m.s.value)


def test_bound_method_equals_the_method_decorated_in_the_class_body():
    m = ep.pmap2_new_states(_model)
    x = _x()
    got = ep.pmap2(m.forward)(x)
    in_class = m.forward_in_class(x)
    w, s = _np(m)
    expected = np.asarray(x) * w + s  # each device its own row of s
    assert_laid_out(got, 0)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(in_class), expected, rtol=1e-6)


def test_bound_method_returning_the_instance_keeps_its_layout():
    m = ep.pmap2_new_states(_model)
    x = _x()
    new = ep.pmap2(m.bump)(x)
    assert_laid_out(new.w.value, None)
    assert_laid_out(new.s.value, 0)
    w, s = _np(m)
    np.testing.assert_allclose(np.asarray(new.w.value), w)
    np.testing.assert_allclose(
        np.asarray(new.s.value), s + np.asarray(x).sum(1, keepdims=True), rtol=1e-6
    )
    new, loss = ep.pmap2(m.bump_and_loss)(x)
    assert_laid_out(new.s.value, 0)
    assert_laid_out(loss, None)
    np.testing.assert_allclose(
        float(loss), float((np.asarray(x) * w).sum(1).mean()), rtol=1e-6
    )


def test_a_new_instance_of_a_callable_module_reuses_the_program():
    m = ep.pmap2_new_states(_model)
    x = _x()
    ep.clear_caches()
    TRACES.clear()
    for step in range(5):
        m = jax.tree.map(lambda a: a + 1.0, m)  # an updated model, as training makes
        got = ep.pmap2(m)(x)
        w, s = _np(m)
        expected = np.tanh(np.asarray(x) * w) + s
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    assert len(TRACES) == 1


def test_a_new_bound_method_reuses_the_program():
    m = ep.pmap2_new_states(_model)
    x = _x()
    ep.clear_caches()
    TRACES.clear()
    for _ in range(4):
        m = ep.pmap2(m.bump)(x)
        ep.pmap2(m.forward)(x)
    assert len(TRACES) == 1


def test_a_global_the_method_reads_is_still_followed():
    global GAIN
    m = ep.pmap2_new_states(_model)
    x = _x()
    first = np.asarray(ep.pmap2(m.forward)(x))
    GAIN = 2.0
    try:
        second = np.asarray(ep.pmap2(m.forward)(x))
    finally:
        GAIN = 1.0
    np.testing.assert_allclose(second - first, _np(m)[1], rtol=1e-6)


def test_a_model_not_on_the_mesh_is_seen_whole_as_by_filter_pmap():
    net = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    x = _x()
    got = ep.pmap2(net)(x)
    expected = eqx.filter_pmap(net)(x)
    assert_laid_out(got, 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)


def test_the_function_s_arrays_are_not_donated():
    m = ep.pmap2_new_states(_model)
    x = _x()
    ep.pmap2(m.forward, donate="all")(x)
    assert not m.s.value.is_deleted() and not m.w.value.is_deleted()
    np.testing.assert_allclose(np.asarray(m.w.value), [1.0, 2.0, 3.0])


def test_messages_name_the_arguments_as_the_caller_wrote_them():
    m = ep.pmap2_new_states(_model)
    with pytest.raises(ValueError, match=r"The input args\[0\] is to be mapped"):
        ep.pmap2(m.forward)(jnp.ones((5, 3)))


def test_bound_method_in_a_map():
    # A `Map`'s module is an input of each call, with its layout.
    mapper = ep.Map(_model, init_map_size=N, behavior="pmap")
    mapper = mapper.init_all_states()
    x = _x()
    got = mapper(x)
    w, s = _np(mapper.module)
    np.testing.assert_allclose(
        np.asarray(got), np.tanh(np.asarray(x) * w) + s, rtol=1e-6
    )


def test_inside_jax_jit_the_function_s_arrays_cannot_be_read_and_are_refused():
    # Traced, a per-device state's layout is unknown: seeing it whole on every device
    # would silently differ from the eager call, so it is an error that says what to do.
    m = ep.pmap2_new_states(_model)
    x = _x()
    with pytest.raises(
        ValueError, match=r"^The function's array self.w.value is traced"
    ):
        jax.jit(lambda m, x: ep.pmap2(m.forward, in_axes=0)(x))(m, x)
    # As it advises: the model as an argument, its axes given.
    from eqx_pmapstate.filters import OfType

    axes = ep.StateAxes({0: OfType(ep.ShortTermState), None: ...})
    step = ep.pmap2(lambda m, v: m.forward(v), in_axes=(axes, 0))
    got = jax.jit(step)(m, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ep.pmap2(m.forward)(x)))
