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


class Parts(eqx.Module):
    w: jax.Array
    b: jax.Array | None
    h: jax.Array | None


def _parts(b=None, h=None):
    """A replicated `Parts` whose optional fields are arrays where given."""
    return ep.pmap2_new_states(
        lambda: Parts(
            jnp.ones(3),
            None if b is None else jnp.asarray(b, jnp.float32),
            None if h is None else jnp.asarray(h, jnp.float32),
        ),
        state_out_axes={None: ...},
    )


def _refused(path, like, backend):
    """The message of `load`'s ValueError, `like` left as it was."""
    before = jax.tree.map(np.asarray, like)
    with pytest.raises(ValueError) as e:
        ep.load(path, like, backend=backend)
    jax.tree.map(np.testing.assert_array_equal, like, before)
    return str(e.value)


_REBUILD = "Build `like` with the structure of the tree that was saved"


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_a_saved_leaf_that_is_none_in_like_is_refused(backend, tmp_path):
    ep.save(tmp_path / "ckpt", _parts(b=[7, 7]), backend=backend)
    message = _refused(tmp_path / "ckpt", _parts(), backend)
    assert ".b is an array in the checkpoint but None in `like`" in message
    assert _REBUILD in message


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_a_leaf_of_like_that_was_not_saved_is_refused(backend, tmp_path):
    ep.save(tmp_path / "ckpt", _parts(), backend=backend)
    message = _refused(tmp_path / "ckpt", _parts(b=[0, 0]), backend)
    assert message.startswith(
        "The checkpoint was saved from a tree of another structure than `like`: .b is "
        "an array in `like` but not in the checkpoint. " + _REBUILD
    )


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_a_saved_leaf_is_not_read_into_another_field(backend, tmp_path):
    # Equinox's files are read in order: `b` would have been read into `h`.
    ep.save(tmp_path / "ckpt", _parts(b=[7, 7]), backend=backend)
    message = _refused(tmp_path / "ckpt", _parts(h=[0, 0]), backend)
    assert message.startswith(
        "The checkpoint was saved from a tree of another structure than `like`: .b is "
        "an array in the checkpoint but None in `like`; .h is an array in `like` but "
        "not in the checkpoint. " + _REBUILD
    )


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_a_matching_structure_loads_bitwise(backend, tmp_path, leaks):
    saved = _parts(b=[7.5, -0.0], h=[1e-30, np.inf])
    ep.save(tmp_path / "ckpt", saved, backend=backend)
    if backend == "equinox":
        assert (tmp_path / "ckpt.eqx").is_file()  # named as Equinox names it
    like = _parts(b=[0, 0], h=[0, 0])
    for into in (like, ep.abstract(like)):
        got = ep.load(tmp_path / "ckpt", into, backend=backend)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(saved), strict=True):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
            assert_laid_out(x, None)
    assert np.array_equal(like.b, [0, 0])  # `like` is left as it was


class Reordered(eqx.Module):  # `Parts`'s arrays, its fields in another order
    h: jax.Array
    w: jax.Array


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_arrays_are_read_by_path_not_by_position(backend, tmp_path, leaks):
    ep.save(tmp_path / "ckpt", _parts(h=[7, 7, 7]), backend=backend)
    like = ep.pmap2_new_states(
        lambda: Reordered(jnp.zeros(3), jnp.zeros(3)), state_out_axes={None: ...}
    )
    got = ep.load(tmp_path / "ckpt", like, backend=backend)
    assert np.array_equal(got.h, [7, 7, 7]) and np.array_equal(got.w, [1, 1, 1])


