"""A mapped function made and dropped does not live on in a cache."""

import gc
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_laid_out

import eqx_pmapstate as ep


def test_a_dropped_pmap2_function_is_freed():
    f = ep.pmap2(lambda x: x + 1)
    f(np.ones((8, 2), np.float32))
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None


class _Holder(eqx.Module):
    w: jax.Array
    s: ep.State | None = None

    def init_state(self):
        return _Holder(self.w, ep.State(jnp.zeros(2)))


def test_the_compiled_init_keeps_no_array_of_the_call():
    w = jnp.ones(3)
    key = jax.random.key(0)
    ref_w, ref_key = weakref.ref(w), weakref.ref(key)
    out = ep.pmap2_new_states(_Holder(w))
    out2 = ep.pmap2_new_states(lambda key: jax.random.normal(key, (2,)), {"key": key})
    assert out.w is w and out2.shape == (8, 2)
    del w, key, out, out2
    gc.collect()
    assert ref_w() is None and ref_key() is None


def test_an_inline_lambda_filter_does_not_recompile():
    traces = []

    def make():
        traces.append(1)
        return {"a": jnp.zeros(3), "b": jnp.ones(3)}

    def create():  # a fresh lambda on every call
        return ep.pmap2_new_states(
            make, state_out_axes={None: lambda path, state: path[0].key == "a"}
        )

    first = create()
    n = len(traces)
    second = create()
    assert len(traces) == n  # not traced again
    assert first["a"].shape == (3,) and second["b"].shape == (8, 3)
    for out in (first, second):  # both lambdas put the same states in the same places
        assert_laid_out(out["a"], None)
        assert_laid_out(out["b"], 0)
        np.testing.assert_array_equal(np.asarray(out["a"]), np.zeros(3))
        np.testing.assert_array_equal(np.asarray(out["b"]), np.ones((8, 3)))
