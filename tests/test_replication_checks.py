"""The run-time replication check of the init agrees between the device and batch forms."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out

import eqx_pmapstate as ep
from eqx_pmapstate._checks import checksum


def _make(x):
    return ep.NonBatchState(x)


@pytest.mark.parametrize("how", ["pmap", "vmap"])
def test_equal_split_inputs_may_be_replicated(how, leaks):
    x = jnp.ones((8, 2))
    if how == "pmap":
        out = ep.pmap2_new_states(_make, {"x": x}, init_in_axes={"x": 0})
        assert_laid_out(out.value, None)
    else:
        out = ep.vmap2_new_states(_make, {"x": x}, axis_size=8, init_in_axes={"x": 0})
        assert len(out.value.devices()) == 1
    assert out.value.shape == (2,)
    np.testing.assert_array_equal(out.value, np.ones(2))


@pytest.mark.parametrize("how", ["pmap", "vmap"])
def test_unequal_split_inputs_may_not_be_replicated(how):
    x = jnp.ones((8, 2)).at[5, 1].set(2.0)
    with pytest.raises(
        ValueError, match=r"at \.value are to be replicated \(axis None\)"
    ):
        if how == "pmap":
            ep.pmap2_new_states(_make, {"x": x}, init_in_axes={"x": 0})
        else:
            ep.vmap2_new_states(_make, {"x": x}, axis_size=8, init_in_axes={"x": 0})


def test_checksum_sees_differences_that_cancel_in_a_weighted_sum():
    a = jnp.array([0, 0], dtype=jnp.uint32)
    b = jnp.array([3, 2**32 - 1], dtype=jnp.uint32)  # +3 in word 0, -1 in word 1
    assert not np.array_equal(checksum(a), checksum(b))
    # Swapped words differ too, and NaNs of the same bits agree.
    assert not np.array_equal(
        checksum(jnp.array([1.0, 2.0])), checksum(jnp.array([2.0, 1.0]))
    )
    nan = jnp.array([jnp.nan, 1.0])
    np.testing.assert_array_equal(checksum(nan), checksum(nan + 0))


def test_checksums_of_small_and_large_arrays_together():
    from eqx_pmapstate import _checks as _engine
    from eqx_pmapstate._checks import checksums

    big = jnp.arange(_engine._SMALL + 5, dtype=jnp.float32)
    xs = [
        jnp.arange(5.0),
        big,
        jnp.ones((2, 3), jnp.int32),
        jnp.zeros((0,)),
        jnp.array(True),
        jax.random.key(0),
    ]
    together = np.asarray(checksums(xs))
    assert together.shape == (len(xs), 2)
    # Each row depends only on its own array, wherever it stands and whatever is beside it.
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(together[i], checksum(x))
    alone = np.asarray(checksums(xs[::-1]))[::-1]
    np.testing.assert_array_equal(together, alone)
    # One changed word in the large array or in a small one changes its row only.
    changed = np.asarray(
        checksums([xs[0].at[4].set(7.0), big.at[_engine._SMALL + 2].set(-1.0)] + xs[2:])
    )
    assert not np.array_equal(changed[0], together[0]) and not np.array_equal(
        changed[1], together[1]
    )
    np.testing.assert_array_equal(changed[2:], together[2:])


# --------------------------------------------------------------------------- one family
# Every replication failure is an `ep.ReplicationError` (a `ValueError`), whoever finds
# it and when, with the same shape of message: which leaf, why, what to do.


def _not_pmeaned(w, x):
    grad = jax.grad(lambda w: jnp.sum(w * x))(w)
    return w - grad  # `grad` differs per device: no `pmean`


def test_a_step_traced_with_an_unproved_output_raises_replication_error():
    w = ep.pmap2_new_states(lambda: {"w": jnp.ones(3)}, state_out_axes={None: ...})
    x = jnp.arange(24.0).reshape(8, 3)
    step = ep.pmap2(lambda m, x: {"w": _not_pmeaned(m["w"], x)})
    with pytest.raises(ep.ReplicationError) as info:
        step(w, x)
    assert isinstance(info.value, ValueError)
    assert info.value.names == ("output['w']",)
    assert str(info.value).startswith("The output at output['w'] must come back")
    assert "jax.lax.pmean(grads, 'devices')" in str(info.value)


def test_a_map_call_with_an_unproved_output_raises_replication_error():
    class Scale(eqx.Module):
        w: ep.ParamState | None = None

        def init_state(self):
            return Scale(ep.ParamState(jnp.ones(3)))

        def __call__(self, x):
            return jnp.sum(x)  # differs per device

    mapper = ep.Map(Scale(), init_map_size=8, behavior="pmap", out_axes=None)
    mapper = mapper.init_all_states()
    with pytest.raises(ep.ReplicationError, match="must come back replicated"):
        mapper(jnp.arange(8.0))


def test_a_runtime_check_raises_replication_error_of_the_same_shape():
    step = ep.pmap2(lambda v: v - v, out_axes=None, check_replicated="runtime")
    np.testing.assert_array_equal(step(jnp.arange(8.0)), 0.0)  # equal: accepted
    bad = ep.pmap2(lambda v: v * 1, out_axes=None, check_replicated="runtime")
    with pytest.raises(ep.ReplicationError) as info:
        bad(jnp.arange(8.0))
    assert str(info.value).startswith(
        "The output at output (the whole return value) must come back replicated"
    )
    assert "differs between devices (compared after the call)" in str(info.value)
    assert info.value.names == ("output (the whole return value)",)


@pytest.mark.parametrize("how", ["pmap", "vmap"])
def test_states_that_differ_raise_replication_error(how):
    x = jnp.ones((8, 2)).at[5, 1].set(2.0)
    with pytest.raises(ep.ReplicationError) as info:
        if how == "pmap":
            ep.pmap2_new_states(_make, {"x": x}, init_in_axes={"x": 0})
        else:
            ep.vmap2_new_states(_make, {"x": x}, axis_size=8, init_in_axes={"x": 0})
    assert info.value.names == (".value",)


def test_states_that_cannot_be_compared_inside_jit_raise_replication_error():
    x = jnp.ones((8, 2))
    make = jax.jit(
        lambda x: ep.pmap2_new_states(_make, {"x": x}, init_in_axes={"x": 0})
    )
    with pytest.raises(ep.ReplicationError, match="inside `jax.jit`"):
        make(x)


def _per_device_shared():
    i = jax.lax.axis_index("devices").astype(jnp.float32)
    return {"shared": ep.NonBatchState(jnp.full(3, i)), "own": jnp.zeros(3) + i}


def test_eval_new_states_refuses_what_pmap2_new_states_refuses():
    # A `NonBatchState` the init makes differ per device: `pmap2_new_states` compares it
    # and refuses; `eval_new_states`, which runs nothing, cannot prove it and refuses too
    # (it used to return a replicated layout for it, without a word).
    with pytest.raises(ep.ReplicationError, match="values differ between devices"):
        ep.pmap2_new_states(_per_device_shared)
    with pytest.raises(ep.ReplicationError) as info:
        ep.eval_new_states(_per_device_shared)
    assert info.value.names == ("['shared'].value",)
    assert "`eval_new_states` runs nothing" in str(info.value)


def test_eval_new_states_keeps_what_it_can_prove():
    def shared_from_replicated_inputs(scale):
        return {"shared": ep.NonBatchState(jnp.full(3, scale)), "own": jnp.zeros(3)}

    like = ep.eval_new_states(shared_from_replicated_inputs, {"scale": jnp.float32(2)})
    made = ep.pmap2_new_states(shared_from_replicated_inputs, {"scale": jnp.float32(2)})
    for a, b in zip(jax.tree.leaves(like), jax.tree.leaves(made), strict=True):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
