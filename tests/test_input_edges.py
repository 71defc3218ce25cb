"""Arrays of the user's crossing into the layout (issue 14: items 12, 10, 7 and the
peers' list): each case is a program a user writes, checked against `jax.pmap`,
`eqx.filter_pmap` or a one-device run, or the exact error."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out, N
from jax.test_util import check_grads

import eqx_pmapstate as ep


def _apply(m, v):
    return jax.vmap(m)(v)


# --------------------------------------------------------------------------- item 12

MODULE_REFUSED = (
    r"The argument args\[0\] is an `eqx.Module` none of whose arrays is laid out on the "
    r"mesh \(for example args\[0\].weight\). By default it would be split over the "
    r"devices along its first axis"
)


def test_a_model_not_on_the_mesh_is_refused_whatever_the_other_inputs_are():
    fresh = eqx.nn.Linear(2, N, key=jax.random.key(0))  # first axis of weight: N
    batch = np.ones((N, 4, 2), np.float32)  # straight from numpy
    on_mesh = ep.pmap2_new_states(lambda: jnp.ones((4, 2)))
    step = ep.pmap2(_apply)
    with pytest.raises(ValueError, match=MODULE_REFUSED) as alone:
        step(fresh, batch)
    with pytest.raises(ValueError, match=MODULE_REFUSED) as beside:
        step(fresh, on_mesh)
    assert str(alone.value) == str(beside.value)


def test_explicit_in_axes_still_map_or_replicate_a_model():
    key = jax.random.key(0)
    fresh = eqx.nn.Linear(2, 3, key=key)
    stacked = eqx.filter_vmap(lambda k: eqx.nn.Linear(2, 3, key=k))(
        jax.random.split(key, N)
    )
    batch = np.arange(N * 4 * 2, dtype=np.float32).reshape(N, 4, 2)
    got = ep.pmap2(_apply, in_axes=0)(stacked, batch)
    expected = eqx.filter_pmap(_apply, in_axes=0)(stacked, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
    got = ep.pmap2(_apply, in_axes=(None, 0))(fresh, batch)
    expected = jax.pmap(_apply, in_axes=(None, 0))(fresh, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)


# --------------------------------------------------------------------------- item 10


def _mesh():
    return ep.pmap2_new_states(lambda: jnp.zeros(())).sharding.mesh


def _rule_cases():
    """`(name, step, in_axes, out_axes, args)`: one program per output rule."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = _mesh()
    params = {"w": jnp.ones(3), "b": jnp.float32(0.5)}
    batch = jnp.arange(N * 4 * 3, dtype=jnp.float32).reshape(N, 4, 3) / 10
    hidden = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3)
    cols = jax.device_put(  # laid out along axis 1
        jnp.arange(3 * N, dtype=jnp.float32).reshape(3, N),
        NamedSharding(mesh, P(None, "devices")),
    )

    def train(p, x):
        g = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"]) ** 2))(p)
        g = jax.lax.pmean(g, "devices")
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    def carry(p, h, x):
        return p, h + x.sum(0), jax.lax.psum(x.sum(), "devices")

    return [
        ("rule 1, whole output", train, (None, 0), ep.DEFAULT, (params, batch)),
        (
            "rule 1, tuple elements",
            carry,
            (None, 0, 0),
            ep.DEFAULT,
            (params, hidden, batch),
        ),
        ("a bare array along axis 1", lambda c: c * 2, 1, ep.DEFAULT, (cols,)),
        (
            "rule 2",
            lambda x: (jax.lax.psum(x, "devices"), x * 2),
            0,
            ep.DEFAULT,
            (batch,),
        ),
        ("out_axes prefix", lambda x: (x, x.sum()), 0, (1, 0), (batch,)),
        (
            "out_axes StateAxes",
            lambda x: {"a": x, "b": jax.lax.pmean(x, "devices")},
            0,
            ep.StateAxes({None: lambda path, state: "b" in jax.tree_util.keystr(path)}),
            (batch,),
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_every_output_rule_gives_the_same_layout_under_jax_jit(case):
    name, step, in_axes, out_axes, args = _rule_cases()[case]
    f = ep.pmap2(step, in_axes=in_axes, out_axes=out_axes)
    eager = f(*args)
    jitted = jax.jit(f)(*args)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted), name
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert a.shape == b.shape, name
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_a_bare_array_given_its_axis_comes_back_as_jax_pmap_returns_it():
    # The case: eagerly it came back (3, 8), under `jax.jit` (8, 3).
    name, step, in_axes, _, (cols,) = _rule_cases()[2]
    f = ep.pmap2(step, in_axes=1)
    expected = jax.pmap(step, in_axes=1, axis_name="devices")(cols)
    for out in (f(cols), jax.jit(f)(cols), jax.vmap(f)(cols[None])[0]):
        assert out.shape == (N, 3)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert_laid_out(f(cols), 0)
    # Left to the default rule, its layout is read off the mesh, and kept.
    kept = ep.pmap2(step)(cols)
    assert kept.shape == (3, N) and kept.sharding == cols.sharding


def test_gradient_through_a_step_is_the_same_under_jax_jit():
    f = ep.pmap2(
        lambda w, x: jax.lax.psum(jnp.sum(jnp.tanh(x * w)), "devices"),
        in_axes=(None, 0),
    )
    w = jnp.arange(3.0)
    x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) / 10
    eager = jax.grad(f)(w, x)
    jitted = jax.jit(jax.grad(f))(w, x)
    expected = jax.grad(lambda w: jnp.sum(jnp.tanh(x * w[None])))(w)
    assert eager.shape == jitted.shape == (3,)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(expected), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(expected), rtol=1e-5)


