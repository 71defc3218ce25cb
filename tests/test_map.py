"""`Map`: the reference page's `Map` example, functionally, over devices and as an ensemble."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import _none, assert_laid_out, N, ours, ParallelModel
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType


class MemberModel(eqx.Module):
    """Each member gets its own weights, from its own key, and a bias equal to its index."""

    axis_name: str = eqx.field(static=True)
    weight: ep.ParamState | None = None
    bias: ep.ParamState | None = None

    def init_state(self, layer_size, key):
        i = jax.lax.axis_index(self.axis_name)
        weight = ep.ParamState(
            jax.random.normal(jax.random.fold_in(key, i), (layer_size,))
        )
        bias = ep.ParamState(jnp.zeros(layer_size) + i.astype(jnp.float32))
        return eqx.tree_at(
            lambda m: (m.weight, m.bias), self, (weight, bias), is_leaf=_none
        )

    def __call__(self, x):
        assert self.weight is not None and self.bias is not None  # set by init_state
        return (
            jnp.tanh(x * self.weight.value[None]) + self.bias.value[None]
        )  # x: (batch, features)


def _member_weight(key, i, size):
    return np.asarray(jax.random.normal(jax.random.fold_in(key, i), (size,)))


def test_reference_example_pmap(leaks):
    mapper = ep.Map(
        ParallelModel(), init_map_size=N, behavior="pmap", axis_name="devices"
    )
    new = mapper.init_all_states(layer_size=128)
    assert isinstance(new, ep.Map) and new is not mapper
    # the old one is unchanged
    assert mapper.module.weight is None and mapper.module.bias is None
    w = new.module.weight.value
    assert w.shape == (N, 128)
    assert new.module.bias.value.shape == (N, 128)
    assert isinstance(w.sharding, NamedSharding) and w.sharding.spec == P("devices")
    assert_laid_out(w, 0)
    assert_laid_out(new.module.bias.value, 0)
    expected_w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (128,)))
    np.testing.assert_allclose(
        np.asarray(w), np.broadcast_to(expected_w, (N, 128)), rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(new.module.bias.value), np.zeros((N, 128)))

    inputs = np.asarray(jax.random.normal(jax.random.key(1), (N * 4, 128)))
    batch_per_device = inputs.shape[0] // N
    sharded_inputs = inputs.reshape(N, batch_per_device, -1)
    outputs = new(sharded_inputs)
    assert outputs.shape == (N, batch_per_device, 128)
    assert outputs.sharding.spec == P("devices")
    assert_laid_out(outputs, 0)
    w, b, outputs = (
        np.asarray(w),
        np.asarray(new.module.bias.value),
        np.asarray(outputs),
    )
    for i in range(N):
        expected = sharded_inputs[i] * w[i] + b[i]
        np.testing.assert_allclose(outputs[i], expected, rtol=1e-6)


def test_pmap_members_see_their_own_states(leaks):
    key = jax.random.key(7)
    mapper = ep.Map(
        MemberModel("devices"), init_map_size=N, behavior="pmap", axis_name="devices"
    )
    mapper = mapper.init_all_states(layer_size=16, key=key)
    assert mapper.module.weight.value.shape == (N, 16)
    assert_laid_out(mapper.module.weight.value, 0)
    assert_laid_out(mapper.module.bias.value, 0)
    w = np.asarray(mapper.module.weight.value)
    for i in range(N):
        np.testing.assert_allclose(w[i], _member_weight(key, i, 16), rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(mapper.module.bias.value), np.repeat(np.arange(N)[:, None], 16, 1)
    )

    x = np.asarray(jax.random.normal(jax.random.key(2), (N, 3, 16)))
    out = mapper(x)
    assert out.shape == (N, 3, 16)
    assert_laid_out(out, 0)
    np.testing.assert_allclose(
        np.asarray(out),
        np.tanh(x * w[:, None, :]) + np.arange(N)[:, None, None],
        rtol=1e-5,
        atol=1e-6,
    )
    for i in range(N):  # against a loop over the members
        np.testing.assert_allclose(
            np.asarray(out)[i], np.tanh(x[i] * w[i]) + i, rtol=1e-5, atol=1e-6
        )
    # a second call with new inputs of the same shape
    out2 = np.asarray(mapper(2 * x))
    np.testing.assert_allclose(
        out2,
        np.tanh(2 * x * w[:, None, :]) + np.arange(N)[:, None, None],
        rtol=1e-5,
        atol=1e-6,
    )


def test_pmap_broadcast_inputs(leaks):
    key = jax.random.key(0)
    mapper = ep.Map(
        MemberModel("devices"), init_map_size=N, behavior="pmap", in_axes=None
    )
    mapper = mapper.init_all_states(layer_size=4, key=key)
    x = np.ones((2, 4), np.float32)  # the same input for every member
    out = mapper(x)
    assert out.shape == (N, 2, 4)
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(x, np.ones((2, 4)))  # the input is not changed
    w = np.asarray(mapper.module.weight.value)
    out = np.asarray(out)
    for i in range(N):
        np.testing.assert_allclose(out[i], np.tanh(x * w[i]) + i, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [3, N])
def test_vmap_ensemble(size, leaks):
    key = jax.random.key(5)
    mapper = ep.Map(
        MemberModel("ens"), init_map_size=size, behavior="vmap", axis_name="ens"
    )
    new = mapper.init_all_states(layer_size=16, key=key)
    assert new is not mapper
    assert mapper.module.weight is None and mapper.module.bias is None
    w = np.asarray(new.module.weight.value)
    assert w.shape == (size, 16)
    assert new.module.bias.value.shape == (size, 16)
    assert len(new.module.weight.value.devices()) == 1  # an ensemble on one device
    for i in range(size):
        np.testing.assert_allclose(w[i], _member_weight(key, i, 16), rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(new.module.bias.value), np.repeat(np.arange(size)[:, None], 16, 1)
    )

    x = np.asarray(jax.random.normal(jax.random.key(3), (size, 5, 16)))
    out = new(x)
    assert out.shape == (size, 5, 16)
    out = np.asarray(out)
    for i in range(size):
        np.testing.assert_allclose(
            out[i], np.tanh(x[i] * w[i]) + i, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("behavior", ["pmap", "vmap"])
def test_init_state_axes(behavior, leaks):
    # the parameters laid out along axis 1: calls still see one member's slice each
    key = jax.random.key(4)
    name = "devices" if behavior == "pmap" else "ens"
    mapper = ep.Map(
        MemberModel(name),
        init_map_size=N,
        behavior=behavior,
        axis_name=name,
        init_state_axes={-1: OfType(ep.ParamState)},
    )
    mapper = mapper.init_all_states(layer_size=6, key=key)
    w = mapper.module.weight.value
    assert w.shape == (6, N)
    b = mapper.module.bias.value
    assert b.shape == (6, N)
    if behavior == "pmap":
        assert_laid_out(w, 1)
        assert_laid_out(b, 1)
    np.testing.assert_array_equal(np.asarray(b), np.repeat(np.arange(N)[None], 6, 0))
    x = np.asarray(jax.random.normal(jax.random.key(9), (N, 2, 6)))
    out = mapper(x)
    assert out.shape == (N, 2, 6)
    out, w = np.asarray(out), np.asarray(w)
    for i in range(N):
        expected = np.tanh(x[i] * w[:, i]) + i
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-6)


def test_state_tag(leaks):
    mapper = ep.Map(
        ParallelModel(), init_map_size=N, behavior="pmap", state_tag="mapped"
    )
    mapper = mapper.init_all_states(layer_size=4)
    assert mapper.module.weight.tag == "mapped"
    assert mapper.module.bias.tag == "mapped"


def test_bad_behavior():
    with pytest.raises((ValueError, TypeError)) as e:
        ep.Map(ParallelModel(), init_map_size=N, behavior="jit")  # pyright: ignore[reportArgumentType]  # deliberately invalid
    assert "behavior" in str(e.value) and "'jit'" in str(e.value)
    if ours(e.value):
        assert isinstance(e.value, ValueError)
        assert "`behavior` must be 'vmap' or 'pmap', but got 'jit'" in str(e.value)


class _Layer(eqx.Module):
    """A replicated weight and a per-device state equal to the device's index."""

    w: ep.ParamState | None = None
    h: ep.ShortTermState | None = None

    def init_state(self, size):
        i = jax.lax.axis_index("devices").astype(jnp.float32)
        return _Layer(
            ep.ParamState(jnp.ones(size)), ep.ShortTermState(jnp.full(size, i))
        )

    def __call__(self, x):
        assert self.w is not None and self.h is not None
        return x * self.w.value[None] + self.h.value[None]


