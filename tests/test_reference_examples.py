"""The brainstate reference page's examples, written functionally, with the shapes it
promises; and the places where brainstate's `pmap2_new_states` is wrong and this one is not."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import _none, assert_laid_out, ParallelModel  # example 2's model
from jax.sharding import PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType, PathContains


# --------------------------------------------------------------------------- example 1


class ParallelCounter(eqx.Module):
    count: ep.ShortTermState | None = None

    def init_state(self):
        return eqx.tree_at(
            lambda m: m.count, self, ep.ShortTermState(jnp.array(0)), is_leaf=_none
        )


def test_example_1_basic_parallel_initialization(leaks):
    n = jax.local_device_count()
    module = ParallelCounter()
    module = ep.pmap2_new_states(
        module, init_kwargs={}, axis_size=jax.local_device_count()
    )
    assert module.count.value.shape == (n,)
    assert module.count.value.sharding.spec == P("devices")
    assert_laid_out(module.count.value, 0, n=n)
    np.testing.assert_array_equal(np.asarray(module.count.value), np.zeros(n))
    # brainstate returns {axis: [State, ...]}; here that is states_by_axis
    layout = ep.states_by_axis(module)
    assert list(layout) == [0]
    assert [path for path, _ in layout[0]] == [(jax.tree_util.GetAttrKey("count"),)]
    assert layout[0][0][1] is module.count


# --------------------------------------------------------------------------- example 2


def test_example_2_device_sharded_parameters(leaks):
    model = ParallelModel()
    n_devices = jax.local_device_count()
    model = ep.pmap2_new_states(
        model,
        init_kwargs={"layer_size": 128},
        axis_size=n_devices,
        state_out_axes={0: OfType(ep.ParamState)},
    )
    assert model.weight.value.shape == (n_devices, 128)
    assert model.bias.value.shape == (n_devices, 128)
    for x in (model.weight.value, model.bias.value):
        assert x.sharding.spec == P("devices")
        assert x.sharding.shard_shape(x.shape) == (1, 128)
        assert_laid_out(x, 0, n=n_devices)
    expected = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (128,)))
    for shard in model.weight.value.addressable_shards:
        np.testing.assert_allclose(np.asarray(shard.data)[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(model.bias.value), np.zeros((n_devices, 128))
    )
    layout = ep.states_by_axis(model)
    assert list(layout) == [0]
    assert [type(s) for _, s in layout[0]] == [ep.ParamState, ep.ParamState]
    assert layout[0][0][1] is model.weight and layout[0][1][1] is model.bias


# --------------------------------------------------------------------------- example 3


class MixedParallelModule(eqx.Module):
    local_state: ep.ShortTermState | None = None
    global_config: ep.NonBatchState | None = None

    def init_state(self):
        # sharded state (different on each device), replicated state (same on all devices)
        local_state = ep.ShortTermState(jnp.array(0))
        global_config = ep.NonBatchState(jnp.array([1.0, 2.0, 3.0]))
        return eqx.tree_at(
            lambda m: (m.local_state, m.global_config),
            self,
            (local_state, global_config),
            is_leaf=_none,
        )


def test_example_3_mixed_replicated_and_sharded(leaks):
    module = ep.pmap2_new_states(
        MixedParallelModule(), init_kwargs={}, axis_size=jax.local_device_count()
    )
    assert module.local_state.value.shape == (jax.local_device_count(),)  # sharded
    assert module.global_config.value.shape == (3,)  # replicated (not sharded)
    assert module.local_state.value.sharding.spec == P("devices")
    assert module.global_config.value.sharding.is_fully_replicated
    assert_laid_out(module.local_state.value, 0)
    assert_laid_out(module.global_config.value, None)
    np.testing.assert_array_equal(np.asarray(module.local_state.value), np.zeros(8))
    for shard in module.global_config.value.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), [1.0, 2.0, 3.0])
    layout = ep.states_by_axis(module)
    assert set(layout) == {0, None}
    assert layout[0][0][1] is module.local_state
    assert layout[None][0][1] is module.global_config


# --------------------------------------------------------------------------- where brainstate is wrong


def test_nonbatchstate_exists():
    # brainstate documents `brainstate.NonBatchState` but does not export it.
    assert issubclass(ep.NonBatchState, ep.State)
    assert ep.NonBatchState(jnp.zeros(1)).value.shape == (1,)


def test_varying_nonbatchstate_raises_instead_of_taking_device_0(leaks):
    # brainstate silently keeps device 0's value.
    class M(eqx.Module):
        config: ep.NonBatchState | None = None

        def init_state(self):
            return M(
                ep.NonBatchState(jax.lax.axis_index("devices").astype(jnp.float32))
            )

    with pytest.raises(ValueError, match=r"at \.config\.value are to be replicated"):
        ep.pmap2_new_states(M())


def test_pathcontains_matches(leaks):
    # brainstate calls filters with an empty path: PathContains never matches there.
    class Block(eqx.Module):
        h: ep.ShortTermState | None = None

        def init_state(self):
            return Block(ep.ShortTermState(jnp.zeros(4)))

    class Net(eqx.Module):
        encoder: Block
        decoder: Block

    out = ep.pmap2_new_states(
        Net(Block(), Block()), state_out_axes={None: PathContains("encoder")}
    )
    assert out.encoder.h.value.shape == (4,)
    assert out.encoder.h.value.sharding.is_fully_replicated
    assert_laid_out(out.encoder.h.value, None)
    assert out.decoder.h.value.shape == (8, 4)
    assert_laid_out(out.decoder.h.value, 0)


def test_ambiguous_filters_raise(leaks):
    # brainstate: the first matching filter silently wins.
    with pytest.raises(
        ValueError,
        match=r"at \.weight \(ParamState\) is matched .*`state_out_axes`: 0, 1\.",
    ):
        ep.pmap2_new_states(
            ParallelModel(),
            {"layer_size": 4},
            state_out_axes={0: ep.ParamState, 1: PathContains("weight")},
        )


def test_axis_size_too_large_is_a_clear_error():
    # brainstate: "cannot select an axis to squeeze out..." from inside JAX.
    with pytest.raises(ValueError, match=r"`axis_size=16` is larger .* which is 8\."):
        ep.pmap2_new_states(ParallelCounter(), axis_size=16)


def test_axis_index_works_inside_the_init_no_eager_pass(leaks):
    # brainstate runs the init once eagerly first, where axis_index fails.
    calls = []

    class Ranked(eqx.Module):
        rank: ep.ShortTermState | None = None

        def init_state(self):
            calls.append(1)
            return Ranked(ep.ShortTermState(jax.lax.axis_index("devices")))

    out = ep.pmap2_new_states(Ranked())
    assert_laid_out(out.rank.value, 0)
    np.testing.assert_array_equal(np.asarray(out.rank.value), np.arange(8))
    first = len(calls)
    out = ep.pmap2_new_states(Ranked())  # brainstate recompiles on every call
    assert len(calls) == first
    np.testing.assert_array_equal(np.asarray(out.rank.value), np.arange(8))


def test_negative_axis_gives_the_right_shape(leaks):
    # brainstate inherits jax.pmap's wrong shape for out_axes=-1.
    out = ep.pmap2_new_states(
        ParallelModel(),
        {"layer_size": 5},
        state_out_axes={-1: PathContains("bias"), 0: PathContains("weight")},
    )
    assert out.bias.value.shape == (5, 8)
    assert out.weight.value.shape == (8, 5)
    assert_laid_out(out.bias.value, 1)
    assert_laid_out(out.weight.value, 0)
    np.testing.assert_array_equal(np.asarray(out.bias.value), np.zeros((5, 8)))


def test_the_input_module_is_not_mutated(leaks):
    # brainstate writes the new values into the module it was given.
    m = ParallelModel()
    out = ep.pmap2_new_states(m, {"layer_size": 3})
    assert m.weight is None and m.bias is None
    assert out.weight.value.shape == (8, 3)
    assert out.bias.value.shape == (8, 3)
