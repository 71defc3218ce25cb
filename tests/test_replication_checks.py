"""The run-time replication check of the init agrees between the device and batch forms."""

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
