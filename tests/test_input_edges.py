"""Arrays of the user's crossing into the layout (issue 14: items 12, 10, 7 and the
peers' list): each case is a program a user writes, checked against `jax.pmap`,
`eqx.filter_pmap` or a one-device run, or the exact error."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out, N

import eqx_pmapstate as ep


def _apply(m, v):
    return jax.vmap(m)(v)


# --------------------------------------------------------------------------- item 12

MODULE_REFUSED = (
    r"The argument args\[0\] is an `eqx.Module` none of whose arrays is laid out on the "
    r"mesh \(for example args\[0\].weight\). By default it would be split over the "
    r"devices along its first axis"
)


def test_a_model_not_on_the_mesh_is_refused_whatever_the_other_inputs_are():
    fresh = eqx.nn.Linear(2, N, key=jax.random.key(0))  # first axis of weight: N
    batch = np.ones((N, 4, 2), np.float32)  # straight from numpy
    on_mesh = ep.pmap2_new_states(lambda: jnp.ones((4, 2)))
    step = ep.pmap2(_apply)
    with pytest.raises(ValueError, match=MODULE_REFUSED) as alone:
        step(fresh, batch)
    with pytest.raises(ValueError, match=MODULE_REFUSED) as beside:
        step(fresh, on_mesh)
    assert str(alone.value) == str(beside.value)


def test_explicit_in_axes_still_map_or_replicate_a_model():
    key = jax.random.key(0)
    fresh = eqx.nn.Linear(2, 3, key=key)
    stacked = eqx.filter_vmap(lambda k: eqx.nn.Linear(2, 3, key=k))(
        jax.random.split(key, N)
    )
    batch = np.arange(N * 4 * 2, dtype=np.float32).reshape(N, 4, 2)
    got = ep.pmap2(_apply, in_axes=0)(stacked, batch)
    expected = eqx.filter_pmap(_apply, in_axes=0)(stacked, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
    got = ep.pmap2(_apply, in_axes=(None, 0))(fresh, batch)
    expected = jax.pmap(_apply, in_axes=(None, 0))(fresh, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
