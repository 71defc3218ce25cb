"""The data-parallel training example against the same training on one device."""

import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_laid_out

import eqx_pmapstate as ep


_path = pathlib.Path(__file__).parents[1] / "examples" / "train_data_parallel.py"
_spec = importlib.util.spec_from_file_location("train_data_parallel", _path)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

STEPS, BATCH, LR = 20, 256, 1e-2


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax mixes Python floats with int32 counters, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _single_device_training(initial_params, static):
    optimizer = optax.adam(LR)
    params = initial_params
    opt_state = optimizer.init(params)
    key_data = jax.random.split(jax.random.key(0))[1]

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(example.loss_fn)(params, static, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(STEPS):
        x, y = example.make_data(jax.random.fold_in(key_data, i), BATCH)
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    return params, losses


def test_data_parallel_training_matches_one_device():
    key_model = jax.random.split(jax.random.key(0))[0]
    initial = example.init(key_model, 8)
    params0, static = eqx.partition(initial, eqx.is_inexact_array)
    params0 = jax.device_put(jax.device_get(params0), jax.devices()[0])

    model, opt_state, losses = example.train(steps=STEPS, batch=BATCH, lr=LR, seed=0)
    ref_params, ref_losses = _single_device_training(params0, static)

    got = eqx.filter(model, eqx.is_inexact_array)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params), strict=True):
        assert a.sharding.spec == jax.sharding.PartitionSpec()  # still replicated
        assert_laid_out(a, None)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    # The per-device state was kept per device across the steps.
    assert model.seen.value.shape == (8,)
    assert_laid_out(model.seen.value, 0)
    np.testing.assert_array_equal(
        np.asarray(model.seen.value), np.full(8, STEPS * BATCH // 8)
    )
    # The optimizer state kept its replicated layout too.
    assert jax.tree.leaves(opt_state)
    for leaf in jax.tree.leaves(opt_state):
        assert leaf.sharding.spec == jax.sharding.PartitionSpec()
        assert_laid_out(leaf, None)


def test_forgetting_the_pmean_raises_naming_a_parameter():
    # Proved at trace time: nothing runs.
    logged = []
    with pytest.raises(
        ep.ReplicationError,
        match=r"(?s)output\[0\]\.mlp\.layers\[\d\]\.(weight|bias).* must come back "
        r"replicated.*pmean",
    ) as info:
        example.train(
            steps=2, average_gradients=False, log=lambda i, _: logged.append(i)
        )
    assert "compared after the call" not in str(info.value)  # not the run-time check
    assert logged == []  # not one step was taken


def test_without_the_check_the_replicas_drift_silently():
    # What `jax.pmap` and `eqx.filter_pmap` do: the parameters labelled replicated differ.
    n = 8
    model = example.init(jax.random.key(1), n)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @ep.pmap2(check_replicated=False)
    def step(model, opt_state, x, y):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        grads = jax.grad(example.loss_fn)(params, static, x, y)  # no pmean
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state

    x, y = example.make_data(jax.random.key(2), 64)
    model, opt_state = step(model, opt_state, x.reshape(n, 8, 4), y.reshape(n, 8))
    w = model.mlp.layers[0].weight
    shards = [np.asarray(s.data) for s in w.addressable_shards]
    assert w.sharding.spec == jax.sharding.PartitionSpec()
    assert_laid_out(w, None)  # labelled replicated ...
    assert not all(np.array_equal(shards[0], s) for s in shards[1:])


def test_example_runs_and_loss_falls(capsys):
    _, _, losses = example.train(steps=60)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert jnp.isfinite(jnp.asarray(losses)).all()