def test_a_file_without_paths_is_checked_by_its_number_of_arrays(tmp_path, leaks):
    # Written by Equinox itself (or by an older `save`): only the arrays, in order.
    eqx.tree_serialise_leaves(tmp_path / "plain.eqx", _parts(b=[7, 7]))
    message = _refused(tmp_path / "plain.eqx", _parts(), "equinox")
    assert message.startswith(
        "The checkpoint holds 2 arrays and `like` 1, so it was saved from a tree of "
        "another structure than `like`."
    )
    assert _REBUILD in message
    got = ep.load(tmp_path / "plain.eqx", _parts(b=[0, 0]), backend="equinox")
    assert np.array_equal(got.b, [7, 7])


def test_an_orbax_checkpoint_without_paths_is_checked_by_its_metadata(tmp_path, leaks):
    # Written by Orbax itself (or by an older `save`): Orbax's metadata names the arrays.
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "plain", eqx.filter(_parts(b=[7, 7]), eqx.is_array))
    checkpointer.wait_until_finished()
    message = _refused(tmp_path / "plain", _parts(h=[0, 0]), "orbax")
    assert (
        ".b is an array in the checkpoint but None in `like`; .h is an array" in message
    )
    got = ep.load(tmp_path / "plain", _parts(b=[0, 0]), backend="orbax")
    assert np.array_equal(got.b, [7, 7])


def test_equinox_reads_the_file_as_before(tmp_path, leaks):
    saved = _parts(b=[7, 7])
    ep.save(tmp_path / "ckpt", saved, backend="equinox")
    got = eqx.tree_deserialise_leaves(tmp_path / "ckpt", _parts(b=[0, 0]))
    assert np.array_equal(got.b, [7, 7]) and np.array_equal(got.w, saved.w)


def _with_empty(key):
    keys = jax.random.split(jax.random.fold_in(key, jax.lax.axis_index("devices")), 0)
    return {
        "w": ep.ParamState(jnp.ones(3, jnp.bfloat16)),
        "empty": ep.ShortTermState(jnp.zeros((0, 2))),
        "empty_bf16": ep.ParamState(jnp.zeros((0,), jnp.bfloat16)),
        "keys": ep.ShortTermState(keys),
    }


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_zero_size_arrays_round_trip(backend, tmp_path, leaks):
    # Orbax writes no zero-size array: they are recorded and made again on loading.
    axes = {None: OfType(ep.ParamState)}
    made = ep.pmap2_new_states(
        _with_empty, {"key": jax.random.key(0)}, state_out_axes=axes
    )
    ep.save(tmp_path / "ckpt", made, backend=backend)
    back = ep.load(tmp_path / "ckpt", made, backend=backend)
    for name in made:
        x, y = made[name].value, back[name].value
        assert x.shape == y.shape and x.dtype == y.dtype
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
    assert back["empty"].value.shape == (N, 0, 2)
    assert np.asarray(jax.random.key_data(back["keys"].value)).shape == (N, 0, 2)
    np.testing.assert_array_equal(
        np.asarray(back["w"].value, np.float32), np.ones(3, np.float32)
    )
    # and into a layout for another number of devices: nothing to choose for them
    four = ep.eval_new_states(
        _with_empty, {"key": jax.random.key(0)}, state_out_axes=axes, axis_size=4
    )
    back4 = ep.load(tmp_path / "ckpt", four, backend=backend)
    assert back4["empty"].value.shape == (4, 0, 2)
    assert_laid_out(back4["empty"].value, 0, n=4)


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_a_bare_array_round_trips(backend, tmp_path, leaks):
    # Orbax writes no bare array: it is written under a name, and read back as given.
    made = ep.pmap2_new_states(
        lambda: ep.ShortTermState(jnp.arange(3.0, dtype=jnp.bfloat16))
    ).value
    ep.save(tmp_path / "ckpt", made, backend=backend)
    back = ep.load(tmp_path / "ckpt", made, backend=backend)
    assert back.dtype == jnp.bfloat16 and back.shape == (N, 3)
    assert_laid_out(back, 0)
    np.testing.assert_array_equal(
        np.asarray(back, np.float32), np.asarray(made, np.float32)
    )