def test_pmap_map_inside_jit_and_grad_uses_each_devices_state():
    # Inside `jax.jit` the module's arrays are tracers whose layout cannot be read; the
    # `Map` maps them by the axes `init_all_states` gave them (before, it replicated
    # the whole per-device state: every device saw row 0).
    mp = ep.Map(
        _Layer(),
        init_map_size=N,
        behavior="pmap",
        init_state_axes={None: OfType(ep.ParamState)},
    ).init_all_states(size=4)
    x = jnp.zeros((N, 2, 4))
    eager = np.asarray(mp(x))
    np.testing.assert_array_equal(eager[:, 0, 0], np.arange(N, dtype=np.float32))
    jitted = eqx.filter_jit(lambda m, x: m(x))(mp, x)
    np.testing.assert_array_equal(np.asarray(jitted), eager)
    grad = eqx.filter_grad(lambda m, x: jnp.sum(m(x) ** 2))(mp, jnp.ones((N, 2, 4)))
    want = 2 * (1.0 + np.arange(N, dtype=np.float32))[:, None] * 2  # d/dh, 2 rows each
    np.testing.assert_allclose(np.asarray(grad.module.h.value)[:, 0], want[:, 0])


def test_pmap_map_with_a_changed_structure_inside_jit_is_refused():
    mp = ep.Map(_Layer(), init_map_size=N, behavior="pmap").init_all_states(size=4)
    changed = eqx.tree_at(lambda m: m.module.w, mp, None)  # not what it recorded
    x = jnp.zeros((N, 2, 4))
    with pytest.raises(ValueError, match=r"`Map`'s module holds a traced array"):
        eqx.filter_jit(lambda m, x: m.module.h.value + m(x) * 0)(
            changed, x
        )  # (calls `_Layer` without `w`: only the refusal is asserted)


