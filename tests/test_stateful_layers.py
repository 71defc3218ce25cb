"""Stateful Equinox layers: `eqx.nn.make_with_state` under `pmap2_new_states`, BatchNorm
statistics averaged over all devices inside a `pmap2` step, and per-device dropout keys."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import _spec, assert_laid_out, N
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType


B = 5  # samples per device
MOMENTUM = 0.9


def _arrays(tree):
    return [x for x in jtu.tree_leaves(tree) if isinstance(x, jax.Array)]


class Net(eqx.Module):
    linear: eqx.nn.Linear
    bn: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.bn = eqx.nn.BatchNorm(
            4, axis_name=("batch", "devices"), mode="batch", momentum=MOMENTUM
        )

    def __call__(self, x, state):
        return self.bn(self.linear(x), state)


_AXES = {0: OfType(eqx.nn.State), None: ...}


def _make(key):
    return ep.pmap2_new_states(
        eqx.nn.make_with_state(Net), {"key": key}, state_out_axes=_AXES
    )


def test_make_with_state_model_replicated_state_per_device(leaks):
    key = jax.random.key(0)
    model, state = _make(key)
    ref_model, ref_state = eqx.nn.make_with_state(Net)(key)
    assert isinstance(model, Net) and isinstance(state, eqx.nn.State)

    # the model: replicated, the same shapes and values as built on one device
    leaves, ref_leaves = _arrays(model), _arrays(ref_model)
    assert len(leaves) == len(ref_leaves) > 0
    for x, r in zip(leaves, ref_leaves):
        assert x.shape == r.shape
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh.axis_names == (
            "devices",
        )
        assert _spec(x) == () and x.sharding.is_fully_replicated
        assert_laid_out(x, None)
        np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=1e-6)

    # the state: one copy per device, along axis 0
    leaves, ref_leaves = _arrays(state), _arrays(ref_state)
    assert len(leaves) == len(ref_leaves) > 0
    for x, r in zip(leaves, ref_leaves):
        assert x.shape == (N,) + r.shape
        assert _spec(x) == ("devices",)
        assert_laid_out(x, 0)
        for i in range(N):
            np.testing.assert_array_equal(np.asarray(x)[i], np.asarray(r))
    assert model.bn.batch_state_index is not None and model.bn.batch_counter is not None
    mean, var = state.get(model.bn.batch_state_index)
    assert mean.shape == (N, 4) and var.shape == (N, 4)
    assert state.get(model.bn.batch_counter).shape == (N,)


@ep.pmap2
def _bn_step(model, state, x):
    out, state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    return out, state


def _expected_stats(model, x):
    """BatchNorm's statistics over the whole global batch, with numpy."""
    w = np.asarray(model.linear.weight, np.float64)
    b = np.asarray(model.linear.bias, np.float64)
    h = x.reshape(-1, x.shape[-1]).astype(np.float64) @ w.T + b  # (N * B, 4)
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)  # biased, as equinox's pmean of squares gives
    return h, mean, var


