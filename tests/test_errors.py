"""Section 6 of the issue: bad input gets a clear error, and changes nothing."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import assert_laid_out, Counter, ours
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate.filters import PathContains


def _snapshot(tree):
    return [(p, x) for p, x in jtu.tree_flatten_with_path(tree)[0]]


def _unchanged(tree, snap):
    now = _snapshot(tree)
    assert len(now) == len(snap)
    for (p1, x1), (p2, x2) in zip(now, snap):
        assert p1 == p2
        assert x1 is x2


def _numbers(msg):
    return set(re.findall(r"(?<![\w.])-?\d+(?!\w|\.\d)", msg))


# --------------------------------------------------------------------------- axis_size


def test_axis_size_above_device_count_names_both_numbers():
    m = Counter()
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(m, axis_size=16)
    msg = str(e.value)
    assert "16" in msg and "8" in msg
    assert "axis_size" in msg
    assert {"16", "8"} <= _numbers(msg)
    assert "`axis_size=16` is larger than the number of local devices" in msg
    assert "which is 8" in msg
    assert m.count is None


def test_axis_size_above_the_given_devices():
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(Counter(), axis_size=5, devices=jax.devices()[:3])
    assert {"5", "3"} <= _numbers(str(e.value))
    assert (
        "`axis_size=5` is larger than the number of devices in `devices`, which is 3"
        in (str(e.value))
    )


@pytest.mark.parametrize("bad", [0, -1, -8])
def test_axis_size_not_positive(bad):
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(Counter(), axis_size=bad)
    assert "axis_size" in str(e.value)
    assert str(bad) in str(e.value)
    assert f"`axis_size` must be a positive int, but got {bad}." in str(e.value)


@pytest.mark.parametrize("bad", [0, -2])
def test_vmap_axis_size_not_positive(bad):
    with pytest.raises(ValueError, match="axis_size") as e:
        ep.vmap2_new_states(Counter(), axis_size=bad)
    assert f"`axis_size` must be a positive int, but got {bad}." in str(e.value)


@pytest.mark.parametrize("bad", [2.0, "4", True, [4]])
def test_axis_size_not_an_int(bad):
    with pytest.raises(TypeError) as e:
        ep.pmap2_new_states(Counter(), axis_size=bad)
    assert "axis_size" in str(e.value)
    assert repr(bad) in str(e.value)
    if ours(e.value):
        assert f"got {bad!r} of type {type(bad).__name__}" in str(e.value)


@pytest.mark.parametrize("bad", [2.0, "4", True, None])
def test_vmap_axis_size_not_an_int(bad):
    with pytest.raises(TypeError, match="axis_size") as e:
        ep.vmap2_new_states(Counter(), axis_size=bad)
    assert repr(bad) in str(e.value)
    if ours(e.value):
        assert f"got {bad!r} of type {type(bad).__name__}" in str(e.value)


def test_axis_size_disagrees_with_mesh():
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:4]),
        ("devices",),
        axis_types=(jax.sharding.AxisType.Auto,),
    )
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(Counter(), axis_size=2, devices=mesh)
    assert {"2", "4"} <= _numbers(str(e.value))
    assert (
        "`axis_size=2` does not match the mesh, whose axis 'devices' has 4 devices"
        in (str(e.value))
    )


def test_mesh_without_the_axis_name():
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:4]),
        ("other",),
        axis_types=(jax.sharding.AxisType.Auto,),
    )
    with pytest.raises(
        ValueError, match=r"has axes \('other',\), but no axis named 'devices'"
    ):
        ep.pmap2_new_states(Counter(), devices=mesh)


# --------------------------------------------------------------------------- state_out_axes


@pytest.mark.parametrize("bad", ["0", 1.5, True, (0,)])
def test_state_out_axes_key_not_int_or_none(bad):
    out_axes = {bad: ep.ParamState}
    with pytest.raises(TypeError) as e:
        ep.pmap2_new_states(Counter(), state_out_axes=out_axes)
    assert repr(bad) in str(e.value)
    assert "keys of `state_out_axes`" in str(e.value)
    assert f"the key {bad!r} of type {type(bad).__name__}" in str(e.value)
    assert out_axes == {bad: ep.ParamState}


@pytest.mark.parametrize("bad", [42, 2.5, {"a": 1}, object()])
def test_filter_that_cannot_be_converted(bad):
    m = Counter()
    with pytest.raises(TypeError) as e:
        ep.pmap2_new_states(m, state_out_axes={1: bad})
    assert type(bad).__name__ in str(e.value)
    assert f"Cannot use {bad!r} of type {type(bad).__name__} as a filter" in str(
        e.value
    )
    assert m.count is None


def test_filter_that_cannot_be_converted_inside_a_list():
    with pytest.raises(TypeError, match="Cannot use 42 of type int as a filter"):
        ep.pmap2_new_states(Counter(), state_out_axes={1: [ep.ParamState, 42]})  # pyright: ignore[reportArgumentType]  (a deliberately invalid filter)


class Model(eqx.Module):
    weight: ep.ParamState | None = None
    other: ep.ShortTermState | None = None

    def init_state(self):
        return Model(
            ep.ParamState(jnp.zeros(2), tag="w"), ep.ShortTermState(jnp.zeros(2))
        )


def test_ambiguous_state_names_path_and_both_axes(leaks):
    m = Model()
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(m, state_out_axes={0: ep.ParamState, 1: "w"})
    msg = str(e.value)
    assert ".weight" in msg
    assert ".other" not in msg
    assert {"0", "1"} <= _numbers(msg)
    assert "at .weight (ParamState) is matched by the filters of several axes" in msg
    assert "`state_out_axes`: 0, 1." in msg
    assert m.weight is None
    # and again: an error is not cached away
    with pytest.raises(ValueError, match=r"\.weight"):
        ep.pmap2_new_states(m, state_out_axes={0: ep.ParamState, 1: "w"})


def test_ambiguous_state_with_replicated_axis(leaks):
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(
            Model(), state_out_axes={None: PathContains("weight"), -1: "w"}
        )
    msg = str(e.value)
    assert ".weight" in msg and "None" in msg and "-1" in msg
    assert "at .weight (ParamState) is matched by the filters of several axes" in msg
    assert "`state_out_axes`: None, -1." in msg


def test_two_catch_alls_are_ambiguous(leaks):
    with pytest.raises(
        ValueError,
        match=r"at \.(weight|other) .* several axes .*`state_out_axes`: 0, 1\.",
    ):
        ep.pmap2_new_states(Model(), state_out_axes={0: ..., 1: True})


@pytest.mark.parametrize("axis", [2, 5, -3])
def test_axis_out_of_range_names_path(axis, leaks):
    m = Model()
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(m, state_out_axes={axis: ep.ParamState})
    msg = str(e.value)
    assert ".weight" in msg
    assert str(axis) in msg
    assert f"Axis {axis} is out of range for the state at .weight.value" in msg
    assert "has 1 dimension(s): the new axis can go at positions -2 to 1" in msg
    assert m.weight is None


def test_axis_out_of_range_vmap(leaks):
    with pytest.raises(
        ValueError, match=r"Axis 3 is out of range for the state at \.weight\.value"
    ):
        ep.vmap2_new_states(Model(), axis_size=2, state_out_axes={3: ep.ParamState})


# --------------------------------------------------------------------------- varying replicated state


class Varying(eqx.Module):
    ok: ep.ShortTermState | None = None
    shared: ep.NonBatchState | None = None

    def init_state(self):
        i = jax.lax.axis_index("devices")
        return Varying(ep.ShortTermState(i), ep.NonBatchState(i))


def test_varying_nonbatchstate_names_path(leaks):
    m = Varying()
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(m)
    msg = str(e.value)
    assert ".shared" in msg
    assert ".ok" not in msg
    assert "at .shared.value are to be replicated (axis None)" in msg
    assert m.shared is None
    # the check is made on every call, cached program or not
    with pytest.raises(ValueError, match=r"at \.shared\.value are to be replicated"):
        ep.pmap2_new_states(m)


def test_varying_state_put_on_axis_none_by_a_filter(leaks):
    keys = jax.random.split(jax.random.key(0), 8)

    def make(key):
        return {
            "noise": ep.ShortTermState(jax.random.normal(key, (2,))),
            "z": jnp.zeros(2),
        }

    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(
            make, {"key": keys}, state_out_axes={None: ...}, init_in_axes={"key": 0}
        )
    assert "['noise']" in str(e.value)
    assert "['z']" not in str(e.value)
    assert "at ['noise'].value are to be replicated (axis None)" in str(e.value)


def test_varying_only_on_some_devices_is_caught(leaks):
    # Differs on one device only: a run-time value check, not just a trace-time one.
    def make(x):
        return ep.NonBatchState(x)

    xs = jnp.zeros((8, 2)).at[5, 1].set(1.0)
    with pytest.raises(ValueError, match=r"at \.value are to be replicated"):
        ep.pmap2_new_states(make, {"x": xs}, init_in_axes={"x": 0})
    # identical per-device values are accepted
    out = ep.pmap2_new_states(make, {"x": jnp.ones((8, 2))}, init_in_axes={"x": 0})
    assert out.value.shape == (2,)
    assert_laid_out(out.value, None)
    np.testing.assert_array_equal(np.asarray(out.value), np.ones(2))


def test_varying_replicated_state_whose_differences_cancel_in_a_sum(leaks):
    # Device i holds [3i, -i]: different on every device. A position-weighted sum of the
    # words (1*w0 + 3*w1 mod 2**32) is 0 on all of them, so a checksum of that kind misses it.
    def make():
        i = jax.lax.axis_index("devices")
        return {"shared": ep.NonBatchState(jnp.stack([3 * i, -i]))}

    with pytest.raises(ValueError, match=r"\['shared'\]\.value are to be replicated"):
        out = ep.pmap2_new_states(make)
        shards = [
            np.asarray(s.data).tolist() for s in out["shared"].value.addressable_shards
        ]
        print("accepted, shards:", shards)


# --------------------------------------------------------------------------- init_in_axes


def test_init_in_axes_wrong_length_names_argument(leaks):
    keys = jax.random.split(jax.random.key(0), 4)
    kwargs = {"key": keys, "n": 2}

    def make(key, n):
        return ep.State(jax.random.normal(key, (n,)))

    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(make, kwargs, init_in_axes={"key": 0})
    msg = str(e.value)
    assert "'key'" in msg
    assert {"4", "8"} <= _numbers(msg)
    assert "'key' is to be mapped over its axis 0, of length 4" in msg
    assert "the mapped axis has size 8" in msg
    assert kwargs["key"] is keys and kwargs["n"] == 2 and len(kwargs) == 2


def test_init_in_axes_wrong_length_inside_a_pytree_names_argument(leaks):
    args = {"a": jnp.zeros((8, 2)), "b": jnp.zeros((3, 2))}
    with pytest.raises(
        ValueError,
        match=r"'args' at \['b'\] is to be mapped over its axis 0, of length 3, but the "
        r"mapped axis has size 8",
    ):
        ep.pmap2_new_states(
            lambda args: ep.State(args["a"]), {"args": args}, init_in_axes={"args": 0}
        )


def test_init_in_axes_names_a_missing_argument():
    with pytest.raises(ValueError, match=r"names the argument 'nope', which is not in"):
        ep.pmap2_new_states(
            lambda key: ep.State(key), {"key": jnp.zeros(2)}, init_in_axes={"nope": 0}
        )


def test_init_in_axes_vmap_wrong_length(leaks):
    keys = jax.random.split(jax.random.key(0), 3)
    with pytest.raises(
        ValueError, match=r"'key' .* of length 3, but the mapped axis has size 4"
    ):
        ep.vmap2_new_states(
            lambda key: ep.State(jax.random.normal(key, (2,))),
            {"key": keys},
            axis_size=4,
            init_in_axes={"key": 0},
        )


# --------------------------------------------------------------------------- the module argument


@pytest.mark.parametrize("bad", [42, "model", None, np.zeros(3)])
def test_module_neither_init_state_module_nor_callable(bad):
    with pytest.raises(TypeError) as e:
        ep.pmap2_new_states(bad)
    assert "module" in str(e.value).lower()  # the argument, named
    if ours(e.value):
        assert f"but got {bad!r} of type {type(bad).__name__}." in str(e.value)


def test_module_instance_without_init_state():
    lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))  # callable, but must not be called
    snap = _snapshot(lin)
    with pytest.raises(TypeError) as e:
        ep.pmap2_new_states(lin)
    assert "Linear" in str(e.value)
    assert "init_state" in str(e.value)
    assert "got an instance of Linear, but no module in it defines `init_state`" in (
        str(e.value)
    )
    _unchanged(lin, snap)
    with pytest.raises(
        TypeError, match=r"got an instance of Linear, but no module in it defines"
    ):
        ep.vmap2_new_states(lin, axis_size=2)
    _unchanged(lin, snap)


class MyError(Exception):
    pass


class Raises(eqx.Module):
    s: ep.State | None = None

    def init_state(self):
        raise MyError("from init_state")


def test_exception_from_init_state_reaches_caller_as_itself(leaks):
    m = Raises()
    with pytest.raises(MyError, match="from init_state"):
        ep.pmap2_new_states(m)
    assert m.s is None
    with pytest.raises(MyError, match="from init_state"):
        ep.vmap2_new_states(m, axis_size=2)
    assert m.s is None


def test_exception_from_factory_reaches_caller_as_itself(leaks):
    kwargs = {"n": 3}

    def make(n):
        raise MyError(f"bad n={n}")

    with pytest.raises(MyError, match="bad n=3"):
        ep.pmap2_new_states(make, kwargs)
    assert kwargs == {"n": 3}


def test_exception_from_submodule_init_state(leaks):
    class Outer(eqx.Module):
        inner: Raises

    with pytest.raises(MyError, match="from init_state"):
        ep.pmap2_new_states(Outer(Raises()))


class Changes(eqx.Module):
    w: jax.Array
    s: ep.State | None = None

    def init_state(self):
        return Changes(self.w + 1.0, ep.State(jnp.zeros(2)))


def test_init_state_changing_a_held_leaf_names_it(leaks):
    w = jnp.arange(3.0)
    m = Changes(w)
    with pytest.raises(ValueError) as e:
        ep.pmap2_new_states(m)
    assert ".w" in str(e.value)
    assert "`init_state` changed the leaf at .w, which the module already held" in (
        str(e.value)
    )
    assert m.w is w and m.s is None
    np.testing.assert_array_equal(np.asarray(w), np.arange(3.0))
    with pytest.raises(ValueError, match=r"changed the leaf at \.w,"):
        ep.vmap2_new_states(m, axis_size=2)


def test_init_state_dropping_a_held_leaf_names_it(leaks):
    class Drops(eqx.Module):
        w: jax.Array | None
        s: ep.State | None = None

        def init_state(self):
            return Drops(None, ep.State(jnp.zeros(2)))

    with pytest.raises(ValueError, match=r"changed the leaf at \.w, which the module"):
        ep.pmap2_new_states(Drops(jnp.ones(2)))


def test_init_state_returning_none_is_a_clear_error(leaks):
    class Mutates(eqx.Module):
        def init_state(self):
            return None

    with pytest.raises(TypeError, match=r"`Mutates\.init_state` returned None"):
        ep.pmap2_new_states(Mutates())


def test_unknown_init_kwarg_is_an_error(leaks):
    with pytest.raises(TypeError, match=r"accepts the argument\(s\) \['typo'\]"):
        ep.pmap2_new_states(Counter(), {"typo": 1})


def test_a_collective_over_another_axis_name_says_which():
    x = jnp.ones((8, 3))
    step = ep.pmap2(lambda g: jax.lax.pmean(g, "batch"))
    with pytest.raises(
        NameError, match=r"axis name 'batch'.*mapped over the axis 'devices'"
    ) as caught:
        step(x)
    assert "shard_map" not in str(caught.value)  # not JAX's advice
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    on_batch = jax.device_put(x, NamedSharding(mesh, P("batch")))
    fixed = ep.pmap2(lambda g: jax.lax.pmean(g, "batch"), axis_name="batch")
    np.testing.assert_array_equal(np.asarray(fixed(on_batch)), np.ones((8, 3)))


def test_a_name_error_of_the_users_own_passes_through():
    def step(x):
        return x * undefined_name  # noqa: F821  # pyright: ignore[reportUndefinedVariable]

    with pytest.raises(NameError, match="undefined_name"):
        ep.pmap2(step)(jnp.ones((8, 3)))


def test_state_axes_messages_name_the_state_axes_and_the_leaf_as_written():
    made = ep.pmap2_new_states(lambda: {"w": ep.ShortTermState(jnp.zeros(2))})
    overlapping = ep.StateAxes({0: ep.ShortTermState, None: ep.State})
    with pytest.raises(
        ValueError,
        match=r"^The state at args\[0\]\['w'\] .* in the `StateAxes`: 0, None",
    ):
        ep.pmap2(lambda t: t, in_axes=overlapping)(made)
    with pytest.raises(TypeError, match=r"keys of a `StateAxes`.*not filters to axes"):
        ep.StateAxes({ep.ParamState: 0, ...: None})  # pyright: ignore[reportArgumentType]


def test_a_filter_reading_a_states_value_says_filters_see_no_values():
    with pytest.raises(ValueError, match=r"reads the value of the state at \['w'\]"):
        ep.pmap2_new_states(
            lambda: {"w": ep.ShortTermState(jnp.zeros(2))},
            state_out_axes={None: lambda v: (v == 0).all()},
        )
