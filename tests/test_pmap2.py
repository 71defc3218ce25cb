"""`pmap2`: the decorator's forms, pmap semantics, input and output layouts, the
replication checks, donation, compile caching and errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import _idx, assert_laid_out, N, ours
from jax.sharding import Mesh, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType, WithTag


def _shards(x):
    """The per-device buffers of a global array, in mesh order."""
    by_device = {s.device: np.asarray(s.data) for s in x.addressable_shards}
    return [by_device[d] for d in x.sharding.mesh.devices.ravel()]


# --------------------------------------------------------------------------- forms


def test_bare_decorator(leaks):
    seen = []

    @ep.pmap2
    def f(x):
        seen.append(x.shape)
        return x * _idx()

    x = np.ones((N, 3), np.float32)
    y = f(x)
    assert seen and all(s == (3,) for s in seen)  # the device axis is removed
    assert y.shape == (N, 3)
    assert_laid_out(y, 0)
    np.testing.assert_array_equal(
        np.asarray(y), np.repeat(np.arange(N, dtype=np.float32)[:, None], 3, 1)
    )


def test_decorator_with_arguments(leaks):
    seen = []

    @ep.pmap2(axis_name="batch", donate="none", check_replicated=True)
    def f(x, y):
        seen.append((x.shape, y.shape))
        return x * jax.lax.axis_index("batch").astype(jnp.float32) + y

    x = np.ones((N, 2), np.float32)
    y = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    out = f(x, y)
    assert all(s == ((2,), (2,)) for s in seen)
    assert_laid_out(out, 0, name="batch")
    np.testing.assert_array_equal(
        np.asarray(out), np.arange(N, dtype=np.float32)[:, None] + np.asarray(y)
    )


class Plain:
    def __init__(self, scale):
        self.scale = scale

    @ep.pmap2
    def apply(self, x):
        return x * self.scale * _idx()


def test_on_a_method_of_a_plain_class(leaks):
    obj = Plain(3.0)
    i = np.repeat(np.arange(N, dtype=np.float32)[:, None], 2, 1)
    out = obj.apply(np.ones((N, 2), np.float32))
    assert out.shape == (N, 2)
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(np.asarray(out), 3.0 * i)
    # a different instance is a different static value
    out = Plain(5.0).apply(np.ones((N, 2), np.float32))
    np.testing.assert_array_equal(np.asarray(out), 5.0 * i)
    # unbound, through the class
    out = Plain.apply(obj, np.ones((N, 2), np.float32))
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(np.asarray(out), 3.0 * i)


class Scaled(eqx.Module):
    w: ep.NonBatchState  # replicated
    b: ep.ShortTermState  # per device

    @ep.pmap2
    def __call__(self, x):
        assert self.w.value.shape == (2,)
        assert self.b.value.shape == (2,)
        assert x.shape == (2,)
        return x * self.w.value + self.b.value

    @ep.pmap2(axis_name="devices")
    def total(self, x):
        return jax.lax.psum(x * self.w.value, "devices")


def _make_scaled():
    return Scaled(
        ep.NonBatchState(jnp.array([1.0, 2.0])),
        ep.ShortTermState(jnp.zeros(2) + _idx()),
    )


def test_on_a_method_of_an_equinox_module(leaks):
    m = ep.pmap2_new_states(_make_scaled)
    assert_laid_out(m.w.value, None)
    assert_laid_out(m.b.value, 0)
    x = np.ones((N, 2), np.float32)
    out = m(x)
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(
        np.asarray(out), np.array([1.0, 2.0]) + np.arange(N)[:, None]
    )
    tot = m.total(x)
    assert tot.shape == (2,)
    assert_laid_out(tot, None)
    np.testing.assert_array_equal(np.asarray(tot), [8.0, 16.0])


def test_collectives(leaks):
    @ep.pmap2
    def f(x):
        return {
            "psum": jax.lax.psum(x, "devices"),
            "pmean": jax.lax.pmean(x, "devices"),
            "pmax": jax.lax.pmax(x, "devices"),
            "gathered_sum": jnp.sum(jax.lax.all_gather(x, "devices"), axis=0),
        }

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    out = f(x)
    for k in ("psum", "pmean", "pmax"):  # rule 2: the same everywhere, so replicated
        assert out[k].shape == (2,)
        assert_laid_out(out[k], None)
    np.testing.assert_allclose(np.asarray(out["psum"]), x.sum(0))
    np.testing.assert_allclose(np.asarray(out["pmean"]), x.mean(0))
    np.testing.assert_allclose(np.asarray(out["pmax"]), x.max(0))
    # the gathered array is the whole input on every device (whatever layout it comes
    # back in: see test_all_gather_comes_back_replicated)
    for row in np.asarray(out["gathered_sum"]).reshape(-1, 2):
        np.testing.assert_allclose(row, x.sum(0))


def test_all_gather_comes_back_replicated(leaks):
    # The docstring's rule 2: "the result of `psum`, `pmean`, `all_gather`" comes back
    # replicated, with no device axis.
    @ep.pmap2
    def f(x):
        return jax.lax.all_gather(x, "devices")

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    out = f(x)
    assert out.shape == (N, 2)
    assert_laid_out(out, None)
    np.testing.assert_array_equal(np.asarray(out), x)


# --------------------------------------------------------------------------- pmap semantics


def _grad_step(w, x):
    return jax.lax.pmean(jax.grad(lambda w: w * x)(w), "devices")


def test_pmean_of_grad_is_the_mean_as_with_jax_pmap(leaks):
    w = jnp.float32(2.0)
    x = jnp.arange(N, dtype=jnp.float32)
    expected = jax.pmap(_grad_step, axis_name="devices", in_axes=(None, 0))(w, x)
    np.testing.assert_allclose(np.asarray(expected), np.full(N, 3.5))

    out = ep.pmap2(_grad_step, in_axes=(None, 0))(w, x)
    assert out.shape == ()
    assert_laid_out(out, None)
    np.testing.assert_allclose(np.asarray(out), 3.5)  # not 28 = 8 * 3.5
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected)[0])

    # the same with w laid out replicated on the mesh (no in_axes)
    wr = ep.pmap2_new_states(lambda: ep.NonBatchState(jnp.float32(2.0))).value
    assert_laid_out(wr, None)
    out = ep.pmap2(_grad_step)(wr, x)
    assert out.shape == ()
    assert_laid_out(out, None)
    np.testing.assert_allclose(np.asarray(out), 3.5)


def test_grad_of_a_replicated_input_is_local(leaks):
    # Each device holds its own copy of w: its gradient is its own x_i, not a sum over
    # devices (which plain shard_map with check_vma=True would give: 28 on every device).
    def local(w, x):
        return jax.grad(lambda w: w * x)(w)

    w = jnp.float32(2.0)
    x = jnp.arange(N, dtype=jnp.float32)
    expected = jax.pmap(local, axis_name="devices", in_axes=(None, 0))(w, x)
    out = ep.pmap2(local, in_axes=(None, 0), out_axes=0)(w, x)
    assert_laid_out(out, 0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected))
    np.testing.assert_allclose(np.asarray(out), np.arange(N))


# --------------------------------------------------------------------------- inputs


def _make_layouts():
    i = _idx()
    return {
        "a0": ep.State(jnp.zeros((2, 3)) + i, tag="a0"),
        "a1": ep.State(jnp.zeros((2, 3)) + 10 * i, tag="a1"),
        "am1": ep.State(jnp.zeros((2, 3)) + 100 * i, tag="am1"),
        "r": ep.NonBatchState(jnp.arange(3.0)),
    }


def _layouts():
    return ep.pmap2_new_states(_make_layouts, state_out_axes={1: "a1", -1: "am1"})


def test_laid_out_inputs_keep_their_layout(leaks):
    m = _layouts()
    assert m["a0"].value.shape == (N, 2, 3)
    assert m["a1"].value.shape == (2, N, 3)
    assert m["am1"].value.shape == (2, 3, N)
    assert m["r"].value.shape == (3,)
    seen = {}

    @ep.pmap2
    def f(m):
        seen.update({k: v.value.shape for k, v in m.items()})
        i = _idx()
        # every mapped leaf holds its own device's slice
        ok = (
            jnp.all(m["a0"].value == i)
            & jnp.all(m["a1"].value == 10 * i)
            & jnp.all(m["am1"].value == 100 * i)
            & jnp.all(m["r"].value == jnp.arange(3.0))
        )
        return jnp.stack([ok.astype(jnp.float32), m["am1"].value[1, 2]])

    out = f(m)
    assert seen == {"a0": (2, 3), "a1": (2, 3), "am1": (2, 3), "r": (3,)}
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], np.ones(N))
    np.testing.assert_array_equal(np.asarray(out)[:, 1], 100.0 * np.arange(N))


def test_other_arrays_are_mapped_over_axis_0(leaks):
    seen = []

    @ep.pmap2
    def f(a, b):
        seen.append((a.shape, b.shape))
        return a + b

    a = np.arange(N * 3, dtype=np.float32).reshape(N, 3)  # numpy
    b = jnp.ones((N, 3))  # a jax array on one device, not laid out on the mesh
    out = f(a, b)
    assert all(s == ((3,), (3,)) for s in seen)
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(np.asarray(out), a + 1)


def test_non_arrays_are_static_and_retrace_on_change(leaks):
    traces = []

    @ep.pmap2
    def f(x, n, name):
        traces.append((n, name))
        assert isinstance(n, int) and isinstance(name, str)
        return x * n

    x = np.ones((N, 2), np.float32)
    np.testing.assert_array_equal(np.asarray(f(x, 2, "a")), 2 * x)
    first = len(traces)
    assert first >= 1
    np.testing.assert_array_equal(np.asarray(f(x, 2, "a")), 2 * x)
    assert len(traces) == first  # the same static values: no new trace
    np.testing.assert_array_equal(np.asarray(f(x, 3, "a")), 3 * x)
    assert len(traces) > first and traces[-1] == (3, "a")
    second = len(traces)
    with pytest.warns(ep.RecompileWarning, match=r"the value of args\[2\], a static"):
        np.testing.assert_array_equal(np.asarray(f(x, 3, "b")), 3 * x)  # third compile
    assert len(traces) > second and traces[-1] == (3, "b")


def test_in_axes_pytree_prefix(leaks):
    seen = []

    @ep.pmap2(in_axes=(None, 0))
    def f(w, x):
        seen.append((w.shape, x.shape))
        return x * w

    w = np.array([1.0, 2.0, 3.0], np.float32)
    x = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
    out = f(w, x)
    assert all(s == ((3,), (3,)) for s in seen)
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(np.asarray(out), x * w)

    # a nested prefix, and a mapped axis other than 0
    @ep.pmap2(in_axes=({"a": 1, "b": None},))
    def g(d):
        seen.append((d["a"].shape, d["b"].shape))
        return d["a"] * d["b"][0]

    cols = np.arange(3 * N, dtype=np.float32).reshape(3, N)
    out = g(
        {"a": cols, "b": np.full((N + 1,), 2.0, np.float32)}
    )  # b's length is irrelevant
    assert seen[-1] == ((3,), (N + 1,))
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(np.asarray(out), 2.0 * cols.T)


def test_in_axes_state_axes(leaks):
    seen = {}

    @ep.pmap2(in_axes=ep.StateAxes({0: WithTag("data"), None: ...}))
    def f(tree):
        seen.update({k: v.value.shape for k, v in tree.items()})
        return tree["data"].value @ tree["w"].value

    x = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
    w = np.ones((3, 2), np.float32)
    tree = {"data": ep.State(x, tag="data"), "w": ep.ParamState(w)}
    out = f(tree)
    assert seen == {"data": (3,), "w": (3, 2)}
    assert out.shape == (N, 2)
    assert_laid_out(out, 0)
    np.testing.assert_allclose(np.asarray(out), x @ w)

    # an axis other than 0, chosen by type
    @ep.pmap2(in_axes=ep.StateAxes({1: OfType(ep.ShortTermState), None: ...}))
    def g(tree):
        seen["g"] = tree["s"].value.shape
        return tree["s"].value * tree["w"].value

    cols = np.arange(3 * N, dtype=np.float32).reshape(3, N)
    out = g({"s": ep.ShortTermState(cols), "w": ep.ParamState(np.float32(2.0))})
    assert seen["g"] == (3,)
    assert out.shape == (N, 3)
    assert_laid_out(out, 0)
    np.testing.assert_array_equal(np.asarray(out), 2.0 * cols.T)


def test_mapped_input_of_the_wrong_length(leaks):
    @ep.pmap2
    def f(tree):
        return tree["x"] + 1

    with pytest.raises(
        ValueError,
        match=r"args\[0\]\['x'\] .* of length 5, but the mapped axis has size 8",
    ):
        f({"x": np.ones((5, 2), np.float32)})


def test_a_shorter_mapped_axis_is_told_how_to_map_over_fewer_devices(leaks):
    # `jax.pmap` maps an axis of 4 over the first 4 devices; `pmap2` maps over the mesh,
    # so the error says how to do the same.
    x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    hint = r"To map over 4 devices, .*`pmap2\(..., devices=jax.devices\(\)\[:4\]\)`\.$"
    with pytest.raises(ValueError, match=r"length 4, but the mapped axis has size 8"):
        ep.pmap2(lambda v: v)(x)
    with pytest.raises(ValueError, match=hint):
        ep.pmap2(lambda v: v)(x)
    out = ep.pmap2(lambda v: jax.lax.psum(v, "devices"), devices=jax.devices()[:4])(x)
    np.testing.assert_array_equal(np.asarray(out), x.sum(0))
    # Not where the length is a mismatch: another input already has N rows.
    with pytest.raises(ValueError) as e:
        ep.pmap2(lambda a, b: a)(np.ones((N, 3), np.float32), x)
    assert "devices=" not in str(e.value)
    # Nor where `devices` was given, or an input is on the mesh already.
    with pytest.raises(ValueError) as e:
        ep.pmap2(lambda v: v, devices=jax.devices())(x)
    assert "devices=" not in str(e.value)


def test_out_axes_out_of_range_names_the_output(leaks):
    with pytest.raises(ValueError) as e:
        ep.pmap2(lambda v: {"a": v}, out_axes=2)(np.ones((N, 3), np.float32))
    assert str(e.value) == (
        "Axis 2 is out of range for the output at output['a'], which has 1 "
        "dimension(s): the new axis can go at positions -2 to 1."
    )


def test_a_scalar_input_not_on_the_mesh_is_a_clear_error():
    # A 0-d array has no axis 0 to map over: a ValueError that names it, not an IndexError.
    @ep.pmap2
    def f(w, x):
        return w * x

    with pytest.raises(
        ValueError, match=r"args\[0\] is to be mapped .* scalar \(0-d\)"
    ):
        f(jnp.float32(2.0), np.ones((N,), np.float32))


# --------------------------------------------------------------------------- outputs, rule 1


def _make_model():
    i = _idx()
    return {
        "w": ep.ParamState(jnp.array([1.0, -1.0, 0.5])),
        "a0": ep.State(jnp.zeros((2, 3)) + i, tag="a0"),
        "a1": ep.State(jnp.zeros((2, 3)) + i, tag="a1"),
        "am1": ep.State(jnp.zeros((2, 3)) + i, tag="am1"),
    }


def _make_state():
    return {
        "count": ep.ShortTermState(jnp.zeros((), jnp.int32)),
        "h": ep.ShortTermState(jnp.zeros(3) + _idx()),
    }


def test_layout_kept_over_ten_steps(leaks):
    model = ep.pmap2_new_states(
        _make_model, state_out_axes={None: OfType(ep.ParamState), 1: "a1", -1: "am1"}
    )
    state = ep.pmap2_new_states(_make_state)
    before = [(x.shape, x.sharding) for x in jtu.tree_leaves((model, state))]
    assert_laid_out(model["w"].value, None)
    assert_laid_out(model["a0"].value, 0)
    assert_laid_out(model["a1"].value, 1)
    assert_laid_out(model["am1"].value, 2)

    @ep.pmap2
    def step(model, state, batch):
        grad = jax.lax.pmean(jnp.mean(batch) * jnp.ones(3), "devices")
        model = {
            "w": ep.ParamState(model["w"].value - 0.5 * grad),
            "a0": ep.State(model["a0"].value + 1, tag="a0"),
            "a1": ep.State(model["a1"].value + 2, tag="a1"),
            "am1": ep.State(model["am1"].value + 3, tag="am1"),
        }
        state = {
            "count": ep.ShortTermState(state["count"].value + 1),
            "h": ep.ShortTermState(state["h"].value + batch),
        }
        return model, state

    batch = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
    for _ in range(10):
        model, state = step(model, state, batch)
        after = [(x.shape, x.sharding) for x in jtu.tree_leaves((model, state))]
        assert after == before
    assert_laid_out(model["w"].value, None)
    assert_laid_out(model["a0"].value, 0)
    assert_laid_out(model["a1"].value, 1)
    assert_laid_out(model["am1"].value, 2)
    assert_laid_out(state["count"].value, 0)
    assert_laid_out(state["h"].value, 0)
    i = np.arange(N, dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(model["w"].value),
        np.array([1.0, -1.0, 0.5]) - 10 * 0.5 * batch.mean(),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(
        np.asarray(model["a0"].value), np.broadcast_to(i[:, None, None] + 10, (N, 2, 3))
    )
    np.testing.assert_array_equal(
        np.moveaxis(np.asarray(model["a1"].value), 1, 0),
        np.broadcast_to(i[:, None, None] + 20, (N, 2, 3)),
    )
    np.testing.assert_array_equal(
        np.moveaxis(np.asarray(model["am1"].value), 2, 0),
        np.broadcast_to(i[:, None, None] + 30, (N, 2, 3)),
    )
    np.testing.assert_array_equal(np.asarray(state["count"].value), np.full(N, 10))
    np.testing.assert_allclose(np.asarray(state["h"].value), i[:, None] + 10 * batch)


def test_per_device_state_stays_per_device_when_made_equal(leaks):
    state = ep.pmap2_new_states(lambda: ep.ShortTermState(jnp.zeros(2) + _idx()))

    @ep.pmap2
    def step(state):
        return ep.ShortTermState(jax.lax.pmean(state.value, "devices"))

    out = step(state)
    assert out.value.shape == (N, 2)
    assert out.value.sharding == state.value.sharding
    assert_laid_out(out.value, 0)
    np.testing.assert_allclose(np.asarray(out.value), np.full((N, 2), 3.5))
    out = step(out)  # and again, from its own output
    assert out.value.shape == (N, 2)
    assert_laid_out(out.value, 0)
    np.testing.assert_allclose(np.asarray(out.value), np.full((N, 2), 3.5))


def test_rule_1_pairs_tuple_elements_with_arguments_by_position(leaks):
    # a and b have the same structure but different layouts
    a = ep.pmap2_new_states(lambda: ep.State(jnp.zeros((2, 3)) + _idx()))
    b = ep.pmap2_new_states(
        lambda: ep.State(jnp.zeros((2, 3)) + _idx()), state_out_axes={1: ...}
    )
    assert a.value.shape == (N, 2, 3) and b.value.shape == (2, N, 3)
    assert jtu.tree_structure(a) == jtu.tree_structure(b)

    @ep.pmap2
    def step(a, b):
        return ep.State(a.value + 1), ep.State(b.value + 2)

    a2, b2 = step(a, b)
    assert a2.value.shape == (N, 2, 3) and a2.value.sharding == a.value.sharding
    assert b2.value.shape == (2, N, 3) and b2.value.sharding == b.value.sharding
    np.testing.assert_array_equal(np.asarray(a2.value), np.asarray(a.value) + 1)
    np.testing.assert_array_equal(np.asarray(b2.value), np.asarray(b.value) + 2)

    # an element that matches no argument falls to rule 2
    @ep.pmap2
    def step2(a, b):
        return (
            ep.State(a.value + 1),
            ep.State(b.value + 2),
            jax.lax.psum(a.value[0, 0], "devices"),
            a.value[0, 0],
        )

    a3, b3, total, each = step2(a, b)
    assert a3.value.shape == (N, 2, 3) and a3.value.sharding == a.value.sharding
    assert b3.value.shape == (2, N, 3) and b3.value.sharding == b.value.sharding
    np.testing.assert_array_equal(np.asarray(a3.value), np.asarray(a.value) + 1)
    np.testing.assert_array_equal(np.asarray(b3.value), np.asarray(b.value) + 2)
    assert_laid_out(total, None)
    np.testing.assert_allclose(np.asarray(total), 28.0)
    assert_laid_out(each, 0)
    np.testing.assert_allclose(np.asarray(each), np.arange(N))


def test_rule_1_on_the_whole_return_value(leaks):
    a = ep.pmap2_new_states(lambda: ep.State(jnp.zeros((2, 3)) + _idx()))
    b = ep.pmap2_new_states(
        lambda: ep.State(jnp.zeros((2, 3)) + _idx()), state_out_axes={-1: ...}
    )

    @ep.pmap2
    def step(pair):
        x, y = pair
        return ep.State(x.value * 2), ep.State(y.value * 3)

    x2, y2 = step((a, b))
    assert x2.value.shape == (N, 2, 3)
    assert x2.value.sharding == a.value.sharding
    assert y2.value.sharding == b.value.sharding
    assert y2.value.shape == (2, 3, N)
    np.testing.assert_array_equal(np.asarray(x2.value), 2 * np.asarray(a.value))
    np.testing.assert_array_equal(np.asarray(y2.value), 3 * np.asarray(b.value))


def test_rule_1_ignores_bare_arrays_not_on_the_mesh_but_not_laid_out_ones(leaks):
    # a bare numpy argument does not count: the psum comes back replicated (rule 2)
    @ep.pmap2
    def total(x):
        return jax.lax.psum(x, "devices")

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    out = total(x)
    assert out.shape == (2,)
    assert_laid_out(out, None)
    np.testing.assert_allclose(np.asarray(out), x.sum(0))

    # a bare array laid out per device counts: the output keeps its layout
    laid = ep.pmap2_new_states(lambda: jnp.zeros(2) + _idx())
    assert_laid_out(laid, 0)
    out = total(laid)
    assert out.shape == (N, 2)
    assert out.sharding == laid.sharding
    np.testing.assert_allclose(np.asarray(out), np.full((N, 2), 28.0))


# --------------------------------------------------------------------------- outputs, rule 2


def test_rule_2_psum_constant_and_per_device(leaks):
    @ep.pmap2
    def f(x):
        return {
            "psum": jax.lax.psum(x, "devices"),
            "const": jnp.arange(3.0),
            "local": x * 2,
            "idx": jax.lax.axis_index("devices"),
        }

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    out = f(x)
    assert out["psum"].shape == (2,)
    assert out["psum"].sharding.spec == P()
    assert_laid_out(out["psum"], None)
    np.testing.assert_allclose(np.asarray(out["psum"]), x.sum(0))
    assert out["const"].shape == (3,)
    assert_laid_out(out["const"], None)
    np.testing.assert_array_equal(np.asarray(out["const"]), np.arange(3.0))
    assert out["local"].shape == (N, 2)
    assert_laid_out(out["local"], 0)
    np.testing.assert_array_equal(np.asarray(out["local"]), 2 * x)
    assert_laid_out(out["idx"], 0)
    np.testing.assert_array_equal(np.asarray(out["idx"]), np.arange(N))


def test_out_axes_prefix(leaks):
    @ep.pmap2(out_axes=(1, 0, None))
    def f(x):
        return x * 2, jax.lax.psum(x, "devices"), jax.lax.pmean(x, "devices")

    x = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
    local, tiled, mean = f(x)
    assert local.shape == (3, N)
    assert_laid_out(local, 1)
    np.testing.assert_array_equal(np.asarray(local), 2 * x.T)
    assert tiled.shape == (N, 3)  # forced to a device axis: one copy per device
    assert_laid_out(tiled, 0)
    np.testing.assert_allclose(np.asarray(tiled), np.broadcast_to(x.sum(0), (N, 3)))
    assert_laid_out(mean, None)
    np.testing.assert_allclose(np.asarray(mean), x.mean(0))


def test_out_axes_overrides_rule_1(leaks):
    state = ep.pmap2_new_states(lambda: ep.ShortTermState(jnp.zeros(2) + _idx()))

    @ep.pmap2(out_axes=-1)
    def step(state):
        return ep.ShortTermState(state.value + 1)

    out = step(state)
    assert out.value.shape == (2, N)
    assert_laid_out(out.value, 1)
    np.testing.assert_array_equal(np.asarray(out.value), np.asarray(state.value).T + 1)


def test_out_axes_state_axes(leaks):
    @ep.pmap2(
        out_axes=ep.StateAxes({1: WithTag("t"), None: OfType(ep.NonBatchState), 0: ...})
    )
    def f(x):
        return {
            "t": ep.State(jnp.stack([x, x]), tag="t"),
            "nb": ep.NonBatchState(jax.lax.psum(x, "devices")),
            "other": ep.ShortTermState(x),
        }

    x = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
    out = f(x)
    assert out["t"].value.shape == (2, N, 3)
    assert_laid_out(out["t"].value, 1)
    np.testing.assert_array_equal(np.asarray(out["t"].value), np.stack([x, x]))
    assert out["nb"].value.shape == (3,)
    assert_laid_out(out["nb"].value, None)
    np.testing.assert_allclose(np.asarray(out["nb"].value), x.sum(0))
    assert out["other"].value.shape == (N, 3)
    assert_laid_out(out["other"].value, 0)
    np.testing.assert_array_equal(np.asarray(out["other"].value), x)


# --------------------------------------------------------------------------- replication is never assumed


def _replicated_model():
    return ep.pmap2_new_states(
        lambda: {
            "w": ep.ParamState(jnp.array([1.0, 2.0])),
            "s": ep.ShortTermState(jnp.zeros(2)),
        },
        state_out_axes={None: OfType(ep.ParamState)},
    )


def _replicated_with(x):
    return ep.pmap2_new_states(lambda: ep.NonBatchState(x)).value


def test_replicated_output_that_varies_is_a_trace_time_error():
    model = _replicated_model()
    assert_laid_out(model["w"].value, None)
    ran = []

    @ep.pmap2
    def step(model, x):
        ran.append(1)
        return {"w": ep.ParamState(model["w"].value + x.sum()), "s": model["s"]}

    x = np.ones((N, 2), np.float32)
    with pytest.raises(
        ValueError, match=r"output\['w'\]\.value must come back replicated"
    ) as info:
        step(model, x)
    assert not isinstance(info.value, jax.errors.JaxRuntimeError)
    assert len(ran) == 1  # found from the one trace, before compiling or running


def test_replicated_output_that_drifts_is_a_trace_time_error():
    # The forgotten `pmean`: the dataflow pass proves before anything runs that the
    # update of a replicated parameter depends on the per-device data.
    model = _replicated_model()
    traces = []

    @ep.pmap2
    def step(model, x):
        traces.append(1)
        w = model["w"].value
        g = jax.grad(lambda w: jnp.sum(w * x))(w)  # no pmean: each its own gradient
        return {"w": ep.ParamState(w - g), "s": model["s"]}

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    with pytest.raises(
        ValueError, match=r"(?s)output\['w'\]\.value must come back replicated.*pmean"
    ):
        step(model, x)
    assert len(traces) == 1  # found from the one trace, before compiling or running


def test_replicated_output_that_drifts_is_a_run_time_error_when_asked():
    model = _replicated_model()

    def step(model, x):
        w = model["w"].value
        g = jax.grad(lambda w: jnp.sum(w * x))(w)
        return {"w": ep.ParamState(w - g), "s": model["s"]}

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    with pytest.raises(ep.ReplicationError, match=r"(?s)\['w'\]\.value.*same on every"):
        ep.pmap2(step, check_replicated="runtime")(model, x)


def test_runtime_check_passes_values_made_equal_by_arithmetic(leaks):
    # `x - x` is the same everywhere although it is computed from per-device data: the
    # proof cannot see it (a trace-time error), the run-time comparison can.
    def step(w, x):
        return w + (x - x).sum()

    w = _replicated_with(jnp.ones(3))
    x = np.arange(N, dtype=np.float32).reshape(N, 1)
    with pytest.raises(ValueError, match="check_replicated='runtime'"):
        ep.pmap2(step)(w, x)
    out = ep.pmap2(step, check_replicated="runtime")(w, x)
    assert_laid_out(out, None)
    np.testing.assert_array_equal(np.asarray(out), np.ones(3))


def test_replicated_output_with_pmean_is_fine(leaks):
    model = _replicated_model()

    @ep.pmap2
    def step(model, x):
        w = model["w"].value
        g = jax.lax.pmean(jax.grad(lambda w: jnp.sum(w * x))(w), "devices")
        return {"w": ep.ParamState(w - g), "s": model["s"]}

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    out = jax.block_until_ready(step(model, x))
    assert_laid_out(out["w"].value, None)
    expected = np.array([1.0, 2.0]) - x.mean(0)
    np.testing.assert_allclose(np.asarray(out["w"].value), expected, rtol=1e-6)
    for shard in _shards(out["w"].value):
        np.testing.assert_allclose(shard, expected, rtol=1e-6)
    out = jax.block_until_ready(step(out, x))
    assert_laid_out(out["w"].value, None)
    np.testing.assert_allclose(
        np.asarray(out["w"].value), expected - x.mean(0), rtol=1e-6
    )


def test_check_replicated_false_lets_a_drift_through_silently():
    model = _replicated_model()

    def body(model, x):
        w = model["w"].value
        g = jax.grad(lambda w: jnp.sum(w * x))(w)
        return {"w": ep.ParamState(w - g), "s": model["s"]}

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    out = jax.block_until_ready(ep.pmap2(body, check_replicated=False)(model, x))
    w = out["w"].value
    assert w.shape == (2,)
    assert_laid_out(w, None)  # labelled replicated ...
    shards = _shards(w)
    for i, shard in enumerate(shards):  # ... but each device kept its own value
        np.testing.assert_allclose(shard, np.array([1.0, 2.0]) - x[i])
    assert not np.allclose(shards[0], shards[1])


def test_the_run_time_check_does_not_flag_a_correct_update_with_a_device_axis_output(
    leaks,
):
    # a per-device output next to a checked replicated one: no false alarm
    model = _replicated_model()

    def step(model, x):
        w = model["w"].value
        g = jax.lax.pmean(jax.grad(lambda w: jnp.sum(w * x))(w), "devices")
        return {"w": ep.ParamState(w - g), "s": ep.ShortTermState(model["s"].value + x)}

    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    for check in (True, "runtime"):  # the proof, and the run-time comparison
        out = jax.block_until_ready(ep.pmap2(step, check_replicated=check)(model, x))
        assert_laid_out(out["w"].value, None)
        np.testing.assert_allclose(
            np.asarray(out["w"].value), np.array([1.0, 2.0]) - x.mean(0), rtol=1e-6
        )
        assert_laid_out(out["s"].value, 0)
        np.testing.assert_allclose(np.asarray(out["s"].value), x)


# --------------------------------------------------------------------------- donation


def test_donate_all(leaks):
    state = ep.pmap2_new_states(lambda: ep.ShortTermState(jnp.zeros(3) + _idx()))
    old = state.value
    # On jaxlib 0.11.2 (CPU) an array once read to the host is silently not donated.
    expected = old + 1

    @ep.pmap2(donate="all")
    def step(state):
        return ep.ShortTermState(state.value + 1)

    out = step(state)
    assert old.is_deleted()
    assert out.value.sharding == old.sharding
    assert bool(jnp.array_equal(out.value, expected))  # compared on device
    out2 = step(out)
    assert out.value.is_deleted()
    np.testing.assert_array_equal(np.asarray(out2.value), np.asarray(expected) + 1)


def test_donate_none_keeps_the_inputs(leaks):
    state = ep.pmap2_new_states(lambda: ep.ShortTermState(jnp.zeros(3) + _idx()))

    @ep.pmap2(donate="none")
    def step(state):
        return ep.ShortTermState(state.value + 1)

    out = step(state)
    assert not state.value.is_deleted()
    i = np.repeat(np.arange(N, dtype=np.float32)[:, None], 3, 1)
    np.testing.assert_array_equal(np.asarray(state.value), i)  # unchanged
    np.testing.assert_array_equal(np.asarray(out.value), i + 1)

    @ep.pmap2  # the default
    def step2(state):
        return ep.ShortTermState(state.value + 1)

    np.testing.assert_array_equal(np.asarray(step2(state).value), i + 1)
    assert not state.value.is_deleted()
    np.testing.assert_array_equal(np.asarray(state.value), i)


def test_donate_all_except_first(leaks):
    a = ep.pmap2_new_states(lambda: ep.State(jnp.zeros(3) + _idx()))
    b = ep.pmap2_new_states(lambda: ep.State(jnp.ones(3) + _idx()))
    # On jaxlib 0.11.2 (CPU) an array once read to the host is silently not donated.
    expected = a.value + b.value

    @ep.pmap2(donate="all-except-first")
    def step(a, b):
        return ep.State(a.value + b.value)

    out = step(a, b)
    assert not a.value.is_deleted()
    assert b.value.is_deleted()
    np.testing.assert_array_equal(np.asarray(out.value), np.asarray(expected))


# --------------------------------------------------------------------------- compile caching


def test_a_repeated_call_does_not_trace_again(leaks):
    calls = []
    model = ep.pmap2_new_states(
        _make_model, state_out_axes={None: OfType(ep.ParamState), 1: "a1", -1: "am1"}
    )

    @ep.pmap2
    def step(model, x, scale):
        calls.append(1)
        return jtu.tree_map(lambda v: v * scale, model), x + 1

    x = np.ones((N, 2), np.float32)
    model, _ = step(model, x, 2.0)
    first = len(calls)
    assert first >= 1
    for _ in range(3):
        model, _ = step(model, x, 2.0)
        model, _ = step(
            model, np.zeros((N, 2), np.float32), 2.0
        )  # new values, same signature
    assert len(calls) == first
    # a new shape, or a new static value, does trace again
    step(model, np.ones((N, 3), np.float32), 2.0)
    assert len(calls) > first
    n = len(calls)
    with pytest.warns(ep.RecompileWarning) as caught:  # the third compile: told why
        step(model, x, 3.0)
    assert len(calls) > n
    message = str(caught[0].message)
    assert "the value of args[2], a static argument (not an array), changed" in message
    assert "shape" not in message  # a few shapes are meant: said from the tenth on


# --------------------------------------------------------------------------- errors


def test_bad_donate():
    msg = "`donate` must be 'all', 'all-except-first' or 'none', but got 'bad'"
    # (Under jaxtyping's import hook, beartype refuses the value first, as a TypeError.)
    with pytest.raises((ValueError, TypeError)) as e:
        ep.pmap2(lambda x: x, donate="bad")  # pyright: ignore[reportArgumentType]  # deliberately invalid
    assert "donate" in str(e.value) and "'bad'" in str(e.value)
    if ours(e.value):
        assert isinstance(e.value, ValueError) and msg in str(e.value)

    with pytest.raises((ValueError, TypeError)) as e:

        @ep.pmap2(donate="bad")  # pyright: ignore[reportArgumentType]  # deliberately invalid
        def f(x):
            return x

    assert "donate" in str(e.value) and "'bad'" in str(e.value)


def test_inputs_on_two_meshes():
    a = ep.pmap2_new_states(lambda: ep.State(jnp.zeros(2)))
    b = ep.pmap2_new_states(lambda: ep.State(jnp.zeros(2)), devices=jax.devices()[:4])
    assert b.value.shape == (4, 2)

    @ep.pmap2
    def f(a, b):
        return a.value.sum() + b.value.sum()

    with pytest.raises(
        ValueError,
        match=r"(?s)two different meshes .*\{'devices': 8\}.*\{'devices': 4\}.*"
        r"devices \[0, 1, 2, 3\]\.",
    ):
        f(a, b)

    # the same devices in another order are another mesh too
    reordered = Mesh(
        np.array(jax.devices()[::-1]),
        ("devices",),
        axis_types=(jax.sharding.AxisType.Auto,),
    )
    c = ep.pmap2_new_states(lambda: ep.State(jnp.zeros(2)), devices=reordered)
    with pytest.raises(
        ValueError,
        match=r"two different meshes .* devices \[7, 6, 5, 4, 3, 2, 1, 0\]\.",
    ):
        f(a, c)


def test_inputs_on_a_smaller_mesh_run_there(leaks):
    b = ep.pmap2_new_states(
        lambda: ep.State(jnp.zeros(2) + _idx()), devices=jax.devices()[:4]
    )

    @ep.pmap2
    def f(b):
        return jax.lax.psum(b.value, "devices"), b.value * 2

    total, each = f(b)
    assert_laid_out(total, None, n=4)
    np.testing.assert_allclose(np.asarray(total), [6.0, 6.0])
    assert_laid_out(each, 0, n=4)
    np.testing.assert_allclose(np.asarray(each), 2 * np.asarray(b.value))


def test_default_as_a_leaf_of_an_in_axes_prefix(leaks):
    # Keep the model's layout, replicate a learning rate given as a host array.
    model = ep.pmap2_new_states(
        lambda: {"w": ep.State(jnp.ones(3)), "h": ep.ShortTermState(jnp.ones(2))},
        state_out_axes={0: OfType(ep.ShortTermState), None: ...},
    )

    def scale(m, lr):
        return {"w": ep.State(m["w"].value * lr), "h": m["h"]}

    out = ep.pmap2(scale, in_axes=(ep.DEFAULT, None))(model, np.float32(0.5))
    assert_laid_out(out["w"].value, None)
    assert_laid_out(out["h"].value, 0)
    np.testing.assert_array_equal(np.asarray(out["w"].value), np.full(3, 0.5))


def test_an_unproved_whole_return_value_is_named_readably():
    with pytest.raises(ValueError, match=r"output \(the whole return value\) must"):
        ep.pmap2(lambda v: v, out_axes=None)(jnp.arange(8.0))