def test_batch_norm_statistics_over_all_devices(leaks):
    key = jax.random.key(1)
    model, state = _make(key)
    before = [(x.shape, x.sharding) for x in _arrays(state)]
    x = (
        np.asarray(jax.random.normal(jax.random.key(2), (N, B, 3)))
        * np.arange(1, N + 1, dtype=np.float32)[:, None, None]
    )

    out, new_state = _bn_step(model, state, x)

    # the state keeps its per-device layout
    assert isinstance(new_state, eqx.nn.State)
    assert [(a.shape, a.sharding) for a in _arrays(new_state)] == before

    h, mean, var = _expected_stats(model, x)
    hidden_mean, hidden_var = new_state.get(model.bn.batch_state_index)
    # equinox's update from hidden_mean = 0, hidden_var = 1:
    # hidden * momentum + batch_stat * (1 - momentum), the same on every device
    expected_mean = 0.0 * MOMENTUM + mean * (1 - MOMENTUM)
    expected_var = 1.0 * MOMENTUM + var * (1 - MOMENTUM)
    np.testing.assert_allclose(
        np.asarray(hidden_mean),
        np.broadcast_to(expected_mean, (N, 4)),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(hidden_var),
        np.broadcast_to(expected_var, (N, 4)),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        np.asarray(new_state.get(model.bn.batch_counter)), np.ones(N)
    )

    # the outputs are normalised with the global statistics
    assert out.shape == (N, B, 4)
    assert_laid_out(out, 0)
    expected_out = (h - mean) / np.sqrt(var + model.bn.eps)
    np.testing.assert_allclose(
        np.asarray(out).reshape(-1, 4), expected_out, rtol=1e-4, atol=1e-5
    )

    # a second step, from the returned state
    out2, state2 = _bn_step(model, new_state, x)
    hidden_mean2, hidden_var2 = state2.get(model.bn.batch_state_index)
    np.testing.assert_allclose(
        np.asarray(hidden_mean2),
        np.broadcast_to(expected_mean * MOMENTUM + mean * (1 - MOMENTUM), (N, 4)),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(hidden_var2),
        np.broadcast_to(expected_var * MOMENTUM + var * (1 - MOMENTUM), (N, 4)),
        rtol=1e-5,
        atol=1e-6,
    )
    # mode="batch": the same batch is normalised with the same global statistics
    np.testing.assert_allclose(
        np.asarray(out2).reshape(-1, 4), expected_out, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(
        np.asarray(state2.get(model.bn.batch_counter)), np.full(N, 2)
    )
    assert [(a.shape, a.sharding) for a in _arrays(state2)] == before


# --------------------------------------------------------------------------- messages

# The state's leaves as `describe` names them, by their layer: JAX's key paths write an
# `eqx.nn.State`'s entries `[<flat index 0>]`, `[<flat index 1>][0]`, ...
_STATE_LEAVES = (
    "[Net.bn.batch_counter]",
    "[Net.bn.batch_state_index][0]",
    "[Net.bn.batch_state_index][1]",
)


def _names_the_state_leaves(message: str, before: str = "") -> None:
    for leaf in _STATE_LEAVES:
        assert before + leaf in message, message
    assert "flat index" not in message, message


def test_describe_names_the_state_leaves_as_the_messages_do(leaks):
    _, state = _make(jax.random.key(0))
    _names_the_state_leaves(ep.describe(state))


def test_to_one_device_names_the_state_leaves_by_their_layer(leaks):
    _, state = _make(jax.random.key(0))
    with pytest.raises(ValueError, match="are per device") as e:
        ep.to_one_device(state)
    _names_the_state_leaves(str(e.value))
    with pytest.raises(ValueError, match="floating-point leaves only") as e:
        ep.to_one_device(state, per_device="mean")
    assert "the leaf at [Net.bn.batch_counter] is int32" in str(e.value)
    assert "flat index" not in str(e.value)


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_load_names_the_state_leaves_by_their_layer(backend, tmp_path, leaks):
    _, state = _make(jax.random.key(0))
    ep.save(tmp_path / "ckpt", state, backend=backend)
    _, like = ep.eval_new_states(
        eqx.nn.make_with_state(Net),
        {"key": jax.random.key(0)},
        state_out_axes=_AXES,
        axis_size=4,
    )
    with pytest.raises(ValueError, match="another number of devices") as e:
        ep.load(tmp_path / "ckpt", like, backend=backend)
    assert str(e.value).startswith("The leaves at [Net.bn.batch_counter], ")
    _names_the_state_leaves(str(e.value))
    with pytest.raises(ValueError, match="floating-point leaves only") as e:
        ep.load(tmp_path / "ckpt", like, per_device="mean", backend=backend)
    assert "the leaf at [Net.bn.batch_counter] is int32" in str(e.value)
    assert "flat index" not in str(e.value)


@pytest.mark.parametrize("check", [True, "runtime"])
def test_replication_error_names_the_state_leaves_by_their_layer(check, leaks):
    model, state = _make(jax.random.key(0))
    # each device's entries differ, and so do the new ones made from them
    state = jax.tree.map(
        lambda s: s + jnp.arange(N, dtype=s.dtype).reshape((N,) + (1,) * (s.ndim - 1)),
        state,
    )
    x = np.ones((N, B, 3), np.float32)
    # The new state asked replicated: not proved so (True), differing (`"runtime"`)
    step = ep.pmap2(
        _bn_step.fun,
        in_axes=(None, 0, 0),
        out_axes=(0, None),
        check_replicated=check,
    )
    with pytest.raises(ep.ReplicationError) as e:
        step(model, state, x)
    _names_the_state_leaves(str(e.value), before="output[1]")
    assert sorted(e.value.names) == sorted("output[1]" + s for s in _STATE_LEAVES)


def test_pmap2_names_the_state_leaves_among_its_inputs_by_their_layer(leaks):
    _, state = _make(jax.random.key(0))
    with pytest.raises(ValueError, match="to be mapped over its axis 1") as e:
        ep.pmap2(lambda s: s, in_axes=(1,))(state)
    assert str(e.value).startswith("The input args[0][Net.bn.batch_counter] ")
    assert "flat index" not in str(e.value)


# --------------------------------------------------------------------------- dropout


class DropNet(eqx.Module):
    dropout: eqx.nn.Dropout

    def __init__(self):
        self.dropout = eqx.nn.Dropout(p=0.5)

    def __call__(self, x, key):
        return self.dropout(x, key=key)


@ep.pmap2
def _drop(model, x, key):
    return model(x, key)


def test_per_device_dropout_keys(leaks):
    model = DropNet()
    x = np.ones((N, 64), np.float32)  # identical inputs on every device
    keys = jax.random.split(jax.random.key(0), N)
    out = _drop(model, x, keys)
    assert out.shape == (N, 64)
    assert_laid_out(out, 0)
    masks = np.asarray(out) != 0
    assert len({m.tobytes() for m in masks}) == N  # a different mask on each device
    for i in range(N):  # each the mask of its own key
        np.testing.assert_array_equal(
            np.asarray(out)[i], np.asarray(model(jnp.ones(64), keys[i]))
        )
    assert 0 < masks.mean() < 1


@pytest.mark.parametrize("how", ["in_axes", "laid_out"])
def test_replicated_dropout_key(how, leaks):
    model = DropNet()
    x = np.ones((N, 64), np.float32)
    key = jax.random.key(3)
    if how == "in_axes":
        fn = ep.pmap2(lambda model, x, key: model(x, key), in_axes=(None, 0, None))
        out = fn(model, x, key)
    else:
        mesh = Mesh(
            np.array(jax.devices()),
            ("devices",),
            axis_types=(jax.sharding.AxisType.Auto,),
        )
        # (returned in a dict: a bare array output would take the layout of the bare
        # laid-out key argument by rule 1)
        out = ep.pmap2(lambda model, x, key: {"y": model(x, key)})(
            model, x, jax.device_put(key, NamedSharding(mesh, P()))
        )["y"]
    assert out.shape == (N, 64)
    assert_laid_out(out, 0)
    out = np.asarray(out)
    expected = np.asarray(model(jnp.ones(64), key))
    assert 0 < (expected != 0).mean() < 1
    for i in range(N):  # the same mask on every device
        np.testing.assert_array_equal(out[i], expected)
