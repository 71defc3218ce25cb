"""Checkpoints that restore straight into the layout: `save`, `load`, `eval_new_states`."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_laid_out, N, ours

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType


class Model(eqx.Module):
    linear: eqx.nn.Linear
    seen: ep.ShortTermState
    key: ep.ShortTermState  # per-device PRNG keys


def _make(key):
    k = jax.random.fold_in(key, jax.lax.axis_index("devices"))
    return Model(
        eqx.nn.Linear(3, 2, key=key),
        ep.ShortTermState(jnp.zeros((), jnp.int32) + jax.lax.axis_index("devices")),
        ep.ShortTermState(k),
    )


AXES = {0: OfType(ep.ShortTermState), None: ...}


def _model():
    return ep.pmap2_new_states(_make, {"key": jax.random.key(0)}, state_out_axes=AXES)


@ep.pmap2
def _step(model, x):
    grads = jax.grad(lambda lin: jnp.sum(jax.vmap(lin)(x) ** 2))(model.linear)
    grads = jax.lax.pmean(grads, "devices")
    linear = jax.tree.map(lambda p, g: p - 0.1 * g, model.linear, grads)
    key = jax.random.split(model.key.value)[0]
    return Model(
        linear, ep.ShortTermState(model.seen.value + 1), ep.ShortTermState(key)
    )


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_round_trip_is_bitwise_and_keeps_the_layout(backend, tmp_path, leaks):
    model = _model()
    x = jnp.ones((N, 4, 3))
    model = _step(model, x)
    path = tmp_path / "ckpt"
    ep.save(path, model, backend=backend)
    restored = ep.load(path, model)
    assert ep.describe(restored) == ep.describe(model)
    _same(restored, model)
    # Five more steps from each give the same numbers.
    a, b = model, restored
    for _ in range(5):
        a, b = _step(a, x), _step(b, x)
    _same(a, b)


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_load_into_the_layout_made_without_running_the_init(backend, tmp_path, leaks):
    model = _model()
    ep.save(tmp_path / "ckpt", model, backend=backend)
    like = ep.eval_new_states(_make, {"key": jax.random.key(0)}, state_out_axes=AXES)
    assert isinstance(like.linear.weight, jax.ShapeDtypeStruct)
    assert like.linear.weight.sharding == model.linear.weight.sharding
    restored = ep.load(tmp_path / "ckpt", like)
    assert_laid_out(restored.seen.value, 0)
    assert_laid_out(restored.linear.weight, None)
    _same(restored, model)


def test_eval_new_states_runs_nothing(leaks):
    calls = []

    def make(key):
        calls.append(1)
        return _make(key)

    like = ep.eval_new_states(make, {"key": jax.random.key(0)}, state_out_axes=AXES)
    assert len(calls) == 1  # traced once, never run
    assert like.seen.value.shape == (N,)
    assert like.linear.weight.shape == (2, 3)
    assert like.linear.use_bias is True  # static fields as made


def test_an_optimizer_state_round_trips(tmp_path, leaks):
    model = _model()
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model.linear, eqx.is_inexact_array))
    ep.save(tmp_path / "opt", opt_state)
    _same(ep.load(tmp_path / "opt", opt_state), opt_state)


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_a_checkpoint_for_another_device_count_is_a_clear_error(backend, tmp_path):
    model = _model()
    ep.save(tmp_path / "ckpt", model, backend=backend)
    four = ep.pmap2_new_states(
        _make, {"key": jax.random.key(0)}, state_out_axes=AXES, axis_size=4
    )
    with pytest.raises(ValueError) as e:
        ep.load(tmp_path / "ckpt", four, backend=backend)
    assert str(e.value).startswith(
        "The leaves at .seen.value, .key.value are per device (one entry per device "
        "along their device axis), and the checkpoint was made for another number of "
        "devices: it has 8 entries along their device axis, and `like` 4. Say what each "
        "becomes with `load(..., per_device=...)`: 'first'"
    )


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_a_checkpoint_for_more_devices_loads_by_choice(backend, tmp_path, leaks):
    model = _model()  # seen = device index, per-device keys, replicated linear
    ep.save(tmp_path / "ckpt", model, backend=backend)
    four = ep.eval_new_states(
        _make, {"key": jax.random.key(1)}, state_out_axes=AXES, axis_size=4
    )
    seen = np.arange(N)
    keys = np.asarray(jax.random.key_data(model.key.value))
    for choice, want in [
        ("first", [0] * 4),
        (6, [6] * 4),
        ("leading", [0, 1, 2, 3]),
        (lambda a: a[::2], [0, 2, 4, 6]),
    ]:
        got = ep.load(tmp_path / "ckpt", four, per_device=choice, backend=backend)
        assert np.array_equal(got.seen.value, want)
        assert_laid_out(got.seen.value, 0, n=4)
        assert np.array_equal(got.linear.weight, model.linear.weight)  # exactly
        assert_laid_out(got.linear.weight, None, n=4)
        assert got.key.value.dtype == model.key.value.dtype
        picked = np.asarray(jax.random.key_data(got.key.value))
        assert np.array_equal(picked, keys[np.asarray(want)])
    assert np.array_equal(seen, model.seen.value)  # nothing of the input changed
    with pytest.raises(
        ValueError,
        match=r"averages floating-point leaves only, but the leaf at \.seen\.value is int32",
    ):
        ep.load(tmp_path / "ckpt", four, per_device="mean", backend=backend)
    with pytest.raises(
        ValueError,
        match=r"The `per_device` callable made int32\[2\] \(device axis at 0\) for the leaf at \.seen\.value, but `like` has int32\[4\]",
    ):
        ep.load(tmp_path / "ckpt", four, per_device=lambda a: a[:2], backend=backend)
    ep.save(
        tmp_path / "four",
        ep.load(tmp_path / "ckpt", four, per_device="leading", backend=backend),
        backend=backend,
    )
    with pytest.raises(
        ValueError,
        match=r"keeps the first 8 of the entries of the leaf at \.seen\.value, but the checkpoint has only 4",
    ):
        ep.load(tmp_path / "four", model, per_device="leading", backend=backend)


def test_a_mismatch_other_than_the_device_count_is_named(tmp_path):
    model = _model()
    ep.save(tmp_path / "ckpt", model)
    other = ep.pmap2_new_states(
        lambda key: Model(
            eqx.nn.Linear(4, 2, key=key),
            ep.ShortTermState(jnp.zeros((), jnp.int32)),
            ep.ShortTermState(key),
        ),
        {"key": jax.random.key(0)},
        state_out_axes=AXES,
    )
    with pytest.raises(ValueError) as e:
        ep.load(tmp_path / "ckpt", other, per_device="first")
    assert str(e.value).startswith(
        "The checkpoint does not fit `like`: .linear.weight (float32[2, 3] on disk, "
        "float32[2, 4] in `like`). Load it with a `like` of the tree it was saved from"
    )


def test_the_restored_model_trap_now_works(tmp_path, leaks):
    # A model restored with plain Equinox (single-device arrays) is refused by a step
    # beside laid-out inputs; `load` gives one that works.
    model = _model()
    eqx.tree_serialise_leaves(
        tmp_path / "plain.eqx", eqx.filter(model, eqx.is_inexact_array)
    )
    x = jnp.ones((N, 4, 3))
    restored = ep.load(
        tmp_path / "plain.eqx",
        eqx.filter(model, eqx.is_inexact_array),
        backend="equinox",
    )
    restored = eqx.combine(
        restored, eqx.filter(model, eqx.is_inexact_array, inverse=True)
    )
    _same(_step(restored, x), _step(model, x))


def test_unknown_backend():
    with pytest.raises((ValueError, TypeError)) as e:
        ep.save("x", {}, backend="pickle")  # pyright: ignore[reportArgumentType]  (a deliberate error)
    assert "backend" in str(e.value) and "'pickle'" in str(e.value)
    if ours(e.value):  # (under jaxtyping's import hook, beartype refuses it first)
        assert "'auto', 'orbax' or 'equinox'" in str(e.value)


def test_the_layout_for_more_devices_than_are_here(tmp_path):
    # A user on 8 devices describes a checkpoint made on 16.
    sixteen = ep.eval_new_states(
        _make, {"key": jax.random.key(0)}, state_out_axes=AXES, axis_size=2 * N
    )
    seen = sixteen.seen.value
    assert seen.shape == (2 * N,) and seen.dtype == jnp.int32
    assert isinstance(seen.sharding.mesh, jax.sharding.AbstractMesh)
    assert seen.sharding.mesh.shape == {"devices": 2 * N}
    assert seen.sharding.spec == jax.sharding.PartitionSpec("devices")
    assert sixteen.linear.weight.shape == (2, 3)  # replicated: as on any count
    assert sixteen.linear.weight.sharding.spec == jax.sharding.PartitionSpec()
    # global and per-device shapes
    assert re.search(r"\.seen\.value .* \(16,\) +\(1,\) +int32", ep.describe(sixteen))
    ep.save(tmp_path / "ckpt", _model())
    with pytest.raises(ValueError) as e:
        ep.load(tmp_path / "ckpt", sixteen)
    assert str(e.value).startswith(
        "The leaves at .linear.weight, .linear.bias, .seen.value, .key.value of `like` "
        "are laid out over 16 devices that are not here (`eval_new_states` with an "
        "`axis_size` larger than the 8 local devices)"
    )
    with pytest.raises(ValueError, match="larger than the number of local devices"):
        ep.pmap2_new_states(_make, {"key": jax.random.key(0)}, axis_size=2 * N)