# --------------------------------------------------------------------------- item 7


def _affine(a, x, b):
    return a * x + b


def test_in_axes_bind_to_parameters_passed_by_keyword():
    a = jnp.float32(2.0)
    x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3)
    b = jnp.arange(3.0)
    expected = jax.pmap(_affine, in_axes=(None, 0, None))(a, x, b)
    f = ep.pmap2(_affine, in_axes=(None, 0, None))
    for out in (f(a, x, b), f(a, x, b=b), f(a, x=x, b=b), f(b=b, x=x, a=a)):
        assert_laid_out(out, 0)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_a_single_in_axes_applies_to_keyword_arguments_too():
    x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3)
    f = ep.pmap2(lambda x, y: x * y, in_axes=0)
    np.testing.assert_array_equal(np.asarray(f(x, y=x)), np.asarray(f(x, x)))


def test_a_parameter_left_to_its_default_needs_no_axis():
    def scale(x, k=2.0):
        return x * k

    x = jnp.ones((N, 3))
    out = ep.pmap2(scale, in_axes=(0, None))(x)
    np.testing.assert_array_equal(np.asarray(out), np.full((N, 3), 2.0))


def test_in_axes_that_cannot_bind_say_which_argument_in_a_short_message():
    def keyword_only(a, x, *, b):
        return a * x + b

    a, x, b = jnp.float32(2.0), jnp.ones((N, 3)), jnp.arange(3.0)
    with pytest.raises(ValueError) as e:
        ep.pmap2(keyword_only, in_axes=(None, 0, None))(a, x, b=b)
    assert str(e.value) == (
        "`in_axes` has 3 entries, but the call passes 2 positional argument(s), and "
        "its keyword argument(s) b take no position. Such an argument follows the "
        "default rule: lay it out on the mesh to choose its layout, or give every axis "
        "with `eqx_pmapstate.StateAxes`."
    )
    assert len(str(e.value)) < 300
    big = jnp.ones((N, 1000))  # its repr is long; the message stays short
    with pytest.raises(ValueError, match="has 2 entries, but the call passes 3") as e:
        ep.pmap2(_affine, in_axes=(None, 0))(a, big, big)
    assert len(str(e.value)) < 300
    with pytest.raises(ValueError, match="not a pytree prefix") as e:
        ep.pmap2(_affine, in_axes=({"w": None}, 0, None))(
            {"v": big}, big, jnp.float32(0)
        )
    assert len(str(e.value)) < 300


