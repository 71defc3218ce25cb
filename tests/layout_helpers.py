"""Assertions about layouts, shared by the test files."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

N = 8  # the tests force 8 CPU devices


def _spec(x):
    """The PartitionSpec of a global array as a tuple, trailing Nones dropped."""
    spec = list(x.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


def assert_laid_out(x, axis, n=N, name="devices", devices=None):
    """`x` is a global jax.Array on a 1-D mesh `name` of `n` devices, with `name` at
    position `axis` of its spec (None: replicated)."""
    assert isinstance(x, jax.Array)
    s = x.sharding
    assert isinstance(s, NamedSharding)
    assert s.mesh.axis_names == (name,)
    assert s.mesh.devices.shape == (n,)
    if devices is not None:
        assert list(s.mesh.devices.ravel()) == list(devices)
    if axis is None:
        assert _spec(x) == ()
        assert s.is_fully_replicated
    else:
        assert _spec(x) == (None,) * axis + (name,)
        assert x.shape[axis] == n
        assert len(x.addressable_shards) == n


def _idx(name="devices"):
    return jax.lax.axis_index(name).astype(jnp.float32)
