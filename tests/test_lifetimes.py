"""A mapped function made and dropped does not live on in a cache."""

import gc
import weakref

import numpy as np

import eqx_pmapstate as ep


def test_a_dropped_pmap2_function_is_freed():
    f = ep.pmap2(lambda x: x + 1)
    f(np.ones((8, 2), np.float32))
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None