@pytest.mark.parametrize("behavior", ["pmap", "vmap"])
def test_map_init_state_axes_with_several_axes(behavior):
    # `init_state_axes` takes what `state_out_axes` takes: keys 0 and None together.
    axes = {0: ep.ShortTermState, None: ...}
    mp = ep.Map(
        _Layer(),
        init_map_size=N,
        behavior=behavior,
        init_state_axes=axes,
        axis_name="devices",
    ).init_all_states(size=4)
    assert mp.init_state_axes == axes
    assert mp.module.w.value.shape == (4,)  # replicated
    assert mp.module.h.value.shape == (N, 4)
    np.testing.assert_array_equal(
        np.asarray(mp.module.h.value)[:, 0], np.arange(N, dtype=np.float32)
    )


class _Scaled(eqx.Module):
    w: ep.ParamState | None = None

    def init_state(self):
        return _Scaled(ep.ParamState(jnp.ones(3)))

    def __call__(self, x, scale=1.0):
        assert self.w is not None
        return (x * self.w.value).sum() * scale


@pytest.mark.parametrize("behavior", ["pmap", "vmap"])
def test_map_keyword_arguments_that_are_not_arrays_are_static(behavior):
    n = N if behavior == "pmap" else 4
    mp = ep.Map(_Scaled(), init_map_size=n, behavior=behavior).init_all_states()
    out = mp(jnp.ones((n, 3)), scale=3.0)
    np.testing.assert_array_equal(np.asarray(out), np.full(n, 9.0))


@pytest.mark.parametrize("behavior", ["pmap", "vmap"])
def test_calling_a_map_before_init_all_states_says_so(behavior):
    mp = ep.Map(_Scaled(), init_map_size=N, behavior=behavior)
    with pytest.raises(ValueError, match=r"Call `init_all_states` first"):
        mp(jnp.ones((N, 3)))


@pytest.mark.parametrize("behavior", ["pmap", "vmap"])
def test_a_map_given_the_wrong_number_of_members_names_the_input(behavior):
    mp = ep.Map(_Scaled(), init_map_size=4, behavior=behavior).init_all_states()
    with pytest.raises(
        ValueError,
        match=r"^The input args\[0\] .* of length 5, .* maps over 4 \(its `init_map_size`\)",
    ):
        mp(jnp.ones((5, 3)))
