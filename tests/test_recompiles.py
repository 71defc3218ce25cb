"""Compiling again: what the cache keys a function by, the warning that says why a
function compiled again, and the fast path bounded by the cache."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_pmapstate as ep
from eqx_pmapstate._cache import MAXSIZE, programs


class TrainState(eqx.Module):
    params: jax.Array


TRACES = []


def read_params_attribute(ts):
    TRACES.append(1)
    return TrainState(ts.params * 2)


def test_an_attribute_named_like_a_rebound_global_does_not_recompile():
    # The script also has a global `params` that the loop rebinds: `ts.params` is an
    # attribute, not a read of that global, so nothing is compiled again.
    global params
    step = ep.pmap2(read_params_attribute)
    split = ep.pmap2(read_params_attribute, in_axes=0)  # a Module off the mesh: say so
    ts = step(split(TrainState(jnp.ones((8, 3)))))  # its layout read, then kept
    TRACES.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing to warn of
        for i in range(4):
            params = jnp.full(3, float(i))  # noqa: F841 (the global of the issue)
            ts = step(ts)
    assert TRACES == []  # traced before the loop only
    np.testing.assert_array_equal(ts.params, np.full((8, 3), 64.0))


LR = 0.1


def scaled_by_the_global_lr(x):
    return x * LR


def test_a_global_rebound_each_call_is_explained_on_the_third_compile():
    global LR
    step = ep.pmap2(scaled_by_the_global_lr)
    x = jnp.ones((8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for LR in (0.1, 0.2):  # two compiles: no warning
            step(x)
    LR = 0.3
    with pytest.warns(ep.RecompileWarning) as caught:
        np.testing.assert_allclose(step(x), 0.3)
    (warning,) = caught
    message = str(warning.message)
    assert message.startswith(
        "`scaled_by_the_global_lr` was traced and compiled again (3 compiles so far)"
    )
    assert "the global `LR` has another value: pass it as an argument" in message
    assert warning.filename == __file__  # points at the call
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per function and thing
        LR = 0.4
        step(x)


def test_many_shapes_are_explained_from_the_tenth_compile():
    # A few shapes are meant (training and evaluation, a last smaller batch); many are
    # a loop over lengths, worth a word.
    step = ep.pmap2(lambda x: x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for width in range(1, 10):
            step(jnp.ones((8, width)))
    with pytest.warns(ep.RecompileWarning) as caught:
        step(jnp.ones((8, 10)))
    assert "(10 compiles so far)" in str(caught[0].message)
    assert (
        "the shape or dtype of args[0] changed (float32[8, 9] -> float32[8, 10]): each "
        "one is a program; pad or bucket to a few shapes"
    ) in str(caught[0].message)


def test_a_static_argument_that_changes_is_explained():
    def scale(x, factor):
        return x * factor

    step = ep.pmap2(scale)
    x = jnp.ones((8, 2))
    step(x, 0.1)
    step(x, 0.2)
    with pytest.warns(ep.RecompileWarning) as caught:
        step(x, 0.3)
    message = str(caught[0].message)
    assert "the value of args[1], a static argument (not an array), changed" in message
    assert "pass it as an array" in message


def test_a_new_closed_over_array_is_explained():
    w = jnp.ones(2)
    step = ep.pmap2(lambda x: x * w)
    x = jnp.ones((8, 2))
    step(x)
    w = jnp.ones(2)  # rebound: a new array, keyed by identity
    step(x)
    w = jnp.full(2, 3.0)
    with pytest.warns(
        ep.RecompileWarning, match="the closed-over `w` is another array"
    ):
        np.testing.assert_array_equal(step(x), 3.0)


def test_clear_caches_starts_the_count_again():
    def triple(x):
        return x * 3

    step = ep.pmap2(triple)
    step(jnp.ones((8, 1)))
    step(jnp.ones((8, 2)))
    ep.clear_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(jnp.ones((8, 3)))


@pytest.mark.filterwarnings("ignore::eqx_pmapstate.RecompileWarning")
def test_the_fast_path_never_outlives_the_cache(monkeypatch):
    # A serving loop with many sequence lengths: the library's cache keeps the newest
    # `maxsize` programs, and the function's own shortcuts point only to those. (The
    # cache is made small here so that the test compiles 60 programs, not 300.)
    ep.clear_caches()
    monkeypatch.setattr(programs, "maxsize", 20)
    step = ep.pmap2(lambda x: x + 1)
    for length in range(1, 61):
        out = step(jnp.zeros((8, length), jnp.int32))
        assert out.shape == (8, length)
    held = {id(v) for v in programs._entries.values()}
    assert len(held) == 20
    assert len(step._fast) == 20
    assert all(id(fast.entry) in held for fast in step._fast.values())
    assert all(id(quick.entry) in held for quick in step._quick.values())
    # The shortcuts still work for the lengths kept, and the others compile again.
    np.testing.assert_array_equal(step(jnp.zeros((8, 60), jnp.int32)), 1)
    np.testing.assert_array_equal(step(jnp.zeros((8, 1), jnp.int32)), 1)
    assert len(step._fast) == 20
    ep.clear_caches()
    assert not step._fast and not step._quick
    assert MAXSIZE == 256  # the default bound


# --------------------------------------------------------------------------- stores


def test_clear_caches_empties_every_store():
    from eqx_pmapstate import _keys, _map, _mesh, _stores
    from eqx_pmapstate._pmap2 import _memo

    assert set(_stores.store_names()) >= {
        "meshes",
        "Map's pmap2 functions",
        "what code objects read and assign",
        "array types",
        "the leaves of returned modules",
    }
    for clear in (ep.clear_caches, jax.clear_caches):
        ep.pmap2(lambda x: x * 2)(jnp.ones((8, 2)))
        returned = ep.pmap2(lambda m: m, in_axes=0)(
            _Scale(ep.ParamState(jnp.ones((8, 2))))
        )
        assert id(returned) in _memo._MEMO
        ep.Map(_Scale(), init_map_size=8, behavior="pmap").init_all_states()(
            jnp.ones((8, 2))
        )
        assert _mesh._meshes and _map._mapped_apply.cache_info().currsize
        assert _keys._names_read.cache_info().currsize
        clear()
        assert not _mesh._meshes
        assert _map._mapped_apply.cache_info().currsize == 0
        assert _keys._names_read.cache_info().currsize == 0
        assert programs.cache_info().currsize == 0
        assert not _memo._MEMO


def test_the_meshes_kept_are_bounded():
    from eqx_pmapstate import _mesh

    ep.clear_caches()
    devices = jax.devices()
    for i in range(_mesh._MESHES_KEPT + 10):  # a new axis name each time
        ep.pmap2(lambda x: x + 1, axis_name=f"axis{i}", devices=devices)
        _mesh.resolve_mesh(None, devices, f"axis{i}")
    assert len(_mesh._meshes) == _mesh._MESHES_KEPT
    newest = _mesh.resolve_mesh(None, devices, f"axis{_mesh._MESHES_KEPT + 9}")[0]
    assert (
        newest is _mesh.resolve_mesh(None, devices, f"axis{_mesh._MESHES_KEPT + 9}")[0]
    )


class _Scale(eqx.Module):
    w: ep.ParamState | None = None

    def init_state(self):
        return _Scale(ep.ParamState(jnp.full(2, 3.0)))

    def __call__(self, x):
        assert self.w is not None
        return x * self.w.value


def test_the_fast_path_sees_a_rebound_global_and_closure():
    global LR
    x = jnp.ones((8, 2))
    step = ep.pmap2(scaled_by_the_global_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ep.RecompileWarning)
        for LR in (0.5, 2.0, 0.5):  # each call through the fast path's guards
            np.testing.assert_allclose(step(x), LR)
    factor = 1.0
    closed = ep.pmap2(lambda x: x * factor)
    np.testing.assert_allclose(closed(x), 1.0)
    factor = 4.0  # the cell is rebound: the guard fails, the right program runs
    np.testing.assert_allclose(closed(x), 4.0)
