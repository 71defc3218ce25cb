"""Where `pmap2` takes the forms `eqx.filter_pmap` and `jax.pmap` accept: `in_axes` by
parameter name, Python numbers given an output axis, `donate="all-except-first"` with
the first argument passed by keyword; and the messages for `in_axes` mistakes."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep


def _mesh():
    return jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


def _on_mesh(x, spec=P("devices")):
    return jax.device_put(x, NamedSharding(_mesh(), spec))


def test_in_axes_by_parameter_name_as_filter_pmap():
    x = np.arange(8.0, dtype=np.float32)[:, None] * np.ones((8, 4), np.float32)
    w = np.arange(4.0, dtype=np.float32)

    def f(x, w):
        return x * w

    ours = ep.pmap2(f, in_axes={"w": None})(x, w)  # `x` follows the default rule
    theirs = eqx.filter_pmap(f, in_axes=dict(w=None))(x, w)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert ours.shape == (8, 4)
    # by keyword too, and with the name of the first parameter
    by_kw = ep.pmap2(f, in_axes={"x": 0, "w": None})(x, w=w)
    np.testing.assert_array_equal(np.asarray(by_kw), np.asarray(theirs))


def test_in_axes_naming_no_parameter_is_an_error():
    f = ep.pmap2(lambda x, w: x * w, in_axes={"weights": None})
    with pytest.raises(ValueError, match=r"'weights', which is not a parameter.*x, w"):
        f(np.ones((8, 2), np.float32), np.ones(2, np.float32))


def test_a_python_number_given_an_axis_comes_back_per_device():
    # `jax.pmap` and `eqx.filter_pmap(out_axes=0)` return a number as an array with a
    # device axis; the default rule keeps it static.
    x = np.arange(8.0, dtype=np.float32)

    def f(x):
        return x, jax.lax.axis_size("i")

    want = jax.pmap(f, axis_name="i")(x)[1]
    for out_axes in (0, (0, 0)):
        got = ep.pmap2(f, axis_name="i", out_axes=out_axes, in_axes=0)(x)[1]
        assert isinstance(got, jax.Array) and got.shape == (8,)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert ep.pmap2(f, axis_name="i", in_axes=0)(x)[1] == 8
    assert ep.pmap2(f, axis_name="i", in_axes=0, out_axes=(0, None))(x)[1] == 8
    # a callable that gives no axis to a non-array (as `eqx.if_array`) keeps it static
    assert ep.pmap2(f, axis_name="i", in_axes=0, out_axes=eqx.if_array(0))(x)[1] == 8
    one = ep.pmap2(lambda v: v, out_axes=0, devices=jax.devices()[:1])(1)
    assert isinstance(one, jax.Array)
    np.testing.assert_array_equal(np.asarray(one), np.array([1]))


def test_all_except_first_keeps_the_first_parameter_passed_by_keyword():
    def step(batch, params):
        return params + batch.sum(), params * 2

    f = ep.pmap2(step, donate="all-except-first")
    for call in (
        lambda b, p: f(b, p),
        lambda b, p: f(b, params=p),
        lambda b, p: f(batch=b, params=p),
        lambda b, p: f(params=p, batch=b),
    ):
        b, p = _on_mesh(jnp.ones((8, 3))), _on_mesh(jnp.ones((8, 3)))
        call(b, p)
        assert not b.is_deleted()
        assert p.is_deleted()
        call(b, _on_mesh(jnp.ones((8, 3))))  # the batch can be passed again


def test_in_axes_with_more_entries_than_parameters():
    with pytest.raises(
        ValueError,
        match=r"`in_axes` has 2 entries, but the function takes 1 positional "
        r"parameter\(s\) \(x\)",
    ):
        ep.pmap2(lambda x: x, in_axes=(0, 0))(np.ones((8, 2), np.float32))


def test_a_callable_in_axes_returning_no_axis_names_the_input():
    with pytest.raises(
        TypeError, match=r"^The input args\[0\] is given the axis 'zero', which is not"
    ):
        ep.pmap2(lambda x: x, in_axes=lambda a: "zero")(np.ones((8, 2), np.float32))


def test_an_output_replicated_by_the_default_rule_names_the_argument():
    # An output of a replicated argument's per-device shape and dtype takes its
    # layout (the default rule); when it varies, the error says why it was to be
    # replicated.
    x = _on_mesh(jnp.ones((8, 4, 3)))
    w = _on_mesh(jnp.ones((3, 3)), P())
    with pytest.raises(
        ep.ReplicationError, match=r"a replicated argument \(args\[1\]\)"
    ):
        ep.pmap2(lambda x, w: (x @ w)[:3])(x, w)
    out = ep.pmap2(lambda x, w: (x @ w)[:3], out_axes=0)(x, w)
    assert out.shape == (8, 3, 3)