def test_an_in_axes_that_is_no_prefix_says_where_it_differs():
    # As `jax.pmap` says it: the path, and what each side has there (JAX's own words,
    # "Tuple arity mismatch: 3 != 2", said neither).
    x = jnp.ones((N, 2))
    f = ep.pmap2(lambda a, b: a[0] + a[1] + b, in_axes=((0, 0), 0))
    with pytest.raises(
        ValueError,
        match=r"at \[0\], a tuple of 2 entries where the tree has a tuple of 3",
    ):
        f((x, x, x), x)
    g = ep.pmap2(lambda a: a["p"][0], in_axes=({"p": ({"w": 0}, None)},))
    with pytest.raises(
        ValueError,
        match=r"at \[0\]\['p'\]\[0\], a dict with keys \['w'\] where the tree has an array",
    ):
        g({"p": (x, x)})
    with pytest.raises(ValueError, match=r"of the argument 'key': at \['a'\], a tuple"):
        ep.pmap2_new_states(
            lambda key: ep.ShortTermState(key["a"][0]),
            {"key": {"a": (x, x)}},
            init_in_axes={"key": {"a": (0, 0, 0)}},
        )


# --------------------------------------------------------------------------- peers' list


def test_state_axes_for_one_argument_inside_an_in_axes_tuple():
    # Flax NNX's form: `in_axes=(nnx.StateAxes({...}), 0)`.
    from eqx_pmapstate.filters import OfType

    class Cell(eqx.Module):
        w: jax.Array
        h: ep.ShortTermState

        def __call__(self, x):
            return x * self.w + self.h.value

    hidden = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
    cell = Cell(jnp.arange(3.0), ep.ShortTermState(jnp.asarray(hidden)))
    x = jnp.ones((N, 3))
    axes = ep.StateAxes({0: OfType(ep.ShortTermState), None: ...})
    out = ep.pmap2(lambda c, v: c(v), in_axes=(axes, 0))(cell, x)
    expected = jax.pmap(lambda h, v: v * jnp.arange(3.0) + h)(hidden, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected))


def test_map_with_state_axes_as_in_axes():
    class Scale(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return x * self.w

    mapper = ep.Map(
        lambda: Scale(jnp.arange(3.0)),
        init_map_size=N,
        init_state_axes={None: ...},
        behavior="pmap",
        in_axes=ep.StateAxes({0: ...}),
    ).init_all_states()
    x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3)
    for _ in range(2):  # it failed on every call
        out = mapper(x)
        np.testing.assert_allclose(np.asarray(out), np.asarray(x) * np.arange(3.0))


def test_one_scalar_per_leaf_of_a_model_with_a_state_on_axis_1():
    key1, key2 = jax.random.split(jax.random.key(0))

    def make():
        i = jax.lax.axis_index("devices").astype(jnp.float32)
        second = eqx.nn.Linear(4, 2, key=key2)
        second = eqx.tree_at(lambda l: l.weight, second, second.weight + i)
        return [eqx.nn.Linear(3, 4, key=key1), second]

    def is_second_weight(path, state):
        return jax.tree_util.keystr(path) == "[1].weight"

    net = ep.pmap2_new_states(make, state_out_axes={1: is_second_weight, None: ...})
    assert_laid_out(net[1].weight, 1)
    norms = ep.pmap2(lambda m: jax.tree.map(lambda a: jnp.sqrt(jnp.sum(a**2)), m))(net)
    # the per-device weight's norm differs per device: one per device, as jax.pmap
    # returns it; the replicated leaves' norms are proved the same: one value.
    assert norms[1].weight.shape == (N,)
    assert_laid_out(norms[1].weight, 0)
    w = np.moveaxis(np.asarray(net[1].weight), 1, 0)
    np.testing.assert_allclose(
        np.asarray(norms[1].weight), np.sqrt((w**2).sum((1, 2))), rtol=1e-5
    )
    assert norms[0].weight.shape == ()
    np.testing.assert_allclose(
        float(norms[0].weight), np.linalg.norm(np.asarray(net[0].weight)), rtol=1e-5
    )


