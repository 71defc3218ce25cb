"""`abstract` and `relayout`: the layout as a value, and arrays put back into it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out, N

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType


class Model(eqx.Module):
    w: ep.ParamState
    h: ep.ShortTermState
    act: object = jax.nn.relu


def _make():
    return Model(
        ep.ParamState(jnp.full((N,), 8.0)),
        ep.ShortTermState(
            jnp.arange(3.0) + jax.lax.axis_index("devices").astype(float)
        ),
    )


def _model():
    return ep.pmap2_new_states(_make, state_out_axes={None: OfType(ep.ParamState)})


def test_abstract_gives_shapes_dtypes_and_shardings(leaks):
    model = _model()
    spec = ep.abstract(model)
    assert isinstance(spec.w.value, jax.ShapeDtypeStruct)
    assert (
        spec.w.value.shape == (N,) and spec.w.value.sharding == model.w.value.sharding
    )
    assert spec.h.value.sharding == model.h.value.sharding
    assert spec.act is jax.nn.relu


def test_a_restored_model_relaid_out_works_in_a_step(tmp_path, leaks):
    model = _model()
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    restored = eqx.tree_deserialise_leaves(path, model)
    laid = ep.relayout(restored, model)
    assert ep.describe(laid) == ep.describe(model)
    assert_laid_out(laid.w.value, None)
    assert_laid_out(laid.h.value, 0)
    step = ep.pmap2(
        lambda m: jax.lax.pmean(m.w.value.sum() + m.h.value.sum(), "devices")
    )
    assert float(step(laid)) == float(step(model))
    relaid_from_abstract = ep.relayout(restored, ep.abstract(model))
    assert ep.describe(relaid_from_abstract) == ep.describe(model)


def test_relayout_from_host_arrays(leaks):
    model = _model()
    host = jax.tree.map(np.asarray, model)
    laid = ep.relayout(host, model)
    np.testing.assert_array_equal(np.asarray(laid.h.value), np.asarray(model.h.value))
    assert laid.h.value.sharding == model.h.value.sharding


def test_relayout_names_the_leaf_that_does_not_fit():
    model = _model()
    other = eqx.tree_at(lambda m: m.w.value, model, jnp.zeros(N + 1))
    with pytest.raises(
        ValueError, match=r"\.w\.value \(float32\[9\] against float32\[8\]\)"
    ):
        ep.relayout(other, model)


def test_relayout_needs_the_same_structure():
    with pytest.raises(ValueError, match="same structure"):
        ep.relayout({"a": jnp.ones(2)}, {"b": jnp.ones(2)})


def test_relayout_keeps_an_ensembles_member_axes(leaks):
    ensemble = ep.vmap2_new_states(
        lambda: ep.State(jnp.ones(2)), axis_size=3, state_out_axes={1: ...}
    )
    copied = ep.relayout(jax.tree.map(np.asarray, ensemble), ensemble)
    assert ep.describe(copied) == ep.describe(ensemble)
