"""`pmap2_new_states` and `vmap2_new_states`: forms, layout, values, priority, caching."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import _idx, assert_laid_out, BNNet, Counter, N
from jax.sharding import Mesh, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType, WithTag


# --------------------------------------------------------------------------- the init_state form


def test_init_state_module(leaks):
    m = Counter()
    out = ep.pmap2_new_states(m)
    assert isinstance(out, Counter)
    assert isinstance(out.count, ep.ShortTermState)
    assert out.count.value.shape == (N,)
    assert_laid_out(out.count.value, 0)
    np.testing.assert_array_equal(np.asarray(out.count.value), np.zeros(N))
    assert m.count is None  # the input is not changed


class Inner(eqx.Module):
    h: ep.ShortTermState | None = None

    def init_state(self, size):
        return Inner(ep.ShortTermState(jnp.zeros((size,)) + _idx()))


class Outer(eqx.Module):
    inner: Inner
    extra: ep.LongTermState | None = None

    def init_state(self, scale):
        # innermost first: the submodule is already initialised here
        assert self.inner.h is not None
        new = ep.LongTermState(self.inner.h.value * scale)
        return eqx.tree_at(lambda m: m.extra, self, new, is_leaf=lambda x: x is None)


class Wrapper(eqx.Module):
    inner: Inner
    label: str = eqx.field(static=True, default="w")


def test_submodule_init_state_and_kwargs_by_signature(leaks):
    out = ep.pmap2_new_states(Outer(Inner()), {"size": 3, "scale": 2.0})
    assert out.inner.h.value.shape == (N, 3)
    assert out.extra.value.shape == (N, 3)
    h = np.asarray(out.inner.h.value)
    np.testing.assert_array_equal(
        h, np.repeat(np.arange(N, dtype=np.float32)[:, None], 3, 1)
    )
    np.testing.assert_array_equal(np.asarray(out.extra.value), 2.0 * h)
    assert_laid_out(out.inner.h.value, 0)
    assert_laid_out(out.extra.value, 0)


def test_only_a_submodule_defines_init_state(leaks):
    out = ep.pmap2_new_states(Wrapper(Inner()), {"size": 2})
    assert isinstance(out, Wrapper)
    assert out.label == "w"
    assert out.inner.h is not None
    assert out.inner.h.value.shape == (N, 2)
    assert_laid_out(out.inner.h.value, 0)
    np.testing.assert_array_equal(
        np.asarray(out.inner.h.value),
        np.repeat(np.arange(N, dtype=np.float32)[:, None], 2, 1),
    )


class Held(eqx.Module):
    w: jax.Array
    p: ep.ParamState
    s: ep.ShortTermState | None = None

    def init_state(self):
        return eqx.tree_at(
            lambda m: m.s,
            self,
            ep.ShortTermState(self.w * 2.0),
            is_leaf=lambda x: x is None,
        )


def test_preexisting_leaves_come_back_unchanged_and_undistributed(leaks):
    w = jnp.arange(3.0)
    pv = jnp.ones(2)
    m = Held(w, ep.ParamState(pv))
    out = ep.pmap2_new_states(m)
    # the new state is distributed, and built from the held leaf
    assert out.s.value.shape == (N, 3)
    assert_laid_out(out.s.value, 0)
    np.testing.assert_array_equal(
        np.asarray(out.s.value), np.tile(2.0 * np.arange(3.0), (N, 1))
    )
    # the held leaves: the very same objects, not copies laid out over the mesh
    assert out.w is w
    assert out.p.value is pv
    assert m.w is w and m.p.value is pv and m.s is None
    np.testing.assert_array_equal(np.asarray(w), np.arange(3.0))


def test_state_tag_does_not_retag_preexisting_markers(leaks):
    m = Held(jnp.arange(3.0), ep.ParamState(jnp.ones(2)))
    out = ep.pmap2_new_states(m, state_tag="new")
    assert out.s.tag == "new"
    assert out.p.tag is None


def test_held_distributed_leaves_are_seen_per_device(leaks):
    def make():
        return ep.ShortTermState(jnp.ones(2) * _idx())

    h = ep.pmap2_new_states(make)

    class Stage2(eqx.Module):
        h: ep.ShortTermState
        d: ep.State | None = None

        def init_state(self):
            assert self.h.value.shape == (2,)  # the per-device view
            return Stage2(self.h, ep.State(self.h.value * 2.0))

    out = ep.pmap2_new_states(Stage2(h))
    assert out.h.value is h.value
    assert out.d.value.shape == (N, 2)
    assert_laid_out(out.d.value, 0)
    np.testing.assert_array_equal(np.asarray(out.d.value), 2.0 * np.asarray(h.value))


def test_state_tag_on_a_new_marker_around_a_held_array(leaks):
    class Wraps(eqx.Module):
        w: jax.Array
        s: ep.State | None = None

        def init_state(self):
            return Wraps(self.w, ep.State(self.w))

    out = ep.pmap2_new_states(Wraps(jnp.ones(2)), state_tag="new")
    assert out.s.value.shape == (N, 2)  # a new state: distributed ...
    assert_laid_out(out.s.value, 0)
    assert out.s.tag == "new"  # ... and a new marker, so tagged


# --------------------------------------------------------------------------- the callable form


class Made(eqx.Module):
    p: ep.ParamState
    b: jax.Array

    def __init__(self, n):
        self.p = ep.ParamState(jnp.arange(n, dtype=jnp.float32) + _idx())
        self.b = jnp.zeros((n,))


def test_module_class_as_callable(leaks):
    out = ep.pmap2_new_states(Made, {"n": 3})
    assert isinstance(out, Made)
    assert out.p.value.shape == (N, 3)
    assert out.b.shape == (N, 3)
    expected = np.arange(3)[None, :] + np.arange(N)[:, None]
    np.testing.assert_array_equal(np.asarray(out.p.value), expected)
    assert_laid_out(out.p.value, 0)
    assert_laid_out(out.b, 0)
    np.testing.assert_array_equal(np.asarray(out.b), np.zeros((N, 3)))


def test_factory_function(leaks):
    def make(size):
        return {
            "a": ep.ShortTermState(jnp.zeros((size,))),
            "n": ep.NonBatchState(jnp.arange(size)),
        }

    out = ep.pmap2_new_states(make, {"size": 4})
    assert out["a"].value.shape == (N, 4)
    assert out["n"].value.shape == (4,)
    assert_laid_out(out["a"].value, 0)
    assert_laid_out(out["n"].value, None)
    np.testing.assert_array_equal(np.asarray(out["a"].value), np.zeros((N, 4)))
    np.testing.assert_array_equal(np.asarray(out["n"].value), np.arange(4))


def test_make_with_state(leaks):
    key = jax.random.key(1)
    net, state = ep.pmap2_new_states(eqx.nn.make_with_state(BNNet), {"key": key})
    ref_net, ref_state = eqx.nn.make_with_state(BNNet)(key)
    assert net.linear.weight.shape == (N, 2, 3)
    # a broadcast key: every device builds the same model, and the same state
    leaves = jtu.tree_leaves(eqx.filter((net, state), eqx.is_array))
    ref_leaves = jtu.tree_leaves(eqx.filter((ref_net, ref_state), eqx.is_array))
    assert len(leaves) == len(ref_leaves) > 2
    for x, r in zip(leaves, ref_leaves):
        assert x.shape == (N,) + r.shape
        assert_laid_out(x, 0)
        for i in range(N):
            np.testing.assert_allclose(np.asarray(x[i]), np.asarray(r))
    # the result is usable as an eqx.nn.State: the index still finds its entry
    mean, var = state.get(net.bn.ema_state_index)
    assert mean.shape == (N, 2)


def test_an_equinox_module_instance_is_never_called(leaks):
    called = []

    class CallableWithInit(eqx.Module):
        s: ep.State | None = None

        def init_state(self):
            return CallableWithInit(ep.State(jnp.ones(2)))

        def __call__(self, **kwargs):
            called.append(1)
            raise AssertionError("called")

    out = ep.pmap2_new_states(CallableWithInit())
    assert out.s.value.shape == (N, 2)
    assert not called


# --------------------------------------------------------------------------- layout and values


def test_values_per_device_from_axis_index(leaks):
    def make():
        return ep.ShortTermState(jax.lax.axis_index("devices"))

    out = ep.pmap2_new_states(make)
    x = out.value
    assert_laid_out(x, 0)
    np.testing.assert_array_equal(np.asarray(x), np.arange(N))
    mesh_devices = list(x.sharding.mesh.devices.ravel())
    for shard in x.addressable_shards:
        i = shard.index[0].start
        assert shard.data.shape == (1,)
        assert int(shard.data[0]) == i
        assert shard.device == mesh_devices[i]


def test_per_device_keys_give_different_values(leaks):
    keys = jax.random.split(jax.random.key(0), N)

    def make(key):
        return ep.ShortTermState(jax.random.normal(key, (4,)))

    out = ep.pmap2_new_states(make, {"key": keys}, init_in_axes={"key": 0})
    assert_laid_out(out.value, 0)
    x = np.asarray(out.value)
    assert x.shape == (N, 4)
    for i in range(N):
        np.testing.assert_allclose(
            x[i], np.asarray(jax.random.normal(keys[i], (4,))), rtol=1e-6
        )
    assert len({tuple(row) for row in x.tolist()}) == N


def test_broadcast_key_gives_identical_values(leaks):
    key = jax.random.key(3)

    def make(key):
        return ep.ShortTermState(jax.random.normal(key, (4,)))

    out = ep.pmap2_new_states(make, {"key": key})
    assert_laid_out(out.value, 0)
    x = np.asarray(out.value)
    assert x.shape == (N, 4)
    for i in range(N):
        np.testing.assert_allclose(
            x[i], np.asarray(jax.random.normal(key, (4,))), rtol=1e-6
        )


def test_raw_uint32_keys_per_device(leaks):
    keys = jax.random.split(jax.random.PRNGKey(0), N)  # (8, 2) uint32

    def make(key):
        return ep.ShortTermState(jax.random.uniform(key, (2,)))

    out = ep.pmap2_new_states(make, {"key": keys}, init_in_axes={"key": 0})
    assert_laid_out(out.value, 0)
    x = np.asarray(out.value)
    assert x.shape == (N, 2)
    for i in range(N):
        np.testing.assert_allclose(
            x[i], np.asarray(jax.random.uniform(keys[i], (2,))), rtol=1e-6
        )
    assert not np.allclose(x[0], x[1])


def test_init_in_axes_nonzero_axis_and_pytree_prefix(leaks):
    cols = jnp.arange(3 * N, dtype=jnp.float32).reshape(3, N)

    def make(args, scale):
        return {"a": ep.State(args["a"] * scale), "b": ep.NonBatchState(args["b"])}

    args = {"a": cols, "b": jnp.arange(2.0)}
    out = ep.pmap2_new_states(
        make,
        {"args": args, "scale": jnp.float32(2.0)},
        init_in_axes={"args": {"a": 1, "b": None}},
    )
    assert out["a"].value.shape == (N, 3)
    assert_laid_out(out["a"].value, 0)
    np.testing.assert_array_equal(np.asarray(out["a"].value), 2.0 * np.asarray(cols).T)
    assert out["b"].value.shape == (2,)
    assert_laid_out(out["b"].value, None)
    np.testing.assert_array_equal(np.asarray(out["b"].value), np.arange(2.0))


@pytest.mark.parametrize(
    "axis, shape",
    [
        (0, (N, 3, 5)),
        (1, (3, N, 5)),
        (2, (3, 5, N)),
        (-1, (3, 5, N)),
        (-2, (3, N, 5)),
        (-3, (N, 3, 5)),
    ],
)
def test_axis_position(axis, shape, leaks):
    def make():
        return ep.State(jnp.zeros((3, 5)) + _idx())

    out = ep.pmap2_new_states(make, state_out_axes={axis: ...})
    x = out.value
    assert x.shape == shape
    pos = axis if axis >= 0 else axis + 3
    assert_laid_out(x, pos)
    moved = np.moveaxis(np.asarray(x), pos, 0)
    for i in range(N):
        np.testing.assert_array_equal(moved[i], np.full((3, 5), float(i)))


def test_replicated_state_layout_and_value(leaks):
    def make():
        return ep.NonBatchState(jnp.array([1.0, 2.0, 3.0]))

    out = ep.pmap2_new_states(make)
    assert out.value.shape == (3,)
    assert_laid_out(out.value, None)
    for shard in out.value.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), [1.0, 2.0, 3.0])
    assert len(out.value.addressable_shards) == N


def _mixed():
    return {
        "p": ep.ParamState(jnp.zeros(2)),
        "s": ep.ShortTermState(jnp.zeros(2)),
        "nb": ep.NonBatchState(jnp.zeros(3)),
        "bare": jnp.zeros(2),
        "t": ep.LongTermState(jnp.zeros(2), tag="t"),
    }


def test_nonbatchstate_is_replicated_even_if_a_filter_names_axis_0(leaks):
    out = ep.pmap2_new_states(
        _mixed, state_out_axes={0: OfType(ep.NonBatchState), 1: ep.ParamState}
    )
    assert out["nb"].value.shape == (3,)
    assert_laid_out(out["nb"].value, None)
    assert out["p"].value.shape == (2, N)
    assert_laid_out(out["p"].value, 1)

    out = ep.pmap2_new_states(
        _mixed, state_out_axes={1: ...}
    )  # catch-all does not catch it either
    assert out["nb"].value.shape == (3,)
    assert_laid_out(out["nb"].value, None)
    assert out["s"].value.shape == (2, N)
    assert_laid_out(out["s"].value, 1)


def test_default_no_filter_means_axis_0(leaks):
    out = ep.pmap2_new_states(_mixed)
    for k in ("p", "s", "t"):
        assert out[k].value.shape == (N, 2)
        assert_laid_out(out[k].value, 0)
    assert out["bare"].shape == (N, 2)
    assert_laid_out(out["bare"], 0)
    assert out["nb"].value.shape == (3,)
    assert_laid_out(out["nb"].value, None)


def test_unmatched_states_go_to_axis_0(leaks):
    # A filter that matches no state at all is almost always a typo: it is said.
    with pytest.warns(UserWarning, match=r"WithTag\(tag='absent'\) for axis -1"):
        out = ep.pmap2_new_states(
            _mixed, state_out_axes={1: "t", -1: WithTag("absent")}
        )
    assert out["t"].value.shape == (2, N)
    assert_laid_out(out["t"].value, 1)
    for k in ("p", "s"):
        assert out[k].value.shape == (N, 2)
        assert_laid_out(out[k].value, 0)
    assert out["bare"].shape == (N, 2)
    assert_laid_out(out["bare"], 0)
    assert out["nb"].value.shape == (3,)


def test_catch_all_counts_only_when_nothing_else_matched(leaks):
    out = ep.pmap2_new_states(
        _mixed, state_out_axes={None: ..., 1: ep.ParamState, -1: "t"}
    )
    assert out["p"].value.shape == (2, N)  # ParamState wins over the catch-all
    assert_laid_out(out["p"].value, 1)
    assert out["t"].value.shape == (2, N)
    assert_laid_out(out["t"].value, 1)
    assert out["s"].value.shape == (2,)  # caught by `...`: replicated
    assert out["bare"].shape == (2,)
    assert_laid_out(out["s"].value, None)
    assert_laid_out(out["bare"], None)

    out = ep.pmap2_new_states(
        _mixed, state_out_axes={1: True, 0: ep.ParamState}
    )  # True too
    assert out["p"].value.shape == (N, 2)
    assert_laid_out(out["p"].value, 0)
    for k in ("s", "t"):
        assert out[k].value.shape == (2, N)
        assert_laid_out(out[k].value, 1)
    assert out["bare"].shape == (2, N)
    assert_laid_out(out["bare"], 1)


def test_single_filter_means_axis_0(leaks):
    out = ep.pmap2_new_states(_mixed, state_out_axes=ep.ParamState)
    for k in ("p", "s", "t"):
        assert out[k].value.shape == (N, 2)
        assert_laid_out(out[k].value, 0)
    assert out["nb"].value.shape == (3,)
    assert_laid_out(out["nb"].value, None)


def test_same_axis_matched_twice_is_not_ambiguous(leaks):
    out = ep.pmap2_new_states(_mixed, state_out_axes={1: [ep.LongTermState, "t"]})
    assert out["t"].value.shape == (2, N)
    assert_laid_out(out["t"].value, 1)


def test_marker_holding_a_pytree_gets_one_axis(leaks):
    def make():
        return ep.ShortTermState({"a": jnp.zeros(2), "b": jnp.zeros((2, 3))})

    out = ep.pmap2_new_states(make, state_out_axes={-1: ...})
    assert out.value["a"].shape == (2, N)
    assert out.value["b"].shape == (2, 3, N)
    assert_laid_out(out.value["a"], 1)
    assert_laid_out(out.value["b"], 2)


def test_state_tag_written_into_new_untagged_markers(leaks):
    def make():
        return {
            "a": ep.ParamState(jnp.zeros(2)),
            "b": ep.ParamState(jnp.zeros(2), tag="mine"),
            "c": jnp.zeros(2),
        }

    out = ep.pmap2_new_states(make, state_tag="new")
    assert out["a"].tag == "new"
    assert out["b"].tag == "mine"
    assert isinstance(out["c"], jax.Array)


def test_state_tag_is_visible_to_filters(leaks):
    def make():
        return {
            "a": ep.ParamState(jnp.zeros(2)),
            "b": ep.ParamState(jnp.zeros(2), tag="mine"),
        }

    out = ep.pmap2_new_states(make, state_tag="new", state_out_axes={1: WithTag("new")})
    assert out["a"].value.shape == (2, N)
    assert_laid_out(out["a"].value, 1)
    assert out["b"].value.shape == (N, 2)
    assert_laid_out(out["b"].value, 0)


def test_inputs_are_never_changed(leaks):
    key = jax.random.key(0)
    nested = {"k": key, "n": 2}
    init_kwargs = {"cfg": nested, "size": 3}
    before = dict(init_kwargs)
    nested_before = dict(nested)
    out_axes = {1: ep.ParamState}
    out_axes_before = dict(out_axes)
    in_axes = {"cfg": None}
    in_axes_before = dict(in_axes)

    class M(eqx.Module):
        w: jax.Array
        p: ep.ParamState | None = None

        def init_state(self, cfg, size):
            p = ep.ParamState(jax.random.normal(cfg["k"], (size,)) + self.w[:size])
            return eqx.tree_at(lambda m: m.p, self, p, is_leaf=lambda x: x is None)

    w = jnp.arange(4.0)
    m = M(w)
    m_leaves = jtu.tree_leaves(m)
    out = ep.pmap2_new_states(
        m, init_kwargs, state_out_axes=out_axes, init_in_axes=in_axes
    )
    assert out.p.value.shape == (3, N)
    assert_laid_out(out.p.value, 1)
    assert init_kwargs == before and all(init_kwargs[k] is before[k] for k in before)
    assert nested == nested_before and nested["k"] is key
    assert out_axes == out_axes_before and in_axes == in_axes_before
    assert m.p is None and m.w is w
    assert all(a is b for a, b in zip(jtu.tree_leaves(m), m_leaves))
    np.testing.assert_array_equal(np.asarray(w), np.arange(4.0))


# --------------------------------------------------------------------------- devices, mesh, axis_size


def test_devices_list(leaks):
    devs = jax.devices()[4:]

    def make():
        return ep.ShortTermState(jax.lax.axis_index("devices"))

    out = ep.pmap2_new_states(make, devices=devs)
    assert out.value.shape == (4,)
    assert_laid_out(out.value, 0, n=4, devices=devs)
    np.testing.assert_array_equal(np.asarray(out.value), np.arange(4))
    assert {s.device for s in out.value.addressable_shards} == set(devs)


def test_devices_mesh_with_axis_name(leaks):
    devs = jax.devices()[2:6]
    mesh = Mesh(np.array(devs), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def make():
        return {
            "i": ep.ShortTermState(jax.lax.axis_index("batch")),
            "r": ep.NonBatchState(jnp.ones(2)),
        }

    out = ep.pmap2_new_states(make, devices=mesh, axis_name="batch")
    x = out["i"].value
    assert x.shape == (4,)
    assert x.sharding.mesh == mesh
    assert_laid_out(x, 0, n=4, name="batch", devices=devs)
    assert_laid_out(out["r"].value, None, n=4, name="batch", devices=devs)
    np.testing.assert_array_equal(np.asarray(x), np.arange(4))


def test_axis_size_alone(leaks):
    out = ep.pmap2_new_states(Counter(), axis_size=4)
    assert out.count.value.shape == (4,)
    assert_laid_out(out.count.value, 0, n=4, devices=jax.local_devices()[:4])


def test_axis_name(leaks):
    def make():
        return ep.ShortTermState(jax.lax.axis_index("d"))

    out = ep.pmap2_new_states(make, axis_name="d")
    assert_laid_out(out.value, 0, name="d")
    np.testing.assert_array_equal(np.asarray(out.value), np.arange(N))


# --------------------------------------------------------------------------- straight into jit / shard_map


def test_results_work_in_jit_and_shard_map(leaks):
    def make():
        return {
            "a": ep.ShortTermState(_idx()),
            "r": ep.NonBatchState(jnp.array([1.0, 2.0, 3.0])),
        }

    out = ep.pmap2_new_states(make)
    a, r = out["a"].value, out["r"].value

    total = jax.jit(lambda t: jnp.sum(t["a"].value) + jnp.sum(t["r"].value))(out)
    assert float(total) == 28.0 + 6.0

    mesh = a.sharding.mesh

    def body(a_local, r_local):
        assert a_local.shape == (1,)
        assert r_local.shape == (3,)
        return a_local * 2.0 + jnp.sum(r_local)

    f = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(P("devices"), P()), out_specs=P("devices")
        )
    )
    y = f(a, r)
    np.testing.assert_array_equal(np.asarray(y), 2.0 * np.arange(N) + 6.0)
    assert y.sharding.spec == a.sharding.spec

    g = jax.jit(
        jax.shard_map(
            lambda a_local: jax.lax.psum(a_local, "devices"),
            mesh=mesh,
            in_specs=P("devices"),
            out_specs=P(),
        )
    )
    assert float(g(a)[0]) == 28.0


# --------------------------------------------------------------------------- compile caching


def test_cache_factory_not_traced_again(leaks):
    calls = []

    def make(n, key):
        calls.append(1)
        return ep.ParamState(jax.random.normal(key, (n,)))

    ep.pmap2_new_states(
        make,
        {"n": 3, "key": jax.random.key(0)},
        state_out_axes={0: OfType(ep.ParamState)},
    )
    first = len(calls)
    assert first >= 1
    out = ep.pmap2_new_states(
        make,
        {"n": 3, "key": jax.random.key(1)},
        state_out_axes={0: OfType(ep.ParamState)},
    )
    assert len(calls) == first  # a fresh but equal filter, new key values: no trace
    np.testing.assert_allclose(
        np.asarray(out.value[0]),
        np.asarray(jax.random.normal(jax.random.key(1), (3,))),
        rtol=1e-6,
    )
    ep.pmap2_new_states(
        make,
        {"n": 4, "key": jax.random.key(0)},
        state_out_axes={0: OfType(ep.ParamState)},
    )
    assert len(calls) > first  # another static value: traced again


def test_cache_init_state_module_not_traced_again(leaks):
    calls = []

    class C(eqx.Module):
        w: jax.Array
        s: ep.ShortTermState | None = None

        def init_state(self, size):
            calls.append(1)
            return C(self.w, ep.ShortTermState(jnp.zeros((size,)) + self.w[0]))

    ep.pmap2_new_states(C(jnp.ones(2)), {"size": 2})
    first = len(calls)
    assert first >= 1
    out = ep.pmap2_new_states(
        C(jnp.array([5.0, 5.0])), {"size": 2}
    )  # a fresh, equal-shaped module
    assert len(calls) == first
    np.testing.assert_array_equal(np.asarray(out.s.value), np.full((N, 2), 5.0))


def test_cache_make_with_state_called_anew(leaks):
    calls = []

    class Net(eqx.Module):
        linear: eqx.nn.Linear

        def __init__(self, key):
            calls.append(1)
            self.linear = eqx.nn.Linear(2, 2, key=key)

    ep.pmap2_new_states(eqx.nn.make_with_state(Net), {"key": jax.random.key(0)})
    first = len(calls)
    assert first >= 1
    key = jax.random.key(1)
    net, _ = ep.pmap2_new_states(eqx.nn.make_with_state(Net), {"key": key})
    assert len(calls) == first
    ref = eqx.nn.make_with_state(Net)(key)[0]  # the new key's values, not the old ones
    for i in range(N):
        np.testing.assert_allclose(
            np.asarray(net.linear.weight[i]), np.asarray(ref.linear.weight)
        )


def test_cache_tells_static_int_from_float(leaks):
    # 2 == 2.0 and hash(2) == hash(2.0), but they are different static values.
    def make(fill):
        return ep.State(jnp.full((3,), fill))

    a = ep.pmap2_new_states(make, {"fill": 2})
    b = ep.pmap2_new_states(make, {"fill": 2.0})
    assert jnp.issubdtype(a.value.dtype, jnp.integer)
    assert jnp.issubdtype(b.value.dtype, jnp.floating)
    for x in (a.value, b.value):
        np.testing.assert_array_equal(np.asarray(x), np.full((N, 3), 2))


def test_cache_tells_dtypes_apart(leaks):
    def make(x):
        return ep.State(x * 2)

    a = ep.pmap2_new_states(make, {"x": jnp.ones(2, jnp.float32)})
    b = ep.pmap2_new_states(make, {"x": jnp.ones(2, jnp.int32)})
    assert a.value.dtype == jnp.float32
    assert b.value.dtype == jnp.int32
    for x in (a.value, b.value):
        np.testing.assert_array_equal(np.asarray(x), np.full((N, 2), 2))


# --------------------------------------------------------------------------- vmap2_new_states


def test_vmap_needs_axis_size():
    with pytest.raises(TypeError, match="axis_size"):
        ep.vmap2_new_states(Counter())


@pytest.mark.parametrize(
    "axis, shape", [(0, (4, 3, 5)), (1, (3, 4, 5)), (-1, (3, 5, 4)), (None, (3, 5))]
)
def test_vmap_axes(axis, shape, leaks):
    def make():
        return {
            "s": ep.ShortTermState(
                jnp.zeros((3, 5)) + (0.0 if axis is None else _idx("ens"))
            ),
            "nb": ep.NonBatchState(jnp.ones(2)),
        }

    out = ep.vmap2_new_states(
        make, axis_size=4, state_out_axes={axis: ...}, axis_name="ens"
    )
    x = out["s"].value
    assert x.shape == shape
    assert len(x.devices()) == 1
    assert out["nb"].value.shape == (2,)
    assert len(out["nb"].value.devices()) == 1
    np.testing.assert_array_equal(np.asarray(out["nb"].value), np.ones(2))
    if axis is None:
        np.testing.assert_array_equal(np.asarray(x), np.zeros((3, 5)))
    else:
        pos = axis % 3
        moved = np.moveaxis(np.asarray(x), pos, 0)
        for i in range(4):
            np.testing.assert_array_equal(moved[i], np.full((3, 5), float(i)))


def test_vmap_init_state_module_and_per_member_keys(leaks):
    keys = jax.random.split(jax.random.key(0), 3)

    class Ens(eqx.Module):
        w: ep.ParamState | None = None

        def init_state(self, key):
            return Ens(ep.ParamState(jax.random.normal(key, (2,))))

    out = ep.vmap2_new_states(
        Ens(), {"key": keys}, axis_size=3, init_in_axes={"key": 0}
    )
    assert len(out.w.value.devices()) == 1
    x = np.asarray(out.w.value)
    assert x.shape == (3, 2)
    for i in range(3):
        np.testing.assert_allclose(
            x[i], np.asarray(jax.random.normal(keys[i], (2,))), rtol=1e-6
        )
    assert not np.allclose(x[0], x[1])


def test_vmap_varying_replicated_state_names_path(leaks):
    def make():
        return {"ok": ep.State(_idx("ens")), "shared": ep.NonBatchState(_idx("ens"))}

    with pytest.raises(ValueError, match=r"\['shared'\]\.value are to be replicated"):
        ep.vmap2_new_states(make, axis_size=4, axis_name="ens")


def test_vmap_varying_replicated_state_from_keys_names_path(leaks):
    keys = jax.random.split(jax.random.key(0), 4)

    def make(key):
        return {
            "ok": ep.State(jnp.zeros(2)),
            "bad": ep.NonBatchState(jax.random.normal(key, (2,))),
        }

    with pytest.raises(ValueError, match=r"\['bad'\]\.value are to be replicated"):
        ep.vmap2_new_states(make, {"key": keys}, axis_size=4, init_in_axes={"key": 0})


def test_vmap_more_members_than_devices(leaks):
    out = ep.vmap2_new_states(Counter(), axis_size=16)
    assert out.count.value.shape == (16,)
    assert len(out.count.value.devices()) == 1
    np.testing.assert_array_equal(np.asarray(out.count.value), np.zeros(16))


def test_vmap_state_tag(leaks):
    out = ep.vmap2_new_states(Counter(), axis_size=2, state_tag="ens")
    assert out.count.tag == "ens"
    assert out.count.value.shape == (2,)


class _Counter(eqx.Module):
    count: ep.ShortTermState | None = None
    scale: ep.ParamState | None = None

    def init_state(self):
        # as code written for brainstate says it: Python numbers in the markers
        return _Counter(ep.ShortTermState(0.0), ep.ParamState(2))


def test_a_python_number_in_a_marker_is_a_state():
    made = ep.pmap2_new_states(
        _Counter(), {}, state_out_axes={None: OfType(ep.ParamState)}
    )
    count, scale = made.count.value, made.scale.value
    assert count.shape == (8,) and count.dtype == jnp.float32
    assert scale.shape == () and jnp.issubdtype(scale.dtype, jnp.integer)
    assert "2 array(s)" in ep.describe(made)

    @ep.pmap2
    def tick(m):
        i = jax.lax.axis_index("devices").astype(jnp.float32)
        return eqx.tree_at(lambda m: m.count.value, m, m.count.value + i)

    np.testing.assert_array_equal(np.asarray(tick(made).count.value), np.arange(8.0))