def test_the_vjp_takes_a_cotangent_laid_out_otherwise_than_the_output():
    from jax.sharding import NamedSharding, PartitionSpec as P

    f = ep.pmap2(lambda v: jnp.sin(v) * 2, in_axes=0)
    x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) / 10
    y, vjp = jax.vjp(f, x)
    assert_laid_out(y, 0)
    cotangent = jax.device_put(jnp.ones((N, 3)), NamedSharding(y.sharding.mesh, P()))
    (got,) = vjp(cotangent)
    _, theirs = jax.vjp(jax.pmap(lambda v: jnp.sin(v) * 2), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(theirs(cotangent)[0]))
    np.testing.assert_allclose(np.asarray(got), 2 * np.cos(np.asarray(x)), rtol=1e-6)
    check_grads(f, (x,), order=2, modes=["rev"], eps=1e-2)


def test_empty_devices_are_refused_at_once():
    with pytest.raises(ValueError, match=r"^`devices` is empty\. Pass the devices"):
        ep.pmap2(lambda x: x, devices=[])


def test_one_array_both_donated_and_kept_is_refused_before_anything_runs():
    params = ep.pmap2_new_states(
        lambda: {"w": jnp.arange(3.0)}, state_out_axes={None: ...}
    )

    @ep.pmap2(donate="all-except-first")
    def ema_step(p, ema):
        return p, jax.tree.map(lambda e, q: 0.9 * e + 0.1 * q, ema, p)

    with pytest.raises(ValueError) as e:
        ema_step(params, params)  # the first step of an EMA: ema is params
    assert str(e.value).startswith(
        "The same array is passed at args[1]['w'], which is donated, and at "
        "args[0]['w'], which is not"
    )
    assert not params["w"].is_deleted()
    _, ema = ema_step(params, jax.tree.map(jnp.copy, params))
    np.testing.assert_allclose(np.asarray(ema["w"]), [0.0, 1.0, 2.0])


def test_a_bound_method_s_arrays_passed_again_and_donated_are_refused():
    class Tied(eqx.Module):
        w: jax.Array

        def add(self, v):
            return self.w + v

    m = ep.pmap2_new_states(lambda: Tied(jnp.ones(3)), state_out_axes={None: ...})
    with pytest.raises(ValueError) as e:
        ep.pmap2(m.add, donate="all", in_axes=None)(m.w)
    assert str(e.value).startswith(
        "The same array is passed at args[0], which is donated, and at self.w, which "
        "is not"
    )
    assert not m.w.is_deleted()


# --------------------------------------------------------------------------- float0


def _grads_with_an_int(x, k):
    loss = lambda x, k: (x * k.astype(jnp.float32)).sum()  # noqa: E731
    return jax.grad(loss, argnums=(0, 1), allow_int=True)(x, k)


def test_a_float0_output_comes_back_as_jax_pmap_returns_it():
    # JAX returns a `float0` output as a host array, with no layout: the check of the
    # outputs' layouts after the run read its `.sharding` (AttributeError).
    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    k = jnp.arange(N, dtype=jnp.int32)
    expected = jax.pmap(_grads_with_an_int)(x, k)
    step = ep.pmap2(_grads_with_an_int)
    for _ in range(2):  # the full path, then the quick path
        dx, dk = step(x, k)
        np.testing.assert_array_equal(np.asarray(dx), np.asarray(expected[0]))
        assert dk.dtype == jax.dtypes.float0
    zeros = np.zeros((N,), dtype=jax.dtypes.float0)
    out = ep.pmap2(lambda z, v: (z, v))(zeros, x)  # handed back as it came
    assert out[0].dtype == jax.dtypes.float0 and out[0].shape == (N,)
    np.testing.assert_array_equal(np.asarray(out[1]), x)
